"""TOML configuration for the roles; relative paths resolve against the file's folder."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import ConfigError

__all__ = ["MqttConfig", "read_toml", "section", "mqtt_section"]


@dataclass(frozen=True, slots=True, kw_only=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""
    username: str | None = None
    password: str | None = None
    keepalive: int = 30
    tls_ca: Path | None = None  # with it, TLS to the broker, trusting only this CA file


def read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def section(cls, doc: dict, name: str, base: Path | None = None, paths: tuple[str, ...] = ()):
    """Build dataclass `cls` from table `name`, refusing unknown keys and
    resolving the keys in `paths` against `base`."""
    raw = dict(doc.get(name, {}))
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"[{name}]: unknown keys {sorted(unknown)}")
    for key in paths:
        if key in raw and base is not None:
            raw[key] = (base / raw[key]).resolve()
    try:
        return cls(**raw)
    except TypeError as exc:
        raise ConfigError(f"[{name}]: {exc}") from exc


def mqtt_section(doc: dict, path: Path) -> MqttConfig:
    """The `[mqtt]` table of the config file at `path` (its `tls_ca` resolved against its folder)."""
    return section(MqttConfig, doc, "mqtt", Path(path).parent, ("tls_ca",))
