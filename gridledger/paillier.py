"""Paillier keys and raw operations (g = n + 1), on `phe` with gmpy2 underneath.

Raw integer operations only; slot packing lives in `wire`. The private key is
whole here: a testbed shortcut that threshold trustees replace.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import gmpy2
from phe import paillier as phe_paillier

from .errors import ConfigError
from .wire import kid_of

__all__ = ["PublicKey", "generate", "load_public", "load_private", "save_keypair",
           "encrypt_raw", "add_ciphertexts", "in_ciphertext_space",
           "djn_seed_bytes", "djn_exponent", "djn_base_root", "djn_hn", "djn_rho"]


@dataclass(frozen=True, slots=True)
class PublicKey:
    n: int
    # Derived once: the gateway and validators need them for every reading, and
    # the kid alone (a decimal conversion and a SHA-256) costs more than a modmul.
    nsquare: int = field(init=False, repr=False, compare=False)
    kid: str = field(init=False, repr=False, compare=False)
    _n: gmpy2.mpz = field(init=False, repr=False, compare=False)
    _nsq: gmpy2.mpz = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.n < 3 or self.n % 2 == 0:
            raise ConfigError("Paillier modulus must be odd and > 2")
        object.__setattr__(self, "nsquare", self.n * self.n)
        object.__setattr__(self, "kid", kid_of(self.n))
        object.__setattr__(self, "_n", gmpy2.mpz(self.n))
        object.__setattr__(self, "_nsq", gmpy2.mpz(self.nsquare))

    def in_ciphertext_space(self, c: int) -> bool:
        """c is a unit of Z_{n^2}: `in_ciphertext_space(n, c)` with n^2 computed once."""
        return 0 < c < self._nsq and gmpy2.gcd(c, self._n) == 1

    @property
    def bits(self) -> int:
        return self.n.bit_length()

    def to_phe(self) -> phe_paillier.PaillierPublicKey:
        return phe_paillier.PaillierPublicKey(self.n)


def encrypt_raw(n: int, m: int, r: int | None = None) -> int:
    """c = (1 + m n) r^n mod n^2; r drawn uniformly from Z*_n unless given."""
    if not 0 <= m < n:
        raise ValueError("plaintext out of range")
    nsq = gmpy2.mpz(n) * n
    if r is None:
        while True:
            r = secrets.randbelow(n)
            if r > 1 and gmpy2.gcd(r, n) == 1:
                break
    return int((1 + gmpy2.mpz(m) * n) * gmpy2.powmod(r, n, nsq) % nsq)


# Damgard-Jurik-Nielsen randomness as the meter derives it (firmware/paillier.py,
# the same rules byte for byte): rho = (h^n)^a mod n^2 with h = -x^2 mod n,
# x a hash of n, and a short exponent a expanded from a random seed that the
# meter's journal keeps so a resend computes the same ciphertext again.

def _expand(tag: bytes, data: bytes, k: int) -> bytes:
    out = b"".join(hashlib.sha256(tag + data + bytes((i,))).digest() for i in range((k + 31) // 32))
    return out[:k]


def djn_seed_bytes(exp_bits: int) -> int:
    """Seed length for an exp_bits exponent: 128 bits up to 512, a quarter of the exponent beyond."""
    return max(16, (exp_bits + 31) // 32)


def djn_exponent(seed: bytes, exp_bits: int) -> int:
    return int.from_bytes(_expand(b"gl-djn-a", seed, (exp_bits + 7) // 8), "big") | 1


def djn_base_root(n: int) -> int:
    nb = (n.bit_length() + 7) // 8 + 16
    i = 0
    while True:
        x = int.from_bytes(_expand(b"gl-djn-h", str(n).encode() + bytes((i,)), nb), "big") % n
        if x > 1:
            return x
        i += 1


@functools.lru_cache(maxsize=8)
def djn_hn(n: int) -> int:
    """h^n mod n^2, the fixed base every meter value of key n is a power of."""
    x = djn_base_root(n)
    return int(gmpy2.powmod(-(x * x) % n, n, gmpy2.mpz(n) * n))


def djn_rho(n: int, seed: bytes, exp_bits: int) -> int:
    return int(gmpy2.powmod(djn_hn(n), djn_exponent(seed, exp_bits), gmpy2.mpz(n) * n))


def in_ciphertext_space(n: int, c: int) -> bool:
    """c is a unit of Z_{n^2}: 0 < c < n^2 and gcd(c, n) = 1."""
    return 0 < c < n * n and gmpy2.gcd(c, n) == 1


def add_ciphertexts(n: int, cs: Iterable[int]) -> int:
    """The ciphertext of the sum of the plaintexts: the product mod n^2."""
    nsq = gmpy2.mpz(n) * n
    acc = gmpy2.mpz(1)
    for c in cs:
        acc = acc * c % nsq
    return int(acc)


def generate(bits: int = 2048) -> tuple[phe_paillier.PaillierPublicKey, phe_paillier.PaillierPrivateKey]:
    if bits < 2048:
        raise ConfigError("Paillier modulus must be at least 2048 bits (DESIGN section 4)")
    return phe_paillier.generate_paillier_keypair(n_length=bits)


def save_keypair(directory: Path, pub: phe_paillier.PaillierPublicKey,
                 priv: phe_paillier.PaillierPrivateKey) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    pub_path = directory / "paillier.pub.json"
    key_path = directory / "paillier.key.json"
    pub_path.write_text(json.dumps({"n": str(pub.n), "kid": kid_of(pub.n), "bits": pub.n.bit_length()}, indent=1))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"warning": "TESTBED SHORTCUT: the whole Paillier private key in one file. "
                              "Production keys are split among threshold trustees.",
                   "n": str(pub.n), "p": str(priv.p), "q": str(priv.q)}, f, indent=1)
    return pub_path, key_path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read key file {path}: {exc}") from exc


def load_public(path: Path) -> PublicKey:
    obj = _read_json(path)
    try:
        pk = PublicKey(int(obj["n"]))
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"{path}: no valid modulus 'n'") from exc
    if "kid" in obj and obj["kid"] != pk.kid:
        raise ConfigError(f"{path}: kid {obj['kid']} does not match n")
    return pk


def load_private(path: Path) -> phe_paillier.PaillierPrivateKey:
    obj = _read_json(path)
    try:
        n, p, q = int(obj["n"]), int(obj["p"]), int(obj["q"])
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"{path}: needs n, p, q") from exc
    if p * q != n:
        raise ConfigError(f"{path}: p*q != n")
    return phe_paillier.PaillierPrivateKey(phe_paillier.PaillierPublicKey(n), p, q)
