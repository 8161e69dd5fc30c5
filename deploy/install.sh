#!/usr/bin/env bash
# Install Mirrorline from this source tree on a systemd host. Safe to run again: it
# upgrades the installed package in place and never overwrites an existing config.
#
#   deploy/install.sh [--prefix DIR] [--bindir DIR] [--confdir DIR] [--unitdir DIR]
#                     [--python PYTHON] [--no-apt]
#
# What it does:
#   1. FUSE system packages (fuse3, libfuse3-dev, pkg-config, gcc) with apt-get when
#      missing and running as root (pyfuse3 builds against libfuse3); --no-apt skips it;
#   2. a virtualenv in PREFIX/venv (default /opt/mirrorline/venv) holding mirrorline with
#      the fuse extra;
#   3. symlinks mirrorline, mirrorline-source, mirrorline-target into BINDIR
#      (default /usr/local/bin), where the units expect them;
#   4. the systemd units into UNITDIR (default /etc/systemd/system);
#   5. CONFDIR (default /etc/mirrorline) with keys/ (0700), tasks.d/ and the example
#      configs (only those that are absent); the live configs are left to you;
#   6. systemctl daemon-reload when systemd is running.
# It enables and starts nothing.
set -euo pipefail

prefix=/opt/mirrorline
bindir=/usr/local/bin
confdir=/etc/mirrorline
unitdir=/etc/systemd/system
python=${PYTHON:-python3}
use_apt=1
scripts=(mirrorline mirrorline-source mirrorline-target)

usage() { sed -n '2,20s/^# \{0,1\}//p' "$0"; }
die() { echo "install.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
        --prefix=*) prefix=${1#*=}; shift ;;
        --bindir) bindir=${2:?--bindir needs a directory}; shift 2 ;;
        --bindir=*) bindir=${1#*=}; shift ;;
        --confdir) confdir=${2:?--confdir needs a directory}; shift 2 ;;
        --confdir=*) confdir=${1#*=}; shift ;;
        --unitdir) unitdir=${2:?--unitdir needs a directory}; shift 2 ;;
        --unitdir=*) unitdir=${1#*=}; shift ;;
        --python) python=${2:?--python needs an interpreter}; shift 2 ;;
        --python=*) python=${1#*=}; shift ;;
        --no-apt) use_apt=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

src=$(cd "$(dirname "$0")/.." && pwd)
[ -f "$src/pyproject.toml" ] || die "$src does not look like the mirrorline source tree"
case "$prefix" in /*) ;; *) prefix="$(pwd)/$prefix" ;; esac
venv="$prefix/venv"

# -- 1. system packages ---------------------------------------------------------------
need_apt=()
command -v fusermount3 >/dev/null 2>&1 || need_apt+=(fuse3)
{ command -v pkg-config >/dev/null 2>&1 && pkg-config --exists fuse3; } \
    || need_apt+=(libfuse3-dev pkg-config)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$use_apt" = 1 ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "== installing ${need_apt[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq </dev/null
        apt-get install -y -qq "${need_apt[@]}" </dev/null
    else
        echo "install.sh: warning: missing ${need_apt[*]}; pyfuse3 may fail to build" >&2
    fi
fi

# -- 2. virtualenv ----------------------------------------------------------------------
"$python" - <<'PY' || die "$python is too old: Python >= 3.11 is needed (--python)"
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY
if [ ! -x "$venv/bin/python" ]; then
    echo "== creating $venv"
    mkdir -p "$prefix"
    "$python" -m venv "$venv" \
        || die "could not create $venv (on Debian: apt-get install python3-venv)"
fi
echo "== installing mirrorline[fuse] from $src into $venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "$src[fuse]"
# Same version number, newer code: make sure the tree's code is what gets installed.
"$venv/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall \
    --no-deps "$src"

# -- 3. commands ------------------------------------------------------------------------
mkdir -p "$bindir"
for s in "${scripts[@]}"; do
    [ -x "$venv/bin/$s" ] || die "$venv/bin/$s was not installed"
    ln -sfn "$venv/bin/$s" "$bindir/$s"
done
echo "== linked ${scripts[*]} into $bindir"

# -- 4. units ---------------------------------------------------------------------------
mkdir -p "$unitdir"
for role in source target; do
    unit="mirrorline-$role.service"
    # The units run /usr/local/bin/mirrorline-* with /etc/mirrorline/*.toml: follow a
    # different --bindir or --confdir.
    sed -e "s#/usr/local/bin/#$bindir/#g" -e "s#/etc/mirrorline/#$confdir/#g" \
        "$src/deploy/$unit" >"$unitdir/$unit.tmp"
    chmod 0644 "$unitdir/$unit.tmp"
    mv -f "$unitdir/$unit.tmp" "$unitdir/$unit"
done
echo "== installed units into $unitdir"

# -- 5. configuration -------------------------------------------------------------------
install -d -m 0755 "$confdir" "$confdir/tasks.d"
install -d -m 0700 "$confdir/keys"
for role in source target; do
    example="$confdir/$role.toml.example"
    [ -e "$example" ] || install -m 0644 "$src/deploy/$role.toml.example" "$example"
done
echo "== $confdir ready (examples: $confdir/*.toml.example)"

# -- 6. systemd ---------------------------------------------------------------------------
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload
    echo "== systemctl daemon-reload done"
fi

cat <<EOF

Next steps:
  mirrorline keygen $confdir/keys/src1.key          # copy the same file to the other host
  cp $confdir/source.toml.example $confdir/source.toml   # on the source; edit it
  cp $confdir/target.toml.example $confdir/target.toml   # on the target; edit it, and the
                                                    # unit's ReadWritePaths= (replica roots)
  systemctl enable --now mirrorline-source          # or mirrorline-target
EOF
