"""Serial framing v1 for wired meters (docs/serial.md): 0x00, COBS(type, payload, CRC-32), 0x00.

This is the CPython twin of ``firmware/frame.py``; ``tests/vectors/serial_frames_v1.json``
pins both to the same bytes. COBS leaves no zero byte inside a frame, so every 0x00
is a boundary: a receiver resynchronises at the next one after garbage, a truncated
frame or a reboot mid-frame, and the leading 0x00 of each frame ends any garbage
before it so it cannot spoil the frame. The CRC-32 (zlib's) catches bit errors.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from enum import IntEnum

from .errors import Rejected

__all__ = ["FrameType", "Frame", "REASONS", "limit", "cobs_encode", "cobs_decode", "encode", "decode",
           "Decoder"]


class FrameType(IntEnum):
    """The type byte; printable ASCII so a hex dump of the line reads as it flows."""
    HELLO = 0x48    # H meter -> bridge: {"proto", "meter", "area"}, repeated as a keepalive
    READING = 0x52  # R meter -> bridge: a wire-v1 reading, the exact payload an MQTT meter publishes
    HEALTH = 0x53   # S meter -> bridge: {"seq", "spooled", ...}
    LOG = 0x4C      # L meter -> bridge: one JSON log line (a meter whose console is the link)
    WELCOME = 0x57  # W bridge -> meter: broker connected and the meter's ack topics subscribed
    ACK = 0x41      # A bridge -> meter: the gateway's ack body, verbatim
    NACK = 0x4E     # N bridge -> meter: the gateway's nack body, verbatim
    QUERY = 0x51    # Q bridge -> meter: say hello now (the bridge does not know who is there)
    ALERT = 0x45    # E meter -> bridge: a signed alert (docs/alerts.md), the exact MQTT payload
    EVENT = 0x56    # V meter -> bridge: a signed meter event (docs/journal.md), the exact MQTT payload


# Why a run of bytes between delimiters is not a frame, in the order they are checked.
REASONS = ("oversized", "bad_cobs", "too_short", "bad_crc", "unknown_type")
_TYPES = frozenset(int(t) for t in FrameType)


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    payload: bytes


def limit(max_payload: int) -> int:
    """Most bytes between two delimiters for payloads up to `max_payload` bytes:
    type + payload + CRC, plus one COBS code byte per started 254 bytes."""
    body = 1 + max_payload + 4
    return body + body // 254 + 1


def cobs_encode(data: bytes) -> bytes:
    """Canonical COBS (no final code after a full 254-byte block at the end)."""
    out = bytearray()
    n, i = len(data), 0
    while True:
        j = data.find(b"\x00", i)
        end = n if j < 0 else j
        full = False
        while end - i >= 254:
            out.append(255)
            out += data[i:i + 254]
            i += 254
            full = True
        if not (j < 0 and full and i == end):
            out.append(end - i + 1)
            out += data[i:end]
        if j < 0:
            return bytes(out)
        i = j + 1


def cobs_decode(data: bytes) -> bytes:
    """Inverse of `cobs_encode` for bytes holding no zero; raises Rejected("bad_cobs")."""
    out = bytearray()
    n, i = len(data), 0
    while i < n:
        c = data[i]
        if c == 0:
            raise Rejected("bad_cobs", f"zero byte at {i}")
        j = i + c
        if j > n:
            raise Rejected("bad_cobs", f"code {c} at {i} runs past the end ({n} bytes)")
        out += data[i + 1:j]
        i = j
        if c < 255 and i < n:
            out.append(0)
    return bytes(out)


def encode(ftype: int, payload: bytes) -> bytes:
    """The bytes on the line for one frame, both delimiters included."""
    if ftype not in _TYPES:
        raise ValueError(f"unknown frame type {ftype:#04x}")
    body = bytes((ftype,)) + payload
    return b"\x00" + cobs_encode(body + zlib.crc32(body).to_bytes(4, "big")) + b"\x00"


def decode(raw: bytes) -> Frame:
    """One frame's bytes between delimiters -> Frame; raises Rejected with one of REASONS
    (except "oversized", which only the stream decoder can see)."""
    body = cobs_decode(raw)
    if len(body) < 5:
        raise Rejected("too_short", f"{len(body)} bytes, need type + CRC-32")
    want, got = zlib.crc32(body[:-4]), int.from_bytes(body[-4:], "big")
    if want != got:
        raise Rejected("bad_crc", f"crc {got:08x} != {want:08x} over {len(body) - 4} bytes")
    if body[0] not in _TYPES:
        raise Rejected("unknown_type", f"type {body[0]:#04x}")
    return Frame(FrameType(body[0]), body[1:-4])


class Decoder:
    """Bytes in, in any chunking; frames and rejections out, in line order.

    Memory stays bounded: a run longer than `limit(max_payload)` is dropped as it
    arrives and reported once, as "oversized", at its closing delimiter. Runs of
    delimiters (empty frames) are idle line, not errors.
    """

    def __init__(self, max_payload: int):
        self.limit = limit(max_payload)
        self._buf = bytearray()
        self._over = 0

    def feed(self, data: bytes) -> list[Frame | Rejected]:
        out: list[Frame | Rejected] = []
        n, i = len(data), 0
        while i < n:
            j = data.find(b"\x00", i)
            end = n if j < 0 else j
            if self._over:
                self._over += end - i
            elif len(self._buf) + end - i > self.limit:
                self._over = len(self._buf) + end - i
                self._buf = bytearray()
            else:
                self._buf += data[i:end]
            if j < 0:
                break
            if self._over:
                out.append(Rejected("oversized", f"{self._over} bytes without a delimiter > {self.limit}"))
                self._over = 0
            elif self._buf:
                raw = bytes(self._buf)
                self._buf.clear()
                try:
                    out.append(decode(raw))
                except Rejected as exc:
                    out.append(exc)
            i = j + 1
        return out
