#!/usr/bin/env bash
# Install Mirrorline from this source tree on a systemd host. Safe to run again: it
# upgrades the installed package in place and never overwrites an existing config.
#
#   deploy/install.sh [--prefix DIR] [--bindir DIR] [--confdir DIR] [--unitdir DIR]
#                     [--datadir DIR] [--destdir DIR] [--python PYTHON] [--no-apt]
#
# --destdir DIR (or DESTDIR=DIR): stage everything under DIR, for packaging or a
# test, as `make install DESTDIR=` does: paths inside the files (unit ExecStart=, the
# command symlinks) are the final ones, no apt-get and no systemctl. The venv is built
# in DIR too (venvs are not relocatable: build it where it will run to use it).
# MIRRORLINE_INSTALL_SKIP_VENV=1 skips step 2 (no venv, no pip: the tests use it).
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
#   6. bash and zsh completions under DATADIR (default /usr/local/share);
#   7. systemctl daemon-reload when systemd is running.
# It enables and starts nothing.
set -euo pipefail

prefix=/opt/mirrorline
bindir=/usr/local/bin
confdir=/etc/mirrorline
unitdir=/etc/systemd/system
python=${PYTHON:-python3}
datadir=/usr/local/share
destdir=${DESTDIR:-}
use_apt=1
scripts=(mirrorline mirrorline-source mirrorline-target)

usage() { sed -n '2,28s/^# \{0,1\}//p' "$0"; }
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
        --datadir) datadir=${2:?--datadir needs a directory}; shift 2 ;;
        --datadir=*) datadir=${1#*=}; shift ;;
        --destdir) destdir=${2:?--destdir needs a directory}; shift 2 ;;
        --destdir=*) destdir=${1#*=}; shift ;;
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
if [ -n "$destdir" ]; then
    case "$destdir" in /*) ;; *) destdir="$(pwd)/$destdir" ;; esac
    destdir=${destdir%/}
    use_apt=0
fi
# $D...: where files are written; the plain paths are what the installed files name.
Dvenv=$destdir$venv Dbindir=$destdir$bindir Dunitdir=$destdir$unitdir
Dconfdir=$destdir$confdir Ddatadir=$destdir$datadir

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
if [ "${MIRRORLINE_INSTALL_SKIP_VENV:-0}" = 1 ]; then
    echo "== MIRRORLINE_INSTALL_SKIP_VENV=1: not creating $Dvenv"
else
    "$python" - <<'PY' || die "$python is too old: Python >= 3.11 is needed (--python)"
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY
    if [ ! -x "$Dvenv/bin/python" ]; then
        echo "== creating $Dvenv"
        mkdir -p "$(dirname "$Dvenv")"
        "$python" -m venv "$Dvenv" \
            || die "could not create $Dvenv (on Debian: apt-get install python3-venv)"
    fi
    echo "== installing mirrorline[fuse,zstd] from $src into $Dvenv"
    "$Dvenv/bin/python" -m pip install -q --disable-pip-version-check "${src}[fuse,zstd]"
    # Same version number, newer code: make sure the tree's code is what gets installed.
    "$Dvenv/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall \
        --no-deps "$src"
    for s in "${scripts[@]}"; do
        [ -x "$Dvenv/bin/$s" ] || die "$Dvenv/bin/$s was not installed"
    done
fi

# -- 3. commands ------------------------------------------------------------------------
install -d -m 0755 "$destdir$prefix"
mkdir -p "$Dbindir"
for s in "${scripts[@]}"; do
    ln -sfn "$venv/bin/$s" "$Dbindir/$s"
done
echo "== linked ${scripts[*]} into $Dbindir"

# -- 4. units ---------------------------------------------------------------------------
mkdir -p "$Dunitdir"
for role in source target; do
    unit="mirrorline-$role.service"
    # The units run /usr/local/bin/mirrorline-* with /etc/mirrorline/*.toml: follow a
    # different --bindir or --confdir.
    sed -e "s#/usr/local/bin/#$bindir/#g" -e "s#/etc/mirrorline/#$confdir/#g" \
        "$src/deploy/$unit" >"$Dunitdir/$unit.tmp"
    chmod 0644 "$Dunitdir/$unit.tmp"
    mv -f "$Dunitdir/$unit.tmp" "$Dunitdir/$unit"
done
echo "== installed units into $Dunitdir"

# -- 5. configuration -------------------------------------------------------------------
install -d -m 0755 "$Dconfdir" "$Dconfdir/tasks.d"
install -d -m 0700 "$Dconfdir/keys"
for role in source target; do
    example="$Dconfdir/$role.toml.example"
    [ -e "$example" ] || install -m 0644 "$src/deploy/$role.toml.example" "$example"
done
echo "== $Dconfdir ready (examples: $Dconfdir/*.toml.example)"

# -- 6. shell completions -----------------------------------------------------------------
bashdir=$Ddatadir/bash-completion/completions
zshdir=$Ddatadir/zsh/site-functions
install -d -m 0755 "$bashdir" "$zshdir"
install -m 0644 "$src/deploy/completions/mirrorline.bash" "$bashdir/mirrorline"
# bash-completion loads completions by command name: the agents share the file.
for s in mirrorline-source mirrorline-target; do ln -sfn mirrorline "$bashdir/$s"; done
install -m 0644 "$src/deploy/completions/_mirrorline" "$zshdir/_mirrorline"
echo "== installed bash and zsh completions under $Ddatadir"

# -- 7. systemd ---------------------------------------------------------------------------
if [ -z "$destdir" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload
    echo "== systemctl daemon-reload done"
fi

cat <<EOF

Next steps${destdir:+ (once $destdir is copied to /)}:
  mirrorline keygen $confdir/keys/src1.key          # copy the same file to the other host
  cp $confdir/source.toml.example $confdir/source.toml   # on the source; edit it
  cp $confdir/target.toml.example $confdir/target.toml   # on the target; edit it, and the
                                                    # unit's ReadWritePaths= (replica roots)
  mirrorline-source --config $confdir/source.toml --check-config   # 0 = valid
  systemctl enable --now mirrorline-source          # or mirrorline-target
EOF
