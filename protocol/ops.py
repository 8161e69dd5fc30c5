"""The op model: one captured mutation of a volume, as both agents see it.

An op travels on the wire and sits in the journal as a msgpack array whose first
element is the op's kind code and whose remaining elements are its fields, in the
order the dataclass declares them. Arrays rather than maps keep a 4 KiB write's
overhead to a few bytes, and decoding is one positional check per field.

Every path is ``bytes``, relative to the connection root, with ``/`` separators.
This module checks only the *shape* of an op (types, ranges); whether a path is
safe to touch is the target's path guard's job (``target_agent.pathguard``), and
:func:`check_relative_path` gives it the lexical half of that check.

``mtime_ns`` on content-changing and entry-creating ops is the entry's mtime on
the source right after the op; the target sets it so replica times match.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Final

from protocol.errors import ProtocolError

MAX_PATH_BYTES: Final = 4096
MAX_NAME_BYTES: Final = 255
MAX_XATTR_VALUE: Final = 64 * 1024

# renameat2(2) flags, as Linux numbers them.
RENAME_NOREPLACE: Final = 1
RENAME_EXCHANGE: Final = 2

# Trigger points of a task (DESIGN §6).
TASK_TRIGGERS: Final = ("queue", "transmit", "receive", "execute")


@dataclass(frozen=True, slots=True)
class Op:
    """Base of every op. ``CODE`` is the wire kind code; subclasses add fields."""

    CODE: ClassVar[int] = 0
    #: True for ops that cannot be replayed safely (DESIGN §5): checkpoint after them.
    CHECKPOINT_AFTER: ClassVar[bool] = False

    def values(self) -> tuple[Any, ...]:
        """The field values in declaration order (no copies, unlike dataclasses.astuple,
        which deep-copies every value: this runs once per captured op)."""
        return tuple(getattr(self, name) for name in _field_names(type(self)))

    def to_wire(self) -> list[Any]:
        return [self.CODE, *self.values()]

    def paths(self) -> tuple[bytes, ...]:
        """Every path this op names (for validation and logging)."""
        path = getattr(self, "path", None)
        return (path,) if isinstance(path, bytes) else ()

    @property
    def kind(self) -> str:
        return _KIND_NAMES[type(self)]

    def wire_size(self) -> int:
        """A cheap estimate of the encoded size, for windows and memory bounds."""
        size = 16
        for value in self.values():
            if isinstance(value, (bytes, str)):
                size += len(value)
            elif isinstance(value, (list, tuple)):
                size += sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in value)
            else:
                size += 9
        return size


@dataclass(frozen=True, slots=True)
class WriteOp(Op):
    CODE: ClassVar[int] = 1
    path: bytes
    offset: int
    data: bytes
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class TruncateOp(Op):
    CODE: ClassVar[int] = 2
    path: bytes
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class CreateOp(Op):
    """A new empty regular file; on replay an existing entry is kept, not truncated."""

    CODE: ClassVar[int] = 3
    path: bytes
    mode: int
    uid: int
    gid: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class MknodOp(Op):
    """A FIFO or a regular file made by mknod(2); device nodes are never replicated."""

    CODE: ClassVar[int] = 4
    path: bytes
    mode: int
    uid: int
    gid: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class MkdirOp(Op):
    CODE: ClassVar[int] = 5
    path: bytes
    mode: int
    uid: int
    gid: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class UnlinkOp(Op):
    CODE: ClassVar[int] = 6
    path: bytes


@dataclass(frozen=True, slots=True)
class RmdirOp(Op):
    CODE: ClassVar[int] = 7
    path: bytes


@dataclass(frozen=True, slots=True)
class RenameOp(Op):
    CODE: ClassVar[int] = 8
    CHECKPOINT_AFTER: ClassVar[bool] = True
    old: bytes
    new: bytes
    flags: int

    def paths(self) -> tuple[bytes, ...]:
        return (self.old, self.new)


@dataclass(frozen=True, slots=True)
class LinkOp(Op):
    CODE: ClassVar[int] = 9
    CHECKPOINT_AFTER: ClassVar[bool] = True
    old: bytes
    new: bytes

    def paths(self) -> tuple[bytes, ...]:
        return (self.old, self.new)


@dataclass(frozen=True, slots=True)
class SymlinkOp(Op):
    CODE: ClassVar[int] = 10
    path: bytes
    target: bytes
    uid: int
    gid: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class ChmodOp(Op):
    CODE: ClassVar[int] = 11
    path: bytes
    mode: int


@dataclass(frozen=True, slots=True)
class ChownOp(Op):
    """uid or gid of -1 leaves that id unchanged, as chown(2) does."""

    CODE: ClassVar[int] = 12
    path: bytes
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class UtimensOp(Op):
    """Resolved times (never UTIME_NOW): what the source entry holds after the call."""

    CODE: ClassVar[int] = 13
    path: bytes
    atime_ns: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class SetxattrOp(Op):
    CODE: ClassVar[int] = 14
    path: bytes
    name: bytes
    value: bytes
    flags: int


@dataclass(frozen=True, slots=True)
class RemovexattrOp(Op):
    CODE: ClassVar[int] = 15
    path: bytes
    name: bytes


@dataclass(frozen=True, slots=True)
class FallocateOp(Op):
    """fallocate(2) with its mode bits (KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE …)."""

    CODE: ClassVar[int] = 16
    path: bytes
    mode: int
    offset: int
    length: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class TaskOp(Op):
    """A task inserted in the stream (DESIGN §6). ``timeout`` < 0 means forever.

    The journal is shared by every connection of a volume, so a task names the one
    connection it belongs to; the others pass over it.
    """

    CODE: ClassVar[int] = 32
    task_id: str
    conid: int
    name: str
    args: list[str]
    trigger: str
    timeout: float

    def wire_size(self) -> int:
        return 64 + len(self.name) + sum(len(a) for a in self.args)


@dataclass(frozen=True, slots=True)
class NoteOp(Op):
    """A marker with no effect on data, such as 'mirror required from here'."""

    CODE: ClassVar[int] = 33
    note: str


#: Entry kinds named by PrepareOp and CheckOp.
ENTRY_KINDS: Final = ("file", "dir", "symlink", "fifo", "none", "moveout")


@dataclass(frozen=True, slots=True)
class PrepareOp(Op):
    """Mirror: make ``path`` ready to become an entry of kind ``entry``.

    If something of another kind is there (or a regular file with other hard links,
    for kind "file"), it is removed — a directory with everything in it. User xattrs
    not named in ``keep_xattrs`` are removed from what stays. Kind "none" removes
    whatever is at ``path``; "moveout" moves it to the target's orphan holding area.
    """

    CODE: ClassVar[int] = 17
    path: bytes
    entry: str
    keep_xattrs: list[bytes]


@dataclass(frozen=True, slots=True)
class CheckOp(Op):
    """Mirror/verify: compare ``path`` on the target with the source *at this point*.

    ``meta`` = [mode, uid, gid, size, mtime_ns] of the source entry. For files with
    ``hashes``, block ``i`` of ``block_size`` bytes from ``offset`` must hash (xxh3-64)
    to ``hashes[i]``. For directories, ``names`` lists the source entries in the
    sorted name range (``lo``, ``hi``] of this check, so extra target names in that
    range are orphans. The target answers with a CHECK_RESULT naming what differs.
    """

    CODE: ClassVar[int] = 34
    job: str
    path: bytes
    entry: str
    meta: list[int]
    link: bytes
    xattrs: bytes
    offset: int
    block_size: int
    hashes: list[bytes]
    names: list[bytes]
    lo: bytes
    hi: bytes
    flags: int

    def paths(self) -> tuple[bytes, ...]:
        return () if self.path == b"." else (self.path,)

    def wire_size(self) -> int:
        return 96 + len(self.path) + 8 * len(self.hashes) + sum(len(n) + 2 for n in self.names)


#: CheckOp flags.
CHECK_NEWER: Final = 1      # the target's copy wins if its mtime is newer
CHECK_DIFFERENT: Final = 2  # compare size and mtime only (no hashes)
CHECK_LAST_RANGE: Final = 4 # last range of the file: also compare size and metadata
CHECK_ORPHANS: Final = 8    # report extra names in a directory


OP_TYPES: Final[tuple[type[Op], ...]] = (
    WriteOp, TruncateOp, CreateOp, MknodOp, MkdirOp, UnlinkOp, RmdirOp, RenameOp,
    LinkOp, SymlinkOp, ChmodOp, ChownOp, UtimensOp, SetxattrOp, RemovexattrOp,
    FallocateOp, TaskOp, NoteOp, PrepareOp, CheckOp,
)
_BY_CODE: Final[dict[int, type[Op]]] = {t.CODE: t for t in OP_TYPES}
_KIND_NAMES: Final[dict[type[Op], str]] = {
    t: t.__name__.removesuffix("Op").lower() for t in OP_TYPES
}
# Field name -> expected python type, per op class, computed once.
_FIELD_TYPES: Final[dict[type[Op], tuple[tuple[str, type], ...]]] = {}

_TYPE_OF: Final[dict[str, type]] = {"bytes": bytes, "int": int, "str": str, "float": float,
                                    "list[str]": list, "list[bytes]": list, "list[int]": list}


_FIELD_NAMES: Final[dict[type[Op], tuple[str, ...]]] = {}


def _field_names(cls: type[Op]) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = tuple(f.name for f in fields(cls))
        _FIELD_NAMES[cls] = names
    return names


def _field_types(cls: type[Op]) -> tuple[tuple[str, type], ...]:
    cached = _FIELD_TYPES.get(cls)
    if cached is None:
        cached = tuple((f.name, _TYPE_OF[str(f.type)]) for f in fields(cls))
        _FIELD_TYPES[cls] = cached
    return cached


def op_from_wire(raw: Any) -> Op:
    """Build an op from its decoded msgpack array, checking every field.

    Raises:
        ProtocolError: the array is not a known op with well-typed, in-range fields.
    """
    # type() checks, not isinstance: msgpack's ExtType is a tuple and True is an int.
    if type(raw) is not list or not raw:
        raise ProtocolError("op is not a non-empty array")
    code = raw[0]
    cls = _BY_CODE.get(code) if type(code) is int else None
    if cls is None:
        # Never repr() peer data: a deeply nested value would raise RecursionError.
        shown = code if type(code) is int else type(code).__name__
        raise ProtocolError(f"unknown op kind {shown}")
    spec = _field_types(cls)
    if len(raw) != len(spec) + 1:
        raise ProtocolError(f"{cls.__name__} needs {len(spec)} fields, got {len(raw) - 1}")
    values = raw[1:]
    for (name, typ), value in zip(spec, values, strict=True):
        if typ is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif typ is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, typ)
        if not ok:
            raise ProtocolError(f"{cls.__name__}.{name} has type {type(value).__name__}")
    op = cls(*values)
    _check_op(op)
    return op


def _check_int(op: Op, name: str, low: int, high: int) -> None:
    value = getattr(op, name)
    if not low <= value <= high:
        raise ProtocolError(f"{op.kind}.{name} = {value} is out of range")


_U64 = (1 << 64) - 1
_S64 = 1 << 63


def _check_op(op: Op) -> None:
    for path in op.paths():
        check_relative_path(path)
    for name in ("offset", "size", "length", "block_size"):
        if hasattr(op, name):
            _check_int(op, name, 0, _S64 - 1)
    for name in ("uid", "gid"):
        if hasattr(op, name):
            _check_int(op, name, -1, 0xFFFFFFFF)
    for name in ("mtime_ns", "atime_ns"):
        if hasattr(op, name):
            _check_int(op, name, -_S64, _S64 - 1)
    if hasattr(op, "mode"):
        _check_int(op, "mode", 0, 0xFFFFFFFF)
    if isinstance(op, MknodOp) and stat.S_IFMT(op.mode) not in (stat.S_IFREG, stat.S_IFIFO):
        raise ProtocolError("mknod may only make regular files and FIFOs")
    if isinstance(op, SymlinkOp) and (not op.target or b"\0" in op.target
                                      or len(op.target) > MAX_PATH_BYTES):
        raise ProtocolError("symlink target is empty, too long or holds NUL")
    if isinstance(op, RenameOp) and op.flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
        raise ProtocolError(f"rename flags {op.flags:#x} are not supported")
    if isinstance(op, (SetxattrOp, RemovexattrOp)):
        if not op.name or b"\0" in op.name or len(op.name) > MAX_NAME_BYTES:
            raise ProtocolError("xattr name is empty, too long or holds NUL")
    if isinstance(op, SetxattrOp) and len(op.value) > MAX_XATTR_VALUE:
        raise ProtocolError("xattr value is too long")
    if isinstance(op, PrepareOp):
        if op.entry not in ENTRY_KINDS:
            raise ProtocolError(f"unknown entry kind {op.entry!r}")
        if not all(type(n) is bytes and n for n in op.keep_xattrs):
            raise ProtocolError("keep_xattrs must be non-empty byte strings")
    if isinstance(op, CheckOp):
        if op.entry not in ENTRY_KINDS[:4]:
            raise ProtocolError(f"unknown entry kind {op.entry!r}")
        if len(op.meta) != 5 or not all(type(v) is int for v in op.meta):
            raise ProtocolError("check meta must be 5 integers")
        if not all(type(h) is bytes and len(h) == 8 for h in op.hashes):
            raise ProtocolError("check hashes must be 8-byte strings")
        if not 0 < op.block_size <= 1 << 24 or op.offset < 0:
            raise ProtocolError("check block size or offset out of range")
        for entry in op.names:
            if type(entry) is not bytes or not entry or b"/" in entry or b"\0" in entry \
                    or entry in (b".", b".."):
                raise ProtocolError("check names must be plain entry names")
        if op.path != b".":
            check_relative_path(op.path)
    if isinstance(op, TaskOp):
        if op.trigger not in TASK_TRIGGERS:
            raise ProtocolError(f"unknown task trigger {op.trigger!r}")
        if not all(isinstance(a, str) for a in op.args):
            raise ProtocolError("task arguments must be strings")
        if not 0 < len(op.task_id) <= 64 or not 0 < len(op.name) <= 255 or len(op.args) > 256:
            raise ProtocolError("task id, name or arguments out of bounds")


def check_relative_path(path: bytes) -> None:
    """Reject a path that is not a clean relative path (lexical check only).

    A clean path is non-empty, at most 4096 bytes, has no NUL, does not start with
    ``/``, and every ``/``-separated component is non-empty, not ``.`` and not ``..``.

    Raises:
        ProtocolError: naming what is wrong with the path.
    """
    if not path:
        raise ProtocolError("empty path")
    if len(path) > MAX_PATH_BYTES:
        raise ProtocolError("path longer than 4096 bytes")
    if b"\0" in path:
        raise ProtocolError(f"path holds a NUL byte: {path!r}")
    if path.startswith(b"/"):
        raise ProtocolError(f"absolute path: {path!r}")
    for part in path.split(b"/"):
        if part in (b"", b".", b".."):
            raise ProtocolError(f"path has an empty, '.' or '..' component: {path!r}")
        if len(part) > MAX_NAME_BYTES:
            raise ProtocolError(f"path component longer than 255 bytes: {path!r}")
