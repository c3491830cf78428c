"""The coordinator process: `gridledger coordinator run --config coordinator.toml`.

It follows the registry chain and each of its area chains as a non-voting
replica (`certlog.follower.Follower`: every block's certificate checked and its
app re-run, like a validator that does not sign), keeps an `AreaLedger` per area
fed by its replica's commits, and serves the query API (`coordinator.api`).

    [coordinator]
    name = "coord"                  # its follower name on the chains' sync topics
    database = "coordinator.db"     # one file per area: coordinator-A.db, ...
    [mqtt] ...                      # gridledger.config.MqttConfig
    [registry_chain] ...            # the area app judges meters by it (required)
    [[area]]
    chain = "A"                     # an area chain's id is its area id
    validators = "validators.toml"
    paillier_public = "keys/paillier.pub.json"
    [api]
    host = "127.0.0.1"
    port = 8480                     # 0: no API
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from aggregator.areaapp import AreaApp
from certlog.block import Header
from certlog.follower import Follower
from certlog.replica import Replica
from certlog.store import ChainStore, connect
from certlog.validators import load_validator_set
from gridledger.config import MqttConfig, mqtt_section, read_toml, section
from gridledger.errors import ConfigError
from gridledger.logs import event
from gridledger.paillier import load_public
from gridledger.wire import METER_ID_RE

from .api import make_app
from .ledger import AreaLedger
from .registry import RegistryChainSettings, registry_node

__all__ = ["CoordinatorSettings", "AreaSettings", "ApiSettings", "CoordinatorConfig", "CoordinatorRole",
           "load_coordinator_config", "area_database"]

log = logging.getLogger("gridledger.coordinator")

_TABLES = {"coordinator", "mqtt", "registry_chain", "area", "api", "settlement"}  # settlement: coordinator.settle


@dataclass(frozen=True, slots=True, kw_only=True)
class CoordinatorSettings:
    name: str
    database: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class AreaSettings:
    chain: str
    validators: Path
    paillier_public: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiSettings:
    host: str = "127.0.0.1"
    port: int = 8480


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    coordinator: CoordinatorSettings
    areas: tuple[AreaSettings, ...]
    registry_chain: RegistryChainSettings
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    api: ApiSettings = field(default_factory=ApiSettings)

    def area(self, chain: str) -> AreaSettings:
        for a in self.areas:
            if a.chain == chain:
                return a
        raise ConfigError(f"no [[area]] with chain {chain!r} (have {', '.join(a.chain for a in self.areas)})")


def area_database(database: Path, chain: str) -> Path:
    """coordinator.db -> coordinator-A.db: one SQLite file per area chain."""
    return database.with_name(f"{database.stem}-{chain}{database.suffix}")


def load_coordinator_config(path: Path) -> CoordinatorConfig:
    path = Path(path)
    doc = read_toml(path)
    unknown = set(doc) - _TABLES
    if unknown:
        raise ConfigError(f"{path}: unknown tables {sorted(unknown)}")
    c = section(CoordinatorSettings, doc, "coordinator", path.parent, ("database",))
    if not isinstance(c.name, str) or not METER_ID_RE.match(c.name):
        raise ConfigError(f"coordinator name {c.name!r} must match [A-Za-z0-9_-]{{1,32}}")
    tables = doc.get("area")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{path}: give one or more [[area]] tables")
    areas = tuple(section(AreaSettings, {"area": t}, "area", path.parent, ("validators", "paillier_public"))
                  for t in tables)
    chains = [a.chain for a in areas]
    for chain in chains:
        if not isinstance(chain, str) or not METER_ID_RE.match(chain):
            raise ConfigError(f"area chain id {chain!r} must match [A-Za-z0-9_-]{{1,32}}")
    if len(set(chains)) != len(chains):
        raise ConfigError(f"{path}: an area appears twice")
    registry_chain = RegistryChainSettings.from_doc(doc, path.parent)
    if registry_chain is None:
        raise ConfigError(f"{path}: the coordinator needs a [registry_chain] table (the area app reads it)")
    api = section(ApiSettings, doc, "api")
    if type(api.port) is not int or not 0 <= api.port < 65536:
        raise ConfigError("[api] port must be 0..65535 (0: no API)")
    return CoordinatorConfig(c, areas, registry_chain, mqtt_section(doc, path), api)


def open_ledger(cfg: CoordinatorConfig, chain: str, registry=None) -> AreaLedger:
    """The ledger of an area from the coordinator's files (for queries: `registry`
    is needed only to index)."""
    path = area_database(cfg.coordinator.database, cfg.area(chain).chain)
    if not path.exists():
        raise ConfigError(f"{path} does not exist: has `gridledger coordinator run` followed {chain}?")
    return AreaLedger(ChainStore(connect(path)), chain, registry=registry)


class CoordinatorRole:
    def __init__(self, cfg: CoordinatorConfig):
        self.cfg = cfg
        name = cfg.coordinator.name
        self.registry_node, self.history = registry_node(cfg.registry_chain, cfg.mqtt, name)
        self.ledgers: dict[str, AreaLedger] = {}
        self.followers: list[Follower] = []
        for a in cfg.areas:
            path = area_database(cfg.coordinator.database, a.chain)
            app = AreaApp(a.chain, self.history, load_public(a.paillier_public))
            replica = Replica(a.chain, app, ChainStore(connect(path)), load_validator_set(a.validators))
            ledger = self.ledgers[a.chain] = AreaLedger(replica.store, a.chain, registry=self.history)
            replica.listeners.append(self._indexer(ledger))
            mqtt = cfg.mqtt
            if mqtt.client_id:  # one MQTT session per chain
                mqtt = dataclasses.replace(mqtt, client_id=f"{mqtt.client_id}-{a.chain}")
            self.followers.append(Follower(replica, mqtt, name=name))

    @staticmethod
    def _indexer(ledger: AreaLedger):
        def index(header: Header, txs) -> None:
            # The block is durable already: a failure here leaves the ledger behind,
            # and the next block's index() retries from the gap; it never stops the replica.
            try:
                ledger.index(header, txs)
            except Exception as exc:
                event(log, "index_failed", logging.ERROR, chain=ledger.chain, height=header.height,
                      reason=getattr(exc, "reason", type(exc).__name__), detail=str(exc)[:200])
        return index

    async def run(self, stop: asyncio.Event) -> None:
        for chain, ledger in self.ledgers.items():
            done = await asyncio.to_thread(ledger.catch_up)
            event(log, "start", chain=chain, indexed=ledger.height, caught_up=done)
        runner = None
        if self.cfg.api.port:
            runner = web.AppRunner(make_app(self.ledgers), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, self.cfg.api.host, self.cfg.api.port).start()
            event(log, "api_up", host=self.cfg.api.host, port=self.cfg.api.port)
        try:
            await asyncio.gather(self.registry_node.run(stop), *(f.run(stop) for f in self.followers))
        finally:
            if runner is not None:
                await runner.cleanup()
            event(log, "stop", **{chain: led.height for chain, led in self.ledgers.items()})
