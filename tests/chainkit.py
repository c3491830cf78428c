"""Builders for chain tests: validator keys, an area app, replicas over real SQLite."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from aggregator.areaapp import AreaApp
from aggregator.registry import MeterEntry, Registry
from certlog import bls
from certlog.replica import Replica
from certlog.store import ChainStore, connect
from certlog.validators import ValidatorSet, info_for
from certlog.voter import Voter
from gridledger.meterkeys import MeterKey
from gridledger.paillier import PublicKey

from helpers import N, SimMeter

CHAIN = "area1"


def validator_keys(n: int = 4) -> list[int]:
    return [bls.KeyGen(bytes([i + 1]) * 32) for i in range(n)]


def validator_set(sks: list[int]) -> ValidatorSet:
    return ValidatorSet([info_for(f"v{i}", sk) for i, sk in enumerate(sks)])


@dataclass
class Area:
    meters: dict[str, SimMeter]
    registry: Registry

    def app(self) -> AreaApp:
        return AreaApp(CHAIN, self.registry, PublicKey(N))


def make_area(names: list[str]) -> Area:
    keys = {m: MeterKey(m, bytes([i + 1]) * 32) for i, m in enumerate(names)}
    reg = Registry([MeterEntry(m, f"acct-{m}", k.public_hex) for m, k in keys.items()])
    return Area({m: SimMeter(k) for m, k in keys.items()}, reg)


def replica(path: Path, area: Area, vset: ValidatorSet) -> Replica:
    return Replica(CHAIN, area.app(), ChainStore(connect(path)), vset)


def voters(tmp: Path, area: Area, sks: list[int]) -> list[Voter]:
    vset = validator_set(sks)
    return [Voter(replica(tmp / f"v{i}.db", area, vset), i, sk) for i, sk in enumerate(sks)]


def txs_of(readings) -> list[bytes]:
    return [r.to_json() for r in readings]


def load_json(b: bytes):
    return json.loads(b)
