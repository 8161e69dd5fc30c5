"""Frames: the unit on the wire between a source and a target agent.

Layout of one frame::

    magic "ML" | version u8 | type u8 | flags u8 | reserved u8 | body length u32 | checksum u32
    body: msgpack map, validated by the pydantic model of the frame type

The checksum is the low 32 bits of XXH3-64 of the body (:func:`checksum`): it
catches corruption on the link as well as CRC-32 and is ten times faster, which
counts at a gigabyte of bulk data per checksum pass. It is not a MAC. All integers
big-endian. The body length is checked against the negotiated maximum
*before* any of the body is buffered, so a peer cannot make us allocate more than
``max_frame`` bytes. Anything wrong (magic, version, type, length, checksum, msgpack,
model) raises :class:`ProtocolError`; decoding never raises anything else.

Compression (negotiated at the handshake, see session.py): FLAG_COMPRESSED marks a
body that is one zstd frame; length and checksum are those of the compressed bytes
on the wire. It is decompressed through a bounded read of at most ``max_frame`` + 1
bytes, so a small "zstd bomb" cannot make us allocate more than an uncompressed
frame could. A sender compresses only when the result is smaller.
"""

from __future__ import annotations

import struct
from typing import Any, ClassVar, Final

import msgpack
import xxhash
from pydantic import BaseModel, ConfigDict, ValidationError

from protocol.errors import ProtocolError
from protocol.ops import Op, op_from_wire

try:
    import zstandard
except ImportError:   # the optional "zstd" extra is not installed: never offered
    zstandard = None  # type: ignore[assignment]

MAGIC: Final = b"ML"
VERSION: Final = 1
HEADER: Final = struct.Struct(">2sBBBxII")
DEFAULT_MAX_FRAME: Final = 16 * 1024 * 1024
FLAG_COMPRESSED: Final = 0x01
_KNOWN_FLAGS: Final = FLAG_COMPRESSED
#: The one compression there is ("zstd" in HELLO capabilities and WELCOME.compression).
ZSTD: Final = "zstd"
ZSTD_LEVEL: Final = 3


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The frame checksum: low 32 bits of XXH3-64 of ``data``."""
    return xxhash.xxh3_64_intdigest(data) & 0xFFFFFFFF


class Frame(BaseModel):
    """Base of every frame body. ``TYPE`` is the header's type byte."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")
    TYPE: ClassVar[int] = 0

    def body(self) -> dict[str, Any]:
        return self.model_dump()


class Hello(Frame):
    TYPE: ClassVar[int] = 1
    versions: list[int]
    node: str
    conid: int
    volume: str
    target_path: bytes
    nonce: bytes
    capabilities: list[str] = []
    #: The oldest seq the source can still send; a target behind it must skip ahead.
    first_seq: int = 1
    #: The operator ran `replication start … clearrestorerequired`: clear it here too.
    clear_restore_required: bool = False
    #: "replicate", or "restore": the target streams the replica back (reverse stream).
    purpose: str = "replicate"
    restore_mode: str = "overwrite"      # overwrite | newer | checksum
    restore_orphans: str = "remove"      # remove | keep
    #: The source journal's last seq when the restore began: the replica's seq after it.
    restore_seq: int = 0


class Challenge(Frame):
    """Target's nonce, and its proof that it holds the key (auth goes both ways)."""

    TYPE: ClassVar[int] = 2
    nonce: bytes
    proof: bytes


class Auth(Frame):
    TYPE: ClassVar[int] = 3
    proof: bytes


class Welcome(Frame):
    TYPE: ClassVar[int] = 4
    node: str
    resume_from: int
    restore_required: bool
    mirror_required: bool = False
    task_processing: bool = True
    max_frame: int = DEFAULT_MAX_FRAME
    message: str = ""
    #: Runnable task names in the target's task_dir, so the source can refuse at queue time.
    tasks: list[str] = []
    #: A restore session: from here on the target sends OPS and the source ACKs.
    restore: bool = False
    #: Restore: bytes of file data in the replica, for the source's progress.
    restore_bytes: int = 0
    #: "zstd" when the target accepted HELLO's "zstd" capability; "" for none.
    compression: str = ""


class Ops(Frame):
    """A batch of consecutive ops: ``ops[i]`` has seq ``first_seq + i``."""

    TYPE: ClassVar[int] = 5
    model_config = ConfigDict(strict=True, frozen=True, extra="ignore",
                              arbitrary_types_allowed=True)
    first_seq: int
    ops: list[Op]

    def body(self) -> dict[str, Any]:
        return {"first_seq": self.first_seq, "ops": [op.to_wire() for op in self.ops]}

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.ops) - 1


class Ack(Frame):
    """Cumulative: every op up to ``received`` arrived, up to ``durable`` is on disk."""

    TYPE: ClassVar[int] = 6
    received: int
    durable: int


class Ping(Frame):
    TYPE: ClassVar[int] = 7
    nonce: int


class Pong(Frame):
    """Keepalive answer; the target also refreshes its task settings here."""

    TYPE: ClassVar[int] = 8
    nonce: int
    task_processing: bool | None = None
    tasks: list[str] | None = None


class Error(Frame):
    TYPE: ClassVar[int] = 9
    code: str
    message: str


class Bye(Frame):
    TYPE: ClassVar[int] = 10
    reason: str = ""


class TaskResult(Frame):
    TYPE: ClassVar[int] = 11
    task_id: str
    seq: int
    state: str
    exit_code: int | None = None
    output: str = ""
    started: float | None = None
    ended: float | None = None
    message: str = ""


class CheckResult(Frame):
    TYPE: ClassVar[int] = 12
    seq: int
    path: bytes
    result: dict[str, Any] = {}


FRAME_TYPES: Final[dict[int, type[Frame]]] = {
    cls.TYPE: cls
    for cls in (Hello, Challenge, Auth, Welcome, Ops, Ack, Ping, Pong, Error, Bye,
                TaskResult, CheckResult)
}


def encode_frame(frame: Frame) -> bytes:
    """Serialise one frame, header included."""
    body: bytes = msgpack.packb(frame.body(), use_bin_type=True)
    return HEADER.pack(MAGIC, VERSION, frame.TYPE, 0, len(body), checksum(body)) + body


def encode_op(op: Op) -> bytes:
    """The msgpack encoding of one op, as it sits in the journal and inside OPS."""
    encoded: bytes = msgpack.packb(op.to_wire(), use_bin_type=True)
    return encoded


def _array_header(count: int) -> bytes:
    if count < 16:
        return bytes([0x90 | count])
    if count < 1 << 16:
        return b"\xdc" + struct.pack(">H", count)
    return b"\xdd" + struct.pack(">I", count)


_OPS_PREFIX: Final = b"\x82" + msgpack.packb("first_seq")
_OPS_KEY: Final = msgpack.packb("ops")


def encode_ops_frame(first_seq: int, encoded_ops: list[bytes]) -> bytes:
    """An OPS frame built from already-encoded ops (see :func:`encode_op`).

    The journal keeps ops encoded, so sending a batch is a join, not a re-encode.
    """
    parts = [b"", _OPS_PREFIX, msgpack.packb(first_seq), _OPS_KEY,
             _array_header(len(encoded_ops)), *encoded_ops]
    # One copy of the (up to megabytes of) op bytes: the header goes into the join.
    hasher = xxhash.xxh3_64()
    length = 0
    for part in parts:
        hasher.update(part)
        length += len(part)
    parts[0] = HEADER.pack(MAGIC, VERSION, Ops.TYPE, 0, length,
                           hasher.intdigest() & 0xFFFFFFFF)
    return b"".join(parts)


def zstd_available() -> bool:
    """Whether this installation can compress frames (the zstandard package)."""
    return zstandard is not None


def compress_frame(frame: bytes) -> bytes:
    """``frame`` (encoded, header included) with its body zstd-compressed and
    FLAG_COMPRESSED set, or ``frame`` unchanged when that is not smaller."""
    assert zstandard is not None, "compression negotiated without zstandard"
    with memoryview(frame) as view:
        packed: bytes = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(view[HEADER.size:])
    if len(packed) + HEADER.size >= len(frame):
        return frame   # incompressible (already compressed, random): send as it is
    magic, version, ftype, flags, _, _ = HEADER.unpack_from(frame)
    return HEADER.pack(magic, version, ftype, flags | FLAG_COMPRESSED, len(packed),
                       checksum(packed)) + packed


def _decompress(body: bytes, limit: int) -> bytes:
    if zstandard is None:
        raise ProtocolError("compressed frame, but zstandard is not installed")
    try:
        with zstandard.ZstdDecompressor().stream_reader(body) as reader:
            out: bytes = reader.read(limit + 1)   # bounded whatever the header claims
    except Exception as exc:  # zstandard raises ZstdError, and others for odd input
        raise ProtocolError(f"compressed frame does not decompress: {exc}") from exc
    if len(out) > limit:
        raise ProtocolError(f"compressed frame decompresses beyond the limit of {limit} "
                            "bytes", code="too_large")
    return out


def _decode_body(ftype: int, body: bytes) -> Frame:
    cls = FRAME_TYPES.get(ftype)
    if cls is None:
        raise ProtocolError(f"unknown frame type {ftype}")
    try:
        raw = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several types for bad input
        raise ProtocolError(f"{cls.__name__} body is not valid msgpack: {exc}") from exc
    if not isinstance(raw, dict):
        raise ProtocolError(f"{cls.__name__} body is not a map")
    if cls is Ops:
        return _decode_ops(raw)
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ProtocolError(f"invalid {cls.__name__} frame: {where}: {first['msg']}") from exc


def _decode_ops(raw: dict[str, Any]) -> Ops:
    first_seq = raw.get("first_seq")
    ops = raw.get("ops")
    if not isinstance(first_seq, int) or isinstance(first_seq, bool) or first_seq < 1:
        raise ProtocolError("invalid Ops frame: first_seq must be a positive integer")
    if not isinstance(ops, list) or not ops:
        raise ProtocolError("invalid Ops frame: ops must be a non-empty array")
    # model_construct: every op was checked by op_from_wire, so skip a second pass.
    return Ops.model_construct(first_seq=first_seq, ops=[op_from_wire(o) for o in ops])


class FrameDecoder:
    """Incremental decoder: feed any chunking of bytes, get whole frames back.

    Args:
        max_frame: the largest body accepted; a larger declared length is refused
            as soon as the header arrives.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        #: Set by the session once compression is negotiated (``ZSTD``); None: refused.
        self.compression: str | None = None
        self._buf = bytearray()

    def feed(self, data: bytes, limit: int | None = None) -> list[Frame]:
        """Add received bytes; return every frame now complete (at most ``limit``), in order.

        Raises:
            ProtocolError: the stream is not a valid frame sequence. The decoder is
                unusable afterwards; the session must be closed.
        """
        self._buf += data
        frames: list[Frame] = []
        while len(self._buf) >= HEADER.size and (limit is None or len(frames) < limit):
            magic, version, ftype, flags, length, crc = HEADER.unpack_from(self._buf)
            if magic != MAGIC:
                raise ProtocolError(f"bad frame magic {bytes(magic)!r}")
            if version != VERSION:
                raise ProtocolError(f"unsupported frame version {version}")
            if flags & ~_KNOWN_FLAGS:
                raise ProtocolError(f"unknown frame flags {flags:#x}")
            if flags & FLAG_COMPRESSED and self.compression is None:
                raise ProtocolError("compressed frames were not negotiated")
            if ftype not in FRAME_TYPES:   # before buffering a body for it
                raise ProtocolError(f"unknown frame type {ftype}")
            if length > self.max_frame:
                raise ProtocolError(f"frame of {length} bytes exceeds the limit of "
                                    f"{self.max_frame}", code="too_large")
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            with memoryview(self._buf) as view:
                body = bytes(view[HEADER.size:end])   # one copy, not two
            del self._buf[:end]
            if checksum(body) != crc:
                raise ProtocolError("frame checksum mismatch", code="checksum")
            if flags & FLAG_COMPRESSED:
                body = _decompress(body, self.max_frame)
            frames.append(_decode_body(ftype, body))
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buf)
