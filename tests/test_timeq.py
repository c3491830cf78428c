"""Time quality on the wire (the signed ``tq`` extension): kept in the meter's journal and
rebuilt byte for byte, stored by the gateway (also in a database from before it), carried
into blocks the area app re-checks; and end to end under the real ``micropython`` binary,
Mosquitto and the gateway process: a board meter whose clock was never set stamps nothing
until NTP answers, then sends everything its sensor counted meanwhile in one reading
flagged ``unsynced`` and goes on aligned as ``ntp``; a tq altered in transit is a bad
signature."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from aggregator.store import GatewayStore
from certlog.store import NodeDB
from certlog.app import InvalidBlock
from gridledger.firmware_build import micropython_command
from gridledger.meterjournal import journal_records
from gridledger.testbed import gateway_process, wait_up, write_meter_config
from gridledger.wire import nack_topic, readings_topic, unpack_slots

import chainkit
from conftest import MP_SCRIPTS, MqttProbe
from helpers import N, PRIV, log_events, make_area, wait_until
from test_meter_ckpt import SMALL_N

METER = "tq1"
INTERVAL = 900
SCALE = 1800  # 0.5 s of real time per 15-minute interval


def test_journal_records_keep_the_time_quality_and_rebuild_the_same_reading(mp_source, tmp_path):
    """A reading journaled with a time quality comes back from the journal (also after a
    reboot) with it, in the JSON and in the signed bytes; one without stays plain v1; the
    CPython reader finds the quality and the ciphertext after it."""
    d = tmp_path / "m"
    d.mkdir()
    job = tmp_path / "job.json"
    ops = [{"op": "commit", "ckpt": [100, 0], "imp": 100, "exp": 0, "tq": tq} for tq in ("unsynced", "ntp", None)]
    job.write_text(json.dumps({"dir": str(d), "n": str(SMALL_N), "ops": ops}))
    out = mp_source.run_json(MP_SCRIPTS / "mp_meter_ckpt.py", job, heap="128k")
    assert [r.get("tq") for r in out["records"]] == ["unsynced", "ntp", None]
    recs = journal_records(d)
    assert [(r.time_quality, r.ciphertext_for(SMALL_N)) for r in recs] == [
        (r["tq"] if "tq" in r else None, int(r["c"], 16)) for r in out["records"]]
    assert len(recs[0].payload) == len(recs[2].payload) + 1  # one byte more
    job.write_text(json.dumps({"dir": str(d), "n": str(SMALL_N), "ops": []}))
    assert mp_source.run_json(MP_SCRIPTS / "mp_meter_ckpt.py", job, heap="128k")["records"] == out["records"]


def test_gateway_store_keeps_tq_and_gains_the_column_in_an_older_database(tmp_path):
    """A readings table from before the extension gets a tq column; a tq reading comes back
    from the store (as blocks are built) with the same canonical bytes and hash."""
    db = tmp_path / "gateway.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE readings (meter TEXT, seq INTEGER, t INTEGER, dt INTEGER, prev TEXT, kid TEXT, "
                     "c TEXT, sig TEXT, hash TEXT, received_at FLOAT, PRIMARY KEY (meter, seq))")
    area = chainkit.make_area(["m1"])
    sim = area.meters["m1"]
    plain = sim.next()
    sim.tq = "unsynced"
    flagged = sim.next()
    store = GatewayStore(db)
    try:
        store.commit([plain, flagged], [], {})
        back = store.readings("m1")
        assert back == [plain, flagged] and back[1].tq == "unsynced" and back[0].tq is None
        _, unblocked = store.unblocked(store.db.conn, 10)
        assert [r.to_json() for r in unblocked] == [plain.to_json(), flagged.to_json()]
        assert [r.hash for r in unblocked] == [plain.hash, flagged.hash]
    finally:
        store.close()


def test_area_app_rechecks_the_time_quality_as_signed(tmp_path):
    """Validators recompute the signed bytes with the tq line: a block of mixed plain and tq
    readings is valid; the same block with one tq changed is tx_bad_signature, with an
    unknown tq tx_bad_value."""
    area = chainkit.make_area(["m1", "m2"])
    m1, m2 = area.meters["m1"], area.meters["m2"]
    m1.tq = "ntp"
    txs = [m1.next().to_json(), m2.next().to_json(), m1.next().to_json()]
    assert b'"tq":"ntp","sig"' in txs[0] and b'"tq"' not in txs[1]
    app = area.app()
    now_ms = int(time.time() * 1000)
    app.execute(NodeDB(None), app.genesis_root, now_ms, txs)
    for bad, reason in ((b'"tq":"rtc"', "tx_bad_signature"), (b'"tq":"gps"', "tx_bad_value")):
        with pytest.raises(InvalidBlock) as exc:
            app.execute(NodeDB(None), app.genesis_root, now_ms, [txs[0].replace(b'"tq":"ntp"', bad)] + txs[1:])
        assert (exc.value.reason, exc.value.index) == (reason, 0)


def set_device(path: Path, wh: int) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(str(wh))
    os.replace(tmp, path)  # the fake UART never reads half a number


@pytest.fixture
def unsynced_meter(tmp_path, broker, firmware_bundle):
    """The gateway (real process) and a meter (the flashed bundle) on a board clock that
    NTP has not set, with a PZEM-004T on a fake UART."""
    gw_config, keys = make_area(tmp_path, [METER], host=broker.host, port=broker.port)
    gateway = gateway_process(gw_config, tmp_path / "gateway.log")
    wait_up(tmp_path / "gateway.log", gateway)
    d = tmp_path / METER
    keys[METER].write_seed(d / "ed25519.key")
    now = time.time()
    clock = {"scale": SCALE, "real_start": now, "virtual_start": (int(now) // INTERVAL - 400) * INTERVAL,
             "ntp": {"retry_s": 0.3}}
    write_meter_config(d / "config.json", meter=METER, area="area1", state_dir=d, key_file=d / "ed25519.key", n=N,
                       host=broker.host, port=broker.port, interval_s=INTERVAL, clock=clock, seed=1, resend_s=2.0)
    cfg = json.loads((d / "config.json").read_text())
    cfg["sensor"] = {"type": "pzem"}  # replaced by the script's fake UART
    (d / "config.json").write_text(json.dumps(cfg))
    device, ntp_ok, log = tmp_path / "device_wh", tmp_path / "ntp_answers", tmp_path / "meter.log"
    set_device(device, 1_000_000)
    # 256k: the wrapper script is compiled from source on the meter's heap.
    cmd, env = micropython_command(MP_SCRIPTS / "mp_meter_tq.py", d / "config.json", device, ntp_ok, heap="256k",
                                   path=[firmware_bundle])
    with open(log, "ab") as out:
        meter = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    yield tmp_path, device, ntp_ok, log
    for p in (meter, gateway):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM if p is gateway else signal.SIGKILL)
            p.wait(15)


def test_energy_before_the_first_sync_arrives_in_one_unsynced_reading(unsynced_meter):
    """While NTP does not answer the meter makes no reading (no bogus 2000-01-01 stamps) but its
    sensor counts on; at the first sync one reading flagged tq "unsynced" covers boot (estimated
    from ticks) to the first aligned boundary, then aligned 15-minute readings flagged "ntp"
    follow. The gateway stores every tq, and the decrypted readings add up to exactly the
    device register's advance."""
    tmp, device, ntp_ok, log = unsynced_meter
    wh = first = 1_000_000
    wait_until(lambda: sum(e["ev"] == "ntp_failed" for e in log_events(log)) >= 3, 60, "NTP tries that fail")
    for _ in range(4):  # used while the clock is unset
        wh += 250
        set_device(device, wh)
        time.sleep(0.5)
    assert not any(e["ev"] == "reading" for e in log_events(log)), "no reading before the clock is set"
    ntp_ok.write_text("")
    wait_until(lambda: any(e["ev"] == "clock_synced" for e in log_events(log)), 30, "the first sync")
    mark = len(log_events(log))
    for _ in range(3):  # used after the sync
        wait_until(lambda: sum(e["ev"] == "reading" for e in log_events(log)[mark:]) >= 1, 30, "a reading")
        mark = len(log_events(log))
        wh += 40
        set_device(device, wh)
    wait_until(lambda: sum(e["ev"] == "reading" for e in log_events(log)[mark:]) >= 2, 30, "the last movement read")
    last = max(e["seq"] for e in log_events(log) if e["ev"] == "reading")

    db = tmp / "gateway.db"

    def stored() -> list:
        s = GatewayStore(db)
        try:
            return s.readings(METER)
        finally:
            s.close()

    readings = wait_until(lambda: (r := stored()) and r[-1].seq >= last and r, 30, "the gateway to store them")
    evs = log_events(log)
    synced = next(e for e in evs if e["ev"] == "clock_synced")
    assert synced["quality"] == "ntp"
    first_reading = next(i for i, e in enumerate(evs) if e["ev"] == "reading")
    assert first_reading > evs.index(synced)

    r1, rest = readings[0], readings[1:]
    assert (r1.seq, r1.tq) == (1, "unsynced")
    assert r1.t % INTERVAL == 0 and r1.t - r1.dt == synced["boot"] == synced["since"]
    assert r1.t == synced["next_end"] and 0 < r1.t - synced["t"] <= INTERVAL
    # The meter was up (unsynced) for several real seconds: many intervals of virtual time.
    assert r1.dt > 3 * INTERVAL
    assert rest and all(r.tq == "ntp" and r.dt == INTERVAL for r in rest)
    assert [r.t for r in readings[1:]] == [r1.t + INTERVAL * i for i in range(1, len(readings))]

    imp = exp = 0
    for r in readings:
        slots = unpack_slots(PRIV.raw_decrypt(r.ciphertext))
        imp += sum(slots[0::2])
        exp += sum(slots[1::2])
    unsynced = sum(unpack_slots(PRIV.raw_decrypt(r1.ciphertext))[0::2])
    assert unsynced == 4 * 250, "everything used before the sync is in the unsynced reading"
    assert (imp, exp) == (wh - first, 0)

    s = GatewayStore(db)
    try:
        assert s.rejection_counts() == {}
        assert s.db.execute("SELECT tq, COUNT(*) FROM readings GROUP BY tq ORDER BY tq").fetchall() == [
            ("ntp", len(rest)), ("unsynced", 1)]
    finally:
        s.close()


def test_a_time_quality_altered_in_transit_fails_the_signature(unsynced_meter, broker):
    """tq is covered by the meter's signature: the same reading with tq changed (or removed,
    making it look like a plain v1 reading) is refused as bad_signature, an unknown value as
    bad_value, and none of them is stored."""
    tmp, device, ntp_ok, log = unsynced_meter
    ntp_ok.write_text("")

    def stored() -> list:
        s = GatewayStore(tmp / "gateway.db")
        try:
            return s.readings(METER)
        finally:
            s.close()

    r2 = wait_until(lambda: (r := stored()) and len(r) >= 2 and r[1], 60, "two stored readings")
    assert r2.tq == "ntp"
    body = json.loads(r2.to_json())

    async def tamper() -> list[dict]:
        async with MqttProbe(broker, nack_topic("area1", METER)) as probe:
            for change in ({"tq": "rtc"}, {"tq": "unsynced"}, {"tq": None}, {"tq": "gps"}):
                forged = {k: v for k, v in (body | change).items() if v is not None}
                await probe.publish(readings_topic("area1", METER), json.dumps(forged))
            got = []
            for _ in range(4):
                got.append(await probe.expect(nack_topic("area1", METER), start=len(got), timeout=20))
            return got

    nacks = asyncio.run(tamper())
    assert [n["reason"] for n in nacks] == ["bad_signature", "bad_signature", "bad_signature", "bad_value"]
    s = GatewayStore(tmp / "gateway.db")
    try:
        assert s.rejection_counts() == {"bad_signature": 3, "bad_value": 1}
        assert s.readings(METER)[1] == r2
    finally:
        s.close()
