"""The meter registry a gateway checks readings against (a TOML file for now)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gridledger.errors import ConfigError
from gridledger.meterkeys import verifier
from gridledger.wire import METER_ID_RE

__all__ = ["MeterEntry", "Registry", "load_registry", "dump_registry"]


@dataclass(frozen=True, slots=True)
class MeterEntry:
    meter: str
    account: str
    public_key: str  # hex of the 32-byte Ed25519 public key


class Registry:
    def __init__(self, entries: list[MeterEntry]):
        self._entries: dict[str, MeterEntry] = {}
        keys: set[str] = set()
        for e in entries:
            if not METER_ID_RE.match(e.meter):
                raise ConfigError(f"bad meter id {e.meter!r}")
            if e.meter in self._entries:
                raise ConfigError(f"meter {e.meter} registered twice")
            if e.public_key in keys:
                raise ConfigError(f"public key of {e.meter} is already registered to another meter")
            keys.add(e.public_key)
            self._entries[e.meter] = e
        self._verifiers: dict[str, Callable[[bytes, bytes], bool]] = {
            e.meter: verifier(e.public_key) for e in entries}

    def __contains__(self, meter: str) -> bool:
        return meter in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        return iter(self._entries.values())

    def get(self, meter: str) -> MeterEntry | None:
        return self._entries.get(meter)

    def verify(self, meter: str, msg: bytes, sig: bytes) -> bool:
        return self._verifiers[meter](msg, sig)

    def verifier(self, meter: str) -> Callable[[bytes, bytes], bool] | None:
        """`verify` for one meter as a function of (msg, sig); None when it is not registered."""
        return self._verifiers.get(meter)


def load_registry(path: Path) -> Registry:
    try:
        doc = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read registry {path}: {exc}") from exc
    try:
        entries = [MeterEntry(m["id"], m["account"], m["public_key"]) for m in doc.get("meters", [])]
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: each [[meters]] needs id, account, public_key") from exc
    return Registry(entries)


def dump_registry(entries: list[MeterEntry]) -> str:
    lines = ["# gridledger meter registry: one [[meters]] table per enrolled meter", ""]
    for e in entries:
        lines += ["[[meters]]", f'id = "{e.meter}"', f'account = "{e.account}"',
                  f'public_key = "{e.public_key}"', ""]
    return "\n".join(lines)
