"""A meter SIGKILLed at random moments, many times, while it produces readings through a
real Mosquitto to the real gateway: after every restart its seq and counters resume at or
above what it had reported, the gateway holds every interval exactly once, chained, and no
Paillier randomness was ever used twice (the test has the private key: rho = c / (1 + m n))."""

from __future__ import annotations

import json
import os
import random
import signal
import time

from aggregator.store import GatewayStore, stored_counts
from gridledger.meterjournal import read_counters
from gridledger.testbed import wait_up

from helpers import N, PRIV, log_events, wait_until
from test_end_to_end import Area

KILLS = 24


def recent_past(area: Area, meter: str) -> None:
    """Run the meter's accelerated clock over intervals that all end before now: a long
    run from Area's start (yesterday 07:00) would reach past the gateway's clock."""
    virt = (int(time.time()) // 900 - area.intervals - 8) * 900
    area.clock.update(real_start=time.time() + 1.0, virtual_start=virt, stop_at=virt + area.intervals * 900)
    path = area.tmp / meter / "config.json"
    cfg = json.loads(path.read_text())
    cfg["clock"] = area.clock
    path.write_text(json.dumps(cfg, indent=1))


def rho_of(c: int) -> int:
    nsq = N * N
    m = PRIV.raw_decrypt(c)
    return c * pow((1 + m * N) % nsq, -1, nsq) % nsq


def test_meter_killed_at_random_moments_loses_duplicates_and_reuses_nothing(tmp_path, broker, firmware_bundle):
    """24 seeded SIGKILLs of a meter mid-run: seq, chain head and registers never go back,
    every interval reaches the gateway once, the journal drains, every rho is distinct."""
    rng = random.Random(20261121)
    area = Area(tmp_path, broker, firmware_bundle, ["k1"], intervals=80)
    try:
        area.start_gateway()
        wait_up(tmp_path / "gateway.log", area.gateway)
        recent_past(area, "k1")
        area.start_meter("k1")
        log = tmp_path / "k1.log"
        for i in range(KILLS):
            if i % 4 == 3:
                time.sleep(rng.uniform(0.05, 1.5))  # anywhere, booting included
            else:
                # mid-production: once this run has made a reading, a moment later
                made = sum(e["ev"] == "reading" for e in log_events(log))
                wait_until(lambda: sum(e["ev"] == "reading" for e in log_events(log)) > made, 30,
                           "a reading after the restart")
                time.sleep(rng.uniform(0.0, 0.6))
            proc = area.procs["k1"]
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
            area.start_meter("k1")
        area.wait_meters_done(240)
        assert area.stop_gateway() == 0
        area.assert_complete_and_true()
    finally:
        area.cleanup()

    events = log_events(tmp_path / "k1.log")
    boots = [e for e in events if e["ev"] == "boot"]
    assert len(boots) >= KILLS * 3 // 4, "the kills were meant to hit a measuring meter"
    # Never backwards: each boot resumes at or above everything reported before it.
    reported = {"seq": 0, "import_wh": 0, "export_wh": 0, "boot": 0}
    for e in events:
        if e["ev"] == "boot":
            assert e["seq"] >= reported["seq"] and e["boot"] > reported["boot"], e
            assert e["import_wh"] >= reported["import_wh"] and e["export_wh"] >= reported["export_wh"], e
            reported.update({k: e[k] for k in reported})
        elif e["ev"] == "reading":
            assert e["seq"] == reported["seq"] + 1, e  # one after the other, none skipped or repeated
            reported["seq"] = e["seq"]

    store = GatewayStore(tmp_path / "gateway.db")
    try:
        rs = store.readings("k1")
        rejected = dict(store.db.execute("SELECT reason, count FROM rejections").fetchall())
    finally:
        store.close()
    assert stored_counts(tmp_path / "gateway.db") == {"k1": len(rs)}
    assert "equivocation" not in rejected and "seq_gap" not in rejected and "prev_mismatch" not in rejected, rejected
    rhos = [rho_of(r.ciphertext) for r in rs]
    assert len(set(rhos)) == len(rhos), "a Paillier randomness value was used twice"

    # The registers are the sum of what the readings carry, whatever the kills interrupted.
    truth = area.truth("k1")
    final = read_counters(tmp_path / "k1")
    assert final.seq == len(rs) and final.prev == rs[-1].hash and len(boots) <= final.boot <= KILLS + 1
    assert final.import_wh == sum(v["import_wh"] for v in truth.values())
    assert final.export_wh == sum(v["export_wh"] for v in truth.values())
    assert final.acked == len(rs)
