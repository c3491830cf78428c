"""`gridledger chain verify` for an area chain, configured from a gateway's or a
validator's TOML (database, registry, Paillier key, validator set).

With `[registry_chain]` the role's replica of the registry chain is audited
first, and the area chain is then re-run against the enrollments it holds: an
area chain is only as sound as the registry it names."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from certlog.audit import AuditReport, verify_chain
from certlog.store import ChainStore
from certlog.validators import load_validator_set
from coordinator.registryapp import RegistryApp, RegistryHistory, load_genesis
from gridledger.config import read_toml
from gridledger.errors import ConfigError
from gridledger.paillier import load_public

from .areaapp import AreaApp
from .gateway import load_gateway_config
from .registry import load_registry
from .store import block_readings
from .validator import load_validator_config

__all__ = ["audit_from_config"]


def audit_from_config(config: Path, database: Path | None = None) -> AuditReport:
    doc = read_toml(config)
    if "gateway" in doc:
        cfg = load_gateway_config(config)
        if cfg.chain is None:
            raise ConfigError(f"{config} has no [chain] section")
        s, validators, rc = cfg.gateway, cfg.chain.validators, cfg.registry_chain
    elif "validator" in doc:
        vcfg = load_validator_config(config)
        s, validators, rc = vcfg.validator, vcfg.validator.validators, vcfg.registry_chain
    else:
        raise ConfigError(f"{config} is neither a gateway nor a validator config")
    try:
        if rc is None:
            registry = load_registry(s.registry)
        else:
            report = verify_chain(rc.database, rc.chain, RegistryApp(load_genesis(rc.genesis)),
                                  load_validator_set(rc.validators))
            if not report.ok:
                return report
            with sqlite3.connect(f"file:{rc.database}?mode=ro", uri=True, timeout=10) as conn:
                registry = RegistryHistory.from_store(ChainStore(conn), rc.chain)
        app = AreaApp(s.area, registry, load_public(s.paillier_public))
        return verify_chain(database or s.database, s.area, app, load_validator_set(validators),
                            elsewhere=block_readings)
    except FileNotFoundError as exc:
        raise ConfigError(f"no database at {exc}") from None
