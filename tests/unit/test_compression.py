"""zstd compression of OPS frames: negotiation, skipping incompressible data, bomb bounds."""

from __future__ import annotations

import os

import pytest

from protocol.errors import ProtocolError
from protocol.frames import (
    FLAG_COMPRESSED,
    HEADER,
    MAGIC,
    VERSION,
    ZSTD,
    FrameDecoder,
    Ops,
    Welcome,
    checksum,
    encode_frame,
    encode_op,
)
from protocol.ops import WriteOp
from protocol.session import Role, Session, State

zstandard = pytest.importorskip("zstandard")

KEY = b"k" * 32


def _pair(capabilities: list[str]) -> tuple[Session, Session, Welcome]:
    source, target = Session(Role.SOURCE), Session(Role.TARGET)
    target.receive_data(source.start(node="src1", conid=1, volume="data",
                                     target_path=b"data", key=KEY,
                                     capabilities=capabilities))
    source.receive_data(target.challenge(KEY))
    target.receive_data(source.take_auth())
    frames = source.receive_data(target.accept(Welcome(node="tgt1", resume_from=1,
                                                       restore_required=False)))
    assert source.state is State.STREAMING and len(frames) == 1
    welcome = frames[0]
    assert isinstance(welcome, Welcome)
    return source, target, welcome


def _flags(frame: bytes) -> int:
    return int(HEADER.unpack_from(frame)[3])


def test_compression_is_negotiated_and_used_for_compressible_ops() -> None:
    source, target, welcome = _pair([ZSTD])
    assert welcome.compression == ZSTD
    assert source.compression == target.compression == ZSTD
    ops = [WriteOp(b"f", i * 65536, b"\0" * 65536, 0) for i in range(16)]   # 1 MiB of zeros
    frame = source.send_encoded_ops(1, [encode_op(op) for op in ops])
    assert _flags(frame) & FLAG_COMPRESSED
    assert len(frame) < 64 * 1024
    assert target.receive_data(frame) == [Ops(first_seq=1, ops=ops)]
    # Random bytes do not shrink: sent as they are, and still accepted.
    noise = [WriteOp(b"f", 0, os.urandom(65536), 0)]
    frame = source.send_encoded_ops(17, [encode_op(op) for op in noise])
    assert not _flags(frame) & FLAG_COMPRESSED
    assert target.receive_data(frame) == [Ops(first_seq=17, ops=noise)]


def test_no_compression_unless_the_source_asks() -> None:
    source, target, welcome = _pair([])
    assert target.compression is None
    assert welcome.compression == "" and source.compression is None
    ops = [WriteOp(b"f", 0, b"\0" * 65536, 0)]
    frame = source.send_encoded_ops(1, [encode_op(op) for op in ops])
    assert not _flags(frame) & FLAG_COMPRESSED


def test_welcome_with_compression_not_offered_is_refused() -> None:
    source, target = Session(Role.SOURCE), Session(Role.TARGET)
    target.receive_data(source.start(node="src1", conid=1, volume="data",
                                     target_path=b"data", key=KEY))
    source.receive_data(target.challenge(KEY))
    target.receive_data(source.take_auth())
    welcome = encode_frame(Welcome(node="tgt1", resume_from=1, restore_required=False,
                                   compression=ZSTD))
    with pytest.raises(ProtocolError, match="not offered"):
        source.receive_data(welcome)


def _compressed_frame(body: bytes) -> bytes:
    packed = zstandard.ZstdCompressor().compress(body)
    return HEADER.pack(MAGIC, VERSION, Ops.TYPE, FLAG_COMPRESSED, len(packed),
                       checksum(packed)) + packed


def test_compressed_frame_without_negotiation_is_refused() -> None:
    with pytest.raises(ProtocolError, match="not negotiated"):
        FrameDecoder().feed(_compressed_frame(b"\x80"))


def test_zstd_bomb_is_bounded_by_max_frame() -> None:
    decoder = FrameDecoder(max_frame=1024 * 1024)
    decoder.compression = ZSTD
    bomb = _compressed_frame(b"\0" * (64 * 1024 * 1024))   # 64 MiB from a few KiB
    assert len(bomb) < 64 * 1024
    with pytest.raises(ProtocolError, match="beyond the limit") as info:
        decoder.feed(bomb)
    assert info.value.code == "too_large"


def test_garbage_compressed_body_is_a_protocol_error() -> None:
    decoder = FrameDecoder()
    decoder.compression = ZSTD
    junk = b"not zstd at all"
    frame = HEADER.pack(MAGIC, VERSION, Ops.TYPE, FLAG_COMPRESSED, len(junk),
                        checksum(junk)) + junk
    with pytest.raises(ProtocolError, match="does not decompress"):
        decoder.feed(frame)
