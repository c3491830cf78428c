"""Regenerate readings_v1.json: wire-format v1 known answers shared by the
firmware (MicroPython) and CPython tests, plain v1 readings ("readings") and
readings with the time-quality extension ("readings_tq": one more signed line,
"tq=<value>"). Deterministic given the fixed test key; run
`python tests/vectors/make_readings_v1.py` only when the format changes (the plain
readings must come out byte for byte as before).
"""

import hashlib
import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gridledger.meterkeys import MeterKey
from gridledger.paillier import encrypt_raw
from gridledger.wire import ZERO_HASH, kid_of, make_reading, pack_slots

HERE = Path(__file__).parent
# A fixed 2048-bit test key (generated once with phe; never use outside tests).
KEY = json.loads((HERE / "paillier_test_key.json").read_text())


def det_r(n: int, label: str) -> int:
    # Deterministic "randomness" for known answers: SHA-256 counter mode mod n.
    out = b""
    i = 0
    while len(out) * 8 < n.bit_length() + 64:
        out += hashlib.sha256(f"{label}/{i}".encode()).digest()
        i += 1
    return int.from_bytes(out, "big") % n


def main() -> None:
    n = int(KEY["n"])
    kid = kid_of(n)
    seed = bytes.fromhex("a5" * 16 + "5a" * 16)
    key = MeterKey("vec-meter_1", seed)
    cases = [
        {"slots": {0: 123, 1: 0}, "t": 1795160700, "dt": 900},
        {"slots": {4: 2500, 5: 731, 2: 1}, "t": 1795161600, "dt": 900},
        {"slots": {15: (1 << 48) - 1, 0: (1 << 48) - 1}, "t": 1795162500, "dt": 900},
        {"slots": {}, "t": 1795163400, "dt": 60},
    ]
    # A meter that booted with an unset clock: the energy up to its first aligned
    # boundary in one odd-length reading, then aligned ones (docs/journal.md).
    tq_cases = [
        {"slots": {0: 4321}, "t": 1795160700, "dt": 1234, "tq": "unsynced"},
        {"slots": {0: 90, 1: 2}, "t": 1795161600, "dt": 900, "tq": "ntp"},
        {"slots": {6: 77}, "t": 1795162500, "dt": 900, "tq": "rtc"},
        {"slots": {}, "t": 1795163400, "dt": 900, "tq": "host"},
    ]

    def chain(cases: list[dict], label: str) -> list[dict]:
        prev = ZERO_HASH
        out = []
        for i, case in enumerate(cases, 1):
            m = pack_slots(case["slots"])
            r = det_r(n, f"{label}-{i}")
            c = encrypt_raw(n, m, r)
            rd = make_reading(meter=key.meter, seq=i, t=case["t"], dt=case["dt"], prev=prev, kid=kid, c=c,
                              sign=key.sign, tq=case.get("tq"))
            out.append({"meter": rd.meter, "seq": rd.seq, "t": rd.t, "dt": rd.dt, "prev": rd.prev, "kid": rd.kid,
                        **({"tq": rd.tq} if rd.tq else {}),
                        "slots": {str(k): v for k, v in case["slots"].items()}, "m": format(m, "x"),
                        "r": format(r, "x"), "c": rd.c, "signed_bytes": rd.signed_bytes.decode(),
                        "sig": rd.sig, "hash": rd.hash, "payload": json.loads(rd.to_json())})
            prev = rd.hash
        return out

    doc = {
        "about": "gridledger wire format v1 known answers (DESIGN section 4); see make_readings_v1.py",
        "paillier": {"n": KEY["n"], "p": KEY["p"], "q": KEY["q"], "kid": kid},
        "meter_key": {"seed": seed.hex(), "public": key.public_hex},
        "readings": chain(cases, "reading"),
        "readings_tq": chain(tq_cases, "reading-tq"),
    }
    assert Ed25519PrivateKey.from_private_bytes(seed)  # seed is a valid key
    (HERE / "readings_v1.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
