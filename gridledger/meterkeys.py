"""Ed25519 meter keys (RFC 8032) for testbed meters: generate, store, load, verify."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import ConfigError

__all__ = ["MeterKey", "new_meter_key", "verifier", "public_hex"]


@dataclass(frozen=True, slots=True)
class MeterKey:
    meter: str
    seed: bytes  # the 32-byte RFC 8032 private key
    private: Ed25519PrivateKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Parsed once: signing is on the load generator's and benches' hot path.
        object.__setattr__(self, "private", Ed25519PrivateKey.from_private_bytes(self.seed))

    @property
    def public_hex(self) -> str:
        return public_hex(self.private.public_key())

    def sign(self, msg: bytes) -> bytes:
        return self.private.sign(msg)

    def write_seed(self, path: Path) -> None:
        """Raw 32 bytes, mode 0600: the file the firmware reads."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.seed)

    @classmethod
    def read_seed(cls, meter: str, path: Path) -> "MeterKey":
        seed = Path(path).read_bytes()
        if len(seed) != 32:
            raise ConfigError(f"{path}: an Ed25519 seed is 32 bytes, not {len(seed)}")
        return cls(meter, seed)


def new_meter_key(meter: str) -> MeterKey:
    return MeterKey(meter, os.urandom(32))


def public_hex(pub: Ed25519PublicKey) -> str:
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def verifier(public_key_hex: str):
    """A function msg, sig -> bool for one meter's key; False on any malformed input."""
    try:
        pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))
    except ValueError as exc:
        raise ConfigError(f"bad Ed25519 public key {public_key_hex!r}") from exc

    def verify(msg: bytes, sig: bytes) -> bool:
        try:
            pub.verify(sig, msg)
            return True
        except InvalidSignature:
            return False

    return verify
