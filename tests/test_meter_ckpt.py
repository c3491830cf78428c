"""The sensor checkpoint across reboots, under the real `micropython` binary: it is
persisted with every reading (counters and journal record), comes forward from the journal
when a power cut fell between the journal append and the counters write, and a meter whose
files predate it still boots (as "no checkpoint"). A real meter with a PZEM-004T on a fake
UART, SIGKILLed between readings while its device counter moves, reports exactly the
device's advance: nothing lost across a reboot, nothing counted twice."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest

from gridledger.firmware_build import micropython_command
from gridledger.meterjournal import READING, journal_records, read_counters
from gridledger.testbed import write_meter_config
from gridledger.wire import unpack_slots

from conftest import MP_SCRIPTS, MicroPython
from helpers import N, PRIV, log_events, meter_keys, wait_until

NSQ = 32  # ciphertext bytes of the first-format records written here: any fixed length will do
# The state-level jobs encrypt under a small odd modulus: the journal only has to
# compute the same ciphertext again, and a 2048-bit key would spend seconds a job.
SMALL_N = int.from_bytes(bytes(range(1, 33)), "big") | 1
NO_CKPT = (1 << 64) - 1


@pytest.fixture(params=["source", "mpy"])
def mp(request, mp_source, firmware_bundle):
    """The firmware's modules from source and as the mpy-cross bundle flashed to boards."""
    return mp_source if request.param == "source" else MicroPython([firmware_bundle])


def run_state(mp, tmp: Path, d: Path, ops: list[dict], name: str) -> dict:
    job = tmp / f"{name}.json"
    job.write_text(json.dumps({"dir": str(d), "n": str(SMALL_N), "ops": ops}))
    return mp.run_json(MP_SCRIPTS / "mp_meter_ckpt.py", job, heap="128k")


def commit(ckpt, imp=10, exp=0, **kw) -> dict:
    return {"op": "commit", "ckpt": ckpt, "imp": imp, "exp": exp, **kw}


def test_checkpoint_round_trips_through_commit_skip_and_reboot(mp, tmp_path):
    """Each commit and each skipped reading persists its checkpoint in the counters (and a
    commit in its journal record); a reboot restores the last one; None stays None."""
    d = tmp_path / "m"
    d.mkdir()
    out = run_state(mp, tmp_path, d, [commit([100, 5]), commit([250, 9], imp=150, exp=4)], "a")
    assert out["ckpt"] == [250, 9] and out["seq"] == 2
    assert [r.sensor_checkpoint for r in journal_records(d)] == [(100, 5), (250, 9)]
    assert read_counters(d).sensor_checkpoint == (250, 9)
    assert run_state(mp, tmp_path, d, [], "b")["ckpt"] == [250, 9]

    out = run_state(mp, tmp_path, d, [{"op": "skip", "ckpt": [300, 11], "imp": 50, "exp": 2}], "c")
    assert out["seq"] == 2 and out["ckpt"] == [300, 11]
    again = run_state(mp, tmp_path, d, [], "d")
    assert again["ckpt"] == [300, 11] and again["import_wh"] == 10 + 150 + 50

    # Edges: the largest storable totals, then a sensor with no good read yet.
    out = run_state(mp, tmp_path, d, [commit([NO_CKPT - 1, 0])], "e")
    assert out["ckpt"] == [NO_CKPT - 1, 0] and read_counters(d).sensor_checkpoint == (NO_CKPT - 1, 0)
    run_state(mp, tmp_path, d, [commit(None)], "f")
    assert read_counters(d).sensor_checkpoint is None and journal_records(d)[-1].sensor_checkpoint is None
    assert run_state(mp, tmp_path, d, [], "g")["ckpt"] is None


def test_power_cut_after_the_journal_append_brings_the_checkpoint_forward(mp, tmp_path):
    """Record written, counters not: the counters on flash still hold the previous
    checkpoint; the next boot rolls seq, registers and checkpoint forward from the record,
    so the interval is neither lost nor counted again. Likewise after an event."""
    d = tmp_path / "m"
    d.mkdir()
    run_state(mp, tmp_path, d, [commit([100, 5])], "a")
    out = run_state(mp, tmp_path, d, [commit([250, 9], imp=150, exp=4, crash=True)], "b")
    assert any(e["ev"] == "counters_write_failed" for e in out["log"])
    on_flash = read_counters(d)
    assert (on_flash.seq, on_flash.sensor_checkpoint, on_flash.import_wh) == (1, (100, 5), 10)
    last = journal_records(d)[-1]
    assert (last.seq, last.sensor_checkpoint, last.import_wh, last.export_wh) == (2, (250, 9), 160, 4)

    booted = run_state(mp, tmp_path, d, [], "c")
    assert [e["ev"] for e in booted["log"]] == ["rolled_forward"]
    assert booted["ckpt"] == list(last.sensor_checkpoint) and booted["seq"] == 2
    assert (booted["import_wh"], booted["export_wh"]) == (160, 4)
    assert read_counters(d).sensor_checkpoint == (250, 9)

    # The same window after a set-register event: the event's header carries the
    # checkpoint unchanged (it moves the registers, not the sensor), and so does the roll.
    run_state(mp, tmp_path, d, [{"op": "set_register", "imp": 5000, "exp": 70, "crash": True}], "d")
    assert read_counters(d).eseq == 0 and journal_records(d)[-1].kind == 2
    assert journal_records(d)[-1].sensor_checkpoint == (250, 9)
    booted = run_state(mp, tmp_path, d, [], "e")
    assert [e["ev"] for e in booted["log"]] == ["rolled_forward"]
    assert (booted["import_wh"], booted["export_wh"], booted["ckpt"]) == (5000, 70, [250, 9])


def v1_frame(payload: bytes) -> bytes:
    """A journal frame as docs/journal.md defines it (unchanged by the checkpoint)."""
    head = b"\xa7J" + struct.pack(">H", len(payload))
    return head + payload + struct.pack(">I", zlib.crc32(head + payload))


def write_v1_meter(d: Path) -> dict:
    """A meter's files as the firmware before the checkpoint wrote them: a GLC1 counters
    slot at seq 4 (acked through 3) and a first-format journal with readings 4 and 5, the
    second appended just before a power cut (newer than the counters)."""
    prev4, hash4 = bytes([3]) * 32, bytes([4]) * 32
    body = struct.pack(">4sIIIIIIIIQQ32s", b"GLC1", 7, 4, 1795003600, 0, 3, 3, 3, 0, 4000, 120, hash4)
    (d / "counters.0").write_bytes(body + struct.pack(">I", zlib.crc32(body)))
    recs = []
    for seq, t, imp, prev in ((4, 1795003600, 4000, prev4), (5, 1795004500, 4321, hash4)):
        p = (struct.pack(">BIIIQQ32s", 1, seq, t, 0, imp, 120, prev)
             + struct.pack(">I8s64s", 900, bytes(8), bytes([seq]) * 64) + (7000 + seq).to_bytes(NSQ, "big"))
        recs.append(v1_frame(p))
    (d / "unacked").mkdir()
    (d / "unacked" / "00000001.seg").write_bytes(b"".join(recs))
    return {"hash4": hash4.hex()}


def test_files_from_before_the_checkpoint_boot_as_no_checkpoint(mp, tmp_path):
    """GLC1 counters and first-format journal records are read (the CPython reader too):
    the meter boots with no checkpoint, rolls forward from the old record, resends both
    old readings unchanged, and its next write is the new format with the checkpoint."""
    d = tmp_path / "m"
    d.mkdir()
    old = write_v1_meter(d)
    assert read_counters(d).seq == 4 and read_counters(d).sensor_checkpoint is None
    assert [(r.seq, r.version, r.sensor_checkpoint) for r in journal_records(d)] == [(4, 1, None), (5, 1, None)]

    out = run_state(mp, tmp_path, d, [], "a")
    assert [e["ev"] for e in out["log"]] == ["rolled_forward"]
    assert (out["seq"], out["import_wh"], out["ckpt"]) == (5, 4321, None)
    assert [(r["seq"], r["c"], r["sig"]) for r in out["records"]] == [
        (4, "%x" % 7004, "04" * 64), (5, "%x" % 7005, "05" * 64)]
    assert out["records"][1]["prev"] == old["hash4"]
    assert (d / "counters.1").stat().st_size == 104 and read_counters(d).sensor_checkpoint is None

    out = run_state(mp, tmp_path, d, [commit([8000, 0], imp=7)], "b")
    assert (out["seq"], out["import_wh"], out["ckpt"]) == (6, 4328, [8000, 0])
    assert [(r.seq, r.version) for r in journal_records(d)] == [(4, 1), (5, 1), (6, 2)]
    assert read_counters(d).sensor_checkpoint == (8000, 0)
    assert run_state(mp, tmp_path, d, [], "c")["ckpt"] == [8000, 0]


# A real meter process ------------------------------------------------------

METER = "pz1"
ROUNDS = 6


@pytest.fixture
def pzem_meter(tmp_path, broker, firmware_bundle):
    """A meter (the flashed bundle) whose sensor is a PZEM-004T on a fake UART reading its
    energy register from a file; no gateway, so every reading stays in the journal."""
    d = tmp_path / METER
    meter_keys([METER])[METER].write_seed(d / "ed25519.key")
    now = time.time()
    write_meter_config(d / "config.json", meter=METER, area="area1", state_dir=d, key_file=d / "ed25519.key", n=N,
                       host=broker.host, port=broker.port, interval_s=900, seed=1, resend_s=2.0,
                       clock={"scale": 1800, "real_start": now + 1.0, "virtual_start": (int(now) // 900 - 400) * 900})
    cfg = json.loads((d / "config.json").read_text())
    cfg["sensor"] = {"type": "pzem"}  # replaced by the script's fake UART; no sim truth file
    (d / "config.json").write_text(json.dumps(cfg))
    device = tmp_path / "device_wh"
    log = tmp_path / "meter.log"
    procs = []

    def start() -> subprocess.Popen:
        # 256k, not the meters' usual 128k: the wrapper script is compiled from source on
        # the device's heap, and main's meter already boots at the edge of 128k.
        cmd, env = micropython_command(MP_SCRIPTS / "mp_meter_pzem.py", d / "config.json", device, heap="256k",
                                       path=[firmware_bundle])
        with open(log, "ab") as out:
            p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        procs.append(p)
        return p

    yield d, device, log, start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def set_device(path: Path, wh: int) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(str(wh))
    os.replace(tmp, path)  # the fake UART never reads half a number


def test_killed_pzem_meter_reports_exactly_the_device_counters_advance(pzem_meter):
    """Six SIGKILLs at seeded moments between readings, the device counter moving while the
    meter runs and while it is down: the decrypted readings sum to the counter's advance
    exactly, every boot resumes from the checkpoint of the last reading kept."""
    d, device, log, start = pzem_meter
    rng = random.Random(20261121)
    wh = first = 1_000_000
    set_device(device, wh)
    proc = start()

    def readings_since(n_events: int) -> int:
        return sum(e["ev"] == "reading" for e in log_events(log)[n_events:])

    for _ in range(ROUNDS):
        mark = len(log_events(log))
        wait_until(lambda: readings_since(mark) >= 1, 60, "a reading after the (re)start")
        wh += rng.randint(1, 400)  # used while the meter runs
        set_device(device, wh)
        mark = len(log_events(log))
        wait_until(lambda: readings_since(mark) >= 1, 60, "a reading of the moved counter")
        time.sleep(rng.uniform(0.0, 0.5))  # somewhere before, during or after the next one
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        wh += rng.randint(100, 5000)  # used while the meter is down: must land in the next reading
        set_device(device, wh)
        proc = start()
    mark = len(log_events(log))
    wait_until(lambda: readings_since(mark) >= 2, 60, "readings after the last restart")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(5)

    evs = log_events(log)
    assert sum(e["ev"] == "boot" for e in evs) == ROUNDS + 1
    assert sum(e["ev"] == "sensor_resumed" for e in evs) == ROUNDS, "every restart resumes from a checkpoint"
    recs = [r for r in journal_records(d) if r.kind == READING]
    assert [r.seq for r in recs] == list(range(1, len(recs) + 1)), "each reading kept once"
    imp = exp = 0
    for r in recs:
        slots = unpack_slots(PRIV.raw_decrypt(r.ciphertext_for(N)))
        imp += sum(slots[0::2])
        exp += sum(slots[1::2])
    assert (imp, exp) == (wh - first, 0)
    c = read_counters(d)
    assert (c.import_wh, c.sensor_checkpoint) == (wh - first, (wh, 0))
