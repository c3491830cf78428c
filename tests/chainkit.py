"""Builders for chain tests: validator keys, an area app, replicas over real SQLite."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from aggregator.areaapp import AreaApp
from aggregator.registry import MeterEntry, Registry
from aggregator.store import block_readings
from certlog import bls
from certlog.block import Certificate
from certlog.replica import Replica
from certlog.store import ChainStore, connect, read_body
from certlog.validators import ValidatorSet, info_for
from certlog.voter import Voter
from gridledger.meterkeys import MeterKey
from gridledger.paillier import PublicKey
from gridledger.testbed import chain_table, gateway_process, validator_process, wait_up, write_chain

from helpers import N, SimMeter, make_area as gateway_area

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


def certify(prop: Replica, vs: list[Voter], txs: list[bytes], *, voting: list[Voter] | None = None):
    """Build the next block over `txs`, have `voting` (default: all) sign it, and
    commit the certified block on the proposer and on every validator."""
    header = prop.build(txs)
    cert = prop.validators.aggregate([v.vote(header, txs) for v in (voting or vs)])
    prop.commit(header, txs, cert)
    for v in vs:
        v.replica.commit(header, txs, cert)
    return header, cert


class ChainBed:
    """A gateway proposing area1's chain and its validators, as real processes
    on a real broker, in one temporary folder (helpers.make_area's layout)."""

    def __init__(self, tmp: Path, broker, meters: list[str], *, validators: int = 4, block_max: int = 1000):
        self.tmp, self.broker = tmp, broker
        self.cfg, self.keys = gateway_area(tmp, meters, host=broker.host, port=broker.port)
        self.validator_cfgs = write_chain(tmp, area=CHAIN, host=broker.host, port=broker.port,
                                          validators=validators, registry="registry.toml",
                                          paillier_public="paillier.pub.json")
        self.cfg.write_text(self.cfg.read_text() + "\n" + chain_table(block_max))
        self.sims = {m: SimMeter(k) for m, k in self.keys.items()}
        self.gateway = None
        self.validators: dict[int, object] = {}

    def start_gateway(self):
        self.gateway = gateway_process(self.cfg, self.tmp / "gateway.log")
        wait_up(self.tmp / "gateway.log", self.gateway)

    def start_validator(self, i: int):
        self.validators[i] = validator_process(self.validator_cfgs[i], self.tmp / f"v{i}.log")
        wait_up(self.tmp / f"v{i}.log", self.validators[i])

    def db(self, who: str = "gateway") -> Path:
        return self.tmp / ("gateway.db" if who == "gateway" else f"validators/{who}.db")

    def heads(self, who: str = "gateway") -> tuple[int, str | None]:
        try:
            with sqlite3.connect(f"file:{self.db(who)}?mode=ro", uri=True, timeout=5) as conn:
                row = conn.execute("SELECT height, hash FROM chain_blocks WHERE cert IS NOT NULL "
                                   "ORDER BY height DESC LIMIT 1").fetchone()
        except sqlite3.OperationalError:
            return 0, None
        return (row[0], row[1]) if row else (0, None)

    def certificates(self, who: str = "gateway") -> list:
        with sqlite3.connect(f"file:{self.db(who)}?mode=ro", uri=True, timeout=5) as conn:
            rows = conn.execute("SELECT cert FROM chain_blocks WHERE cert IS NOT NULL ORDER BY height").fetchall()
        return [Certificate.from_dict(json.loads(r[0])) for r in rows]

    def log(self, name: str) -> str:
        p = self.tmp / f"{name}.log"
        return p.read_text()[-4000:] if p.exists() else ""

    def cleanup(self):
        for p in [self.gateway, *self.validators.values()]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def chain_bodies(db: Path, *, certified_only: bool = True) -> dict[int, list[bytes]]:
    """height -> body of every (certified) block in a node's store, read as sync and
    `chain verify` read it: a gateway's readings come from its `readings` rows."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            where = " WHERE cert IS NOT NULL" if certified_only else ""
            heights = [h for (h,) in conn.execute(f"SELECT height FROM chain_blocks{where} ORDER BY height")]
            return {h: read_body(conn, h, block_readings) for h in heights}
    except sqlite3.OperationalError:
        return {}
