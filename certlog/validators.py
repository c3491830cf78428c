"""The known validator set of a chain: N = 3f+1 BLS keys with proofs of possession.

Each validator's secret key lives in its own file (mode 0600); the public keys and
proofs of possession are listed, in index order, in a TOML file every node shares.
A proof of possession is checked when the set is loaded, which is what makes
same-message aggregation safe against rogue-key attacks.
"""

from __future__ import annotations

import os
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from gridledger.errors import ConfigError

from . import bls
from .block import Certificate, ChainError, Header, Vote, cert_message

__all__ = ["ValidatorInfo", "ValidatorSet", "new_secret_key", "write_secret_key", "read_secret_key", "info_for",
           "load_validator_set", "dump_validator_set", "proposal_message"]

# Certificates a set remembers as verified (`check_certificate(remember=True)`). Settlement
# checks the same two boundary blocks' certificates for every account of an area, each
# two pairings (~1.5 ms); a few hundred entries cover many periods and areas.
CERT_CACHE = 512


@dataclass(frozen=True, slots=True)
class ValidatorInfo:
    name: str
    public_key: bytes  # 48-byte compressed G1 point
    pop: bytes         # 96-byte proof of possession


class ValidatorSet:
    """The validators of a chain, and the one proposer whose proposals they consider."""

    def __init__(self, members: Sequence[ValidatorInfo], proposer: ValidatorInfo | None = None):
        if not members:
            raise ConfigError("a validator set needs at least one validator")
        names = [m.name for m in members]
        if len(set(names)) != len(names) or len({m.public_key for m in members}) != len(members):
            raise ConfigError("validator names and keys must be unique")
        for m in members:
            if not bls.PopVerify(m.public_key, m.pop):
                raise ConfigError(f"validator {m.name}: proof of possession does not verify")
        if proposer is not None and not bls.PopVerify(proposer.public_key, proposer.pop):
            raise ConfigError(f"proposer {proposer.name}: proof of possession does not verify")
        self.proposer = proposer
        self.members = tuple(members)
        self.n = len(members)
        self.f = (self.n - 1) // 3
        self.quorum = 2 * self.f + 1
        self._verified: set[tuple] = set()

    def index(self, name: str) -> int:
        for i, m in enumerate(self.members):
            if m.name == name:
                return i
        raise ConfigError(f"{name} is not in the validator set")

    def check_vote(self, vote: Vote) -> bool:
        if not 0 <= vote.validator < self.n:
            return False
        msg = cert_message(vote.chain, vote.height, vote.hash)
        return bls.Verify(self.members[vote.validator].public_key, msg, vote.signature)

    def aggregate(self, votes: Sequence[Vote]) -> Certificate:
        """Certificate from `quorum` valid votes on one header (the caller checked them)."""
        first = votes[0]
        votes = sorted({v.validator: v for v in votes}.values(), key=lambda v: v.validator)[:self.quorum]
        return Certificate(first.chain, first.height, first.hash, tuple(v.validator for v in votes),
                           bls.Aggregate([v.signature for v in votes]))

    def check_proposal(self, header: Header, signature: bytes | None) -> None:
        """Only the chain's proposer may propose: raise `ChainError` otherwise."""
        if self.proposer is None:
            return
        if signature is None or not bls.Verify(self.proposer.public_key, proposal_message(header), signature):
            raise ChainError("not_from_proposer", "proposal is not signed by the chain's proposer",
                             height=header.height)

    def check_certificate(self, cert: Certificate, header: Header, *, remember: bool = False) -> None:
        """Raise `ChainError` unless `cert` certifies exactly this header.

        With `remember`, a certificate this set has verified before (the same header
        hash, signers and signature, byte for byte) is not verified again: only the
        aggregate signature's check is skipped, and only for exactly that certificate."""
        if (cert.chain, cert.height, cert.hash) != (header.chain, header.height, header.hash):
            raise ChainError("cert_mismatch", f"certificate is for {cert.chain}/{cert.height}/{cert.hash[:12]}, "
                             f"header is {header.chain}/{header.height}/{header.hash[:12]}", height=header.height)
        s = cert.signers
        if list(s) != sorted(set(s)) or any(i >= self.n for i in s):
            raise ChainError("cert_signers", "signers must be distinct known indices in ascending order",
                             height=header.height)
        if len(s) < self.quorum:
            raise ChainError("cert_quorum", f"{len(s)} signers, {self.quorum} needed", height=header.height)
        seen = (cert.chain, cert.height, cert.hash, tuple(s), bytes(cert.signature))
        if remember and seen in self._verified:
            return
        pks = [self.members[i].public_key for i in s]
        if not bls.FastAggregateVerify(pks, cert_message(cert.chain, cert.height, cert.hash), cert.signature):
            raise ChainError("cert_signature", "aggregate signature does not verify", height=header.height)
        if remember:
            if len(self._verified) >= CERT_CACHE:
                self._verified.clear()
            self._verified.add(seen)


def proposal_message(header: Header) -> bytes:
    return f"gl-propose-v1\n{header.chain}\n{header.height}\n{header.hash}".encode("ascii")


def new_secret_key() -> int:
    return bls.KeyGen(secrets.token_bytes(32))


def write_secret_key(path: Path, sk: int) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{sk:064x}\n")


def read_secret_key(path: Path) -> int:
    try:
        text = Path(path).read_text().strip()
        sk = int(text, 16)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read validator key {path}: {exc}") from exc
    if len(text) != 64 or not 0 < sk < bls.CURVE_ORDER:
        raise ConfigError(f"{path}: not a BLS12-381 secret key")
    return sk


def info_for(name: str, sk: int) -> ValidatorInfo:
    return ValidatorInfo(name, bls.SkToPk(sk), bls.PopProve(sk))


def load_validator_set(path: Path) -> ValidatorSet:
    try:
        doc = tomllib.loads(Path(path).read_text())
        info = lambda v: ValidatorInfo(v["name"], bytes.fromhex(v["public_key"]), bytes.fromhex(v["pop"]))  # noqa: E731
        members = [info(v) for v in doc["validators"]]
        proposer = info(doc["proposer"]) if "proposer" in doc else None
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"cannot read validator set {path}: {exc}") from exc
    return ValidatorSet(members, proposer)


def dump_validator_set(members: Sequence[ValidatorInfo], proposer: ValidatorInfo | None = None) -> str:
    lines = ["# gridledger validator set: index order matters (certificates name signers by index)", ""]
    if proposer is not None:
        lines += ["[proposer]", f'name = "{proposer.name}"', f'public_key = "{proposer.public_key.hex()}"',
                  f'pop = "{proposer.pop.hex()}"', ""]
    for m in members:
        lines += ["[[validators]]", f'name = "{m.name}"', f'public_key = "{m.public_key.hex()}"',
                  f'pop = "{m.pop.hex()}"', ""]
    return "\n".join(lines)
