"""Load curves with real processes: three trustees (t = 2, k = 5) and
`gridledger loadcurve` on a real Mosquitto, over certified chains in SQLite.
Every decrypted point equals the sum of its meters' simulated readings, the
interval reported by only 3 meters is withheld (never asked), the files are
written, and a second run asks the trustees nothing."""

from __future__ import annotations

import csv
import json
import signal
import sqlite3
import subprocess
import sys
import xml.etree.ElementTree as ET

from gridledger.testbed import _spawn, wait_up
from gridledger.wire import BANDS

from settlekit import AREA, START, build_world, write_run_configs

METERS, READINGS, K = 8, 16, 5


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gridledger", *args]


def _decisions(tmp, cfgs) -> int:
    total = 0
    for c in cfgs:
        with sqlite3.connect(tmp / f"{c.stem}.db") as conn:
            total += conn.execute("SELECT COUNT(*) FROM trustee_decisions").fetchone()[0]
    return total


def test_loadcurve_points_are_the_truth_and_a_second_run_asks_nothing(tmp_path, broker):
    world = build_world(tmp_path / "chains", accounts=METERS, readings=READINGS, per_block=8, tail=0, stragglers=3,
                        area_db=f"coordinator-{AREA}.db")
    cfgs, coord = write_run_configs(tmp_path, world, broker, policy=f"min_meters = {K}\n",
                                    settlement=f"min_meters = {K}\n")
    procs = [_spawn(_cli("trustee", "run", "--config", str(c)), tmp_path / f"{c.stem}.log") for c in cfgs]
    t0 = START - 8 * 900                      # readings end at t0 + 900 j, j = 1 .. READINGS + 1
    t1, t2 = t0, t0 + (READINGS + 1) * 900
    cmd = _cli("loadcurve", "--config", str(coord), "--area", AREA, "--from", str(t1), "--to", str(t2),
               "--out", str(tmp_path / "curves"))
    try:
        for c, p in zip(cfgs, procs):
            wait_up(tmp_path / f"{c.stem}.log", p)
        first = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert first.returncode == 0, first.stderr[-3000:]
        asked = _decisions(tmp_path, cfgs)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert second.returncode == 0, second.stderr[-3000:]
        assert _decisions(tmp_path, cfgs) == asked           # resumed: nothing asked again
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=20)

    summary = json.loads(first.stdout)
    assert (summary["points"], summary["withheld"], summary["refused"]) == (READINGS, 1, 0), summary
    assert json.loads(second.stdout) == summary
    assert "load curve" in first.stderr                      # the progress line
    doc = json.loads((tmp_path / "curves" / (summary["files"]["json"].rsplit("/", 1)[1])).read_text())
    for p in doc["points"]:
        slots = [0] * (2 * BANDS)
        for readings in world.truth.values():
            for s, v in dict(readings).get(p["t"], {}).items():
                slots[s] += v
        assert p["energy_wh"] == slots and p["meters"] == METERS and p["dt"] == 900
        assert (p["import_wh"], p["export_wh"]) == (sum(slots[0::2]), sum(slots[1::2]))
        assert len(p["request"]) == 32 and len(p["trustees"]) == 2
    assert [p["t"] for p in doc["points"]] == [t0 + 900 * j for j in range(1, READINGS + 1)]
    assert doc["withheld"] == [{"t": t2, "dt": 900, "meters": 3, "status": "withheld", "reason": "too_few_meters"}]
    # Every trustee that decided, decided about these points, signed; none saw the withheld interval.
    with sqlite3.connect(tmp_path / f"{cfgs[0].stem}.db") as conn:
        recs = [json.loads(r[0]) for r in conn.execute("SELECT record FROM trustee_decisions")]
    assert recs and all(r["kind"] == "area" and r["meters"] == METERS and r["t"] < t2 for r in recs)
    rows = list(csv.DictReader(open(summary["files"]["csv"])))
    assert len(rows) == READINGS + 1 and rows[-1]["status"] == "withheld"
    assert int(rows[0]["import_wh"]) == doc["points"][0]["import_wh"]
    svg = ET.parse(summary["files"]["svg"]).getroot()
    assert svg.tag.endswith("svg") and len(svg.findall(".//{http://www.w3.org/2000/svg}path")) == 2
