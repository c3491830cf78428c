"""Shared builders for tests: a keyed area (Paillier key, meters, registry, gateway config)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from phe import paillier as phe_paillier

from aggregator.registry import MeterEntry, dump_registry
from gridledger.meterkeys import MeterKey
from gridledger.paillier import encrypt_raw
from gridledger.wire import ZERO_HASH, Reading, kid_of, make_reading, pack_slots

from conftest import VECTORS

_KEY = json.loads((VECTORS / "paillier_test_key.json").read_text())
N = int(_KEY["n"])
PRIV = phe_paillier.PaillierPrivateKey(phe_paillier.PaillierPublicKey(N), int(_KEY["p"]), int(_KEY["q"]))


@dataclass
class SimMeter:
    """A CPython meter speaking wire v1, for driving the gateway in tests."""
    key: MeterKey
    n: int = N
    seq: int = 0
    prev: str = ZERO_HASH
    # Aligned interval ends in the recent past, leaving room for 4000 readings
    # before the gateway's clock-skew check (t at most a few minutes ahead).
    t: int = field(default_factory=lambda: (int(time.time()) // 900 - 4000) * 900)
    sent: list[Reading] = field(default_factory=list)

    def next(self, wh: int = 100, band: int = 0) -> Reading:
        self.seq += 1
        self.t += 900
        c = encrypt_raw(self.n, pack_slots({2 * band: wh}))
        r = make_reading(meter=self.key.meter, seq=self.seq, t=self.t, dt=900, prev=self.prev, kid=kid_of(self.n),
                         c=c, sign=self.key.sign)
        self.prev = r.hash
        self.sent.append(r)
        return r


def make_area(tmp: Path, meters: list[str], *, host: str, port: int, area: str = "area1") -> tuple[Path, dict[str, MeterKey]]:
    """Write keys, registry and a gateway config; return (config path, meter keys)."""
    keys = {m: MeterKey(m, bytes([i + 1]) * 32) for i, m in enumerate(meters)}
    (tmp / "registry.toml").write_text(dump_registry([MeterEntry(m, f"acct-{m}", k.public_hex) for m, k in keys.items()]))
    (tmp / "paillier.pub.json").write_text(json.dumps({"n": str(N), "kid": kid_of(N)}))
    cfg = tmp / "gateway.toml"
    cfg.write_text(f'[gateway]\narea = "{area}"\ndatabase = "gateway.db"\nregistry = "registry.toml"\n'
                   f'paillier_public = "paillier.pub.json"\n\n[mqtt]\nhost = "{host}"\nport = {port}\n')
    return cfg, keys
