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

__all__ = ["MeterCounters", "JournalRecord", "read_counters", "read_journal", "journal_records", "pending_seqs"]

COUNTERS_MAGIC = b"GLC1"
_COUNTERS = struct.Struct(">4sIIIIIIIIQQ32s")
FRAME_MAGIC = b"\xa7J"
MAX_PAYLOAD = 2048
_COMMON = struct.Struct(">BIIIQQ32s")
READING, EVENT = 1, 2


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

    @property
    def key(self) -> int:
        """What acknowledges it: a reading's own seq, an event's next reading."""
        return self.seq + 1 if self.kind == EVENT else self.seq


def _slot(path: Path) -> MeterCounters | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    body = _COUNTERS.size
    if len(data) != body + 4 or zlib.crc32(data[:body]) != int.from_bytes(data[body:], "big"):
        return None
    f = _COUNTERS.unpack(data[:body])
    if f[0] != COUNTERS_MAGIC:
        return None
    return MeterCounters(*f[1:11], prev=f[11].hex())


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
    return read_journal(state_dir / "journal")


def read_journal(d: Path) -> list[JournalRecord]:
    """Every intact record in the segment files of folder d, in append order."""
    out = []
    for seg in sorted(d.glob("*.seg")) if d.exists() else []:
        for off, p in _frames(seg.read_bytes()):
            kind, seq, t, eseq, imp, exp, _ = _COMMON.unpack_from(p)
            out.append(JournalRecord(int(seg.stem), off, kind, seq, t, eseq, imp, exp, p))
    return out


def pending_seqs(state_dir: Path) -> list[int]:
    """Seqs of the readings the meter still holds for the gateway (above its persisted floor)."""
    c = read_counters(state_dir)
    floor = c.floor if c is not None else 0
    return [r.seq for r in journal_records(state_dir) if r.kind == READING and r.seq > floor]
