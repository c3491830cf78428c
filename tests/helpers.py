"""Shared builders for tests: a keyed area (Paillier key, meters, registry, gateway config)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from phe import paillier as phe_paillier

from aggregator.ingest import Ingest
from aggregator.registry import MeterEntry, Registry, dump_registry
from gridledger.meterkeys import MeterKey
from gridledger.paillier import PublicKey, encrypt_raw
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
    dt: int = 900  # interval length; a longer one simulates long periods with few readings
    tq: str | None = None  # time quality its readings carry (wire extension); None: plain v1

    def next(self, wh: int = 100, band: int = 0) -> Reading:
        self.seq += 1
        self.t += self.dt
        c = encrypt_raw(self.n, pack_slots({2 * band: wh}))
        r = make_reading(meter=self.key.meter, seq=self.seq, t=self.t, dt=self.dt, prev=self.prev, kid=kid_of(self.n),
                         c=c, sign=self.key.sign, tq=self.tq)
        self.prev = r.hash
        self.sent.append(r)
        return r


def meter_keys(meters: Iterable[str]) -> dict[str, MeterKey]:
    """Fixed Ed25519 keys: the i-th meter's seed is 32 bytes of i + 1."""
    return {m: MeterKey(m, bytes([i + 1]) * 32) for i, m in enumerate(meters)}


def make_ingest(keys: dict[str, MeterKey], *, now: Callable[[], float],
                store: dict[tuple[str, int], str] | None = None) -> Ingest:
    """The gateway's checks without MQTT or SQLite: `store` maps (meter, seq) to a stored hash."""
    registry = Registry([MeterEntry(m, f"acct-{m}", k.public_hex) for m, k in keys.items()])
    held = {} if store is None else store
    return Ingest(registry, PublicKey(N), {}, lambda meter, seq: held.get((meter, seq)), now=now)


def make_area(tmp: Path, meters: list[str], *, host: str, port: int, area: str = "area1") -> tuple[Path, dict[str, MeterKey]]:
    """Write keys, registry and a gateway config; return (config path, meter keys)."""
    keys = meter_keys(meters)
    (tmp / "registry.toml").write_text(dump_registry([MeterEntry(m, f"acct-{m}", k.public_hex) for m, k in keys.items()]))
    (tmp / "paillier.pub.json").write_text(json.dumps({"n": str(N), "kid": kid_of(N)}))
    cfg = tmp / "gateway.toml"
    cfg.write_text(f'[gateway]\narea = "{area}"\ndatabase = "gateway.db"\nregistry = "registry.toml"\n'
                   f'paillier_public = "paillier.pub.json"\n\n[mqtt]\nhost = "{host}"\nport = {port}\n')
    return cfg, keys


def log_events(path: Path) -> list[dict]:
    """The JSON event lines of a process's log, skipping a line cut by a kill."""
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "ev" in rec:
            out.append(rec)
    return out


def wait_until(pred, timeout: float, what: str, step: float = 0.1):
    """Poll `pred` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
