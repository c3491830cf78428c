"""Ed25519 meter keys (RFC 8032) for testbed meters: generate, store, load, verify."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

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
    """A function msg, sig -> bool for one meter's key; False on any malformed input.

    Every Ed25519 check of a meter's signature (gateway, validators, light clients,
    `chain verify`) goes through here, so all of them apply one rule: libsodium's
    (`crypto_sign_verify_detached`, via PyNaCl). It refuses a non-canonical S,
    a small-order R and a small-order or non-canonically encoded public key,
    which OpenSSL's accepts (tests/test_meterkeys.py); an honest RFC 8032 signature (the firmware's, OpenSSL's) always
    passes. It is chosen for speed: 70-75 us a verify on the bench machine where
    OpenSSL's (through `cryptography`) takes 120-145 us, and this check is most of
    a gateway's work per reading (docs/performance.md).

    Only the key's form is checked here (32 bytes of hex), as before: a key that
    is not a usable point fails every signature under it, at verify time."""
    try:
        raw = bytes.fromhex(public_key_hex)
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"bad Ed25519 public key {public_key_hex!r}")
    key = VerifyKey(raw)

    def verify(msg: bytes, sig: bytes) -> bool:
        try:
            key.verify(msg, sig)
            return True
        except (BadSignatureError, ValueError, TypeError):  # ValueError: not 64 bytes
            return False

    return verify
