"""Serial framing v1 (docs/serial.md): the CPython codec against the shared vectors,
the firmware codec under the real MicroPython Unix port against the same vectors,
round trips and resynchronisation over arbitrary bytes and chunkings."""

from __future__ import annotations

import json
import zlib

import pytest
from hypothesis import given, settings, strategies as st

from gridledger.errors import Rejected
from gridledger.serialframe import (REASONS, Decoder, Frame, FrameType, cobs_decode, cobs_encode, decode,
                                    encode, limit)

from conftest import MP_SCRIPTS, VECTORS

VEC = json.loads((VECTORS / "serial_frames_v1.json").read_text())


def results(items: list[Frame | Rejected]) -> list[dict]:
    return [{"reject": x.reason} if isinstance(x, Rejected) else {"type": chr(x.type), "payload": x.payload.hex()}
            for x in items]


def test_frame_vectors_in_cpython():
    """Every vector frame encodes to the pinned bytes and decodes back to its type and payload."""
    for v in VEC["frames"]:
        payload = bytes.fromhex(v["payload"])
        wire = encode(ord(v["type"]), payload)
        assert wire.hex() == v["wire"], v["about"]
        assert Decoder(len(payload)).feed(wire) == [Frame(FrameType(ord(v["type"])), payload)]


@pytest.mark.parametrize("chunk", [0, 1, 7])
def test_stream_vectors_in_cpython(chunk):
    """Each vector stream yields its frames and rejections, whatever the read chunking."""
    for s in VEC["streams"]:
        wire = bytes.fromhex(s["wire"])
        d = Decoder(VEC["max_payload"])
        step = chunk or len(wire)
        got = [x for i in range(0, len(wire), step) for x in d.feed(wire[i:i + step])]
        assert results(got) == s["expect"], s["about"]


def test_vectors_cover_every_rejection_reason():
    seen = {e["reject"] for s in VEC["streams"] for e in s["expect"] if "reject" in e}
    assert seen == set(REASONS)


def test_frame_vectors_under_micropython(mp_source):
    """The firmware encoder writes every vector byte for byte, and its decoder agrees with
    the CPython decoder on every stream (whole, 1-byte and 7-byte reads)."""
    got = mp_source.run_json(MP_SCRIPTS / "mp_serial_frames.py", VECTORS / "serial_frames_v1.json", heap="1m")
    assert got["frames"] == [v["wire"] for v in VEC["frames"]]
    assert got["decoded"] == [[v["type"] + v["payload"]] for v in VEC["frames"]]
    assert got["soft_crc"] == [True] * len(VEC["frames"])  # the fallback for ports without binascii.crc32
    for chunk, runs in got["streams"].items():
        assert runs == [s["expect"] for s in VEC["streams"]], f"chunk {chunk}"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1200))
def test_cobs_round_trip_and_no_zero_inside(data):
    enc = cobs_encode(data)
    assert b"\x00" not in enc
    assert len(enc) <= len(data) + len(data) // 254 + 1
    assert cobs_decode(enc) == data


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(st.tuples(st.sampled_from(list(FrameType)), st.binary(max_size=600)), max_size=6),
       garbage=st.lists(st.binary(max_size=40), min_size=7, max_size=7),
       chunk=st.integers(1, 400))
def test_garbage_between_frames_never_costs_a_good_frame(frames, garbage, chunk):
    """Any bytes between frames (zeros, text, stray COBS) are rejected or ignored;
    every good frame still comes out, in order, whatever the read chunking."""
    wire = garbage[0] + b"".join(encode(t, p) + g for (t, p), g in zip(frames, garbage[1:]))
    d = Decoder(600)
    got = [x for i in range(0, len(wire), chunk) for x in d.feed(wire[i:i + chunk])]
    good = [x for x in got if isinstance(x, Frame)]
    assert good == [Frame(t, p) for t, p in frames]
    assert all(x.reason in REASONS for x in got if isinstance(x, Rejected))


@pytest.mark.parametrize("raw,reason", [
    (b"\x05ab", "bad_cobs"),
    (b"\x01\x01", "too_short"),
    (cobs_encode(b"A{}" + (zlib.crc32(b"A{}") ^ 0x80000000).to_bytes(4, "big")), "bad_crc"),
    (cobs_encode(b"\x00" + zlib.crc32(b"\x00").to_bytes(4, "big")), "unknown_type"),
])
def test_decode_names_each_rejection(raw, reason):
    with pytest.raises(Rejected) as exc:
        decode(raw)
    assert exc.value.reason == reason


def test_oversized_run_is_dropped_as_it_arrives_and_reported_once():
    """A run past the limit is not buffered (memory stays bounded) and costs one rejection."""
    d = Decoder(64)
    assert d.feed(b"\x00" + b"\x41" * 50) == []
    assert d.feed(b"\x41" * 100_000) == []
    assert len(d._buf) == 0
    got = d.feed(b"\x00" + encode(FrameType.ACK, b"{}"))
    assert [x.reason if isinstance(x, Rejected) else x for x in got] == ["oversized", Frame(FrameType.ACK, b"{}")]


def test_largest_payload_fits_the_limit_exactly():
    """A frame carrying max_payload bytes (worst case: no zero byte) passes; one byte more is oversized."""
    for n in (0, 248, 249, 250, 1024, 8192):
        payload = b"\x01" * n
        assert len(encode(FrameType.READING, payload)) - 2 <= limit(n)
        assert Decoder(n).feed(encode(FrameType.READING, payload)) == [Frame(FrameType.READING, payload)]
    got = Decoder(100).feed(encode(FrameType.READING, b"\x01" * 110))
    assert [x.reason for x in got] == ["oversized"]


def test_encode_refuses_an_unknown_type():
    with pytest.raises(ValueError):
        encode(0x5A, b"")
