"""The capture mount: real syscalls through a real FUSE mount, recorded in order.

pyfuse3 serves one mount per process, so the mount runs in a child process
(``source_agent.capture_probe``) that logs every recorded op to a msgpack file.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from protocol.ops import RENAME_EXCHANGE, RENAME_NOREPLACE, Op, op_from_wire

pytestmark = [pytest.mark.fuse, pytest.mark.system, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20


def _is_capture_mount(path: Path) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            mount_point = fields[4].replace("\\040", " ")
            if mount_point == str(path) and fields[sep + 1] == "fuse.mirrorline":
                return True
    return False


def _renameat2(old: Path, new: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Probe:
    """The capture_probe child process serving a mount over ``directory``."""

    def __init__(self, directory: Path, log: Path) -> None:
        self.directory = directory
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "source_agent.capture_probe", str(self.directory),
             str(self.log)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not _is_capture_mount(self.directory):
            if self.proc.poll() is not None:
                out = self.proc.stdout.read() if self.proc.stdout else b""
                pytest.fail(f"capture probe exited with {self.proc.returncode}: {out!r}")
            if time.monotonic() > deadline:
                pytest.fail("capture mount did not appear within 20 s")
            time.sleep(0.02)
        os.stat(self.directory)  # answered only once the FUSE INIT exchange is done

    def stop(self) -> None:
        """SIGTERM the probe; it must unmount and exit 0."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=20)
        assert self.proc.returncode == 0, out
        assert not _is_capture_mount(self.directory)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if _is_capture_mount(self.directory):
            subprocess.run(["fusermount3", "-u", "-z", str(self.directory)], check=False)

    def records(self) -> list[list[Any]]:
        with open(self.log, "rb") as f:
            return list(msgpack.Unpacker(f, raw=False))


def _ops(records: list[list[Any]]) -> list[tuple[int, Op]]:
    return [(rec[1], op_from_wire(rec[2])) for rec in records if rec[0] == "op"]


@pytest.fixture
def workdir(require_fuse: None) -> Iterator[Path]:
    # Not under tmp_path: other uids must be able to reach the mount (pytest's
    # base directory is 0700).
    base = Path(tempfile.mkdtemp(prefix="mirrorline-capture-"))
    base.chmod(0o755)
    old_umask = os.umask(0o022)
    try:
        yield base
    finally:
        os.umask(old_umask)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def probe(workdir: Path) -> Iterator[Probe]:
    volume = workdir / "vol"
    volume.mkdir()
    probe = Probe(volume, workdir / "ops.log")
    yield probe
    probe.kill()


def _user_xattrs_supported(directory: Path) -> bool:
    scratch = directory / ".xattr-probe"
    scratch.write_bytes(b"")
    try:
        os.setxattr(scratch, "user.mirrorline", b"1")
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise
    finally:
        scratch.unlink()


def test_every_mutation_is_recorded_in_order(probe: Probe) -> None:
    vol = probe.directory
    (vol / "existing").write_bytes(b"old contents")
    xattrs = _user_xattrs_supported(vol)
    probe.start()

    # -- through the mount ---------------------------------------------------------
    f = vol / "f"
    fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    assert os.write(fd, b"hello") == 5
    os.pwrite(fd, b"tail", MIB)                  # leaves a hole from 5 to 1 MiB
    os.pwrite(fd, b"mid", 64 * 1024)             # in the hole
    os.fsync(fd)
    os.ftruncate(fd, MIB + 2)                    # cuts "tail" to "ta"
    os.close(fd)

    with open(f, "rb") as reader:                 # reads see the writes
        data = reader.read()
        assert data[:5] == b"hello"
        assert data[64 * 1024:64 * 1024 + 3] == b"mid"
        assert data[-2:] == b"ta" and len(data) == MIB + 2
        with mmap.mmap(reader.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            assert mapped[:5] == b"hello" and mapped[MIB:] == b"ta"

    odd_name = b"caf\xe9-\xff.bin"                # not UTF-8
    os.close(os.open(os.fsencode(vol) + b"/" + odd_name,
                     os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    os.mkfifo(vol / "fifo", 0o640)
    os.mkdir(vol / "d", 0o750)
    inner = os.open(vol / "d" / "inner", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.close(inner)
    with pytest.raises(OSError) as not_empty:
        os.rmdir(vol / "d")                       # fails: records nothing
    assert not_empty.value.errno == errno.ENOTEMPTY
    os.unlink(vol / "d" / "inner")
    os.rmdir(vol / "d")

    a = os.open(vol / "a", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.write(a, b"new contents")
    os.close(a)
    os.rename(vol / "a", vol / "existing")        # over an existing file
    for name, body in ((b"x", b"X"), (b"y", b"Y")):
        xy = os.open(vol / name.decode(), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.write(xy, body)
        os.close(xy)
    _renameat2(vol / "x", vol / "y", RENAME_EXCHANGE)
    with pytest.raises(OSError) as exists:
        _renameat2(vol / "x", vol / "y", RENAME_NOREPLACE)   # fails: records nothing
    assert exists.value.errno == errno.EEXIST
    os.link(f, vol / "f2")
    os.symlink("f", vol / "sl")
    os.chmod(f, 0o600)
    os.chown(f, 1234, -1)
    atime, mtime = 1_600_000_000_123_456_789, 1_500_000_000_987_654_321
    os.utime(f, ns=(atime, mtime))
    if xattrs:
        os.setxattr(f, "user.mirrorline", b"v1")
        assert os.getxattr(f, "user.mirrorline") == b"v1"
        assert "user.mirrorline" in os.listxattr(f)
        os.removexattr(f, "user.mirrorline")
    assert os.stat(f).st_mtime_ns == mtime        # attributes through the mount are right

    probe.stop()

    # -- the recorded ops ----------------------------------------------------------
    records = probe.records()
    ops = _ops(records)
    seqs = [seq for seq, _ in ops]
    assert seqs == list(range(1, len(ops) + 1))   # strictly increasing, gap-free
    got = [(op.kind, *op.paths()) for _, op in ops]
    expected: list[tuple[Any, ...]] = [
        ("create", b"f"), ("write", b"f"), ("write", b"f"), ("write", b"f"),
        ("truncate", b"f"),
        ("create", odd_name), ("mknod", b"fifo"), ("mkdir", b"d"),
        ("create", b"d/inner"), ("unlink", b"d/inner"), ("rmdir", b"d"),
        ("create", b"a"), ("write", b"a"), ("rename", b"a", b"existing"),
        ("create", b"x"), ("write", b"x"), ("create", b"y"), ("write", b"y"),
        ("rename", b"x", b"y"),
        ("link", b"f", b"f2"), ("symlink", b"sl"),
        ("chmod", b"f"), ("chown", b"f"), ("utimens", b"f"),
    ]
    if xattrs:
        expected += [("setxattr", b"f"), ("removexattr", b"f")]
    assert got == expected

    by_index = [op for _, op in ops]
    create_f, w0, w1, w2, trunc = (op.to_wire() for op in by_index[:5])
    assert create_f[2:5] == [0o644, 0, 0]
    assert (w0[2], w0[3]) == (0, b"hello")
    assert (w1[2], w1[3]) == (MIB, b"tail")
    assert (w2[2], w2[3]) == (64 * 1024, b"mid")
    assert trunc[2] == MIB + 2
    assert ["sync", 4] in records                 # fsync made the journal durable to op 4
    assert by_index[6].to_wire()[2] == stat.S_IFIFO | 0o640
    assert by_index[7].to_wire()[2] == 0o750
    assert by_index[18].to_wire()[3] == RENAME_EXCHANGE
    assert by_index[13].to_wire()[3] == 0
    assert by_index[20].to_wire()[2] == b"f"      # symlink target
    assert by_index[21].to_wire()[2] == 0o600
    assert by_index[22].to_wire()[2:] == [1234, -1]
    assert by_index[23].to_wire()[2:] == [atime, mtime]
    # Every content or entry op carries the entry's mtime after the op.
    # Every content or entry op carries the entry's mtime after the op: within
    # the test's run, except the one utimens set explicitly.
    for op in by_index[:23]:
        if hasattr(op, "mtime_ns"):
            assert abs(op.mtime_ns - time.time_ns()) < 600 * 10**9, op
    if xattrs:
        assert by_index[24].to_wire()[2:] == [b"user.mirrorline", b"v1", 0]

    # -- the backing directory, after unmount ---------------------------------------
    st = os.lstat(f)
    assert st.st_size == MIB + 2
    assert st.st_blocks * 512 < MIB               # the hole stayed a hole
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 1234
    assert (st.st_atime_ns, st.st_mtime_ns) == (atime, mtime)
    assert st.st_nlink == 2 and os.lstat(vol / "f2").st_ino == st.st_ino
    content = f.read_bytes()
    assert content[:5] == b"hello" and content[64 * 1024:64 * 1024 + 3] == b"mid"
    assert content[5:64 * 1024] == bytes(64 * 1024 - 5) and content[-2:] == b"ta"
    assert odd_name in os.listdir(os.fsencode(vol))
    assert stat.S_ISFIFO(os.lstat(vol / "fifo").st_mode)
    assert stat.S_IMODE(os.lstat(vol / "fifo").st_mode) == 0o640
    assert not (vol / "d").exists() and not (vol / "a").exists()
    assert (vol / "existing").read_bytes() == b"new contents"
    assert (vol / "x").read_bytes() == b"Y" and (vol / "y").read_bytes() == b"X"
    assert os.readlink(vol / "sl") == "f"
    if xattrs:
        assert "user.mirrorline" not in os.listxattr(f)


def test_entries_made_by_another_user_belong_to_that_user(probe: Probe) -> None:
    vol = probe.directory
    vol.chmod(0o777)
    probe.start()
    pid = os.fork()
    if pid == 0:  # child: become uid 1234 / gid 2345, make three entries, exit
        status = 1
        try:
            os.setgroups([])
            os.setresgid(2345, 2345, 2345)
            os.setresuid(1234, 1234, 1234)
            fd = os.open(vol / "mine", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
            os.write(fd, b"by 1234")
            os.close(fd)
            os.mkdir(vol / "mydir", 0o750)
            os.symlink("mine", vol / "mylink")
            status = 0
        finally:
            os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    probe.stop()

    ops = [op.to_wire() for _, op in _ops(probe.records())]
    kinds = [wire[0] for wire in ops]
    assert kinds == [3, 1, 5, 10]                 # create, write, mkdir, symlink
    create, _, mkdir, symlink = ops
    assert create[1:5] == [b"mine", 0o640, 1234, 2345]
    assert mkdir[1:5] == [b"mydir", 0o750, 1234, 2345]
    assert symlink[1:5] == [b"mylink", b"mine", 1234, 2345]
    for name in ("mine", "mydir", "mylink"):
        st = os.lstat(vol / name)
        assert (st.st_uid, st.st_gid) == (1234, 2345), name
    assert (vol / "mine").read_bytes() == b"by 1234"
