"""Property tests of the frame codec (protocol.frames, protocol.ops).

What must hold (DESIGN §4, issue 2 item i):

* every frame and every op survives encode → decode unchanged;
* any chunking of a stream of valid frames decodes to the same frames;
* random bytes, mutated frames and msgpack bombs only ever raise ``ProtocolError``
  (or decode to nothing yet, or to valid frames), never anything else;
* a declared length above ``max_frame`` is refused as soon as the 14-byte header
  has arrived, before any of the body is buffered;
* an op naming a hostile path (``..``, absolute, NUL, empty or ``.`` component) is
  refused at decode time.

Garbage that must get *past* the checksum (to exercise the msgpack and model
validation) is framed by hand with ``HEADER.pack`` and ``checksum``.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import stat
import struct
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from protocol.errors import ProtocolError
from protocol.frames import (
    DEFAULT_MAX_FRAME,
    FRAME_TYPES,
    HEADER,
    MAGIC,
    VERSION,
    Ack,
    Auth,
    Bye,
    Challenge,
    CheckResult,
    Error,
    Frame,
    FrameDecoder,
    Hello,
    Ops,
    Ping,
    Pong,
    TaskResult,
    Welcome,
    checksum,
    encode_frame,
    encode_op,
    encode_ops_frame,
)
from protocol.ops import (
    ENTRY_KINDS,
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    OP_TYPES,
    TASK_TRIGGERS,
    CheckOp,
    ChmodOp,
    ChownOp,
    CreateOp,
    FallocateOp,
    LinkOp,
    MkdirOp,
    MknodOp,
    NoteOp,
    Op,
    PrepareOp,
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
    check_relative_path,
    op_from_wire,
)

# Property tests stay fast: the whole module runs in a few seconds.
FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
QUICK = settings(max_examples=60, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

S64_MIN, S64_MAX = -(1 << 63), (1 << 63) - 1
U64_MAX = (1 << 64) - 1


# -- helpers ------------------------------------------------------------------------

def raw_frame(ftype: int, body: bytes, *, flags: int = 0, length: int | None = None,
              crc: int | None = None) -> bytes:
    """A frame built by hand: a correct checksum unless told otherwise."""
    return HEADER.pack(MAGIC, VERSION, ftype, flags,
                       len(body) if length is None else length,
                       checksum(body) if crc is None else crc) + body


def packed(value: Any) -> bytes:
    data = msgpack.packb(value, use_bin_type=True)
    assert isinstance(data, bytes)
    return data


def assert_valid_frame(frame: Frame) -> None:
    """A decoded frame is a well-formed frame: it re-encodes and decodes to itself.

    Compared as bytes, not objects: a mutated float may have become NaN.
    """
    assert isinstance(frame, Frame)
    assert type(frame) in FRAME_TYPES.values()
    if isinstance(frame, Ops):
        assert frame.first_seq >= 1 and frame.ops
        for op in frame.ops:
            assert packed(op_from_wire(op.to_wire()).to_wire()) == packed(op.to_wire())
    data = encode_frame(frame)
    again = FrameDecoder().feed(data)
    assert len(again) == 1 and encode_frame(again[0]) == data


def note_outcome(what: str) -> None:
    """Tally outcomes for ``--hypothesis-show-statistics`` (only inside a property test)."""
    if currently_in_test_context():
        event(what)


def feed_hostile(data: bytes, *, chunks: list[bytes] | None = None,
                 max_frame: int = DEFAULT_MAX_FRAME) -> list[Frame] | ProtocolError:
    """Feed untrusted bytes; anything but frames or ProtocolError fails the test."""
    decoder = FrameDecoder(max_frame)
    frames: list[Frame] = []
    try:
        for chunk in chunks if chunks is not None else [data]:
            frames += decoder.feed(chunk)
    except ProtocolError as exc:
        assert isinstance(exc.code, str) and exc.code
        note_outcome(f"ProtocolError {exc.code}: {re.sub(r'[0-9].*', '', str(exc))[:48]}")
        return exc
    for frame in frames:
        assert_valid_frame(frame)
    note_outcome(f"{len(frames)} frames, {decoder.buffered} bytes buffered")
    return frames


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# -- strategies ---------------------------------------------------------------------

def _component_ok(name: bytes) -> bool:
    return name not in (b".", b"..")


# Any byte except '/' and NUL: most components are not valid UTF-8.
components = (st.binary(min_size=1, max_size=16)
              .map(lambda b: b.replace(b"/", b"\xff").replace(b"\0", b"\x80"))
              .filter(_component_ok))
paths = st.lists(components, min_size=1, max_size=6).map(b"/".join)
u63 = st.integers(0, S64_MAX)
s64 = st.integers(S64_MIN, S64_MAX)
ids = st.integers(-1, 0xFFFFFFFF)
modes = st.integers(0, 0xFFFFFFFF)
blobs = st.binary(max_size=200)
texts = st.text(max_size=40)
mtimes = s64
symlink_targets = st.binary(min_size=1, max_size=300).map(lambda b: b.replace(b"\0", b"/"))
xattr_names = st.binary(min_size=1, max_size=MAX_NAME_BYTES).map(
    lambda b: b.replace(b"\0", b"u"))
mknod_modes = st.builds(lambda fmt, perm: fmt | perm,
                        st.sampled_from([stat.S_IFREG, stat.S_IFIFO]), st.integers(0, 0o7777))

OP_STRATEGIES: dict[type[Op], st.SearchStrategy[Op]] = {
    WriteOp: st.builds(WriteOp, paths, u63, blobs, mtimes),
    TruncateOp: st.builds(TruncateOp, paths, u63, mtimes),
    CreateOp: st.builds(CreateOp, paths, modes, ids, ids, mtimes),
    MknodOp: st.builds(MknodOp, paths, mknod_modes, ids, ids, mtimes),
    MkdirOp: st.builds(MkdirOp, paths, modes, ids, ids, mtimes),
    UnlinkOp: st.builds(UnlinkOp, paths),
    RmdirOp: st.builds(RmdirOp, paths),
    RenameOp: st.builds(RenameOp, paths, paths, st.integers(0, 3)),
    LinkOp: st.builds(LinkOp, paths, paths),
    SymlinkOp: st.builds(SymlinkOp, paths, symlink_targets, ids, ids, mtimes),
    ChmodOp: st.builds(ChmodOp, paths, modes),
    ChownOp: st.builds(ChownOp, paths, ids, ids),
    UtimensOp: st.builds(UtimensOp, paths, s64, s64),
    SetxattrOp: st.builds(SetxattrOp, paths, xattr_names, blobs, st.integers(0, 3)),
    RemovexattrOp: st.builds(RemovexattrOp, paths, xattr_names),
    FallocateOp: st.builds(FallocateOp, paths, st.integers(0, 0x7F), u63, u63, mtimes),
    TaskOp: st.builds(TaskOp, st.text(min_size=1, max_size=40), st.integers(1, 2**31),
                      st.text(min_size=1, max_size=40), st.lists(texts, max_size=5),
                      st.sampled_from(TASK_TRIGGERS),
                      st.floats(allow_nan=False) | st.integers(-1, 10**6).map(float)),
    NoteOp: st.builds(NoteOp, texts),
    PrepareOp: st.builds(PrepareOp, paths, st.sampled_from(ENTRY_KINDS),
                         st.lists(xattr_names, max_size=3)),
    CheckOp: st.builds(CheckOp, texts, paths, st.sampled_from(ENTRY_KINDS[:4]),
                       st.lists(s64, min_size=5, max_size=5), blobs, blobs, u63,
                       st.integers(1, 1 << 24), st.lists(st.binary(min_size=8, max_size=8),
                                                         max_size=4),
                       st.lists(components, max_size=4), blobs, blobs, st.integers(0, 15)),
}
any_op: st.SearchStrategy[Op] = st.one_of(*OP_STRATEGIES.values())

wire_ints = st.integers(S64_MIN, U64_MAX)
msgpack_leaves = (st.none() | st.booleans() | wire_ints | st.floats(allow_nan=False)
                  | texts | blobs)
msgpack_values = st.recursive(
    msgpack_leaves,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(texts, kids, max_size=4),
    max_leaves=12)
nonces = st.binary(min_size=32, max_size=32)
opt_floats = st.none() | st.floats(allow_nan=False)

# Every field of every frame type, so a field added later is generated too (checked below).
FRAME_FIELDS: dict[type[Frame], dict[str, st.SearchStrategy[Any]]] = {
    Hello: {"versions": st.lists(wire_ints, max_size=4), "node": texts, "conid": wire_ints,
            "volume": texts, "target_path": blobs, "nonce": nonces,
            "capabilities": st.lists(texts, max_size=4), "first_seq": wire_ints,
            "clear_restore_required": st.booleans(), "purpose": texts, "restore_mode": texts,
            "restore_orphans": texts, "restore_seq": wire_ints},
    Challenge: {"nonce": nonces, "proof": blobs},
    Auth: {"proof": blobs},
    Welcome: {"node": texts, "resume_from": wire_ints, "restore_required": st.booleans(),
              "mirror_required": st.booleans(), "task_processing": st.booleans(),
              "max_frame": wire_ints, "message": texts, "tasks": st.lists(texts, max_size=4),
              "restore": st.booleans(), "restore_bytes": wire_ints, "compression": texts},
    # Up to 20 ops, so the array header of OPS takes both its fix and its 16-bit form.
    Ops: {"first_seq": st.integers(1, 1 << 62),
          "ops": st.lists(any_op, min_size=1, max_size=20)},
    Ack: {"received": wire_ints, "durable": wire_ints},
    Ping: {"nonce": wire_ints},
    Pong: {"nonce": wire_ints, "task_processing": st.none() | st.booleans(),
           "tasks": st.none() | st.lists(texts, max_size=4)},
    Error: {"code": texts, "message": texts},
    Bye: {"reason": texts},
    TaskResult: {"task_id": texts, "seq": wire_ints, "state": texts,
                 "exit_code": st.none() | wire_ints, "output": texts, "started": opt_floats,
                 "ended": opt_floats, "message": texts},
    CheckResult: {"seq": wire_ints, "path": blobs,
                  "result": st.dictionaries(texts, msgpack_values, max_size=4)},
}
FRAME_STRATEGIES: dict[type[Frame], st.SearchStrategy[Frame]] = {
    cls: st.builds(cls, **fields) for cls, fields in FRAME_FIELDS.items()
}
any_frame: st.SearchStrategy[Frame] = st.one_of(*FRAME_STRATEGIES.values())
frame_lists = st.lists(any_frame, min_size=1, max_size=6)


def test_strategies_cover_every_op_and_frame_type() -> None:
    assert set(OP_STRATEGIES) == set(OP_TYPES)
    assert set(FRAME_STRATEGIES) == set(FRAME_TYPES.values())
    for cls, fields in FRAME_FIELDS.items():
        assert set(fields) == set(cls.model_fields), cls.__name__


@QUICK
@given(paths)
def test_generated_paths_are_clean(path: bytes) -> None:
    check_relative_path(path)


# -- (a) round trip -----------------------------------------------------------------

@FAST
@given(any_op)
def test_op_round_trip(op: Op) -> None:
    wire = msgpack.unpackb(packed(op.to_wire()), raw=False)
    assert op_from_wire(wire) == op


@FAST
@given(any_frame)
def test_frame_round_trip(frame: Frame) -> None:
    data = encode_frame(frame)
    assert len(data) == HEADER.size + struct.unpack_from(">I", data, 6)[0]
    decoder = FrameDecoder()
    assert decoder.feed(data) == [frame]
    assert decoder.buffered == 0


@FAST
@given(FRAME_FIELDS[Ops]["first_seq"], FRAME_FIELDS[Ops]["ops"])
def test_ops_frame_from_journal_encoded_ops_matches_encode_frame(
        first_seq: int, ops: list[Op]) -> None:
    data = encode_ops_frame(first_seq, [encode_op(op) for op in ops])
    assert data == encode_frame(Ops(first_seq=first_seq, ops=ops))
    assert FrameDecoder().feed(data) == [Ops(first_seq=first_seq, ops=ops)]


@pytest.mark.parametrize("count", [1, 15, 16, 65535, 65536])
def test_ops_frame_array_header_sizes(count: int) -> None:
    encoded = [encode_op(UnlinkOp(b"x"))] * count
    (frame,) = FrameDecoder().feed(encode_ops_frame(1, encoded))
    assert isinstance(frame, Ops) and len(frame.ops) == count and frame.last_seq == count


# -- (b) any chunking ---------------------------------------------------------------

@FAST
@given(frame_lists, st.data())
def test_any_chunking_decodes_the_same_frames(frames: list[Frame], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(f) for f in frames)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40), label="cuts")
    decoder = FrameDecoder()
    got: list[Frame] = []
    for chunk in split_at(stream, cuts):
        got += decoder.feed(chunk)
    assert got == frames
    assert decoder.buffered == 0


@QUICK
@given(st.lists(FRAME_STRATEGIES[Ack] | FRAME_STRATEGIES[Auth] | FRAME_STRATEGIES[Ping],
                min_size=1, max_size=4))
def test_byte_at_a_time_decodes_the_same_frames(frames: list[Frame]) -> None:
    stream = b"".join(encode_frame(f) for f in frames)
    decoder = FrameDecoder()
    got: list[Frame] = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i:i + 1])
    assert got == frames


def test_incomplete_frame_yields_nothing_until_complete() -> None:
    data = encode_frame(Ack(received=7, durable=5))
    decoder = FrameDecoder()
    assert decoder.feed(data[:-1]) == []
    assert decoder.buffered == len(data) - 1
    assert decoder.feed(data[-1:]) == [Ack(received=7, durable=5)]


# -- (c) random and mutated bytes -----------------------------------------------------

@FAST
@given(st.binary(min_size=12, max_size=400), st.lists(st.integers(0, 400), max_size=8),
       st.sampled_from([b"", MAGIC, MAGIC + bytes([VERSION])]))
def test_random_bytes_raise_only_protocol_error(
        data: bytes, cuts: list[int], prefix: bytes) -> None:
    # The prefixes get random headers past the magic and version checks.
    data = prefix + data
    feed_hostile(data, chunks=split_at(data, cuts))


@FAST
@given(st.sampled_from(sorted(FRAME_TYPES)) | st.integers(0, 255), st.binary(max_size=300))
def test_garbage_body_with_good_checksum_raises_only_protocol_error(
        ftype: int, body: bytes) -> None:
    feed_hostile(raw_frame(ftype, body))


# Maps that look like frame bodies: real field names, values of any msgpack type.
FIELD_NAMES = sorted({name for cls in FRAME_TYPES.values() for name in cls.model_fields}
                     | {"first_seq", "ops"})
body_maps = st.dictionaries(st.sampled_from(FIELD_NAMES) | texts, msgpack_values, max_size=10)
op_arrays = st.lists(msgpack_values, max_size=7).flatmap(
    lambda rest: st.sampled_from([cls.CODE for cls in OP_TYPES] + [0, 17, 34, -1, 1 << 40])
    .map(lambda code: [code, *rest]))


@QUICK
@given(st.sampled_from(sorted(FRAME_TYPES)), body_maps)
def test_wrong_body_fields_raise_only_protocol_error(ftype: int, body: dict[str, Any]) -> None:
    feed_hostile(raw_frame(ftype, packed(body)))


@QUICK
@given(msgpack_values, st.lists(op_arrays | msgpack_values, max_size=5))
def test_malformed_ops_raise_only_protocol_error(first_seq: Any, ops: list[Any]) -> None:
    feed_hostile(raw_frame(Ops.TYPE, packed({"first_seq": first_seq, "ops": ops})))
    feed_hostile(raw_frame(Ops.TYPE, packed({"first_seq": 1, "ops": ops})))


@FAST
@given(any_op, st.data())
def test_ops_with_one_field_replaced_raise_only_protocol_error(
        op: Op, data: st.DataObject) -> None:
    wire = op.to_wire()
    index = data.draw(st.integers(0, len(wire) - 1), label="field")
    wire[index] = data.draw(msgpack_values, label="value")
    if data.draw(st.booleans(), label="drop last field"):
        wire.pop()
    feed_hostile(raw_frame(Ops.TYPE, packed({"first_seq": 1, "ops": [wire]})))


Mutation = Callable[[bytearray, st.DataObject], bytes]


def _flip_bit(buf: bytearray, data: st.DataObject) -> bytes:
    pos = data.draw(st.integers(0, len(buf) * 8 - 1), label="bit")
    buf[pos // 8] ^= 1 << (pos % 8)
    return bytes(buf)


def _flip_body_bit_fix_crc(buf: bytearray, data: st.DataObject) -> bytes:
    # Only the first frame: flip a bit of its body, then make its checksum right again
    # so the damage reaches msgpack and the model validation.
    length = struct.unpack_from(">I", buf, 6)[0]
    if length == 0:
        return bytes(buf)
    pos = data.draw(st.integers(0, length * 8 - 1), label="body bit")
    buf[HEADER.size + pos // 8] ^= 1 << (pos % 8)
    body = bytes(buf[HEADER.size:HEADER.size + length])
    struct.pack_into(">I", buf, 10, checksum(body))
    return bytes(buf)


def _truncate(buf: bytearray, data: st.DataObject) -> bytes:
    return bytes(buf[:data.draw(st.integers(0, len(buf)), label="keep")])


def _set_length(buf: bytearray, data: st.DataObject) -> bytes:
    struct.pack_into(">I", buf, 6, data.draw(st.integers(0, 0xFFFFFFFF), label="length"))
    return bytes(buf)


def _set_length_near(buf: bytearray, data: st.DataObject) -> bytes:
    length = struct.unpack_from(">I", buf, 6)[0]
    new = max(0, length + data.draw(st.integers(-8, 8), label="delta"))
    struct.pack_into(">I", buf, 6, new)
    if data.draw(st.booleans(), label="fix crc"):
        struct.pack_into(">I", buf, 10, checksum(bytes(buf[HEADER.size:HEADER.size + new])))
    return bytes(buf)


def _set_header_byte(buf: bytearray, data: st.DataObject) -> bytes:
    buf[data.draw(st.integers(0, HEADER.size - 1), label="header byte")] = data.draw(
        st.integers(0, 255), label="value")
    return bytes(buf)


def _splice_garbage(buf: bytearray, data: st.DataObject) -> bytes:
    pos = data.draw(st.integers(0, len(buf)), label="at")
    return bytes(buf[:pos]) + data.draw(st.binary(min_size=1, max_size=20)) + bytes(buf[pos:])


MUTATIONS: list[Mutation] = [_flip_bit, _flip_body_bit_fix_crc, _truncate, _set_length,
                             _set_length_near, _set_header_byte, _splice_garbage]


@FAST
@given(frame_lists, st.sampled_from(MUTATIONS), st.lists(st.integers(0, 2000), max_size=6),
       st.data())
def test_mutated_frames_raise_only_protocol_error(
        frames: list[Frame], mutate: Mutation, cuts: list[int], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(f) for f in frames)
    mutated = mutate(bytearray(stream), data)
    feed_hostile(mutated, chunks=split_at(mutated, cuts))


@pytest.mark.parametrize(("header", "code"), [
    (HEADER.pack(b"XL", VERSION, Ack.TYPE, 0, 0, 0), "protocol"),
    (HEADER.pack(MAGIC, VERSION + 1, Ack.TYPE, 0, 0, 0), "protocol"),
    (HEADER.pack(MAGIC, VERSION, Ack.TYPE, 0x80, 0, 0), "protocol"),
    (HEADER.pack(MAGIC, VERSION, Ack.TYPE, 0x01, 0, 0), "protocol"),  # not negotiated
])
def test_bad_header_is_refused_before_the_body(header: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        FrameDecoder().feed(header)
    assert info.value.code == code


def test_bad_checksum_and_unknown_type_are_protocol_errors() -> None:
    body = packed({"received": 1, "durable": 1})
    with pytest.raises(ProtocolError) as info:
        FrameDecoder().feed(raw_frame(Ack.TYPE, body, crc=checksum(body) ^ 1))
    assert info.value.code == "checksum"
    with pytest.raises(ProtocolError, match="unknown frame type"):
        FrameDecoder().feed(raw_frame(200, body))


# -- (d) frame-size limit -------------------------------------------------------------

@FAST
@given(st.integers(0, 1 << 20), st.integers(1, 0xFFFFFFFF), st.sampled_from(sorted(FRAME_TYPES)),
       st.integers(0, 13))
def test_oversized_frame_is_refused_at_the_header(
        max_frame: int, excess: int, ftype: int, split: int) -> None:
    length = min(max_frame + excess, 0xFFFFFFFF)
    header = HEADER.pack(MAGIC, VERSION, ftype, 0, length, 0)
    decoder = FrameDecoder(max_frame)
    # Less than a header: nothing to judge yet.
    assert decoder.feed(header[:split]) == []
    with pytest.raises(ProtocolError) as info:
        decoder.feed(header[split:])
    assert info.value.code == "too_large"
    assert decoder.buffered == HEADER.size  # no body byte was ever asked for


def test_frame_of_exactly_max_frame_is_accepted() -> None:
    body = packed({"received": 3, "durable": 2})
    decoder = FrameDecoder(max_frame=len(body))
    assert decoder.feed(raw_frame(Ack.TYPE, body)) == [Ack(received=3, durable=2)]
    with pytest.raises(ProtocolError):
        FrameDecoder(max_frame=len(body) - 1).feed(raw_frame(Ack.TYPE, body)[:HEADER.size])


def test_default_limit_refuses_a_4_gib_declaration() -> None:
    with pytest.raises(ProtocolError) as info:
        FrameDecoder().feed(HEADER.pack(MAGIC, VERSION, Ops.TYPE, 0, 0xFFFFFFFF, 0))
    assert info.value.code == "too_large"


# -- (e) msgpack bombs --------------------------------------------------------------

def _ops_body(ops_value: bytes) -> bytes:
    return b"\x82" + packed("first_seq") + packed(1) + packed("ops") + ops_value


def _in_map(key: str, value: bytes) -> bytes:
    return b"\x81" + packed(key) + value


HUGE_DECLARATIONS = {
    "array32": b"\xdd\xff\xff\xff\xff",
    "map32": b"\xdf\xff\xff\xff\xff",
    "bin32": b"\xc6\xff\xff\xff\xff",
    "str32": b"\xdb\xff\xff\xff\xff",
    "ext32": b"\xc9\xff\xff\xff\xff\x01",
    "array16": b"\xdc\xff\xff",
    "bin16": b"\xc5\xff\xff",
}


@pytest.mark.parametrize("kind", sorted(HUGE_DECLARATIONS))
@pytest.mark.parametrize("where", ["body", "ops", "op", "field", "checkresult"])
def test_huge_declared_lengths_in_a_small_body(kind: str, where: str) -> None:
    bomb = HUGE_DECLARATIONS[kind] + b"\x00" * 16
    ftype, body = {
        "body": (Hello.TYPE, bomb),
        "ops": (Ops.TYPE, _ops_body(bomb)),
        "op": (Ops.TYPE, _ops_body(b"\x91\x95\x01" + packed(b"a") + packed(0) + bomb)),
        "field": (Hello.TYPE, _in_map("node", bomb)),
        "checkresult": (CheckResult.TYPE, b"\x83" + packed("seq") + packed(1) + packed("path")
                        + packed(b"p") + packed("result") + _in_map("k", bomb)),
    }[where]
    assert isinstance(feed_hostile(raw_frame(ftype, body)), ProtocolError)


@pytest.mark.parametrize("depth", [1100, 5000, 200_000])
@pytest.mark.parametrize("opener", [b"\x91", b"\x81\xa1k", b"\xdc\x00\x01"])
@pytest.mark.parametrize("ftype", [Ops.TYPE, Hello.TYPE, CheckResult.TYPE, Ack.TYPE])
def test_deeply_nested_bodies(depth: int, opener: bytes, ftype: int) -> None:
    nest = opener * depth + b"\xc0"
    bodies = [nest, _ops_body(nest), _in_map("result", nest), _in_map("received", nest)]
    for body in bodies:
        assert isinstance(feed_hostile(raw_frame(ftype, body)), ProtocolError)


@pytest.mark.parametrize("depth", [50, 400])
def test_moderately_nested_fields_are_refused(depth: int) -> None:
    nest = b"\x91" * depth + b"\xc0"
    for ftype, body in [(Ops.TYPE, _ops_body(b"\x91" + nest)),
                        (Ops.TYPE, _ops_body(b"\x91\x92\x06" + nest)),
                        (Hello.TYPE, _in_map("versions", nest)),
                        (Ack.TYPE, _in_map("received", nest))]:
        assert isinstance(feed_hostile(raw_frame(ftype, body)), ProtocolError)


def test_deeply_nested_op_kind_is_a_protocol_error() -> None:
    body = _ops_body(b"\x91" + b"\x91" * 1000 + b"\xc0")
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(raw_frame(Ops.TYPE, body))


def test_boolean_op_kind_is_refused() -> None:
    wire = [True, b"a", 0, b"x", 0]
    with pytest.raises(ProtocolError):
        op_from_wire(wire)


def test_ext_object_is_not_an_op() -> None:
    body = packed({"first_seq": 1, "ops": [msgpack.ExtType(6, b"x")]})
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(raw_frame(Ops.TYPE, body))


# -- (f) hostile paths --------------------------------------------------------------

HOSTILE_COMPONENTS = [b"..", b".", b""]
HOSTILE_PATHS = [
    b"", b"/", b".", b"..", b"../x", b"a/../b", b"a/..", b"/etc/passwd", b"//x", b"a//b",
    b"a/", b"./a", b"a/./b", b"a\0b", b"\0", b"a/b\0", b"x" * (MAX_NAME_BYTES + 1),
    b"a/" * (MAX_PATH_BYTES // 2) + b"b",
]


@st.composite
def hostile_paths(draw: st.DrawFn) -> bytes:
    parts = draw(st.lists(components, min_size=0, max_size=4))
    how = draw(st.sampled_from(["component", "absolute", "nul", "trailing", "fixed"]))
    if how == "component":
        parts.insert(draw(st.integers(0, len(parts))), draw(st.sampled_from(HOSTILE_COMPONENTS)))
        path = b"/".join(parts)
    elif how == "absolute":
        path = b"/" + b"/".join(parts or [b"etc"])
    elif how == "nul":
        path = b"/".join(parts or [b"x"])
        at = draw(st.integers(0, len(path)))
        path = path[:at] + b"\0" + path[at:]
    elif how == "trailing":
        path = b"/".join(parts or [b"x"]) + b"/"
    else:
        path = draw(st.sampled_from(HOSTILE_PATHS))
    return path


PATH_OPS = [cls for cls in OP_TYPES if cls not in (TaskOp, NoteOp)]


@FAST
@given(st.sampled_from(PATH_OPS).flatmap(lambda cls: OP_STRATEGIES[cls]), hostile_paths(),
       st.data())
def test_ops_with_hostile_paths_are_refused(op: Op, path: bytes, data: st.DataObject) -> None:
    with pytest.raises(ProtocolError):
        check_relative_path(path)
    # b"." names the replica root in a CHECK (a directory check of the root): legal there.
    assume(not (isinstance(op, CheckOp) and path == b"."))
    wire = op.to_wire()
    # Paths are the op's bytes fields named path/old/new; replace one of them.
    names = [f.name for f in dataclasses.fields(op)]
    name = data.draw(st.sampled_from([n for n in names if n in ("path", "old", "new")]),
                     label="which path")
    wire[1 + names.index(name)] = path
    with pytest.raises(ProtocolError):
        op_from_wire(wire)
    body = packed({"first_seq": 1, "ops": [op.to_wire(), wire]})
    result = feed_hostile(raw_frame(Ops.TYPE, body))
    assert isinstance(result, ProtocolError)


@pytest.mark.parametrize("path", HOSTILE_PATHS)
def test_every_hostile_path_example_is_refused(path: bytes) -> None:
    for wire in ([UnlinkOp.CODE, path], [RenameOp.CODE, b"ok", path, 0],
                 [LinkOp.CODE, path, b"ok"], [WriteOp.CODE, path, 0, b"data", 0]):
        result = feed_hostile(raw_frame(Ops.TYPE, packed({"first_seq": 1, "ops": [wire]})))
        assert isinstance(result, ProtocolError)
