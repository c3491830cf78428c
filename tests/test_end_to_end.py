"""End to end on real parts: MicroPython meter processes -> Mosquitto -> gateway
process -> SQLite -> ack -> the meter drops only acknowledged readings. Processes
are killed with real signals; no reading may be lost or duplicated."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from aggregator.store import GatewayStore, stored_counts
from coordinator.totals import decrypt_total
from gridledger.meterjournal import pending_seqs
from gridledger.firmware_build import METER_HEAP
from gridledger.testbed import gateway_process, meter_process, read_truth, write_meter_config
from gridledger.wire import ZERO_HASH

from helpers import N, PRIV, make_area, wait_until

INTERVAL_S = 900
SECONDS_PER_INTERVAL = 0.5


class Area:
    """Meters and a gateway as real processes in one temporary folder."""

    def __init__(self, tmp: Path, broker, firmware: Path, meters: list[str], intervals: int,
                 uplinks: dict[str, dict] | None = None):
        self.tmp, self.broker, self.firmware, self.intervals = tmp, broker, firmware, intervals
        self.cfg, keys = make_area(tmp, meters, host=broker.host, port=broker.port)
        self.meters = meters
        now = time.time()
        virt = (int(now) // 86400 - 1) * 86400 + 7 * 3600
        self.clock = {"scale": INTERVAL_S / SECONDS_PER_INTERVAL, "real_start": now + 1.5, "virtual_start": virt,
                      "stop_at": virt + intervals * INTERVAL_S}
        for i, m in enumerate(meters):
            d = tmp / m
            keys[m].write_seed(d / "ed25519.key")
            write_meter_config(d / "config.json", meter=m, area="area1", state_dir=d, key_file=d / "ed25519.key",
                               n=N, host=broker.host, port=broker.port, interval_s=INTERVAL_S, clock=self.clock,
                               seed=7 + i, solar_wp=2500 * (i % 2), resend_s=2.0, uplink=(uplinks or {}).get(m))
        self.procs: dict[str, subprocess.Popen] = {}
        self.gateway: subprocess.Popen | None = None

    def start_meter(self, m: str) -> None:
        self.procs[m] = meter_process(self.tmp / m / "config.json", self.tmp / f"{m}.log", heap=METER_HEAP,
                                      firmware=self.firmware)

    def start_gateway(self) -> None:
        self.gateway = gateway_process(self.cfg, self.tmp / "gateway.log")

    def stop_gateway(self) -> int:
        self.gateway.send_signal(signal.SIGTERM)
        return self.gateway.wait(15)

    def spooled(self, m: str) -> list[int]:
        """Seqs of the readings the meter's journal still holds for the gateway."""
        return pending_seqs(self.tmp / m)

    def truth(self, m: str) -> dict[int, dict]:
        return read_truth(self.tmp / m / "truth.jsonl")

    def wait_meters_done(self, timeout: float) -> None:
        wait_until(lambda: all(p.poll() is not None for p in self.procs.values()), timeout, "meters to finish")
        for m, p in self.procs.items():
            assert p.returncode == 0, (self.tmp / f"{m}.log").read_text()[-3000:]

    def cleanup(self) -> None:
        for p in [*self.procs.values(), self.gateway]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()

    def assert_complete_and_true(self) -> None:
        """Every interval stored exactly once, chained, and the decrypted sums equal the truth."""
        store = GatewayStore(self.tmp / "gateway.db")
        try:
            for m in self.meters:
                rs = store.readings(m)
                # A meter's first interval is the one under way when it first boots, so a
                # slow start (a loaded machine) begins a little later; from there on every
                # interval up to stop_at must be there, in order, once.
                k = len(rs)
                assert k >= self.intervals - 4 and [r.seq for r in rs] == list(range(1, k + 1)), m
                prev = ZERO_HASH
                for r in rs:
                    assert r.prev == prev
                    prev = r.hash
                assert [r.t for r in rs] == [self.clock["stop_at"] - INTERVAL_S * (k - i) for i in range(1, k + 1)]
                truth = self.truth(m)
                assert sorted(truth) == [r.seq for r in rs]
                tot = decrypt_total(PRIV, rs)
                assert tot.import_wh == sum(v["import_wh"] for v in truth.values())
                assert tot.export_wh == sum(v["export_wh"] for v in truth.values())
                assert self.spooled(m) == [], "meter kept readings the gateway acknowledged"
            assert store.db.execute("SELECT COUNT(*) FROM evidence").fetchone()[0] == 0
        finally:
            store.close()


@pytest.fixture
def make_run(tmp_path, broker, firmware_bundle):
    areas = []

    def make(meters: list[str], intervals: int) -> Area:
        a = Area(tmp_path, broker, firmware_bundle, meters, intervals)
        areas.append(a)
        return a

    yield make
    for a in areas:
        a.cleanup()


def test_meters_keep_every_reading_until_the_gateway_acks(make_run):
    """With no gateway, meters spool every reading and drop none; once it starts, all are stored and dropped."""
    area = make_run(["m1", "m2"], intervals=12)
    for m in area.meters:
        area.start_meter(m)
    wait_until(lambda: all(len(area.truth(m)) >= 4 for m in area.meters), 30, "readings to accumulate")
    for m in area.meters:
        produced = sorted(area.truth(m))
        # nothing dropped without an ack (the truth line is written just before the journal record)
        wait_until(lambda: area.spooled(m)[: len(produced)] == produced, 5, "the journal to hold every reading made")
    area.start_gateway()
    area.wait_meters_done(60)
    assert area.stop_gateway() == 0
    area.assert_complete_and_true()


def test_no_reading_lost_when_gateway_and_meter_are_killed(make_run):
    """kill -9 of the gateway and of a meter mid-run: after restarts every interval is stored once and sums are true."""
    area = make_run(["m1", "m2"], intervals=16)
    area.start_gateway()
    for m in area.meters:
        area.start_meter(m)

    wait_until(lambda: sum(stored_counts(area.tmp / "gateway.db").values()) >= 4, 30, "first readings stored")
    area.gateway.send_signal(signal.SIGKILL)
    area.gateway.wait(5)
    os.kill(area.procs["m1"].pid, signal.SIGKILL)
    area.procs["m1"].wait(5)
    time.sleep(1.5)  # meters keep measuring (m2) while the gateway is down
    area.start_gateway()
    area.start_meter("m1")
    area.wait_meters_done(90)
    assert area.stop_gateway() == 0
    area.assert_complete_and_true()
