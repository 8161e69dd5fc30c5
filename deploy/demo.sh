#!/usr/bin/env bash
# make demo: a source and a target agent on this host replicating a sample directory.
# Everything lives under ./demo-run and is cleaned up at the end (also on failure).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin="$here/.venv/bin"
run="$here/demo-run"
port=${MIRRORLINE_DEMO_PORT:-17100}

cleanup() {
    set +e
    [ -n "${src_pid:-}" ] && kill -TERM "$src_pid" 2>/dev/null && wait "$src_pid" 2>/dev/null
    [ -n "${tgt_pid:-}" ] && kill -TERM "$tgt_pid" 2>/dev/null && wait "$tgt_pid" 2>/dev/null
    mountpoint -q "$run/data" 2>/dev/null && fusermount3 -u -z "$run/data"
    rm -rf "$run"
}
trap cleanup EXIT

rm -rf "$run"
mkdir -p "$run/keys" "$run/data" "$run/tasks.d" "$run/snapshots"
"$bin/mirrorline" keygen "$run/keys/src1.key" >/dev/null
cp "$here/deploy/tasks/snapshot" "$run/tasks.d/snapshot" && chmod 755 "$run/tasks.d/snapshot"
# Data that was there before protection: the automatic mirror brings it over.
mkdir -p "$run/data/old"
for i in $(seq 1 20); do echo "pre-existing $i" >"$run/data/old/file-$i"; done

cat >"$run/target.toml" <<TOML
node = "tgt1"
listen = "127.0.0.1:$port"
state_dir = "$run/target-state"
control_socket = "$run/target.sock"
task_dir = "$run/tasks.d"
[[source]]
node = "src1"
key_file = "$run/keys/src1.key"
root = "$run/replica/src1"
TOML

cat >"$run/source.toml" <<TOML
node = "src1"
state_dir = "$run/source-state"
control_socket = "$run/source.sock"
task_dir = "$run/tasks.d"
[[volume]]
name = "data"
path = "$run/data"
[[connection]]
id = 1
volume = "data"
target = "127.0.0.1:$port"
target_path = "data"
key_file = "$run/keys/src1.key"
TOML

echo "== starting the target and the source agents (logs in $run/*.log)"
"$bin/mirrorline-target" --config "$run/target.toml" >"$run/target.log" 2>&1 & tgt_pid=$!
"$bin/mirrorline-source" --config "$run/source.toml" >"$run/source.log" 2>&1 & src_pid=$!
for _ in $(seq 100); do
    MIRRORLINE_SOCKET="$run/source.sock" "$bin/mirrorline" status >/dev/null 2>&1 && \
        mountpoint -q "$run/data" && break
    sleep 0.1
done
mountpoint -q "$run/data" || { echo "source agent did not mount $run/data"; cat "$run/source.log"; exit 1; }
export MIRRORLINE_SOCKET="$run/source.sock"

echo "== writing a sample tree through the protected directory $run/data"
mkdir -p "$run/data/docs" "$run/data/db"
for i in $(seq 1 50); do echo "document $i" >"$run/data/docs/doc-$i.txt"; done
head -c 4194304 /dev/urandom >"$run/data/db/table.dat"
ln -s docs/doc-1.txt "$run/data/latest"
mv "$run/data/docs/doc-50.txt" "$run/data/docs/archived.txt"
setfattr -n user.owner -v demo "$run/data/db/table.dat" 2>/dev/null || true

echo "== a point-in-time snapshot on the target, inline with the data (task command processing)"
"$bin/mirrorline" queuetask 1 snapshot "$run/snapshots" after-sample --wait --timeout 60
echo "more data after the task" >"$run/data/docs/after-the-snapshot.txt"
echo "== mirrorline wait queue 1"
"$bin/mirrorline" wait queue 1 --timeout 30
for _ in $(seq 100); do
    "$bin/mirrorline" --json status | grep -q '"mirror_required":false' && break
    sleep 0.2
done
echo "== mirrorline verify 1 --wait"
"$bin/mirrorline" verify 1 --wait --timeout 60
echo "== mirrorline tasks"
"$bin/mirrorline" tasks
echo "== mirrorline status"
"$bin/mirrorline" status
echo "== mirrorline --socket target.sock status"
"$bin/mirrorline" --socket "$run/target.sock" status
echo "== comparing source and replica"
if diff -r "$run/data" "$run/replica/src1/data"; then
    echo "replica is identical to the source"
else
    echo "replica differs"; exit 1
fi
if [ -e "$run/snapshots/after-sample/docs/after-the-snapshot.txt" ] || \
   [ ! -e "$run/snapshots/after-sample/db/table.dat" ]; then
    echo "the snapshot is not the state at the task's point"; exit 1
fi
echo "snapshot $run/snapshots/after-sample holds exactly the state at the task's point"
echo "== stopping (SIGTERM: flush the journal, unmount)"
