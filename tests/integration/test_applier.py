"""The applier on real directories with real syscalls (run as root, for chown and mknod).

A small ``Source`` performs each mutation on a source directory with plain OS calls
and records the op the capture layer would send, with the source's post-op mtime.
Applying the recorded ops to a replica must give the same tree: ``snapshot``
compares types, content, modes, owners, file and symlink mtimes, user xattrs,
symlink targets and hard-link groups (directory mtimes are not replicated).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol.ops import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ChmodOp,
    ChownOp,
    CreateOp,
    FallocateOp,
    LinkOp,
    MkdirOp,
    MknodOp,
    NoteOp,
    Op,
    RemovexattrOp,
    RenameOp,
    RmdirOp,
    SetxattrOp,
    SymlinkOp,
    TaskOp,
    TruncateOp,
    UnlinkOp,
    UtimensOp,
    WriteOp,
)
from target_agent import applier as applier_module
from target_agent.applier import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    Applier,
    ApplyError,
)
from target_agent.checkpoint import CheckpointError, CheckpointStore

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mknod)")

T0 = 1_600_000_000_123_456_789  # a fixed mtime with nanoseconds, far from "now"
REG = stat.S_IFREG


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _join(root: Path, rel: bytes) -> bytes:
    return os.path.join(bytes(root), rel)


def snapshot(root: Path) -> dict[bytes, tuple[Any, ...]]:
    """Everything the replica must match, per relative path (never following symlinks)."""
    base = bytes(root)
    entries: dict[bytes, tuple[Any, ...]] = {}
    inodes: dict[int, list[bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, base)
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            common: tuple[Any, ...] = (kind, st.st_uid, st.st_gid)
            if stat.S_ISDIR(st.st_mode):
                entries[rel] = (*common, stat.S_IMODE(st.st_mode), _xattrs(full))
            elif stat.S_ISLNK(st.st_mode):
                entries[rel] = (*common, os.readlink(full), st.st_mtime_ns)
            else:
                content = Path(os.fsdecode(full)).read_bytes() if stat.S_ISREG(st.st_mode) \
                    else None
                entries[rel] = (*common, stat.S_IMODE(st.st_mode), st.st_mtime_ns, content,
                                _xattrs(full))
                inodes.setdefault(st.st_ino, []).append(rel)
    for group in inodes.values():
        for rel in group:
            entries[rel] = (*entries[rel], tuple(sorted(group)))
    return entries


def _xattrs(path: bytes) -> dict[str, bytes]:
    return {n: os.getxattr(path, n, follow_symlinks=False)
            for n in os.listxattr(path, follow_symlinks=False) if n.startswith("user.")}


class Source:
    """Mutate a source tree with plain OS calls and record the op each one is."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ops: list[Op] = []

    def p(self, rel: bytes) -> bytes:
        return _join(self.root, rel)

    def mtime(self, rel: bytes) -> int:
        return os.lstat(self.p(rel)).st_mtime_ns

    def create(self, rel: bytes, mode: int = 0o644, uid: int = 1001, gid: int = 2002) -> None:
        os.close(os.open(self.p(rel), os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))
        os.chown(self.p(rel), uid, gid)
        os.chmod(self.p(rel), mode)
        self.ops.append(CreateOp(rel, REG | mode, uid, gid, self.mtime(rel)))

    def write(self, rel: bytes, offset: int, data: bytes) -> None:
        fd = os.open(self.p(rel), os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
        self.ops.append(WriteOp(rel, offset, data, self.mtime(rel)))

    def truncate(self, rel: bytes, size: int) -> None:
        os.truncate(self.p(rel), size)
        self.ops.append(TruncateOp(rel, size, self.mtime(rel)))

    def fallocate(self, rel: bytes, mode: int, offset: int, length: int) -> None:
        fd = os.open(self.p(rel), os.O_WRONLY)
        try:
            applier_module.fallocate(fd, mode, offset, length)
        finally:
            os.close(fd)
        self.ops.append(FallocateOp(rel, mode, offset, length, self.mtime(rel)))

    def mkdir(self, rel: bytes, mode: int = 0o755, uid: int = 1001, gid: int = 2002) -> None:
        os.mkdir(self.p(rel))
        os.chown(self.p(rel), uid, gid)
        os.chmod(self.p(rel), mode)
        self.ops.append(MkdirOp(rel, stat.S_IFDIR | mode, uid, gid, self.mtime(rel)))

    def mkfifo(self, rel: bytes, mode: int = 0o640, uid: int = 1001, gid: int = 2002) -> None:
        os.mkfifo(self.p(rel))
        os.chown(self.p(rel), uid, gid)
        os.chmod(self.p(rel), mode)
        self.ops.append(MknodOp(rel, stat.S_IFIFO | mode, uid, gid, self.mtime(rel)))

    def symlink(self, rel: bytes, target: bytes, uid: int = 1001, gid: int = 2002) -> None:
        os.symlink(target, self.p(rel))
        os.lchown(self.p(rel), uid, gid)
        self.ops.append(SymlinkOp(rel, target, uid, gid, self.mtime(rel)))

    def unlink(self, rel: bytes) -> None:
        os.unlink(self.p(rel))
        self.ops.append(UnlinkOp(rel))

    def rmdir(self, rel: bytes) -> None:
        os.rmdir(self.p(rel))
        self.ops.append(RmdirOp(rel))

    def rename(self, old: bytes, new: bytes, flags: int = 0) -> None:
        if flags:
            applier_module.renameat2(-100, self.p(old), -100, self.p(new), flags)  # AT_FDCWD
        else:
            os.rename(self.p(old), self.p(new))
        self.ops.append(RenameOp(old, new, flags))

    def link(self, old: bytes, new: bytes) -> None:
        os.link(self.p(old), self.p(new), follow_symlinks=False)
        self.ops.append(LinkOp(old, new))

    def chmod(self, rel: bytes, mode: int) -> None:
        os.chmod(self.p(rel), mode)
        self.ops.append(ChmodOp(rel, mode))

    def chown(self, rel: bytes, uid: int, gid: int) -> None:
        os.chown(self.p(rel), uid, gid, follow_symlinks=False)
        self.ops.append(ChownOp(rel, uid, gid))

    def utimens(self, rel: bytes, atime_ns: int, mtime_ns: int) -> None:
        os.utime(self.p(rel), ns=(atime_ns, mtime_ns), follow_symlinks=False)
        self.ops.append(UtimensOp(rel, atime_ns, mtime_ns))

    def setxattr(self, rel: bytes, name: bytes, value: bytes, flags: int = 0) -> None:
        os.setxattr(self.p(rel), name, value, flags)
        self.ops.append(SetxattrOp(rel, name, value, flags))

    def removexattr(self, rel: bytes, name: bytes) -> None:
        os.removexattr(self.p(rel), name)
        self.ops.append(RemovexattrOp(rel, name))


@pytest.fixture
def src(tmp_path: Path) -> Source:
    return Source(tmp_path / "source")


@pytest.fixture
def dst(tmp_path: Path) -> Path:
    return tmp_path / "replica"


@pytest.fixture
def app(dst: Path) -> Iterator[Applier]:
    with Applier(dst) as a:
        yield a


def replicate(src: Source, app: Applier, dst: Path) -> None:
    for op in src.ops:
        app.apply(op)
    app.sync()
    assert snapshot(dst) == snapshot(src.root)


# -- each op kind --------------------------------------------------------------------


def test_create_write_truncate_replicate(src: Source, app: Applier, dst: Path) -> None:
    src.create(b"f", 0o640, 1234, 5678)
    src.write(b"f", 0, b"hello world")
    src.write(b"f", 6, b"there, you")
    src.truncate(b"f", 9)
    src.truncate(b"f", 20)
    src.create(b"exec", 0o4755)  # set-uid survives the chown that follows creation
    replicate(src, app, dst)
    assert (dst / "f").read_bytes() == b"hello the" + bytes(11)
    assert stat.S_IMODE(os.stat(dst / "exec").st_mode) == 0o4755


def test_created_mode_ignores_umask(app: Applier, dst: Path) -> None:
    app.apply(CreateOp(b"f", REG | 0o777, 0, 0, T0))
    app.apply(MkdirOp(b"d", stat.S_IFDIR | 0o777, 0, 0, T0))
    app.apply(MknodOp(b"p", stat.S_IFIFO | 0o666, 0, 0, T0))
    assert stat.S_IMODE(os.stat(dst / "f").st_mode) == 0o777
    assert stat.S_IMODE(os.stat(dst / "d").st_mode) == 0o777
    assert stat.S_IMODE(os.lstat(dst / "p").st_mode) == 0o666


def test_create_on_an_existing_file_keeps_its_content(app: Applier, dst: Path) -> None:
    app.apply(CreateOp(b"f", REG | 0o644, 1, 2, T0))
    app.apply(WriteOp(b"f", 0, b"data", T0 + 1))
    app.apply(CreateOp(b"f", REG | 0o600, 7, 8, T0 + 2))
    app.sync()
    st = os.stat(dst / "f")
    assert (dst / "f").read_bytes() == b"data"
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 7, 8)


def test_interrupted_entry_ops_complete_on_retry(app: Applier, dst: Path) -> None:
    # As if the agent died between making each entry and setting its attributes.
    os.close(os.open(dst / "f", os.O_CREAT | os.O_WRONLY, 0o600))
    (dst / "d").mkdir(0o700)
    os.mkfifo(dst / "p", 0o600)
    (dst / "l").symlink_to("f")
    app.apply(CreateOp(b"f", REG | 0o4755, 11, 12, T0))
    app.apply(MkdirOp(b"d", stat.S_IFDIR | 0o2775, 13, 14, T0 + 1))
    app.apply(MknodOp(b"p", stat.S_IFIFO | 0o666, 15, 16, T0 + 2))
    app.apply(SymlinkOp(b"l", b"f", 17, 18, T0 + 3))
    app.sync()
    got = {n: os.lstat(dst / n) for n in "fdpl"}
    assert {n: (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)
            for n, st in got.items() if n != "l"} == {
        "f": (0o4755, 11, 12, T0), "d": (0o2775, 13, 14, T0 + 1),
        "p": (0o666, 15, 16, T0 + 2)}
    assert (got["l"].st_uid, got["l"].st_gid, got["l"].st_mtime_ns) == (17, 18, T0 + 3)


def test_entry_ops_keep_other_types_and_hard_linked_entries(app: Applier,
                                                            dst: Path) -> None:
    app.apply(CreateOp(b"f", REG | 0o644, 1, 2, T0))
    app.apply(WriteOp(b"f", 0, b"data", T0 + 1))
    app.apply(LinkOp(b"f", b"f2"))
    app.apply(MkdirOp(b"d", stat.S_IFDIR | 0o755, 1, 2, T0))
    app.apply(SymlinkOp(b"l", b"f", 1, 2, T0))
    app.apply(MknodOp(b"p", stat.S_IFIFO | 0o644, 1, 2, T0))
    app.sync()
    before = snapshot(dst)
    ops: list[Op] = []
    for path in (b"f", b"d", b"l", b"p"):
        if path != b"f":
            ops.append(CreateOp(path, REG | 0o600, 7, 8, T0 + 9))
        if path != b"d":
            ops.append(MkdirOp(path, stat.S_IFDIR | 0o700, 7, 8, T0 + 9))
        if path != b"p":
            ops.append(MknodOp(path, stat.S_IFIFO | 0o600, 7, 8, T0 + 9))
        if path != b"l":
            ops.append(SymlinkOp(path, b"elsewhere", 7, 8, T0 + 9))
    ops.append(CreateOp(b"f", REG | 0o600, 7, 8, T0 + 9))  # f has two links
    for op in ops:
        app.apply(op)
    app.sync()
    assert snapshot(dst) == before


def test_mknod_fifo_and_regular(src: Source, app: Applier, dst: Path) -> None:
    src.mkfifo(b"pipe")
    os.mknod(src.p(b"reg"), REG | 0o600)
    src.ops.append(MknodOp(b"reg", REG | 0o600, 0, 0, src.mtime(b"reg")))
    replicate(src, app, dst)
    app.apply(src.ops[0])  # EEXIST tolerated
    assert stat.S_ISFIFO(os.lstat(dst / "pipe").st_mode)


def test_mknod_of_a_device_is_refused(app: Applier, dst: Path) -> None:
    with pytest.raises(ApplyError) as info:
        app.apply(MknodOp(b"null", stat.S_IFCHR | 0o666, 0, 0, T0))
    assert info.value.permanent
    assert not os.path.lexists(dst / "null")


def test_mkdir_and_rmdir_are_idempotent(src: Source, app: Applier, dst: Path) -> None:
    src.mkdir(b"d", 0o2750, 10, 20)
    src.mkdir(b"d/e", 0o700)
    src.mkdir(b"gone")
    src.rmdir(b"gone")
    replicate(src, app, dst)
    app.apply(MkdirOp(b"d", stat.S_IFDIR | 0o2750, 10, 20, T0))
    app.apply(RmdirOp(b"gone"))
    assert app.tolerated_missing == 1
    assert snapshot(dst) == snapshot(src.root)


def test_unlink_missing_is_tolerated_and_counted(app: Applier, dst: Path) -> None:
    app.apply(UnlinkOp(b"nothing"))
    app.apply(UnlinkOp(b"no/dir/file"))
    assert app.tolerated_missing == 2


def test_ops_on_missing_files_are_tolerated(app: Applier, dst: Path) -> None:
    for op in (WriteOp(b"m", 0, b"x", T0), TruncateOp(b"m", 0, T0),
               FallocateOp(b"m", 0, 0, 10, T0), ChmodOp(b"m", 0o600), ChownOp(b"m", 1, 1),
               UtimensOp(b"m", T0, T0), SetxattrOp(b"m", b"user.a", b"v", 0),
               RemovexattrOp(b"m", b"user.a"), WriteOp(b"no/such/dir/f", 0, b"x", T0)):
        app.apply(op)
    assert app.tolerated_missing == 9
    assert os.listdir(dst) == []


def test_non_utf8_names(src: Source, app: Applier, dst: Path) -> None:
    src.mkdir(b"caf\xe9")
    src.create(b"caf\xe9/\xff\xfe\x80")
    src.write(b"caf\xe9/\xff\xfe\x80", 0, b"bytes")
    src.symlink(b"caf\xe9/l\xe9", b"t\xe9rget")
    src.setxattr(b"caf\xe9/\xff\xfe\x80", b"user.n\xe9", b"\x00\xff")
    replicate(src, app, dst)


def test_sparse_write_keeps_holes(src: Source, app: Applier, dst: Path) -> None:
    src.create(b"sparse")
    src.write(b"sparse", 0, b"head")
    src.write(b"sparse", 32 << 20, b"tail")
    replicate(src, app, dst)
    st = os.stat(dst / "sparse")
    assert st.st_size == (32 << 20) + 4
    assert st.st_blocks * 512 < (1 << 20)
    fd = os.open(dst / "sparse", os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) < 32 << 20
    finally:
        os.close(fd)


def test_fallocate_modes(src: Source, app: Applier, dst: Path) -> None:
    src.create(b"f")
    src.write(b"f", 0, b"x" * 16384)
    src.fallocate(b"f", FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 4096, 8192)
    src.fallocate(b"f", 0, 0, 65536)
    src.fallocate(b"f", FALLOC_FL_KEEP_SIZE, 0, 1 << 20)
    replicate(src, app, dst)
    assert (dst / "f").read_bytes()[4096:4100] == bytes(4)
    assert os.stat(dst / "f").st_size == 65536


def test_fallocate_is_emulated_without_fs_support(src: Source, app: Applier, dst: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    src.create(b"f")
    src.write(b"f", 0, b"x" * 10000)
    src.fallocate(b"f", FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 100, 200)
    src.fallocate(b"f", 0x10, 9000, 2000)  # ZERO_RANGE past the end grows the file
    src.fallocate(b"f", 0, 0, 12000)

    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(applier_module, "fallocate", unsupported)
    replicate(src, app, dst)
    content = (dst / "f").read_bytes()
    assert len(content) == 12000
    assert content[100:300] == bytes(200)
    assert content[9000:] == bytes(3000)


def test_hardlinks(src: Source, app: Applier, dst: Path) -> None:
    src.create(b"a")
    src.write(b"a", 0, b"shared")
    src.mkdir(b"d")
    src.link(b"a", b"d/b")
    src.write(b"d/b", 6, b" inode")
    replicate(src, app, dst)
    assert os.stat(dst / "a").st_ino == os.stat(dst / "d" / "b").st_ino
    app.apply(LinkOp(b"a", b"d/b"))  # replay: the same inode is already there


def test_link_over_another_entry_is_permanent(app: Applier, dst: Path) -> None:
    (dst / "a").write_bytes(b"a")
    (dst / "b").write_bytes(b"b")
    with pytest.raises(ApplyError) as info:
        app.apply(LinkOp(b"a", b"b"))
    assert info.value.permanent
    assert info.value.errno == errno.EEXIST
    assert "link" in str(info.value) and "'b'" in str(info.value)


def test_symlinks(src: Source, app: Applier, dst: Path) -> None:
    src.symlink(b"rel", b"../somewhere/else", 55, 66)
    src.symlink(b"abs", b"/etc/passwd")
    src.utimens(b"abs", T0, T0 + 5)
    replicate(src, app, dst)
    app.apply(src.ops[0])  # EEXIST tolerated
    assert os.readlink(dst / "rel") == "../somewhere/else"


def test_rename_over_existing_file(src: Source, app: Applier, dst: Path) -> None:
    src.create(b"old")
    src.write(b"old", 0, b"new content")
    src.create(b"target")
    src.write(b"target", 0, b"to be replaced")
    src.rename(b"old", b"target")
    src.write(b"target", 0, b"NEW")
    replicate(src, app, dst)
    assert (dst / "target").read_bytes() == b"NEW content"


def test_rename_directory_then_write_below_it(src: Source, app: Applier, dst: Path) -> None:
    src.mkdir(b"d")
    src.mkdir(b"d/sub")
    src.create(b"d/sub/f")
    src.write(b"d/sub/f", 0, b"one")
    src.rename(b"d", b"e")
    src.mkdir(b"d")
    src.create(b"d/sub")
    src.write(b"e/sub/f", 3, b"two")
    src.write(b"d/sub", 0, b"other")
    replicate(src, app, dst)


def test_rename_noreplace(src: Source, app: Applier, dst: Path) -> None:
    src.create(b"a")
    src.create(b"b")
    src.rename(b"a", b"c", RENAME_NOREPLACE)
    replicate(src, app, dst)
    with pytest.raises(ApplyError) as info:
        app.apply(RenameOp(b"b", b"c", RENAME_NOREPLACE))
    assert info.value.permanent and info.value.errno == errno.EEXIST
    assert (dst / "b").exists()


def test_rename_exchange_files_and_directories(src: Source, app: Applier, dst: Path) -> None:
    src.create(b"f1")
    src.write(b"f1", 0, b"one")
    src.create(b"f2")
    src.write(b"f2", 0, b"two")
    src.mkdir(b"d1")
    src.create(b"d1/x")
    src.mkdir(b"d2")
    src.create(b"d2/y")
    src.rename(b"f1", b"f2", RENAME_EXCHANGE)
    src.rename(b"d1", b"d2", RENAME_EXCHANGE)
    src.write(b"f1", 3, b"!")
    src.write(b"d1/y", 0, b"y")  # cached descriptors must follow the exchange
    src.write(b"d2/x", 0, b"x")
    replicate(src, app, dst)
    assert (dst / "f1").read_bytes() == b"two!"


def test_chmod_chown(src: Source, app: Applier, dst: Path) -> None:
    src.create(b"f")
    src.mkdir(b"d")
    src.chmod(b"f", 0o4711)
    src.chmod(b"d", 0o1777)
    src.chown(b"f", 42, -1)
    src.chown(b"d", -1, 43)
    src.symlink(b"l", b"f")
    src.chown(b"l", 44, 45)
    replicate(src, app, dst)
    app.apply(ChmodOp(b"l", 0o600))  # skipped on a symlink, not followed
    assert stat.S_IMODE(os.stat(dst / "f").st_mode) == 0o711  # chown cleared set-uid
    assert stat.S_IMODE(os.stat(dst / "d").st_mode) == 0o1777


def test_xattrs(src: Source, app: Applier, dst: Path) -> None:
    src.create(b"f")
    src.mkdir(b"d")
    src.setxattr(b"f", b"user.one", b"1")
    src.setxattr(b"f", b"user.two", b"\x00" * 1000)
    src.setxattr(b"f", b"user.one", b"uno", os.XATTR_REPLACE)
    src.setxattr(b"d", b"user.dir", b"yes", os.XATTR_CREATE)
    src.removexattr(b"f", b"user.two")
    replicate(src, app, dst)
    for op in src.ops:  # replay: XATTR_CREATE on an existing name, ENODATA on removal
        app.apply(op)
    app.sync()
    assert snapshot(dst) == snapshot(src.root)


def test_utimens_replicates_both_times(src: Source, app: Applier, dst: Path) -> None:
    src.create(b"f")
    src.utimens(b"f", T0 - 7, T0)
    for op in src.ops:
        app.apply(op)
    app.sync()
    st = os.stat(dst / "f")  # before snapshot() reads the file and moves its atime
    assert (st.st_atime_ns, st.st_mtime_ns) == (T0 - 7, T0)
    assert snapshot(dst) == snapshot(src.root)


def test_write_mtime_is_replicated_at_sync(app: Applier, dst: Path) -> None:
    app.apply(CreateOp(b"f", REG | 0o644, 0, 0, T0))
    os.utime(dst / "f", ns=(T0 - 99, T0))
    app.apply(WriteOp(b"f", 0, b"a", T0 + 1))
    app.apply(WriteOp(b"f", 1, b"b", T0 + 2))
    app.apply(TruncateOp(b"f", 1, T0 + 3))
    app.sync()
    st = os.stat(dst / "f")
    assert st.st_mtime_ns == T0 + 3
    assert st.st_atime_ns == T0 - 99  # the atime is kept


def test_utimens_after_write_wins_and_write_after_utimens_wins(app: Applier,
                                                               dst: Path) -> None:
    app.apply(CreateOp(b"f", REG | 0o644, 0, 0, T0))
    app.apply(WriteOp(b"f", 0, b"a", T0 + 1))
    app.apply(UtimensOp(b"f", T0, T0 + 100))
    app.sync()
    assert os.stat(dst / "f").st_mtime_ns == T0 + 100
    app.apply(UtimensOp(b"f", T0, T0 + 200))
    app.apply(WriteOp(b"f", 0, b"b", T0 + 300))
    app.sync()
    assert os.stat(dst / "f").st_mtime_ns == T0 + 300


def test_mtime_follows_the_inode_across_hardlinks(app: Applier, dst: Path) -> None:
    app.apply(CreateOp(b"a", REG | 0o644, 0, 0, T0))
    app.apply(LinkOp(b"a", b"b"))
    app.apply(WriteOp(b"a", 0, b"1", T0 + 1))
    app.apply(WriteOp(b"b", 0, b"2", T0 + 2))
    app.apply(WriteOp(b"a", 0, b"3", T0 + 3))
    app.sync()
    assert os.stat(dst / "b").st_mtime_ns == T0 + 3


def test_mtime_survives_cache_eviction_unlink_and_rename(dst: Path) -> None:
    with Applier(dst, file_cache_size=1) as app:
        for name in (b"a", b"b", b"c", b"keep"):
            app.apply(CreateOp(name, REG | 0o644, 0, 0, T0))
        app.apply(LinkOp(b"c", b"c2"))
        app.apply(WriteOp(b"a", 0, b"a", T0 + 1))
        app.apply(WriteOp(b"b", 0, b"b", T0 + 2))  # evicts a
        app.apply(WriteOp(b"c", 0, b"c", T0 + 3))
        app.apply(UnlinkOp(b"c"))  # c2 keeps the inode and its mtime
        app.apply(WriteOp(b"keep", 0, b"k", T0 + 4))
        app.apply(RenameOp(b"keep", b"kept", 0))
        app.sync()
        assert os.stat(dst / "a").st_mtime_ns == T0 + 1
        assert os.stat(dst / "b").st_mtime_ns == T0 + 2
        assert os.stat(dst / "c2").st_mtime_ns == T0 + 3
        assert os.stat(dst / "kept").st_mtime_ns == T0 + 4
        assert (dst / "c2").read_bytes() == b"c"


def test_entry_ops_set_owner_and_mtime(src: Source, app: Applier, dst: Path) -> None:
    src.create(b"f", 0o600, 1111, 2222)
    src.mkdir(b"d", 0o750, 3333, 4444)
    src.symlink(b"l", b"f", 5555, 6666)
    src.mkfifo(b"p", 0o600, 7777, 8888)
    replicate(src, app, dst)
    assert os.lstat(dst / "l").st_uid == 5555
    assert os.lstat(dst / "p").st_gid == 8888
    assert os.stat(dst / "d").st_mtime_ns == src.ops[1].mtime_ns  # type: ignore[attr-defined]


def test_task_and_note_ops_do_nothing(app: Applier, dst: Path) -> None:
    app.apply(TaskOp("t1", 1, "snap", ["a"], "execute", 0.0))
    app.apply(NoteOp("mirror required"))
    assert os.listdir(dst) == []


def test_needs_checkpoint() -> None:
    assert Applier.needs_checkpoint(RenameOp(b"a", b"b", 0))
    assert Applier.needs_checkpoint(LinkOp(b"a", b"b"))
    assert not Applier.needs_checkpoint(WriteOp(b"a", 0, b"", 0))
    assert not Applier.needs_checkpoint(UnlinkOp(b"a"))


# -- durability bookkeeping ----------------------------------------------------------


def test_sync_fsyncs_each_touched_inode_once(app: Applier, dst: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    app.apply(MkdirOp(b"d", stat.S_IFDIR | 0o755, 0, 0, T0))
    app.apply(CreateOp(b"d/a", REG | 0o644, 0, 0, T0))
    app.apply(LinkOp(b"d/a", b"d/b"))
    app.sync()
    synced: list[tuple[int, int]] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        synced.append((st.st_dev, st.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    app.sync()
    assert synced == []  # nothing touched since the last sync
    for i in range(5):
        app.apply(WriteOp(b"d/a", i, b"x", T0))
        app.apply(WriteOp(b"d/b", i + 10, b"y", T0))
    app.apply(ChmodOp(b"d/a", 0o600))
    app.apply(CreateOp(b"c", REG | 0o644, 0, 0, T0))
    app.apply(MkdirOp(b"d/e", stat.S_IFDIR | 0o755, 0, 0, T0))
    app.sync()
    expected = {(os.stat(p).st_dev, os.stat(p).st_ino)
                for p in (dst / "d" / "a", dst / "c", dst, dst / "d", dst / "d" / "e")}
    assert sorted(synced) == sorted(expected)
    # Unlinking a written name: the data still matters while another link holds the
    # inode, and not once the last link is gone.
    synced.clear()
    app.apply(WriteOp(b"d/b", 0, b"z", T0))
    app.apply(UnlinkOp(b"d/b"))
    app.apply(WriteOp(b"c", 0, b"gone", T0))
    app.apply(UnlinkOp(b"c"))
    app.sync()
    expected = {(os.stat(p).st_dev, os.stat(p).st_ino) for p in (dst / "d" / "a", dst, dst / "d")}
    assert sorted(synced) == sorted(expected)
    assert (dst / "d" / "a").read_bytes()[:1] == b"z"


def test_failed_fsync_is_permanent(app: Applier, monkeypatch: pytest.MonkeyPatch) -> None:
    app.apply(CreateOp(b"f", REG | 0o644, 0, 0, T0))
    app.apply(WriteOp(b"f", 0, b"x", T0))

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(ApplyError) as info:
        app.sync()
    assert info.value.permanent and info.value.errno == errno.EIO


def test_descriptors_stay_bounded_and_are_released(dst: Path) -> None:
    before = _open_fds()
    app = Applier(dst, file_cache_size=3, dir_cache_size=4, sync_fd_limit=5)
    for i in range(30):
        d = f"d{i}".encode()
        app.apply(MkdirOp(d, stat.S_IFDIR | 0o755, 0, 0, T0))
        app.apply(CreateOp(d + b"/f", REG | 0o644, 0, 0, T0))
        app.apply(WriteOp(d + b"/f", 0, d, T0 + i))
        assert _open_fds() - before <= 3 + 5 + 5 + 2 + 1
    app.sync()
    assert all((dst / f"d{i}" / "f").read_bytes() == f"d{i}".encode() for i in range(30))
    assert os.stat(dst / "d29" / "f").st_mtime_ns == T0 + 29
    app.close()
    app.close()
    assert _open_fds() == before


# -- errors --------------------------------------------------------------------------


def test_transient_errors_are_retryable(app: Applier, dst: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    app.apply(CreateOp(b"f", REG | 0o644, 0, 0, T0))
    real_pwrite = os.pwrite

    def full(fd: int, data: Any, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    op = WriteOp(b"f", 0, b"data", T0)
    with pytest.raises(ApplyError) as info:
        app.apply(op)
    assert not info.value.permanent and info.value.errno == errno.ENOSPC
    assert "write" in str(info.value) and "'f'" in str(info.value)
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    app.apply(op)  # the retry succeeds
    assert (dst / "f").read_bytes() == b"data"


def test_other_errors_are_permanent(app: Applier, dst: Path) -> None:
    (dst / "d").mkdir()
    (dst / "d" / "x").write_bytes(b"")
    cases: list[tuple[Op, int]] = [
        (RmdirOp(b"d"), errno.ENOTEMPTY),
        (UnlinkOp(b"d"), errno.EISDIR),
        (WriteOp(b"d", 0, b"x", T0), errno.EISDIR),
        (TruncateOp(b"d", 0, T0), errno.EISDIR),
        (MkdirOp(b"d/x/y", stat.S_IFDIR | 0o755, 0, 0, T0), errno.ENOTDIR),
    ]
    for op, code in cases:
        with pytest.raises(ApplyError) as info:
            app.apply(op)
        assert info.value.permanent, op
        if op.kind != "mkdir":  # a non-directory in the middle is an unsafe path
            assert info.value.errno == code, op
        assert op.kind in str(info.value)


# -- hostile replica contents ----------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    out.mkdir()
    (out / "x").write_bytes(b"precious")
    os.setxattr(out / "x", "user.keep", b"1")
    os.utime(out / "x", ns=(T0, T0))
    os.utime(out, ns=(T0, T0))
    return out


def _outside_state(out: Path) -> tuple[Any, ...]:
    st = os.stat(out)
    return (snapshot(out), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
            _xattrs(bytes(out)))


def test_symlink_to_outside_directory_is_never_followed(app: Applier, dst: Path,
                                                        outside: Path) -> None:
    (dst / "evil").symlink_to(outside)
    before = _outside_state(outside)
    through = [
        WriteOp(b"evil/x", 0, b"PWNED", T0), TruncateOp(b"evil/x", 0, T0),
        FallocateOp(b"evil/x", 0, 0, 1 << 20, T0),
        CreateOp(b"evil/new", REG | 0o644, 0, 0, T0),
        MknodOp(b"evil/fifo", stat.S_IFIFO | 0o644, 0, 0, T0),
        MkdirOp(b"evil/d", stat.S_IFDIR | 0o755, 0, 0, T0),
        SymlinkOp(b"evil/l", b"/etc", 0, 0, T0), UnlinkOp(b"evil/x"), RmdirOp(b"evil/x"),
        ChmodOp(b"evil/x", 0o777), ChownOp(b"evil/x", 99, 99), UtimensOp(b"evil/x", 1, 1),
        SetxattrOp(b"evil/x", b"user.pwn", b"1", 0), RemovexattrOp(b"evil/x", b"user.keep"),
        RenameOp(b"evil/x", b"stolen", 0), RenameOp(b"bait", b"evil/bait", 0),
        LinkOp(b"evil/x", b"stolen"),
    ]
    (dst / "bait").write_bytes(b"bait")
    for op in through:
        with pytest.raises(ApplyError) as info:
            app.apply(op)
        assert info.value.permanent, op
        assert "symlink" in str(info.value), op
    on_link = [
        WriteOp(b"evil", 0, b"PWNED", T0), TruncateOp(b"evil", 0, T0),
        FallocateOp(b"evil", 0, 0, 4096, T0),
    ]
    for op in on_link:
        with pytest.raises(ApplyError) as info:
            app.apply(op)
        assert info.value.permanent, op
    # These act on the link itself (or skip it), never on what it points to.
    app.apply(CreateOp(b"evil", REG | 0o777, 99, 99, T0))
    app.apply(MkdirOp(b"evil", stat.S_IFDIR | 0o777, 99, 99, T0))
    app.apply(ChmodOp(b"evil", 0o777))
    app.apply(SetxattrOp(b"evil", b"user.pwn", b"1", 0))
    app.apply(RemovexattrOp(b"evil", b"user.keep"))
    app.apply(ChownOp(b"evil", 99, 99))
    app.apply(UtimensOp(b"evil", 5, 5))
    app.sync()
    assert _outside_state(outside) == before
    assert os.lstat(dst / "evil").st_uid == 99
    assert (dst / "bait").read_bytes() == b"bait"
    app.apply(UnlinkOp(b"evil"))
    assert not os.path.lexists(dst / "evil")
    assert _outside_state(outside) == before


def test_symlink_to_outside_file_is_never_followed(app: Applier, dst: Path,
                                                   outside: Path) -> None:
    (dst / "evilf").symlink_to(outside / "x")
    before = _outside_state(outside)
    for op in (WriteOp(b"evilf", 0, b"PWNED", T0), TruncateOp(b"evilf", 0, T0),
               FallocateOp(b"evilf", 0x02 | 0x01, 0, 4, T0)):
        with pytest.raises(ApplyError) as info:
            app.apply(op)
        assert info.value.permanent
    app.apply(CreateOp(b"evilf", REG | 0o777, 99, 99, T0))
    app.apply(ChmodOp(b"evilf", 0o777))
    app.apply(SetxattrOp(b"evilf", b"user.pwn", b"1", 0))
    app.apply(UtimensOp(b"evilf", 1, 1))
    app.apply(LinkOp(b"evilf", b"hard"))  # hard-links the symlink itself
    app.apply(RenameOp(b"evilf", b"moved", 0))
    app.sync()
    assert os.readlink(dst / "hard") == str(outside / "x")
    assert _outside_state(outside) == before


@pytest.mark.timeout(10)
def test_planted_fifo_and_device_are_not_opened(app: Applier, dst: Path) -> None:
    os.mkfifo(dst / "fifo")
    os.mknod(dst / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    # A reader, so that wrongly opening the FIFO for writing succeeds (and is seen)
    # instead of blocking.
    reader = os.open(dst / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    try:
        for name in (b"fifo", b"null"):
            for op in (WriteOp(name, 0, b"x", T0), TruncateOp(name, 0, T0)):
                with pytest.raises(ApplyError) as info:
                    app.apply(op)  # must neither open the FIFO nor the device
                assert info.value.permanent
            app.apply(CreateOp(name, REG | 0o644, 0, 0, T0))  # kept as it is
        assert os.read(reader, 10) == b""  # nothing was written into it
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.lstat(dst / "fifo").st_mode)
    assert stat.S_ISCHR(os.lstat(dst / "null").st_mode)


@pytest.mark.parametrize("path", [b"", b"/etc/passwd", b"..", b"../outside/x", b"a/../../x",
                                  b"a\0b", b"./x", b"a//b"])
def test_unsafe_paths_are_rejected(app: Applier, dst: Path, path: bytes) -> None:
    (dst / "a").mkdir()
    for op in (WriteOp(path, 0, b"x", T0), CreateOp(path, REG | 0o644, 0, 0, T0),
               UnlinkOp(path), RenameOp(b"a", path, 0), RenameOp(path, b"b", 0),
               LinkOp(path, b"b"), SetxattrOp(path, b"user.a", b"", 0)):
        with pytest.raises(ApplyError) as info:
            app.apply(op)
        assert info.value.permanent and info.value.errno is None
        assert "unsafe path" in str(info.value)
    assert sorted(os.listdir(dst)) == ["a"]


# -- replay after a crash ------------------------------------------------------------


def _replay_source(src: Source) -> None:
    src.mkdir(b"d")
    src.create(b"d/f", 0o600)
    src.write(b"d/f", 0, b"first version of f")
    src.setxattr(b"d/f", b"user.tag", b"v1")
    src.truncate(b"d/f", 5)
    src.write(b"d/f", 8, b"tail")
    src.create(b"tmp")
    src.write(b"tmp", 0, b"scratch")
    src.unlink(b"tmp")
    src.create(b"tmp")
    src.write(b"tmp", 0, b"again")
    src.mkdir(b"d/sub")
    src.create(b"d/sub/g")
    src.write(b"d/sub/g", 0, b"g")
    src.unlink(b"d/sub/g")
    src.rmdir(b"d/sub")
    src.link(b"tmp", b"d/tmp-link")
    src.write(b"d/tmp-link", 0, b"AGAIN")
    src.chmod(b"d/f", 0o640)
    src.chown(b"d/f", 4242, -1)
    src.setxattr(b"d/f", b"user.tag", b"v2")
    src.removexattr(b"d/f", b"user.tag")
    src.symlink(b"l", b"d/f")
    src.mkdir(b"caf\xe9")
    src.create(b"caf\xe9/\xff")
    src.write(b"caf\xe9/\xff", 0, b"x" * 5000)
    src.rename(b"caf\xe9/\xff", b"moved", RENAME_NOREPLACE)
    src.truncate(b"moved", 100)
    src.utimens(b"moved", T0, T0 + 1)
    src.create(b"over")
    src.write(b"over", 0, b"will replace tmp")
    src.rename(b"over", b"tmp")
    src.write(b"tmp", 0, b"W")
    src.rmdir(b"caf\xe9")
    src.unlink(b"d/tmp-link")
    src.mkdir(b"caf\xe9", 0o700)


def test_replay_from_any_checkpoint_reaches_the_source_state(
        src: Source, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Crash after op c with the durable checkpoint at k, restart, replay ops k.. to the end.

    The caller checkpoints right before and right after every rename and link (see
    the applier's module docstring), so a replay never re-applies one, except alone:
    when the crash fell between applying it and the checkpoint after it.
    The crash is simulated (nothing is lost from the page cache), so fsync is made a
    no-op here: it is the state replay reaches that is under test, not durability.
    """
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    _replay_source(src)
    ops = src.ops
    expected = snapshot(src.root)
    scenarios = 0
    for crash in range(1, len(ops) + 1):
        # Every checkpoint for a crash at the end; a fixed spread of them otherwise
        # (start of stream, middle, and the last few ops), to stay fast.
        ckpts = range(crash) if crash == len(ops) else sorted(
            {0, crash // 3, crash // 2, *range(max(0, crash - 4), crash)})
        for ckpt in ckpts:
            window = ops[ckpt:crash]
            if any(op.CHECKPOINT_AFTER for op in window) and len(window) > 1:
                continue
            scenarios += 1
            replica = tmp_path / f"r-{crash}-{ckpt}"
            store = CheckpointStore(tmp_path / f"state-{crash}-{ckpt}.json")
            with Applier(replica) as app:
                for seq, op in enumerate(ops[:crash], start=1):
                    app.apply(op)
                    if seq == ckpt:
                        app.sync()
                        store.save({"applied_seq": seq})
            # crash: the rest of the applied ops are on disk but not checkpointed
            with Applier(replica) as app:
                resume = store.load().get("applied_seq", 0)
                assert resume == ckpt
                for op in ops[resume:]:
                    app.apply(op)
                app.sync()
            assert snapshot(replica) == expected, (crash, ckpt)
            shutil.rmtree(replica)
    assert scenarios > 120


# -- checkpoint store ----------------------------------------------------------------


def test_checkpoint_missing_file_is_empty(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path / "none.json").load() == {}


def test_checkpoint_roundtrip_replaces_atomically(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "state" / "c.json")
    store.save({"applied_seq": 1, "node": "n1"})
    store.save({"applied_seq": 2, "node": "n1"})
    assert store.load() == {"applied_seq": 2, "node": "n1"}
    assert CheckpointStore(str(tmp_path / "state" / "c.json")).load()["applied_seq"] == 2
    assert os.listdir(tmp_path / "state") == ["c.json"]


def test_checkpoint_unserialisable_state_keeps_the_old_one(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "c.json")
    store.save({"applied_seq": 1})
    with pytest.raises(TypeError):
        store.save({"applied_seq": b"bytes"})
    with pytest.raises(ValueError):
        store.save({"applied_seq": float("nan")})
    assert store.load() == {"applied_seq": 1}


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]", b"\xff\xfe", b"42"])
def test_checkpoint_corrupt_file_names_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "c.json"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(path)):
        CheckpointStore(path).load()
