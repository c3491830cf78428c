"""The validator role for area chains: `gridledger validator run --config FILE`.

Everything area-specific is here (the app and what it reads: registry, Paillier
public key, and with `[preverify]` the area's reading stream, whose signatures
it checks before a proposal carries them); the engine's `ValidatorNode` does the rest.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from certlog.follower import Follower
from certlog.replica import Replica
from certlog.store import ChainStore, connect
from certlog.validators import load_validator_set, read_secret_key
from certlog.voter import ValidatorNode, Voter
from gridledger.config import MqttConfig, mqtt_section, read_toml, section
from gridledger.errors import ConfigError
from gridledger.metrics import MetricsConfig, Snapshot, serve as serve_metrics
from gridledger.paillier import load_public
from gridledger.wire import METER_ID_RE

from coordinator.registry import RegistryChainSettings, registry_node

from .areaapp import AreaApp
from .pchain import PChainSettings, pchain_node
from .preverify import Preverifier, PreverifyConfig, VerifiedSignatures
from .registry import load_registry

__all__ = ["ValidatorSettings", "ValidatorConfig", "ValidatorRole", "load_validator_config", "build_node"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ValidatorSettings:
    name: str
    area: str
    database: Path
    secret_key: Path
    validators: Path
    paillier_public: Path
    registry: Path | None = None  # a static registry file; or the [registry_chain] table


@dataclass(frozen=True, slots=True)
class ValidatorConfig:
    validator: ValidatorSettings
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    registry_chain: RegistryChainSettings | None = None
    p_chain: PChainSettings | None = None
    r_chain: PChainSettings | None = None
    preverify: PreverifyConfig = field(default_factory=PreverifyConfig)


def load_validator_config(path: Path) -> ValidatorConfig:
    path = Path(path)
    doc = read_toml(path)
    v = section(ValidatorSettings, doc, "validator", path.parent,
                ("database", "secret_key", "validators", "registry", "paillier_public"))
    if not METER_ID_RE.match(v.area):
        raise ConfigError(f"area id {v.area!r} must match [A-Za-z0-9_-]{{1,32}}")
    registry_chain = RegistryChainSettings.from_doc(doc, path.parent)
    if (v.registry is None) == (registry_chain is None):
        raise ConfigError(f"{path}: give either [validator] registry (a file) or a [registry_chain] table")
    return ValidatorConfig(v, mqtt_section(doc, path), section(MetricsConfig, doc, "metrics"),
                           registry_chain, PChainSettings.from_doc(doc, path.parent),
                           PChainSettings.from_doc(doc, path.parent, "r_chain"),
                           section(PreverifyConfig, doc, "preverify"))


class ValidatorRole:
    """The process: a `ValidatorNode` of the area chain plus its metrics endpoint and,
    with `[registry_chain]`, its node of the registry chain (voting if it is one of
    that chain's validators, following otherwise); with `[p_chain]`, likewise its
    node of the area's P chain; with `[r_chain]`, of its R chain."""

    def __init__(self, cfg: ValidatorConfig):
        self.cfg = cfg
        self.node, self.registry_node = build_node(cfg)
        s = cfg.validator
        self.p_node = self.r_node = None
        if cfg.p_chain is not None:
            self.p_node = pchain_node(cfg.p_chain, s.area, self.node.replica.validators, cfg.mqtt, s.name,
                                      s.secret_key)
        if cfg.r_chain is not None:
            self.r_node = pchain_node(cfg.r_chain, s.area, self.node.replica.validators, cfg.mqtt, s.name,
                                      s.secret_key, "R")

    def metrics(self) -> list[Snapshot]:
        n = self.node
        out = [Snapshot("gridledger_validator_height", "last certified height applied", "gauge", (),
                        {(): n.replica.height}),
               Snapshot("gridledger_validator_events", "votes, syncs and refusals by reason", "counter",
                        ("event",), {(k,): v for k, v in dict(n.counts).items()})]
        pre = n.side
        if isinstance(pre, Preverifier):
            c = pre.cache
            out += [Snapshot("gridledger_validator_signature_cache", "block checks of a reading's signature: "
                             "hit (verified on the stream) or miss (verified then)", "counter", ("result",),
                             {("hit",): c.hits, ("miss",): c.misses}),
                    Snapshot("gridledger_validator_signature_cache_entries", "verified signatures kept", "gauge",
                             (), {(): len(c)}),
                    Snapshot("gridledger_validator_preverify", "stream readings: verified, known (already "
                             "cached) or dropped by reason", "counter", ("outcome",),
                             {(k,): v for k, v in dict(pre.counts).items()}),
                    Snapshot("gridledger_validator_preverify_queue", "stream readings waiting", "gauge", (),
                             {(): len(pre)})]
        return out

    async def run(self, stop: asyncio.Event) -> None:
        serve_metrics(self.cfg.metrics, self.metrics)
        extra = [n for n in (self.registry_node, self.p_node, self.r_node) if n is not None]
        try:
            await asyncio.gather(self.node.run(stop), *(n.run(stop) for n in extra))
        finally:
            if isinstance(self.node.side, Preverifier):
                self.node.side.status(force=True)


def build_node(cfg: ValidatorConfig) -> tuple[ValidatorNode, ValidatorNode | Follower | None]:
    s = cfg.validator
    vset = load_validator_set(s.validators)
    reg_node = None
    if cfg.registry_chain is not None:
        reg_node, registry = registry_node(cfg.registry_chain, cfg.mqtt, s.name, s.secret_key)
    else:
        registry = load_registry(s.registry)
    paillier = load_public(s.paillier_public)
    pre = None
    if cfg.preverify.enabled:
        current = (lambda: registry.view(s.area)) if cfg.registry_chain is not None else (lambda: registry)
        pre = Preverifier(s.area, current, paillier.kid, VerifiedSignatures(cfg.preverify.cache), cfg.preverify)
    app = AreaApp(s.area, registry, paillier, verified=None if pre is None else pre.cache)
    replica = Replica(s.area, app, ChainStore(connect(s.database)), vset)
    voter = Voter(replica, vset.index(s.name), read_secret_key(s.secret_key))
    return ValidatorNode(voter, cfg.mqtt, name=s.name, side=pre), reg_node


