"""PathGuard on real directories: resolution, refusal of unsafe paths, the descriptor cache."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from target_agent.pathguard import PathError, PathGuard


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _same_inode(fd: int, path: Path) -> bool:
    a, b = os.fstat(fd), os.lstat(path)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "replica"


@pytest.fixture
def guard(root: Path) -> Iterator[PathGuard]:
    with PathGuard(root) as g:
        yield g


def test_root_is_created_with_parents(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "replica"
    with PathGuard(bytes(root)) as g:
        assert root.is_dir()
        assert _same_inode(g.root_fd, root)


def test_top_level_name_resolves_to_root(guard: PathGuard, root: Path) -> None:
    fd, name = guard.open_parent(b"file")
    assert fd == guard.root_fd
    assert name == b"file"


def test_nested_path_resolves_to_its_parent(guard: PathGuard, root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    fd, name = guard.open_parent(b"a/b/c")
    assert name == b"c"
    assert _same_inode(fd, root / "a" / "b")


def test_non_utf8_components(guard: PathGuard, root: Path) -> None:
    d = os.path.join(bytes(root), b"caf\xe9", b"\xff\xfe")
    os.makedirs(d)
    fd, name = guard.open_parent(b"caf\xe9/\xff\xfe/n\x80me")
    assert name == b"n\x80me"
    assert _same_inode(fd, Path(os.fsdecode(d)))


@pytest.mark.parametrize(
    "path",
    [b"", b"/etc/passwd", b"/", b"..", b"../x", b"a/../../x", b"a/..", b".", b"./a",
     b"a/./b", b"a//b", b"a/", b"a\0b", b"x" * 256, b"a/" * 2100 + b"b"],
)
def test_lexically_unsafe_paths_are_refused(guard: PathGuard, root: Path, path: bytes) -> None:
    (root / "a").mkdir()
    with pytest.raises(PathError) as info:
        guard.open_parent(path)
    assert info.value.path == path


def test_non_bytes_path_is_refused(guard: PathGuard) -> None:
    with pytest.raises(PathError):
        guard.open_parent("a/b")  # type: ignore[arg-type]


def test_symlink_to_outside_is_refused(guard: PathGuard, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "evil").symlink_to(outside)
    with pytest.raises(PathError) as info:
        guard.open_parent(b"evil/x")
    assert "symlink" in info.value.reason
    assert "evil" in str(info.value)


def test_symlink_to_inside_directory_is_refused_too(guard: PathGuard, root: Path) -> None:
    (root / "real").mkdir()
    (root / "link").symlink_to("real")
    (root / "real" / "deeper").mkdir()
    with pytest.raises(PathError, match="symlink"):
        guard.open_parent(b"link/x")
    with pytest.raises(PathError, match="symlink"):
        guard.open_parent(b"link/deeper/x")


def test_symlink_deep_in_the_path_is_refused(guard: PathGuard, root: Path,
                                             tmp_path: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "c").symlink_to(tmp_path)
    guard.open_parent(b"a/b/x")  # caches a and a/b: the cached walk must still check c
    with pytest.raises(PathError, match="symlink"):
        guard.open_parent(b"a/b/c/d/e")


def test_file_in_the_middle_is_refused(guard: PathGuard, root: Path) -> None:
    (root / "f").write_bytes(b"")
    with pytest.raises(PathError, match="non-directory"):
        guard.open_parent(b"f/x")


def test_missing_intermediate_directory_is_enoent(guard: PathGuard) -> None:
    with pytest.raises(FileNotFoundError) as info:
        guard.open_parent(b"missing/x")
    assert info.value.errno == errno.ENOENT


def test_final_component_is_not_resolved(guard: PathGuard, root: Path, tmp_path: Path) -> None:
    # The last component may be anything: the caller acts on it without following.
    (root / "evil").symlink_to(tmp_path)
    fd, name = guard.open_parent(b"evil")
    assert (fd, name) == (guard.root_fd, b"evil")


def test_parent_descriptors_are_cached(guard: PathGuard, root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    fd1, _ = guard.open_parent(b"a/b/x")
    fd2, _ = guard.open_parent(b"a/b/y")
    fd3, _ = guard.open_parent(b"a/z")
    assert fd1 == fd2
    assert _same_inode(fd3, root / "a")


def test_invalidate_closes_cache_and_follows_renames(guard: PathGuard, root: Path) -> None:
    (root / "a").mkdir()
    (root / "b").mkdir()
    fd_a, _ = guard.open_parent(b"a/x")
    os.rename(root / "a", root / "c")
    os.rename(root / "b", root / "a")
    guard.invalidate()
    with pytest.raises(OSError) as info:
        os.fstat(fd_a)
    assert info.value.errno == errno.EBADF
    fd, _ = guard.open_parent(b"a/x")
    assert _same_inode(fd, root / "a")


def test_cache_is_bounded(root: Path) -> None:
    for i in range(40):
        (root / f"d{i}").mkdir(parents=True)
    before = _open_fds()
    with PathGuard(root, cache_size=4) as g:
        for i in range(40):
            g.open_parent(f"d{i}/x".encode())
        assert _open_fds() - before <= 4 + 2  # bound, plus the last resolution, plus root
    assert _open_fds() == before


def test_open_parents_keeps_both_valid_with_a_tiny_cache(root: Path) -> None:
    deep_a = [f"a{i}" for i in range(10)]
    deep_b = [f"b{i}" for i in range(10)]
    os.makedirs(root.joinpath(*deep_a))
    os.makedirs(root.joinpath(*deep_b))
    with PathGuard(root, cache_size=1) as g:
        g.open_parent(b"unrelated")
        (fd_a, _), (fd_b, _) = g.open_parents("/".join([*deep_a, "x"]).encode(),
                                               "/".join([*deep_b, "y"]).encode())
        assert _same_inode(fd_a, root.joinpath(*deep_a))
        assert _same_inode(fd_b, root.joinpath(*deep_b))


def test_close_is_idempotent_and_releases_everything(root: Path) -> None:
    before = _open_fds()
    g = PathGuard(root)
    (root / "a" / "b").mkdir(parents=True)
    g.open_parent(b"a/b/c")
    g.close()
    g.close()
    assert _open_fds() == before
    with pytest.raises(ValueError):
        g.open_parent(b"a/b/c")
