"""The validator role for area chains: `gridledger validator run --config FILE`.

Everything area-specific is here (the app and what it reads: registry, Paillier
public key); the engine's `ValidatorNode` does the rest.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from certlog.replica import Replica
from certlog.store import ChainStore, connect
from certlog.validators import load_validator_set, read_secret_key
from certlog.voter import ValidatorNode, Voter
from gridledger.config import MqttConfig, read_toml, section
from gridledger.errors import ConfigError
from gridledger.metrics import MetricsConfig, Snapshot, serve as serve_metrics
from gridledger.paillier import load_public
from gridledger.wire import METER_ID_RE

from .areaapp import AreaApp
from .registry import load_registry

__all__ = ["ValidatorSettings", "ValidatorConfig", "ValidatorRole", "load_validator_config", "build_node"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ValidatorSettings:
    name: str
    area: str
    database: Path
    secret_key: Path
    validators: Path
    registry: Path
    paillier_public: Path


@dataclass(frozen=True, slots=True)
class ValidatorConfig:
    validator: ValidatorSettings
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def load_validator_config(path: Path) -> ValidatorConfig:
    path = Path(path)
    doc = read_toml(path)
    v = section(ValidatorSettings, doc, "validator", path.parent,
                ("database", "secret_key", "validators", "registry", "paillier_public"))
    if not METER_ID_RE.match(v.area):
        raise ConfigError(f"area id {v.area!r} must match [A-Za-z0-9_-]{{1,32}}")
    return ValidatorConfig(v, section(MqttConfig, doc, "mqtt"), section(MetricsConfig, doc, "metrics"))


class ValidatorRole:
    """The process: a `ValidatorNode` plus its metrics endpoint."""

    def __init__(self, cfg: ValidatorConfig):
        self.cfg = cfg
        self.node = build_node(cfg)

    def metrics(self) -> list[Snapshot]:
        n = self.node
        return [Snapshot("gridledger_validator_height", "last certified height applied", "gauge", (),
                         {(): n.replica.height}),
                Snapshot("gridledger_validator_events", "votes, syncs and refusals by reason", "counter",
                         ("event",), {(k,): v for k, v in n.counts.items()})]

    async def run(self, stop: asyncio.Event) -> None:
        serve_metrics(self.cfg.metrics, self.metrics)
        await self.node.run(stop)


def build_node(cfg: ValidatorConfig) -> ValidatorNode:
    s = cfg.validator
    vset = load_validator_set(s.validators)
    app = AreaApp(s.area, load_registry(s.registry), load_public(s.paillier_public))
    replica = Replica(s.area, app, ChainStore(connect(s.database)), vset)
    voter = Voter(replica, vset.index(s.name), read_secret_key(s.secret_key))
    return ValidatorNode(voter, cfg.mqtt, name=s.name)


