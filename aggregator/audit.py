"""`gridledger chain verify` for an area chain, configured from a gateway's or a
validator's TOML (database, registry, Paillier key, validator set)."""

from __future__ import annotations

from pathlib import Path

from certlog.audit import AuditReport, verify_chain
from certlog.validators import load_validator_set
from gridledger.config import read_toml
from gridledger.errors import ConfigError
from gridledger.paillier import load_public

from .areaapp import AreaApp
from .gateway import load_gateway_config
from .registry import load_registry
from .validator import load_validator_config

__all__ = ["audit_from_config"]


def audit_from_config(config: Path, database: Path | None = None) -> AuditReport:
    doc = read_toml(config)
    if "gateway" in doc:
        cfg = load_gateway_config(config)
        if cfg.chain is None:
            raise ConfigError(f"{config} has no [chain] section")
        s, validators = cfg.gateway, cfg.chain.validators
    elif "validator" in doc:
        s = load_validator_config(config).validator
        validators = s.validators
    else:
        raise ConfigError(f"{config} is neither a gateway nor a validator config")
    app = AreaApp(s.area, load_registry(s.registry), load_public(s.paillier_public))
    try:
        return verify_chain(database or s.database, s.area, app, load_validator_set(validators))
    except FileNotFoundError as exc:
        raise ConfigError(f"no database at {exc}") from None
