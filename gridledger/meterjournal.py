"""A meter's counters and journal read on the CPython side (tests, the testbed, a
technician's copy of a meter's flash). The formats are the firmware's
(firmware/counters.py, firmware/journal.py, firmware/records.py; docs/journal.md);
tests/test_journal.py pins that both sides agree.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from .paillier import djn_rho

__all__ = ["MeterCounters", "JournalRecord", "read_counters", "read_journal", "journal_records", "pending_seqs"]

COUNTERS_MAGIC = b"GLC2"
_COUNTERS = struct.Struct(">4sIIIIIIIIQQ32sQQ")
V1_COUNTERS_MAGIC = b"GLC1"  # the first format: no sensor checkpoint
_V1_COUNTERS = struct.Struct(">4sIIIIIIIIQQ32s")
FRAME_MAGIC = b"\xa7J"
MAX_PAYLOAD = 2048
V2 = 0x10  # kind byte's high nibble: the header ends with the sensor checkpoint
TQ = 0x20  # and this flag: a reading's time quality, one byte after its signature
COMPACT = 0x40  # and this one: a compact reading (plaintext and randomness seed, no ciphertext)
TIME_QUALITIES = ("ntp", "rtc", "host", "unsynced")  # the byte is the index + 1 (firmware/wire.py TQS)
_COMMON = struct.Struct(">BIIIQQ32sQQ")
_V1_COMMON = struct.Struct(">BIIIQQ32s")
READING, EVENT = 1, 2
NO_CKPT = (1 << 64) - 1


def _ckpt(imp: int, exp: int) -> tuple[int, int] | None:
    return None if NO_CKPT in (imp, exp) else (imp, exp)


@dataclass(frozen=True)
class MeterCounters:
    gen: int
    seq: int
    t: int
    eseq: int
    boot: int
    acked: int
    floor: int
    dropped: int
    import_wh: int
    export_wh: int
    prev: str
    sensor_checkpoint: tuple[int, int] | None = None  # sensor totals the registers counted up to


@dataclass(frozen=True)
class JournalRecord:
    segment: int
    offset: int
    kind: int
    seq: int
    t: int
    eseq: int
    import_wh: int
    export_wh: int
    payload: bytes
    sensor_checkpoint: tuple[int, int] | None = None
    version: int = 2  # 1: written before the header carried the sensor checkpoint

    @property
    def compact(self) -> bool:
        """A reading journaled as its plaintext and randomness seed (firmware/records.py COMPACT)."""
        return self.kind == READING and bool(self.payload[0] & COMPACT)

    @property
    def _after_signature(self) -> int:
        if self.compact:
            return _COMMON.size + 4 + 64  # dt, signature: no kid
        return (_COMMON.size if self.version == 2 else _V1_COMMON.size) + 4 + 8 + 64

    @property
    def time_quality(self) -> str | None:
        """A reading's time quality (wire extension tq), None for a plain v1 reading."""
        if not self.payload[0] & TQ:
            return None
        return TIME_QUALITIES[self.payload[self._after_signature] - 1]

    @property
    def ciphertext(self) -> int:
        """A full-format reading's Paillier ciphertext (after the header, dt, kid, signature and
        time quality); a compact reading has none stored: `ciphertext_for(n)`."""
        if self.compact:
            raise ValueError("a compact journal record stores no ciphertext: use ciphertext_for(n)")
        at = self._after_signature + (1 if self.payload[0] & TQ else 0)
        return int.from_bytes(self.payload[at:], "big")

    @property
    def compact_fields(self) -> tuple[bytes, int, int, bytes]:
        """A compact reading's (hash check: first 4 bytes of its hash, DJN exponent bits,
        plaintext m, seed)."""
        p = self.payload
        at = self._after_signature + (1 if p[0] & TQ else 0)
        check, ebits, mask = p[at:at + 4], 8 * p[at + 4], int.from_bytes(p[at + 5:at + 7], "big")
        at += 7
        m = 0
        for s in range(16):
            if mask >> s & 1:
                v = sh = 0
                while True:
                    b = p[at]
                    at += 1
                    v |= (b & 0x7F) << sh
                    sh += 7
                    if b < 0x80:
                        break
                m |= v << (48 * s)
        return check, ebits, m, p[at:]

    def ciphertext_for(self, n: int) -> int:
        """The reading's ciphertext under Paillier modulus n: stored, or computed again
        from a compact record's plaintext and seed exactly as the meter does."""
        if not self.compact:
            return self.ciphertext
        _, ebits, m, seed = self.compact_fields
        nsq = n * n
        return (1 + m * n) * djn_rho(n, seed, ebits) % nsq

    @property
    def key(self) -> int:
        """What acknowledges it: a reading's own seq, an event's next reading."""
        return self.seq + 1 if self.kind == EVENT else self.seq


def _slot(path: Path) -> MeterCounters | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    fmt, magic = {_COUNTERS.size + 4: (_COUNTERS, COUNTERS_MAGIC),
                  _V1_COUNTERS.size + 4: (_V1_COUNTERS, V1_COUNTERS_MAGIC)}.get(len(data), (None, None))
    if fmt is None:
        return None
    body = fmt.size
    if zlib.crc32(data[:body]) != int.from_bytes(data[body:], "big"):
        return None
    f = fmt.unpack(data[:body])
    if f[0] != magic:
        return None
    return MeterCounters(*f[1:11], prev=f[11].hex(), sensor_checkpoint=_ckpt(*f[12:]) if len(f) > 12 else None)


def read_counters(state_dir: Path) -> MeterCounters | None:
    """The valid slot with the highest generation, or None."""
    slots = [c for c in (_slot(state_dir / "counters.0"), _slot(state_dir / "counters.1")) if c is not None]
    return max(slots, key=lambda c: c.gen) if slots else None


def _frames(data: bytes):
    """(offset, payload) of every intact frame, resynchronising on the magic after damage."""
    pos = 0
    while pos + 8 <= len(data):
        n = int.from_bytes(data[pos + 2:pos + 4], "big")
        end = pos + 4 + n
        if (data[pos:pos + 2] == FRAME_MAGIC and 0 < n <= MAX_PAYLOAD and end + 4 <= len(data)
                and zlib.crc32(data[pos:end]) == int.from_bytes(data[end:end + 4], "big")):
            yield pos, data[pos + 4:end]
            pos = end + 4
            continue
        nxt = data.find(FRAME_MAGIC, pos + 1)
        pos = nxt if nxt >= 0 else len(data)


def journal_records(state_dir: Path) -> list[JournalRecord]:
    """Every intact record of a meter's journal in append order, acknowledged ones included."""
    return read_journal(state_dir / "unacked")


def read_journal(d: Path) -> list[JournalRecord]:
    """Every intact record in the segment files of folder d, in append order."""
    out = []
    for seg in sorted(d.glob("*.seg")) if d.exists() else []:
        for off, p in _frames(seg.read_bytes()):
            if p[0] & V2:
                kind, seq, t, eseq, imp, exp, _, ci, ce = _COMMON.unpack_from(p)
                ck, version = _ckpt(ci, ce), 2
            else:
                kind, seq, t, eseq, imp, exp, _ = _V1_COMMON.unpack_from(p)
                ck, version = None, 1
            out.append(JournalRecord(int(seg.stem), off, kind & 0x0F, seq, t, eseq, imp, exp, p, ck, version))
    return out


def pending_seqs(state_dir: Path) -> list[int]:
    """Seqs of the readings the meter still holds for the gateway (above its persisted floor)."""
    c = read_counters(state_dir)
    floor = c.floor if c is not None else 0
    return [r.seq for r in journal_records(state_dir) if r.kind == READING and r.seq > floor]
