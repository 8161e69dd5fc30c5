"""Batched file checks (CHECK_FILES) and whole-file ops, on real directories.

Both sides compute ``file_state`` the same way; the target's ``check`` answers a
batch with the indices of missing and differing files. ``file_ops`` must rebuild
a file exactly (data, holes, size, mode, owner, mtime, user xattrs) whatever was at
its path on the other side.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.checks import (
    BATCH_FILE_BYTES,
    BLOCK_SIZE,
    CHECK_FILES,
    block_hashes,
    state_digest,
    xattr_digest,
)
from protocol.ops import CHECK_DIFFERENT, CheckOp, Op, PrepareOp, TruncateOp, WriteOp
from protocol.runtime.entries import entry_ops, fd_xattr_items, file_state, xattr_items
from target_agent.applier import Applier
from target_agent.checker import check
from target_agent.pathguard import PathGuard

T0 = 1_600_000_000_123_456_789


def _xattrs_ok(path: Path) -> bool:
    try:
        os.setxattr(path, "user.probe", b"1")
        os.removexattr(path, "user.probe")
        return True
    except OSError:
        return False


def _file(path: Path, data: bytes, mtime: int = T0, mode: int = 0o640) -> None:
    path.write_bytes(data)
    os.chmod(path, mode)
    os.utime(path, ns=(T0, mtime))


@contextlib.contextmanager
def _dirfd(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    src, dst = tmp_path / "src" / "d", tmp_path / "dst" / "d"
    for root in (src, dst):
        root.mkdir(parents=True)
        for i in range(5):
            _file(root / f"f{i}", b"x" * (i * 1000))
    return src, dst


def _batch(src: Path, names: list[bytes], content: bool) -> CheckOp:
    digests = []
    with _dirfd(src) as fd:
        for name in names:
            found = file_state(fd, name, content, BATCH_FILE_BYTES)
            assert not isinstance(found, str)
            digests.append(found[1])
    flags = CHECK_FILES | (0 if content else CHECK_DIFFERENT)
    return CheckOp("job", b"d", "dir", [0, 0, 0, 0, 0], b"", b"", 0, BLOCK_SIZE, digests,
                   names, b"", b"", flags)


def _answer(dst_root: Path, op: CheckOp) -> list[list[int]]:
    with PathGuard(dst_root) as guard:
        result = check(guard, op)
    files: list[list[int]] = result["files"]
    return files


NAMES = [b"f0", b"f1", b"f2", b"f3", b"f4"]


@pytest.mark.parametrize("content", [True, False])
def test_batch_same(trees: tuple[Path, Path], content: bool) -> None:
    src, dst = trees
    assert _answer(dst.parent, _batch(src, NAMES, content)) == [[], []]


@pytest.mark.parametrize("content", [True, False])
def test_batch_differences(trees: tuple[Path, Path], content: bool) -> None:
    src, dst = trees
    (dst / "f1").unlink()
    _file(dst / "f2", b"y" * 2000)              # same size and mtime, other bytes
    _file(dst / "f3", b"x" * 3000, mtime=T0 + 1)
    os.chmod(dst / "f4", 0o600)
    answer = _answer(dst.parent, _batch(src, NAMES, content))
    assert answer[0] == [1]
    assert answer[1] == ([2, 3, 4] if content else [3, 4])


def test_batch_types_and_missing_dir(trees: tuple[Path, Path]) -> None:
    src, dst = trees
    (dst / "f0").unlink()
    os.symlink("f1", dst / "f0")                # never followed
    (dst / "f1").unlink()
    (dst / "f1").mkdir()
    assert _answer(dst.parent, _batch(src, NAMES, True)) == [[], [0, 1]]
    for name in NAMES:
        target = dst / os.fsdecode(name)
        target.rmdir() if target.is_dir() and not target.is_symlink() else target.unlink()
    dst.rmdir()
    assert _answer(dst.parent, _batch(src, NAMES, True)) == [[0, 1, 2, 3, 4], []]


def test_batch_xattrs(trees: tuple[Path, Path]) -> None:
    src, dst = trees
    if not _xattrs_ok(src / "f1"):
        pytest.skip("no user xattrs here")
    os.setxattr(src / "f1", "user.a", b"1")
    for content in (True, False):
        assert _answer(dst.parent, _batch(src, NAMES, content)) == [[], [1]]
    os.setxattr(dst / "f1", "user.a", b"1")
    for content in (True, False):
        assert _answer(dst.parent, _batch(src, NAMES, content)) == [[], []]


def test_file_state_kinds(tmp_path: Path) -> None:
    _file(tmp_path / "big", b"z" * (BATCH_FILE_BYTES + 1))
    os.symlink("big", tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    with _dirfd(tmp_path) as fd:
        assert file_state(fd, b"nothing", True, BATCH_FILE_BYTES) == "missing"
        assert file_state(fd, b"nothing", False, BATCH_FILE_BYTES) == "missing"
        for content in (True, False):
            assert file_state(fd, b"link", content, BATCH_FILE_BYTES) == "other"
            assert file_state(fd, b"fifo", content, BATCH_FILE_BYTES) == "other"
        assert file_state(fd, b"big", True, BATCH_FILE_BYTES) == "large"
        found = file_state(fd, b"big", False, BATCH_FILE_BYTES)   # no content: any size
        assert not isinstance(found, str) and found[0].st_size == BATCH_FILE_BYTES + 1


def test_digests() -> None:
    st = os.stat(__file__)
    empty = xattr_digest([])
    assert state_digest(st, empty, b"a") != state_digest(st, empty, b"b")
    assert xattr_digest([(b"user.a", b"1")]) != empty
    assert xattr_digest([(b"user.a", b"1"), (b"user.b", b"")]) == \
        xattr_digest([(b"user.b", b""), (b"user.a", b"1")])
    data = os.urandom(3 * BLOCK_SIZE + 5)
    hashes = block_hashes(data)
    assert len(hashes) == 4 and block_hashes(data[:BLOCK_SIZE]) == hashes[:1]
    assert block_hashes(b"") == []


def test_xattr_items_paths(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    _file(tmp_path / "sub" / "f", b"1")
    if not _xattrs_ok(tmp_path / "sub" / "f"):
        pytest.skip("no user xattrs here")
    os.setxattr(tmp_path / "sub" / "f", "user.k", b"v")
    with _dirfd(tmp_path) as fd:
        assert xattr_items(fd, b"sub/f", "file") == [(b"user.k", b"v")]
        assert xattr_items(fd, b"sub/none", "file") == []
    f = os.open(tmp_path / "sub" / "f", os.O_RDONLY)
    try:
        assert fd_xattr_items(f) == [(b"user.k", b"v")]
    finally:
        os.close(f)


def _ops(base: Path, path: bytes) -> list[Op]:
    with _dirfd(base) as fd:
        return list(entry_ops(fd, path))


def _state(path: Path) -> tuple[object, ...]:
    st = os.lstat(path)
    with _dirfd(path.parent) as fd:
        xattrs = sorted(xattr_items(fd, path.name.encode(), "file"))
    return (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
            st.st_size, st.st_mtime_ns, path.read_bytes(), xattrs)


@pytest.mark.parametrize("there", ["nothing", "file", "dir", "symlink"])
def test_file_ops_rebuild(tmp_path: Path, there: str) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    data = os.urandom(100_000)
    _file(src / "f", data, mode=0o604)
    if _xattrs_ok(src / "f"):
        os.setxattr(src / "f", "user.keep", b"1")
    if there == "file":
        _file(dst / "f", b"old" * 100_000, mode=0o777)
        if _xattrs_ok(dst / "f"):
            os.setxattr(dst / "f", "user.stale", b"1")
    elif there == "dir":
        (dst / "f").mkdir()
        (dst / "f" / "inner").write_bytes(b"1")
    elif there == "symlink":
        os.symlink("elsewhere", dst / "f")
    ops = _ops(src, b"f")
    assert isinstance(ops[0], PrepareOp) and ops[0].entry == "none"
    assert not any(isinstance(op, TruncateOp) for op in ops)   # no hole, no change
    with Applier(dst) as applier:
        for op in ops:
            applier.apply(op)
        applier.sync()
    assert _state(dst / "f") == _state(src / "f")


def test_file_ops_trailing_hole_and_empty(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    with open(src / "sparse", "wb") as f:
        f.write(b"head")
        f.truncate(5 * 1024 * 1024)
    os.utime(src / "sparse", ns=(T0, T0))
    _file(src / "empty", b"")
    sparse = _ops(src, b"sparse")
    assert any(isinstance(op, TruncateOp) for op in sparse)
    assert sum(len(op.data) for op in sparse if isinstance(op, WriteOp)) < 1024 * 1024
    empty = _ops(src, b"empty")
    assert not any(isinstance(op, (TruncateOp, WriteOp)) for op in empty)
    with Applier(dst) as applier:
        for op in sparse + empty:
            applier.apply(op)
        applier.sync()
    for name in ("sparse", "empty"):
        assert _state(dst / name) == _state(src / name)
