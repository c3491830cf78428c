"""Settlement with real processes: three trustees (t = 2) and `gridledger settle`
on a real Mosquitto, over certified chains in SQLite; the settle process is
killed with SIGKILL mid-run and run again. Every account's bill equals the
simulator's truth, nobody is billed twice, and `verify-bill` accepts every bill
and refuses an altered one."""

from __future__ import annotations

import calendar
import json
import signal
import sqlite3
import subprocess
import sys
import time

from gridledger.testbed import _spawn, wait_up

from coordinator.settle import Period
from settlekit import AREA, build_world, write_run_configs

ACCOUNTS = 96
MONTH = "2026-08"
MONTH_START = calendar.timegm((2026, 8, 1, 0, 0, 0))
DAY = 86_400
TARIFF = """name = "test"
currency = "EUR"
minor_units = 2
standing_charge_per_day = "0.30"
""" + "".join(f'[[band]]\nband = {b}\nname = "b{b}"\nimport_per_kwh = "0.2{b}"\nexport_per_kwh = "0.05"\n'
              for b in range(8))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gridledger", *args]


def _setup(tmp, broker):
    # The area replica sits where `gridledger coordinator run` keeps it (coordinator-AREA.db).
    # A simulated month: one reading a day (dt = 1 day), one block a day, from July 17
    # to September 2, so that the calendar month August holds 31 of each account's readings.
    world = build_world(tmp / "chains", accounts=ACCOUNTS, readings=48, per_block=1, tail=0,
                        start=MONTH_START - 15 * DAY, dt=DAY,
                        area_db=f"coordinator-{AREA}.db")
    trustees, coord = write_run_configs(tmp, world, broker, policy="min_readings = 12\nmin_period_s = 10800\n")
    (tmp / "tariff.toml").write_text(TARIFF)
    return world, trustees, coord


def _billed(db) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute("SELECT COUNT(*) FROM bills").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_settlement_survives_kill_9_and_every_bill_is_the_truth(tmp_path, broker):
    world, trustee_cfgs, coord = _setup(tmp_path, broker)
    procs = [_spawn(_cli("trustee", "run", "--config", str(c)), tmp_path / f"{c.stem}.log") for c in trustee_cfgs]
    try:
        for c, p in zip(trustee_cfgs, procs):
            wait_up(tmp_path / f"{c.stem}.log", p)
        period = Period.month(MONTH)
        start, end = period.start, period.end
        settle = _cli("settle", "--config", str(coord), "--area", AREA, "--period", MONTH,
                      "--tariff", str(tmp_path / "tariff.toml"))
        first = _spawn(settle, tmp_path / "settle1.log")
        deadline = time.monotonic() + 120
        while _billed(tmp_path / "settlement.db") == 0 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        killed_at = _billed(tmp_path / "settlement.db")
        assert first.poll() is None, "settle finished before it could be killed: " + \
            (tmp_path / "settle1.log").read_text()[-2000:]
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert 0 < killed_at < ACCOUNTS
        out = subprocess.run(settle, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        summary = json.loads(out.stdout)
        assert summary["bills"] == ACCOUNTS and summary["unbilled"] == {}
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=20)

    with sqlite3.connect(tmp_path / "settlement.db") as conn:
        rows = conn.execute("SELECT account, COUNT(*) FROM bills GROUP BY account").fetchall()
        bills = [json.loads(r[0]) for r in conn.execute("SELECT bill FROM bills")]
    assert len(rows) == ACCOUNTS and all(n == 1 for _, n in rows)      # nobody billed twice
    for bill in bills:
        assert bill["energy_wh"] == world.truth_between(bill["account"], start, end)
        assert bill["readings"] == 31 and bill["period"] == period.to_dict()
    # The exports, and what a customer does with one.
    files = sorted((tmp_path / "bills").glob("*.json"))
    assert len(files) == ACCOUNTS and (tmp_path / "bills" / f"bills-{AREA}-{MONTH}.csv").exists()
    ok = subprocess.run(_cli("verify-bill", str(files[0]), "--validators", str(tmp_path / "validators.toml")),
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"], ok.stdout + ok.stderr
    bad = json.loads(files[0].read_text())
    bad["charges"]["total"] = "0.01"
    files[0].write_text(json.dumps(bad))
    no = subprocess.run(_cli("verify-bill", str(files[0]), "--validators", str(tmp_path / "validators.toml")),
                        capture_output=True, text=True, timeout=60)
    assert no.returncode == 1 and json.loads(no.stdout)["reason"] == "bill_id"
    # Every trustee logged its decisions, signed.
    for c in trustee_cfgs:
        with sqlite3.connect(tmp_path / f"{c.stem}.db") as conn:
            accepted = conn.execute("SELECT COUNT(*) FROM trustee_decisions WHERE verdict = 'accepted'").fetchone()[0]
        assert accepted >= ACCOUNTS
