"""The meter's journal and counters (firmware/journal.py, firmware/counters.py) under the
real `micropython` binary: torn writes at every byte of the last record and seeded random
corruption recover every intact record and no damaged one; a torn or corrupted counters
slot never wins over an intact one; a full journal says so and keeps the oldest or the
newest as configured. The CPython reader (gridledger/meterjournal.py) agrees byte for byte."""

from __future__ import annotations

import json
import random
import struct
import zlib
from pathlib import Path

import pytest

from gridledger.meterjournal import read_counters, read_journal

from conftest import MP_SCRIPTS, MicroPython

SCRIPT = MP_SCRIPTS / "mp_journal.py"
FRAME = 8  # magic, length, CRC-32 around each payload


def payload(rng: random.Random, seq: int, size: int) -> bytes:
    """A reading-like record: kind 1, seq, then random bytes with the frame magic planted
    inside (and a whole fake frame header), so recovery cannot rely on never seeing it."""
    body = bytearray(rng.randbytes(size - 5))
    at = rng.randrange(0, len(body) - 4)
    body[at:at + 4] = b"\xa7J" + struct.pack(">H", rng.randrange(1, 60))
    return bytes([1]) + struct.pack(">I", seq) + bytes(body)


def run(mp, tmp: Path, job: dict, heap: str = "256k"):
    path = tmp / f"job-{job['mode']}.json"
    path.write_text(json.dumps(job))
    lines = [json.loads(line) for line in mp.run(SCRIPT, path, heap=heap, timeout=300).splitlines()]
    return lines if "cases" in job else lines[-1]


def crc(p: bytes) -> int:
    return zlib.crc32(p)


@pytest.fixture(params=["source", "mpy"])
def mp(request, mp_source, firmware_bundle):
    """The firmware's modules from source and as the mpy-cross bundle flashed to boards."""
    return mp_source if request.param == "source" else MicroPython([firmware_bundle])


@pytest.fixture
def written(mp, tmp_path):
    """Twelve records of 61..1100 bytes written by the firmware, four per segment."""
    rng = random.Random(3)
    payloads = [payload(rng, i + 1, rng.randrange(61, 1100)) for i in range(12)]
    src = tmp_path / "src"
    out = run(mp, tmp_path, {"mode": "write", "dir": str(src), "per_segment": 4,
                                    "payloads": [p.hex() for p in payloads]})
    assert out["live"] == 12
    return src, payloads


def frames(payloads: list[bytes], per_segment: int) -> list[tuple[str, int, int]]:
    """(segment file, start, end) of each record as the journal lays them out."""
    out, off = [], 0
    for i, p in enumerate(payloads):
        if i % per_segment == 0:
            off = 0
        seg = f"{i // per_segment + 1:08d}.seg"
        out.append((seg, off, off + FRAME + len(p)))
        off += FRAME + len(p)
    return out


def test_cpython_reader_agrees_with_the_firmware_writer(written):
    """Segments of four, frames where the format says, payloads byte for byte."""
    src, payloads = written
    recs = read_journal(src)
    assert [r.payload for r in recs] == payloads
    assert [(f"{r.segment:08d}.seg", r.offset) for r in recs] == [(s, a) for s, a, _ in frames(payloads, 4)]


def test_torn_write_at_every_byte_of_the_last_record(mp, tmp_path, written):
    """The last record cut at each of its byte offsets: every earlier record comes back
    intact, the torn one never; a record appended after recovery is kept too."""
    src, payloads = written
    seg, start, end = frames(payloads, 4)[-1]
    extra = payload(random.Random(9), 13, 300)
    cases = [{"ops": [{"op": "cut", "file": seg, "at": at}], "append": True} for at in range(start, end)]
    res = run(mp, tmp_path, {"mode": "recover", "src": str(src), "dir": str(tmp_path / "work"),
                                    "per_segment": 4, "cases": cases, "append": extra.hex()})
    intact = [[i + 1, crc(p)] for i, p in enumerate(payloads[:-1])]
    assert len(res) == end - start
    for at, r in zip(range(start, end), res):
        assert r["records"] == intact, f"cut at {at}"
        assert (r["damaged"] > 0) == (at > start), f"cut at {at}: a torn tail is reported"
        assert r["appended"] and r["after_append"] == intact + [[13, crc(extra)]], f"cut at {at}"


def test_random_corruption_loses_only_the_damaged_records(mp, tmp_path, written):
    """300 seeded cases of one to three flipped bytes anywhere in the segments: exactly
    the records whose frame holds a flipped byte are lost, all others come back."""
    src, payloads = written
    lay = frames(payloads, 4)
    rng = random.Random(20261121)
    cases, expected = [], []
    for _ in range(300):
        hit = set()
        ops = []
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(payloads))
            seg, start, end = lay[i]
            at = rng.randrange(start, end)
            ops.append({"op": "xor", "file": seg, "at": at, "xor": rng.randrange(1, 256)})
            hit.add(i)
        # two flips of the same byte may cancel out: that record is intact again
        flips: dict[tuple[str, int], int] = {}
        for op in ops:
            flips[(op["file"], op["at"])] = flips.get((op["file"], op["at"]), 0) ^ op["xor"]
        hit = {i for i, (seg, s, e) in enumerate(lay) if any(f == seg and s <= a < e and x for (f, a), x in flips.items())}
        cases.append({"ops": ops})
        expected.append([[i + 1, crc(p)] for i, p in enumerate(payloads) if i not in hit])
    res = run(mp, tmp_path, {"mode": "recover", "src": str(src), "dir": str(tmp_path / "work"),
                                    "per_segment": 4, "cases": cases})
    for n, (r, want) in enumerate(zip(res, expected)):
        assert r["records"] == want, f"case {n}: {cases[n]['ops']}"
        assert (r["damaged"] > 0) == (len(want) < len(payloads)), f"case {n}"


@pytest.mark.parametrize("policy,kept_keys,dropped", [
    ("keep_oldest", list(range(1, 11)), 5),
    ("keep_newest", list(range(6, 16)), 5),
])
def test_full_journal_says_so_and_keeps_per_policy(mp, tmp_path, policy, kept_keys, dropped):
    """Capacity 10, fifteen records: full is flagged, five are dropped and counted, the
    oldest or newest ten stay (also across a restart); acks free room and segments, and
    records appended after everything was acknowledged read back in place."""
    rng = random.Random(5)
    payloads = [payload(rng, i + 1, 100) for i in range(15)]
    more = [payload(rng, 16, 100), payload(rng, 17, 90)]
    out = run(mp, tmp_path, {"mode": "full", "dir": str(tmp_path / "j"), "capacity": 10, "when_full": policy,
                             "per_segment": 4, "payloads": [p.hex() for p in payloads], "ack": 12,
                             "ack_all": 15, "more": [p.hex() for p in more]})
    assert out["full"] and out["live"] == 10 and out["dropped"] == dropped
    assert [k for k, _ in out["records"]] == kept_keys
    assert [c for _, c in out["records"]] == [crc(payloads[k - 1]) for k in kept_keys]
    if policy == "keep_oldest":
        assert out["kept"] == [True] * 10 + [False] * 5
    else:
        assert out["kept"] == [True] * 15 and out["floor"] == 5
    after = out["after_ack"]
    assert not after["full"] and [k for k, _ in after["records"]] == [k for k in kept_keys if k > 12]
    assert after["files"] < out["files"], "fully acknowledged segments are deleted"
    assert out["more"]["records"] == [[16, crc(more[0])], [17, crc(more[1])]] and out["more"]["live"] == 2
    assert out["recovered"] == out["more"]["records"], "and the same after a restart"


def test_send_position_survives_its_segment_being_deleted(mp, tmp_path):
    """After a restart, the record the send loop last published is acked and its segment
    deleted; the next records go to a new segment, and the loop's next position is the
    first of them: a reused segment number once made it skip one (a seq_gap at the gateway)."""
    rng = random.Random(5)
    out = run(mp, tmp_path, {"mode": "cursor", "dir": str(tmp_path / "j"),
                             "payloads": [payload(rng, i, 200).hex() for i in (1, 2, 3, 4)]})
    assert out["after_cursor"] == [2, 3, 4]


def test_a_restart_appends_to_an_intact_last_segment_and_never_after_a_torn_tail(mp, tmp_path):
    """After a restart the next record goes into the last segment when all of it is intact
    frames (a file per boot cost a 4 KiB littlefs block and 264 bytes of heap each, and a meter
    restarted often with readings waiting ran short of both), and into a new file after a
    torn tail; every intact record comes back, the torn one never."""
    rng = random.Random(6)
    ps = [payload(rng, i, 200) for i in (1, 2, 3, 4)]
    out = run(mp, tmp_path, {"mode": "reopen", "dir": str(tmp_path / "j"), "payloads": [p.hex() for p in ps]})
    assert out["intact"] == ["00000001.seg"]
    assert out["torn"] == ["00000001.seg", "00000002.seg"]
    assert out["records"] == [[1, crc(ps[0])], [2, crc(ps[1])], [4, crc(ps[3])]] and out["damaged"] == 1


def counters_cases(mp, tmp: Path):
    """Slot bytes after 5 saves (newest in one slot, the one before in the other)."""
    d = tmp / "c"
    out = run(mp, tmp, {"mode": "counters", "dir": str(d), "saves": 5})
    assert out["gen"] == 5
    slots = [(d / "counters.0").read_bytes(), (d / "counters.1").read_bytes()]
    newest = max((0, 1), key=lambda i: struct.unpack_from(">I", slots[i], 4)[0])
    assert read_counters(d).seq == 5 and read_counters(d).gen == 5
    return d, slots, newest


def test_counters_newest_valid_slot_wins_never_a_damaged_one(mp, tmp_path):
    """The newest slot torn at every byte, flipped at random bytes or missing: the older
    intact slot is read, and the next write goes over the damaged slot, never the good one.
    Damage to the older slot leaves the newest in charge; both damaged reads as nothing."""
    d, slots, newest = counters_cases(mp, tmp_path)
    older = 1 - newest
    rng = random.Random(11)
    cases, want = [], []

    def case(new_bytes, old_bytes, expect_seq):
        c = [None, None]
        c[newest], c[older] = new_bytes, old_bytes
        cases.append([None if b is None else b.hex() for b in c])
        want.append(expect_seq)

    for cut in range(len(slots[newest])):
        case(slots[newest][:cut], slots[older], 4)
    for _ in range(150):
        b = bytearray(slots[newest])
        b[rng.randrange(len(b))] ^= rng.randrange(1, 256)
        case(bytes(b), slots[older], 4)
        o = bytearray(slots[older])
        o[rng.randrange(len(o))] ^= rng.randrange(1, 256)
        case(slots[newest], bytes(o), 5)
        case(bytes(b), bytes(o), None)
    case(None, slots[older], 4)
    case(slots[newest] + b"\x00", slots[older], 4)  # a slot longer than a slot is not one
    res = run(mp, tmp_path, {"mode": "counters", "dir": str(d), "cases": cases}, heap="2m")  # the job's size
    for n, (r, seq) in enumerate(zip(res, want)):
        if seq is None:
            assert r is None, f"case {n}"
            continue
        assert r["seq"] == seq and r["t"] == 1000 * seq and r["import_wh"] == 7 * seq, f"case {n}"
        assert r["prev"] == (bytes([seq]) * 32).hex(), f"case {n}"
        good = newest if seq == 5 else older
        assert r["slot"] == good and r["written"] == 1 - good, f"case {n}: the write must spare the good slot"
        assert r["then"] == [r["gen"] + 1, seq + 1], f"case {n}"
