"""Compact journal readings (firmware/records.py: the plaintext and the seed of the DJN
randomness instead of the ciphertext) under the real `micropython` binary: a resend rebuilds
the reading byte for byte; a torn write at every byte of the last compact record recovers
every earlier reading and never the torn one; journals an older firmware wrote (674-byte
readings with the ciphertext) are still sent unchanged after the upgrade, and the chain goes
on in compact records that a real gateway's checks accept."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from gridledger.meterjournal import FRAME_MAGIC, journal_records, read_counters
from gridledger.paillier import djn_exponent, encrypt_raw
from gridledger.wire import ZERO_HASH, kid_of, make_reading, pack_slots, parse_reading

from conftest import MP_SCRIPTS, MicroPython
from helpers import N, PRIV, make_ingest, meter_keys
from test_meter_ckpt import SMALL_N

SCRIPT = MP_SCRIPTS / "mp_compact.py"
FRAME = 8  # magic, length, CRC-32 around each payload


@pytest.fixture(params=["source", "mpy"])
def mp(request, mp_source, firmware_bundle):
    """The firmware's modules from source and as the mpy-cross bundle flashed to boards."""
    return mp_source if request.param == "source" else MicroPython([firmware_bundle])


def run(mp, tmp: Path, job: dict, name: str, heap: str = "256k") -> list[dict]:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(job))
    return [json.loads(line) for line in mp.run(SCRIPT, path, heap=heap, timeout=300).splitlines()]


def frame(payload: bytes) -> bytes:
    head = FRAME_MAGIC + struct.pack(">H", len(payload))
    return head + payload + struct.pack(">I", zlib.crc32(head + payload))


def test_torn_write_at_every_byte_of_the_last_compact_record(mp, tmp_path):
    """Five compact readings, the fifth appended just before a power cut (counters still at
    four): cut anywhere inside the fifth frame, recovery sends readings 1-4 exactly as first
    published and the chain head stays at 4; whole, the fifth is rebuilt byte for byte and the
    counters roll forward to it."""
    src = tmp_path / "src"
    src.mkdir()
    job = {"n": str(SMALL_N), "key": "07" * 32, "meter": "cm1"}
    (w,) = run(mp, tmp_path, {**job, "mode": "write", "dir": str(src), "count": 5}, "write")
    sent = [s.encode() for s in w["sent"]]
    recs = journal_records(src)
    assert [r.seq for r in recs] == [1, 2, 3, 4, 5] and all(r.compact for r in recs)
    assert read_counters(src).seq == 4  # the fifth reading's counters write failed
    # The CPython reader rebuilds each ciphertext too: what the meter signed and published.
    for r, s in zip(recs, sent, strict=True):
        pub = json.loads(s)
        check, ebits, m, seed = r.compact_fields
        assert r.ciphertext_for(SMALL_N) == int(pub["c"], 16) and len(seed) == 16 and ebits == 448
        assert check == bytes.fromhex(parse_reading(s).hash)[:4]
        assert r.time_quality == "host"
    last = recs[-1]
    end = last.offset + FRAME + len(last.payload)
    assert len(last.payload) + FRAME <= 190  # was 682 with the 512-byte ciphertext of a 2048-bit key

    cuts = list(range(last.offset, end + 1))
    lines = run(mp, tmp_path, {**job, "mode": "read", "src": str(src), "dir": str(tmp_path / "work"),
                               "file": f"{last.segment:08d}.seg", "cases": [{"at": a} for a in cuts]}, "read")
    assert len(lines) == len(cuts)
    hashes = [parse_reading(s).hash for s in sent]
    data = (src / "unacked" / f"{last.segment:08d}.seg").read_bytes()
    for at, got in zip(cuts, lines, strict=True):
        if at < end:
            assert got["records"] == w["sent"][:4], at
            assert (got["seq"], got["prev"]) == (4, hashes[3]), at
            assert got["damaged"] == damaged_regions(data[:at], last.offset), at
        else:
            assert got["records"] == w["sent"] and (got["seq"], got["prev"]) == (5, hashes[4])

    # The same cuts with the magic bytes planted in the fifth frame's payload, as its random
    # seed and signature hold them about once in 400 records: the scan resyncs there, refuses
    # a frame it cannot check, counts it, and still recovers exactly readings 1-4.
    planted = tmp_path / "planted"
    shutil.copytree(src, planted)
    at_magic = last.offset + 4 + 40
    data = data[:at_magic] + FRAME_MAGIC + data[at_magic + 2:]
    (planted / "unacked" / f"{last.segment:08d}.seg").write_bytes(data)
    cuts = cuts[:-1]  # whole, the changed frame would fail its CRC: a different case
    lines = run(mp, tmp_path, {**job, "mode": "read", "src": str(planted), "dir": str(tmp_path / "work2"),
                               "file": f"{last.segment:08d}.seg", "cases": [{"at": a} for a in cuts]}, "planted")
    for at, got in zip(cuts, lines, strict=True):
        assert got["records"] == w["sent"][:4] and got["seq"] == 4, at
        assert got["damaged"] == damaged_regions(data[:at], last.offset), at
    assert {got["damaged"] for got in lines} == {0, 1, 2}


def damaged_regions(torn: bytes, start: int) -> int:
    """What recovery counts as damaged in a segment cut inside the frame at `start`: the
    torn frame, once any of it is written, and then each later place the scan resyncs to
    (the two magic bytes, which the random seed and signature of a compact record hold
    about once in 400 records) that has room for a frame's head and tail, each checked
    and refused in turn. Counted exactly, not ">= 1": a count that also took a whole
    frame lost, or missed the torn one, would pass that."""
    if len(torn) == start:
        return 0
    return 1 + sum(1 for p in range(start + 1, len(torn) - FRAME + 1) if torn[p:p + 2] == FRAME_MAGIC)


def old_reading(key, seq: int, prev: str, m: int) -> tuple[bytes, bytes]:
    """(journal payload as the firmware before compact records wrote it: kind 0x31, header with
    checkpoint, dt, kid, signature, time quality, 512-byte ciphertext; the JSON it published)."""
    t = 1795000500 + 900 * seq
    r = make_reading(meter="u1", seq=seq, t=t, dt=900, prev=prev, kid=kid_of(N), c=encrypt_raw(N, m),
                     sign=key.sign, tq="host")
    no_ckpt = (1 << 64) - 1
    p = (struct.pack(">BIIIQQ32sQQ", 0x31, seq, t, 0, 100 * seq, 0, bytes.fromhex(prev), no_ckpt, no_ckpt)
         + struct.pack(">I8s64s", 900, bytes.fromhex(kid_of(N)), bytes.fromhex(r.sig)) + bytes([3])
         + r.ciphertext.to_bytes(512, "big"))
    pub = {"v": 1, "meter": "u1", "seq": seq, "t": t, "dt": 900, "prev": prev, "kid": r.kid, "c": r.c,
           "tq": "host", "sig": r.sig}
    return p, json.dumps(pub).encode()  # the firmware's JSON: json.dumps' separators, wire order


def test_old_full_records_still_send_after_the_upgrade_and_the_chain_goes_on(mp, tmp_path):
    """A journal of three 674-byte readings (with their ciphertexts) and counters at seq 3, as
    the previous firmware left them: the new firmware sends each unchanged, then journals
    two compact readings chained to them; the gateway's checks accept all five in order, and
    the compact ciphertexts decrypt to what was measured."""
    key = meter_keys(["u1"])["u1"]
    d = tmp_path / "u1"
    (d / "unacked").mkdir(parents=True)
    prev, payloads, published = ZERO_HASH, [], []
    for seq in (1, 2, 3):
        p, pub = old_reading(key, seq, prev, pack_slots({0: 100 * seq}))
        payloads.append(p)
        published.append(pub)
        prev = parse_reading(pub).hash
    assert len(frame(payloads[0])) == 674  # on flash: the record size the journal docs give
    (d / "unacked" / "00000001.seg").write_bytes(b"".join(frame(p) for p in payloads))
    body = struct.pack(">4sIIIIIIIIQQ32sQQ", b"GLC2", 9, 3, 1795000500 + 2700, 0, 1, 0, 0, 0, 600, 0,
                       bytes.fromhex(prev), (1 << 64) - 1, (1 << 64) - 1)
    (d / "counters.0").write_bytes(body + struct.pack(">I", zlib.crc32(body)))

    (out,) = run(mp, tmp_path, {"mode": "extend", "dir": str(d), "n": str(N), "key": bytes([1] * 32).hex(),
                                "meter": "u1", "count": 2}, "extend")
    assert [s.encode() for s in out["before"]] == published  # byte for byte what the old firmware sent
    assert [s.encode() for s in out["after"]] == published + [s.encode() for s in out["sent"]]
    recs = journal_records(d)
    assert [(r.seq, r.compact, len(r.payload) + FRAME) for r in recs][:3] == [(1, False, 674), (2, False, 674), (3, False, 674)]
    assert [(r.seq, r.compact) for r in recs[3:]] == [(4, True), (5, True)]
    assert all(len(r.payload) + FRAME <= 190 for r in recs[3:])

    readings = [parse_reading(s.encode()) for s in out["before"] + out["sent"]]
    store: dict = {}
    ingest = make_ingest({"u1": key}, now=lambda: readings[-1].t + 60, store=store)
    for r, raw in zip(readings, published + [s.encode() for s in out["sent"]], strict=True):
        v = ingest.check("u1", raw)
        assert v.kind == "accept", (r.seq, v.reason, v.detail)
        store[("u1", r.seq)] = r.hash
        ingest.committed()
    assert [r.prev for r in readings[1:]] == [r.hash for r in readings[:-1]]
    for r, rec in zip(readings[3:], recs[3:], strict=True):
        _, ebits, m, seed = rec.compact_fields
        assert PRIV.raw_decrypt(r.ciphertext) == m and rec.ciphertext_for(N) == r.ciphertext
        assert djn_exponent(seed, ebits) % 2 == 1
    # The decrypted compact slots are the firmware's readings of this test's counters.
    assert [PRIV.raw_decrypt(r.ciphertext) for r in readings[3:]] == [
        pack_slots({0: 100, 1: 0}), pack_slots({2: 137, 3: 5000 % 3})]
