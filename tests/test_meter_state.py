"""A meter's persistent state under the real `micropython` binary: the one-time migration
from the first cut's state.json + spool/ (or a clear refusal), and the technician's audited
set-register: a signed gl-event-v1, journaled before the registers move, published on
gl/v1/{area}/meters/{meter}/events by the running meter; bad values change nothing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from aggregator.store import GatewayStore
from gridledger.firmware_build import METER_HEAP, micropython_command
from gridledger.meterjournal import journal_records, pending_seqs, read_counters
from gridledger.testbed import gateway_process, meter_process, wait_up, write_meter_config
from gridledger.wire import parse_reading

from conftest import MP_SCRIPTS, MqttProbe
from helpers import N, SimMeter, make_area, meter_keys, wait_until

METER = "s1"


def meter_dir(tmp: Path, port: int = 1) -> tuple[Path, Path]:
    d = tmp / METER
    meter_keys([METER])[METER].write_seed(d / "ed25519.key")
    now = time.time()
    write_meter_config(d / "config.json", meter=METER, area="area1", state_dir=d, key_file=d / "ed25519.key", n=N,
                       host="127.0.0.1", port=port, interval_s=900, seed=3, resend_s=1.0,
                       clock={"scale": 1, "real_start": now, "virtual_start": (int(now) // 900 - 40) * 900})
    return d, d / "config.json"


def run_firmware(firmware: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    cmd, env = micropython_command(firmware / "main.py", config, *args, heap=METER_HEAP, path=[firmware])
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def lines(text: str) -> list[dict]:
    return [json.loads(x) for x in text.splitlines() if x.startswith("{")]


def open_state(mp, config: Path) -> dict:
    return mp.run_json(MP_SCRIPTS / "mp_meter_state.py", config, heap="128k")


def test_first_cut_state_is_migrated_once_with_byte_identical_readings(tmp_path, mp_source):
    """state.json + spool/ become counters and a journal; the unacked readings come out with
    the same signed content and signature; the uncommitted one above state.json's seq is
    dropped; the old files go; a second open changes nothing."""
    d, config = meter_dir(tmp_path)
    sim = SimMeter(meter_keys([METER])[METER])
    readings = [sim.next(wh=100 + i) for i in range(6)]
    (d / "spool").mkdir()
    for r in readings[2:]:  # 1 and 2 acknowledged; 6 written but never committed
        (d / "spool" / f"{r.seq}.json").write_bytes(r.to_json())
    last = readings[4]
    (d / "state.json").write_text(json.dumps({"seq": last.seq, "prev": last.hash, "t": last.t}))

    out = open_state(mp_source, config)
    got = [parse_reading(rec["payload"].encode()) for rec in out["records"]]
    assert [(r.signed_bytes, r.sig) for r in got] == [(r.signed_bytes, r.sig) for r in readings[2:5]]
    assert out["seq"] == 5 and out["t"] == last.t and out["acked"] == 2
    c = read_counters(d)
    assert c.seq == 5 and c.prev == last.hash and c.floor == 2
    assert not (d / "state.json").exists() and not (d / "spool").exists()
    again = open_state(mp_source, config)
    assert again["records"] == out["records"] and again["seq"] == 5
    assert read_counters(d).gen == c.gen + 1  # opened and saved once more, nothing migrated twice


@pytest.mark.parametrize("state_json,reason", [
    ('{"seq": 5, "t": 1795000000}', "bad_state_json"),  # no prev
    ("not json", "bad_state_json"),
])
def test_unmigratable_state_is_refused_clearly(tmp_path, firmware_bundle, state_json, reason):
    """A state.json the meter cannot trust stops it with a reason, and nothing is written."""
    d, config = meter_dir(tmp_path)
    (d / "state.json").write_text(state_json)
    res = run_firmware(firmware_bundle, config)
    assert res.returncode == 2, res.stdout + res.stderr
    refused = [e for e in lines(res.stdout) if e.get("ev") == "refused"]
    assert refused and refused[0]["reason"] == reason
    assert read_counters(d) is None and (d / "state.json").read_text() == state_json


def test_destroyed_counters_are_refused_not_restarted_from_zero(tmp_path, firmware_bundle, mp_source):
    """Both slots present and damaged: starting again at seq 1 would fork the meter's
    chain at the gateway, so the meter refuses with counters_lost."""
    d, config = meter_dir(tmp_path)
    open_state(mp_source, config)
    for slot in ("counters.0", "counters.1"):
        (d / slot).write_bytes(b"\x00" * 92)
    res = run_firmware(firmware_bundle, config)
    assert res.returncode == 2
    assert [e["reason"] for e in lines(res.stdout) if e.get("ev") == "refused"] == ["counters_lost"]


def event_signed_bytes(e: dict) -> bytes:
    """gl-event-v1 as docs/journal.md defines it."""
    return "\n".join(["gl-event-v1", e["meter"], str(e["eseq"]), str(e["at"]), e["kind"], str(e["seq"]), e["prev"],
                      str(e["import_before"]), str(e["export_before"]), str(e["import_wh"]),
                      str(e["export_wh"]), e["by"]]).encode()


def test_set_register_is_a_signed_journaled_published_event(tmp_path, broker, firmware_bundle):
    """A technician sets the registers: refused for bad values (nothing moves), else a
    gl-event-v1 signed by the meter key is journaled with the new values, and the meter,
    once running, publishes it on .../events, where it verifies against the meter's key."""
    d, config = meter_dir(tmp_path, broker.port)
    for bad in (["-5", "0", "tech-7"], ["5", "0", "two words"], ["5", "0", "a" * 33]):
        res = run_firmware(firmware_bundle, config, "set-register", *bad)
        assert res.returncode == 2 and "refused" in res.stdout, bad
    assert not journal_records(d)
    res = run_firmware(firmware_bundle, config, "set-register", "123456", "789", "tech-7")
    assert res.returncode == 0, res.stdout + res.stderr
    c = read_counters(d)
    assert (c.import_wh, c.export_wh, c.eseq, c.boot) == (123456, 789, 1, 0)
    [rec] = journal_records(d)
    assert rec.kind == 2 and (rec.import_wh, rec.export_wh, rec.eseq) == (123456, 789, 1)

    async def published() -> dict:
        async with MqttProbe(broker, f"gl/v1/area1/meters/{METER}/events") as probe:
            proc = meter_process(config, tmp_path / "meter.log", firmware=firmware_bundle)
            try:
                return await probe.expect(f"gl/v1/area1/meters/{METER}/events", timeout=30)
            finally:
                proc.kill()
                proc.wait()

    e = asyncio.run(published())
    assert (e["kind"], e["eseq"], e["seq"], e["by"]) == ("set_register", 1, 0, "tech-7")
    assert (e["import_before"], e["export_before"], e["import_wh"], e["export_wh"]) == (0, 0, 123456, 789)
    public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(meter_keys([METER])[METER].public_hex))
    public.verify(bytes.fromhex(e["sig"]), event_signed_bytes(e))
    forged = dict(e, import_wh=999999)
    with pytest.raises(InvalidSignature):
        public.verify(bytes.fromhex(e["sig"]), event_signed_bytes(forged))
    boot = [x for x in lines((tmp_path / "meter.log").read_text()) if x.get("ev") == "boot"][0]
    assert boot["import_wh"] == 123456 and boot["export_wh"] == 789


def test_full_journal_keeping_the_oldest_says_so_and_keeps_the_chain_whole(tmp_path, broker, firmware_bundle):
    """A real meter with room for 5 readings and no gateway: it keeps readings 1..5, makes
    no reading it cannot keep (no seq used), logs journal_full for each and counts them in
    the persisted dropped count; once a gateway runs, all it kept are accepted, none refused."""
    gw_config, _ = make_area(tmp_path, [METER], host=broker.host, port=broker.port)
    d, config = meter_dir(tmp_path, broker.port)
    cfg = json.loads(config.read_text())
    now = time.time()
    virt = (int(now) // 900 - 30) * 900
    cfg["clock"] = {"scale": 1800, "real_start": now + 4.0, "virtual_start": virt, "stop_at": virt + 12 * 900}
    cfg["journal"] = {"capacity": 5, "when_full": "keep_oldest", "per_segment": 2}
    config.write_text(json.dumps(cfg))
    log = tmp_path / "meter.log"
    proc = meter_process(config, log, firmware=firmware_bundle)
    gateway = None
    try:
        wait_until(lambda: sum(e.get("ev") == "journal_full" for e in lines(log.read_text())) >= 7, 60,
                   "the full journal to refuse the intervals after the fifth")
        assert pending_seqs(d) == [1, 2, 3, 4, 5]
        assert read_counters(d).dropped == 7 and read_counters(d).seq == 5
        gateway = gateway_process(gw_config, tmp_path / "gateway.log")
        wait_up(tmp_path / "gateway.log", gateway)
        assert proc.wait(60) == 0, log.read_text()[-2000:]
    finally:
        for p in (proc, gateway):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    store = GatewayStore(tmp_path / "gateway.db")
    try:
        assert [r.seq for r in store.readings(METER)] == [1, 2, 3, 4, 5]
        # Readings the meter sent before the gateway had subscribed never reached it, so a
        # later one that did can be refused once as seq_gap until the meter resends them
        # all in order (resend_s): benign, and the only refusal this scenario allows.
        rejected = dict(store.db.execute("SELECT reason, count FROM rejections").fetchall())
        assert set(rejected) <= {"seq_gap"}, rejected
    finally:
        store.close()
    final = read_counters(d)
    assert final.dropped == 7 and final.acked == 5 and pending_seqs(d) == []
