"""A meter that boots on a compact journal reading newer than its counters (a power cut
between the journal write and the counters write) settles that reading before it counts
anything from the counters: its next interval and its sensor checkpoint follow it."""

from __future__ import annotations

import json
import time

from gridledger.broker import free_port
from gridledger.testbed import write_meter_config

from conftest import MP_SCRIPTS
from helpers import N


def test_boot_on_an_unsettled_compact_reading_counts_on_from_it(mp_source, tmp_path):
    """Readings 1 and 2 made, 2's counters write lost: the booted meter is at seq 2, its next
    interval ends one interval after reading 2 (not again at 2's end: the gateway refused that as
    clock_skew, then everything after as seq_gap) and its sensor resumes from 2's checkpoint
    (not 1's: reading 2's energy counted twice)."""
    state = tmp_path / "s1"
    state.mkdir()
    (state / "ed25519.key").write_bytes(bytes(range(32)))
    path = tmp_path / "config.json"
    write_meter_config(path, meter="s1", area="area1", state_dir=state, key_file=state / "ed25519.key", n=N,
                       host="127.0.0.1", port=free_port(), interval_s=900, seed=1,
                       clock={"scale": 1, "real_start": time.time(), "virtual_start": 1795000500})
    cfg = json.loads(path.read_text())
    cfg["paillier"]["exp_bits"] = 64
    path.write_text(json.dumps(cfg))
    lines = [json.loads(x) for x in mp_source.run(MP_SCRIPTS / "mp_meter_settle.py", path).splitlines()]
    out, log = lines[-1], lines[:-1]
    assert [e["seq"] for e in log if e.get("ev") == "rolled_forward"] == [2]
    assert [e["ev"] for e in log if e.get("ev") == "counters_write_failed"] == ["counters_write_failed"]
    assert out["seq"] == 2 and out["t"] == out["t2"]
    assert out["next_end"] == out["t2"] + 900
    resumed = [e for e in log if e.get("ev") == "sensor_resumed"]
    assert [(e["import_wh"], e["export_wh"]) for e in resumed] == [(2000, 7)]
