"""The demo (`./run demo` = `gridledger testbed run`) as a user runs it: real
processes end to end (threshold key ceremony, trustees, coordinator, settle, loadcurve), ending
with bills and load-curve points that verify and equal the simulator's truth."""

import re
import subprocess
import sys

import pytest


@pytest.mark.parametrize("broker", ["mosquitto", "amqtt"])
def test_testbed_ends_with_totals_equal_to_truth(tmp_path, broker):
    """The testbed prints one row per meter plus the area, every row matching, and exits 0."""
    res = subprocess.run([sys.executable, "-m", "gridledger", "testbed", "run", "--meters", "3", "--intervals", "8",
                          "--broker", broker, "--dir", str(tmp_path / "tb")],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = re.findall(r"^(m\d\d|area)\s+(\d+)" + r"\s+(-?[\d.]+)" * 6 + r"\s+(yes|NO)$", res.stdout, re.M)
    assert [r[0] for r in rows] == ["m01", "m02", "m03", "area"]
    for name, n, imp, imp_truth, exp, exp_truth, amount, amount_truth, ok in rows:
        assert ok == "yes" and imp == imp_truth and exp == exp_truth and amount == amount_truth
        assert int(n) == (24 if name == "area" else 8)
    assert float(rows[-1][2]) > 0  # the simulated household used energy
    assert "3 bills verify from the validator keys alone" in res.stdout
    assert "threshold Paillier" in res.stdout and "recorded on the registry chain (height" in res.stdout
    assert "8 interval totals decrypted by the trustees, each over >= 3 meters" in res.stdout
    assert "every load-curve point equals the sum of the meters' truth" in res.stdout
    assert res.stdout.count("PASS") == 3 and "FAIL" not in res.stdout
