"""A settled world for tests: a threshold key, a registry chain publishing it, and
an area chain of encrypted readings under it, all certified, in real SQLite.

The simulator's truth is kept per account: which Wh went into which slot."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from aggregator.areaapp import AreaApp
from aggregator.registry import MeterEntry, Registry
from certlog.replica import Replica
from certlog.store import ChainStore, connect
from certlog.voter import Voter
from coordinator.ledger import AreaLedger
from coordinator.registryapp import Genesis, RegistryApp, enroll_record, paillier_key_id, sign_record
from coordinator.threshold import KeyShare, ThresholdPublicKey, ceremony
from certlog import bls
from certlog.light import state_proof
from certlog.validators import dump_validator_set, info_for, write_secret_key
from coordinator.registryapp import dump_genesis
from coordinator.threshold import write_ceremony
from gridledger.meterkeys import MeterKey, public_hex
from gridledger.paillier import PublicKey
from gridledger.wire import BANDS

from chainkit import certify, validator_keys, validator_set
from helpers import SimMeter

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

AREA = "area1"
REGISTRY = "registry"
START = (1_790_000_000 // 86_400 - 30) * 86_400   # midnight, a month ago: readings end after it


@dataclass
class World:
    key: ThresholdPublicKey
    shares: list[KeyShare]
    sks: list[int]
    vset: object
    area: Replica
    registry: Replica
    ledger: AreaLedger
    accounts: list[str]
    truth: dict[str, list[tuple[int, dict[int, int]]]] = field(default_factory=dict)  # account -> [(t, slots)]
    meters: dict[str, SimMeter] = field(default_factory=dict)
    registrar: object = None

    def key_proof(self) -> dict:
        head = self.registry.store.head()
        return state_proof(self.registry.store.nodes, head[0], head[1], paillier_key_id(self.key.kid))

    def truth_between(self, account: str, t0: int, t1: int) -> list[int]:
        """Wh per slot of the account's readings ending in (t0, t1]."""
        slots = [0] * (2 * BANDS)
        for t, vals in self.truth[account]:
            if t0 < t <= t1:
                for s, v in vals.items():
                    slots[s] += v
        return slots


def build_world(tmp: Path, *, accounts: int = 3, readings: int = 48, per_block: int = 8, tail: int = 2,
                trustees: int = 3, area_db: str = "area.db", stragglers: int = 0,
                threshold: int = 2, bits: int = 1024, seed: int = 7, start: int = START, dt: int = 900) -> World:
    """`readings` per meter in blocks of `per_block` each, then `tail` blocks of one
    reading each, then (`stragglers` > 0) a block where only that many meters report."""
    tmp.mkdir(parents=True, exist_ok=True)
    key, shares = ceremony(trustees, threshold, bits, names=[f"t{i + 1}" for i in range(trustees)],
                           insecure_test_bits=True)
    sks = validator_keys(4)
    vset = validator_set(sks)
    registrar = Ed25519PrivateKey.from_private_bytes(b"\x51" * 32)
    reg = Replica(REGISTRY, RegistryApp(Genesis({"ops": public_hex(registrar.public_key())})),
                  ChainStore(connect(tmp / "registry.db")), vset)
    reg_voters = [Voter(Replica(REGISTRY, reg.app, ChainStore(connect(tmp / f"rv{i}.db")), vset), i, sk)
                  for i, sk in enumerate(sks)]
    names = [f"m{i}" for i in range(accounts)]
    keys = {m: MeterKey(m, (i + 1).to_bytes(32, "big")) for i, m in enumerate(names)}
    rec = {"kind": "paillier", "kid": key.kid, "key": key.to_dict(), "signer": "ops", "time": start}
    enrollments = [sign_record(enroll_record(meter=m, account=f"acct-{m}", area=AREA, public_key=k.public_hex,
                                             signer="ops", time=start), registrar, k.private)
                   for m, k in keys.items()]
    certify(reg, reg_voters, [sign_record(rec, registrar), *enrollments])

    registry = Registry([MeterEntry(m, f"acct-{m}", k.public_hex) for m, k in keys.items()])
    app = AreaApp(AREA, registry, PublicKey(key.n))
    area = Replica(AREA, app, ChainStore(connect(tmp / area_db)), vset)
    voters = [Voter(Replica(AREA, AreaApp(AREA, registry, PublicKey(key.n)), ChainStore(connect(tmp / f"v{i}.db")),
                            vset), i, sk) for i, sk in enumerate(sks)]
    ledger = AreaLedger(area.store, AREA, registry=registry)
    area.listeners.append(ledger.index)
    rng = random.Random(seed)
    world = World(key, shares, sks, vset, area, reg, ledger, [f"acct-{m}" for m in names], registrar=registrar)
    for m, k in keys.items():
        sim = SimMeter(k, n=key.n, dt=dt)
        sim.t = start - dt * per_block  # the first block ends at `start`
        world.meters[m] = sim
        world.truth[f"acct-{m}"] = []
    blocks = [(per_block, names)] * (readings // per_block) + [(1, names)] * tail
    if stragglers:
        blocks.append((1, names[:stragglers]))
    for size, reporting in blocks:
        txs = []
        for m in reporting:
            sim = world.meters[m]
            for _ in range(size):
                band, wh = rng.randrange(BANDS), rng.randrange(0, 2500)
                r = sim.next(wh=wh, band=band)
                world.truth[f"acct-{m}"].append((r.t, {2 * band: wh}))
                txs.append(r.to_json())
        certify(area, voters, txs)
    return world


def write_run_configs(tmp: Path, world: World, broker, *, policy: str, settlement: str = "") -> tuple[list[Path], Path]:
    """Key files and TOML for real trustee processes (each with `policy`, the body of
    its [policy]) and a coordinator with [settlement] (plus `settlement` lines), over
    `world`'s chains in tmp/chains: (trustee configs, coordinator config)."""
    keys = tmp / "keys"
    paths = write_ceremony(keys, world.key, world.shares)
    (tmp / "validators.toml").write_text(dump_validator_set([info_for(f"v{i}", sk) for i, sk in enumerate(world.sks)]))
    (tmp / "registry-genesis.toml").write_text(dump_genesis(Genesis({"ops": public_hex(world.registrar.public_key())})))
    coord_sk = bls.KeyGen(b"\x21" * 32)
    write_secret_key(keys / "coord.bls.key", coord_sk)
    mqtt = f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
    trustees = []
    for i, name in enumerate(world.key.names):
        write_secret_key(keys / f"{name}.bls.key", bls.KeyGen(bytes([0x70 + i]) * 32))
        cfg = tmp / f"{name}.toml"
        cfg.write_text(f'[trustee]\nname = "{name}"\ndatabase = "{name}.db"\n'
                       f'share = "{paths["shares"][name]}"\nsecret_key = "keys/{name}.bls.key"\n'
                       f'coordinator_public = "{bls.SkToPk(coord_sk).hex()}"\nvalidators = "validators.toml"\n'
                       f'chains = ["{AREA}"]\n\n[policy]\n{policy}\n{mqtt}')
        trustees.append(cfg)
    coord = tmp / "coordinator.toml"
    coord.write_text(f'[coordinator]\nname = "coord"\ndatabase = "chains/coordinator.db"\n\n'
                     f'[settlement]\nkey = "keys/coord.bls.key"\n'
                     f'threshold_public = "{paths["threshold_public"]}"\ndatabase = "settlement.db"\n'
                     f'bills = "bills"\ntimeout_s = 20\n{settlement}\n'
                     f'[[area]]\nchain = "{AREA}"\nvalidators = "validators.toml"\n'
                     f'paillier_public = "{paths["paillier_public"]}"\n\n'
                     f'[registry_chain]\nvalidators = "validators.toml"\ngenesis = "registry-genesis.toml"\n'
                     f'database = "chains/registry.db"\n\n{mqtt}')
    return trustees, coord
