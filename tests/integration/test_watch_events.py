"""Both watch backends against real kernel notifications on a real directory tree.

Each test runs for ``inotify`` and ``fanotify`` (fanotify needs root; it is skipped
where the kernel or the privileges do not allow it). A change is made with plain OS
calls, then events are read until the expected ones arrived or a deadline passed.
"No events" is shown with a sentinel: a file written after the change, inside the
volume. Kernel order means every event of the change was read before the sentinel's.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from source_agent import watch_events
from source_agent.watch_events import (
    FALLBACK_ERRNOS,
    WatchBackend,
    WatchError,
    WatchEvent,
    open_backend,
    parse_fanotify,
    parse_inotify,
)

BACKENDS = ["inotify", "fanotify"]
TIMEOUT = 20.0  # per test
READ_DEADLINE = 5.0  # per wait for an expected event
_sentinels = itertools.count()


@dataclass
class Watched:
    root: Path
    outside: Path  # a sibling of the root on the same file system
    backend: WatchBackend


def _open(root: Path, kind: str) -> WatchBackend:
    try:
        return open_backend(str(root), kind)
    except WatchError as exc:
        if kind == "fanotify" and exc.errno in FALLBACK_ERRNOS:
            pytest.skip(f"fanotify unavailable here: {exc}")
        raise


@pytest.fixture(params=BACKENDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def watched(kind: str, tmp_path: Path) -> AsyncIterator[Watched]:
    root = tmp_path / "vol"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    backend = _open(root, kind)
    try:
        yield Watched(root, outside, backend)
    finally:
        backend.close()


async def read_until(backend: WatchBackend, done: Callable[[list[WatchEvent]], bool],
                     deadline: float = READ_DEADLINE) -> list[WatchEvent]:
    """Read events until ``done(events)`` holds or ``deadline`` seconds passed."""
    events: list[WatchEvent] = []
    with trio.move_on_after(deadline):
        while not done(events):
            events.extend(await backend.read())
    return events


def has(kind: str, path: bytes, **fields: object) -> Callable[[list[WatchEvent]], bool]:
    def check(events: list[WatchEvent]) -> bool:
        return any(e.kind == kind and e.path == path
                   and all(getattr(e, k) == v for k, v in fields.items()) for e in events)
    return check


def covered(events: list[WatchEvent], path: bytes) -> bool:
    """A dirty event for ``path``, a move to it, or a rescan of it or an ancestor."""
    for e in events:
        if (e.kind == "dirty" and e.path == path) or (e.kind == "move" and e.new_path == path):
            return True
        if e.kind == "rescan" and (not e.path or path == e.path
                                   or path.startswith(e.path + b"/")):
            return True
    return False


async def settle(w: Watched) -> list[WatchEvent]:
    """Write a sentinel file in the root and read through its event."""
    name = f"sentinel-{next(_sentinels)}"
    (w.root / name).write_bytes(b"s")
    events = await read_until(w.backend, has("dirty", name.encode()))
    assert has("dirty", name.encode())(events), events
    return events


def queue_limit(backend: str) -> int:
    """The kernel's queue length for ``backend`` (16,384 events by default)."""
    return int(Path(f"/proc/sys/fs/{backend}/max_queued_events").read_text())


def non_sentinel(events: list[WatchEvent]) -> list[WatchEvent]:
    return [e for e in events if not e.path.startswith(b"sentinel-")]


async def test_create_write_chmod_unlink(watched: Watched) -> None:
    with trio.fail_after(TIMEOUT):
        path = watched.root / "f"
        path.write_bytes(b"hello")
        events = await read_until(watched.backend, has("dirty", b"f"))
        assert has("dirty", b"f", is_dir=False)(events), events
        await settle(watched)

        path.chmod(0o600)  # metadata only
        events = await read_until(watched.backend, has("dirty", b"f"))
        assert has("dirty", b"f", is_dir=False)(events), events

        with path.open("ab") as f:  # content only, no create
            f.write(b" again")
        events = await read_until(watched.backend, has("dirty", b"f"))
        assert has("dirty", b"f", is_dir=False)(events), events

        path.unlink()
        events = await read_until(watched.backend, has("delete", b"f"))
        assert has("delete", b"f", is_dir=False)(events), events


async def test_rename_file_is_one_move(watched: Watched) -> None:
    with trio.fail_after(TIMEOUT):
        (watched.root / "a").write_bytes(b"x")
        (watched.root / "sub").mkdir()
        await settle(watched)

        (watched.root / "a").rename(watched.root / "sub" / "b")
        events = non_sentinel(await settle(watched))
        assert events == [WatchEvent("move", b"a", b"sub/b")], events


async def test_renamed_directory_reports_new_paths(watched: Watched) -> None:
    with trio.fail_after(TIMEOUT):
        (watched.root / "d").mkdir()
        (watched.root / "d" / "x").write_bytes(b"x")
        await settle(watched)  # inotify: d is watched; fanotify: d's handle is cached

        (watched.root / "d").rename(watched.root / "e")
        (watched.root / "e" / "y").write_bytes(b"y")
        events = await read_until(watched.backend, has("dirty", b"e/y"))
        assert has("dirty", b"e/y")(events), events
        assert has("move", b"d", new_path=b"e", is_dir=True)(events), events
        assert not [e for e in events if e.path.startswith(b"d/")], events


async def test_directory_moved_out_goes_quiet(watched: Watched) -> None:
    with trio.fail_after(TIMEOUT):
        (watched.root / "m" / "sub").mkdir(parents=True)
        (watched.root / "m" / "f").write_bytes(b"f")
        await settle(watched)
        watches_before = watched.backend.watches

        gone = watched.outside / "m"
        (watched.root / "m").rename(gone)
        (gone / "f").write_bytes(b"changed outside")  # before the move is even read
        (gone / "sub" / "g").write_bytes(b"new outside")
        events = non_sentinel(await settle(watched))
        assert events == [WatchEvent("delete", b"m", is_dir=True)], events
        if watched.backend.name == "inotify":
            assert watched.backend.watches == watches_before - 2  # m and m/sub

        (gone / "f").write_bytes(b"again")
        (gone / "sub" / "h").mkdir()
        assert non_sentinel(await settle(watched)) == []


async def test_directory_moved_in_is_rescanned(watched: Watched) -> None:
    with trio.fail_after(TIMEOUT):
        incoming = watched.outside / "n"
        (incoming / "sub").mkdir(parents=True)
        (incoming / "f").write_bytes(b"f")
        (incoming / "sub" / "g").write_bytes(b"g")
        await settle(watched)

        incoming.rename(watched.root / "n")
        # Both backends promise a rescan of a directory that arrives from outside.
        events = await read_until(watched.backend, has("rescan", b"n", reason="moved in"))
        assert has("rescan", b"n", reason="moved in", is_dir=True)(events), events

        (watched.root / "n" / "sub" / "h").write_bytes(b"h")  # watched now (inotify)
        events = await read_until(watched.backend, has("dirty", b"n/sub/h"))
        assert has("dirty", b"n/sub/h")(events), events

        (watched.outside / "loose").write_bytes(b"file")
        (watched.outside / "loose").rename(watched.root / "loose")
        events = await read_until(watched.backend, has("dirty", b"loose"))
        assert has("dirty", b"loose")(events), events


async def test_burst_in_new_directories_is_covered(watched: Watched) -> None:
    with trio.fail_after(TIMEOUT):
        levels = ["a", "a/b", "a/b/c", "a/b/c/d"]
        os.makedirs(watched.root / levels[-1])
        files: list[bytes] = []
        for level in levels:
            for i in range(3):
                name = f"{level}/f{i}"
                (watched.root / name).write_bytes(name.encode())
                files.append(name.encode())

        def all_covered(events: list[WatchEvent]) -> bool:
            return all(covered(events, f) for f in files)

        events = await read_until(watched.backend, all_covered)
        missing = [f for f in files if not covered(events, f)]
        assert not missing, (missing, events)
        assert has("rescan", b"a", reason="new directory")(events), events
        if watched.backend.name == "inotify":
            assert watched.backend.watches == 5


async def test_directory_replaced_before_events_are_read(watched: Watched) -> None:
    # mkdir a; mv a b; mkdir a, and the same one level down, with no read in between:
    # inotify adds watches by path after the fact, so its tree must converge.
    with trio.fail_after(TIMEOUT):
        root = watched.root
        (root / "a").mkdir()
        (root / "a" / "f1").write_bytes(b"1")
        (root / "a").rename(root / "b")
        (root / "a").mkdir()
        (root / "a" / "f2").write_bytes(b"2")
        (root / "x" / "d").mkdir(parents=True)
        (root / "x").rename(root / "y")
        (root / "x" / "d").mkdir(parents=True)
        files = [b"b/f1", b"a/f2"]

        events = await read_until(watched.backend,
                                  lambda evs: all(covered(evs, f) for f in files))
        assert all(covered(events, f) for f in files), events
        await settle(watched)

        for name in ("a/g", "b/g", "x/d/g", "y/d/g"):
            (root / name).write_bytes(b"g")
        later = [b"a/g", b"b/g", b"x/d/g", b"y/d/g"]
        events = await read_until(watched.backend,
                                  lambda evs: all(has("dirty", f)(evs) for f in later))
        assert all(has("dirty", f)(events) for f in later), events
        if watched.backend.name == "inotify":
            assert watched.backend.watches == 7  # root, a, b, x, x/d, y, y/d


async def test_rename_in_directory_then_directory_rename(watched: Watched) -> None:
    # P/a -> P/b, then P -> Q, read only afterwards. fanotify resolves P's handle to
    # its current name Q: it must then also rescan Q (the module's theory, rule 2).
    with trio.fail_after(TIMEOUT):
        (watched.root / "P").mkdir()
        (watched.root / "P" / "a").write_bytes(b"a")
        await settle(watched)

        (watched.root / "P" / "a").rename(watched.root / "P" / "b")
        (watched.root / "P").rename(watched.root / "Q")
        events = non_sentinel(await settle(watched))
        assert has("move", b"P", new_path=b"Q", is_dir=True)(events), events
        assert (has("move", b"P/a", new_path=b"P/b")(events)
                or has("rescan", b"Q", reason="directory renamed")(events)), events


async def test_volume_root_moved_with_its_parent(tmp_path: Path, kind: str) -> None:
    with trio.fail_after(TIMEOUT):
        (tmp_path / "outer" / "vol").mkdir(parents=True)
        backend = _open(tmp_path / "outer" / "vol", kind)
        try:
            (tmp_path / "outer").rename(tmp_path / "outer2")
            (tmp_path / "outer2" / "vol" / "newdir").mkdir()  # inotify notices here
            events = await read_until(backend, has("rescan", b"", reason="volume root moved"))
            assert has("rescan", b"", reason="volume root moved")(events), events
        finally:
            backend.close()


async def test_inotify_read_cancelled_while_pairing_loses_nothing(tmp_path: Path) -> None:
    (tmp_path / "vol").mkdir()
    (tmp_path / "vol" / "f").write_bytes(b"f")
    backend = open_backend(str(tmp_path / "vol"), "inotify")
    try:
        with trio.fail_after(TIMEOUT):
            (tmp_path / "vol" / "f").rename(tmp_path / "f")  # an IN_MOVED_FROM alone
            for delay in (0.0, 0.001, 0.005):  # cancelled before, at, during the wait
                with trio.move_on_after(delay):
                    assert await backend.read() == [WatchEvent("delete", b"f")]
                    break
            else:
                events = await read_until(backend, has("delete", b"f"))
                assert events == [WatchEvent("delete", b"f")]
    finally:
        backend.close()


async def test_directory_deleted_and_recreated(watched: Watched) -> None:
    # "rm -r d; mkdir d": a state-based consumer learns that d's old entries are gone
    # only from a rescan of the new d (fanotify cannot name them: their directory's
    # handle is stale by the time the events are read).
    with trio.fail_after(TIMEOUT):
        (watched.root / "d" / "sub").mkdir(parents=True)
        (watched.root / "d" / "sub" / "f").write_bytes(b"f")
        await settle(watched)

        shutil.rmtree(watched.root / "d")
        (watched.root / "d").mkdir()
        events = non_sentinel(await settle(watched))
        kinds = [(e.kind, e.path, e.reason) for e in events if e.path == b"d"]
        assert ("delete", b"d", "") in kinds, events
        assert kinds[-1] == ("rescan", b"d", "new directory"), events


async def test_overflow_is_reported(watched: Watched) -> None:
    with trio.fail_after(TIMEOUT * 2):
        many = watched.root / "many"
        many.mkdir()
        await settle(watched)  # inotify: its watch is there before the files come
        for i in range(queue_limit(watched.backend.name) + 4000):  # ~20,000 by default
            os.close(os.open(many / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644))

        events = await read_until(watched.backend, has("rescan", b"", reason="overflow"),
                                  deadline=30.0)
        assert has("rescan", b"", reason="overflow")(events), events[-5:]
        assert watched.backend.overflows >= 1

        (many / "after").write_bytes(b"still watching")
        events = await read_until(watched.backend, has("dirty", b"many/after"))
        assert has("dirty", b"many/after")(events), events[-5:]


async def test_fanotify_ignores_the_rest_of_the_file_system(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        root = tmp_path / "vol"
        outside = tmp_path / "vol-sibling"  # shares the root's name as a prefix
        root.mkdir()
        outside.mkdir()
        backend = _open(root, "fanotify")
        try:
            w = Watched(root, outside, backend)
            (outside / "f").write_bytes(b"outside")
            (outside / "d").mkdir()
            (outside / "f").rename(outside / "d" / "g")
            (tmp_path / "beside").write_bytes(b"beside")
            assert non_sentinel(await settle(w)) == []
        finally:
            backend.close()


async def test_auto_backend_works(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        with structlog.testing.capture_logs() as logs:
            backend = open_backend(str(tmp_path), "auto")
        try:
            assert backend.name in ("fanotify", "inotify")
            assert any(e["event"] == "watch backend" and e["backend"] == backend.name
                       for e in logs), logs
            (tmp_path / "f").write_bytes(b"x")
            events = await read_until(backend, has("dirty", b"f"))
            assert has("dirty", b"f")(events), events
        finally:
            backend.close()


async def test_non_utf8_names_round_trip(watched: Watched) -> None:
    with trio.fail_after(TIMEOUT):
        root = os.fsencode(watched.root)
        os.mkdir(root + b"/d\xff")
        await settle(watched)  # inotify: watched before the rename below reports into it
        os.close(os.open(root + b"/caf\xe9", os.O_CREAT | os.O_WRONLY, 0o644))
        os.close(os.open(root + b"/d\xff/\x80", os.O_CREAT | os.O_WRONLY, 0o644))
        os.rename(root + b"/caf\xe9", root + b"/d\xff/caf\xe9")

        def done(events: list[WatchEvent]) -> bool:
            return (covered(events, b"d\xff/\x80")
                    and has("move", b"caf\xe9", new_path=b"d\xff/caf\xe9")(events))

        events = await read_until(watched.backend, done)
        assert done(events), events
        assert has("dirty", b"caf\xe9")(events), events


async def test_volume_root_deleted(watched: Watched) -> None:
    with trio.fail_after(TIMEOUT):
        watched.root.rmdir()
        events = await read_until(watched.backend,
                                  has("rescan", b"", reason="volume root deleted"))
        assert has("rescan", b"", reason="volume root deleted")(events), events


async def test_close_wakes_a_pending_read(watched: Watched) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            async def reader() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await watched.backend.read()

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            watched.backend.close()
        with pytest.raises(trio.ClosedResourceError):
            await watched.backend.read()


async def test_inotify_lost_watch_is_loud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    real_add = watch_events._inotify_add_watch

    def add_watch(fd: int, path: bytes, mask: int) -> int:
        # Watches are added through an O_PATH descriptor's /proc link.
        if os.readlink(path).endswith(b"/nowatch") if path.startswith(b"/proc/") else (
                path.endswith(b"/nowatch")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_add(fd, path, mask)

    monkeypatch.setattr(watch_events, "_inotify_add_watch", add_watch)
    with trio.fail_after(TIMEOUT):
        backend = open_backend(str(tmp_path), "inotify")
        try:
            with structlog.testing.capture_logs() as logs:
                (tmp_path / "nowatch").mkdir()
                events = await read_until(backend, has("rescan", b"nowatch", reason=(
                    "watch lost: " + os.strerror(errno.ENOSPC))))
            assert has("rescan", b"nowatch",
                       reason="watch lost: " + os.strerror(errno.ENOSPC))(events), events
            assert backend.lost_watches == 1
            assert [e for e in logs if e["log_level"] == "error"
                    and e["directory"].endswith(b"/nowatch") and e["errno"] == "ENOSPC"], logs
        finally:
            backend.close()


async def test_fallback_when_fanotify_is_refused(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(flags: int, event_f_flags: int) -> int:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(watch_events, "_fanotify_init", refuse)
    with pytest.raises(WatchError, match="fanotify_init") as info:
        open_backend(str(tmp_path), "fanotify")
    assert info.value.errno == errno.EPERM
    with structlog.testing.capture_logs() as logs:
        backend = open_backend(str(tmp_path), "auto")
    backend.close()
    assert backend.name == "inotify"
    assert [e for e in logs if e["event"] == "fanotify unavailable, falling back to inotify"
            and "fanotify_init" in e["error"]], logs
    with pytest.raises(ValueError):
        open_backend(str(tmp_path), "kqueue")


@given(st.binary(max_size=200))
def test_parsers_reject_garbage_with_watch_error(data: bytes) -> None:
    for parse in (parse_inotify, parse_fanotify):
        try:
            parse(data)
        except WatchError as exc:
            assert exc.errno == errno.EIO
