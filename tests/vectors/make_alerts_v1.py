"""Regenerate alerts_v1.json: device-alert known answers (docs/alerts.md) shared by
the firmware (MicroPython) and CPython tests. Deterministic (fixed meter key);
run `python tests/vectors/make_alerts_v1.py` only when the format changes.
"""

import json
from pathlib import Path

from aggregator.alerts import make_alert
from gridledger.meterkeys import MeterKey

HERE = Path(__file__).parent
SEED = bytes(range(32))
INPUTS = [
    ("vec-meter_1", 1, 1767225600, "power_high", 3120, 3000, "raised"),
    ("vec-meter_1", 2, 1767226500, "power_high", 2900, 3000, "cleared"),
    ("vec-meter_1", 3, 1767227400, "power_low", -1850, 50, "raised"),
    ("vec-meter_1", 4, 1767228300, "temp_high", 715, 700, "raised"),
    ("vec-meter_1", 4294967297, 4102444800, "temp_high", 0, -400, "cleared"),
]


def main() -> None:
    key = MeterKey("vec-meter_1", SEED)
    out = {"about": "device alerts v1: signed bytes, canonical payload and Ed25519 signature (RFC 8032)",
           "meter_key": {"seed": SEED.hex(), "public": key.public_hex}, "alerts": []}
    for meter, seq, t, kind, value, threshold, state in INPUTS:
        a = make_alert(meter=meter, seq=seq, t=t, kind=kind, value=value, threshold=threshold, state=state,
                       sign=key.sign)
        out["alerts"].append({"meter": meter, "seq": seq, "t": t, "kind": kind, "value": value,
                              "threshold": threshold, "state": state, "signed_bytes": a.signed_bytes.decode(),
                              "payload": a.to_json().decode()})
    (HERE / "alerts_v1.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
