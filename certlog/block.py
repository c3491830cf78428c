"""Headers, votes and certificates of a certified log (DESIGN section 3).

A header is canonical JSON (sorted keys, no spaces, ASCII); its hash is SHA-256
of those bytes. A validator's vote is a BLS signature over
``gl-cert-v1\\n{chain}\\n{height}\\n{header hash}``; 2f+1 votes on the same
message aggregate into the block's certificate.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["ZERO_HASH", "ChainError", "Header", "Vote", "Certificate", "canonical", "cert_message",
           "CHAIN_ID_RE"]

ZERO_HASH = "0" * 64
CHAIN_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_HEADER_KEYS = {"chain", "height", "prev", "time", "tx_root", "state_root", "txs", "app"}


class ChainError(Exception):
    """A block, vote or certificate that must not be accepted; `reason` is a stable code."""

    def __init__(self, reason: str, detail: str = "", *, height: int | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.height = height


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def cert_message(chain: str, height: int, header_hash: str) -> bytes:
    return f"gl-cert-v1\n{chain}\n{height}\n{header_hash}".encode("ascii")


def _int(obj: Mapping, key: str, lo: int = 0, reason: str = "header_schema") -> int:
    v = obj.get(key)
    if type(v) is not int or v < lo:
        raise ChainError(reason, f"{key} must be an integer >= {lo}")
    return v


def _hex64(obj: Mapping, key: str, reason: str = "header_schema") -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not _HEX64.match(v):
        raise ChainError(reason, f"{key} must be 64 lowercase hex digits")
    return v


@dataclass(frozen=True, slots=True)
class Header:
    chain: str
    height: int
    prev: str            # hash of the parent header; ZERO_HASH at height 1
    time: int            # proposer's clock, Unix milliseconds, strictly increasing
    tx_root: str         # Merkle root of the body (certlog.merkle)
    state_root: str      # the app's state root after this block
    txs: int             # number of transactions in the body
    app: Mapping[str, Any] = field(default_factory=dict)  # app fields: str, int, bool values
    hash: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hash", hashlib.sha256(self.encode()).hexdigest())

    def to_dict(self) -> dict[str, Any]:
        return {"chain": self.chain, "height": self.height, "prev": self.prev, "time": self.time,
                "tx_root": self.tx_root, "state_root": self.state_root, "txs": self.txs,
                "app": dict(self.app)}

    def encode(self) -> bytes:
        return canonical(self.to_dict())

    @classmethod
    def from_dict(cls, obj: Any) -> "Header":
        if not isinstance(obj, dict) or set(obj) != _HEADER_KEYS:
            raise ChainError("header_schema", f"a header has exactly the fields {sorted(_HEADER_KEYS)}")
        chain = obj["chain"]
        if not isinstance(chain, str) or not CHAIN_ID_RE.match(chain):
            raise ChainError("header_schema", "chain id")
        app = obj["app"]
        if not isinstance(app, dict) or not all(
                isinstance(k, str) and type(v) in (str, int, bool) for k, v in app.items()):
            raise ChainError("header_schema", "app fields must map names to str, int or bool")
        return cls(chain=chain, height=_int(obj, "height", 1), prev=_hex64(obj, "prev"),
                   time=_int(obj, "time"), tx_root=_hex64(obj, "tx_root"),
                   state_root=_hex64(obj, "state_root"), txs=_int(obj, "txs"), app=app)

    @classmethod
    def decode(cls, data: bytes) -> "Header":
        """Parse header bytes; they must be canonical, so a header has one encoding."""
        try:
            h = cls.from_dict(json.loads(data))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ChainError("header_schema", f"not JSON: {str(exc)[:80]}") from None
        if h.encode() != bytes(data):
            raise ChainError("header_schema", "header bytes are not canonical")
        return h


def _sig_hex(obj: Mapping, key: str, length: int, reason: str) -> bytes:
    v = obj.get(key)
    if not isinstance(v, str) or len(v) != 2 * length:
        raise ChainError(reason, f"{key} must be {length} bytes of hex")
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise ChainError(reason, f"{key} is not hex") from None


@dataclass(frozen=True, slots=True)
class Vote:
    chain: str
    height: int
    hash: str
    validator: int       # index in the validator set
    signature: bytes

    def to_dict(self) -> dict[str, Any]:
        return {"chain": self.chain, "height": self.height, "hash": self.hash,
                "validator": self.validator, "sig": self.signature.hex()}

    @classmethod
    def from_dict(cls, obj: Any) -> "Vote":
        if not isinstance(obj, dict) or not isinstance(obj.get("chain"), str):
            raise ChainError("vote_schema", "a vote has chain, height, hash, validator, sig")
        return cls(chain=obj["chain"], height=_int(obj, "height", 1, "vote_schema"),
                   hash=_hex64(obj, "hash", "vote_schema"), validator=_int(obj, "validator", 0, "vote_schema"),
                   signature=_sig_hex(obj, "sig", 96, "vote_schema"))


@dataclass(frozen=True, slots=True)
class Certificate:
    chain: str
    height: int
    hash: str
    signers: tuple[int, ...]  # validator indices, ascending
    signature: bytes          # BLS aggregate of the signers' votes

    def to_dict(self) -> dict[str, Any]:
        return {"chain": self.chain, "height": self.height, "hash": self.hash,
                "signers": list(self.signers), "sig": self.signature.hex()}

    def encode(self) -> bytes:
        return canonical(self.to_dict())

    @classmethod
    def from_dict(cls, obj: Any) -> "Certificate":
        if not isinstance(obj, dict) or set(obj) != {"chain", "height", "hash", "signers", "sig"}:
            raise ChainError("cert_schema", "a certificate has chain, height, hash, signers, sig")
        signers = obj["signers"]
        if not isinstance(signers, list) or not all(type(i) is int and i >= 0 for i in signers):
            raise ChainError("cert_schema", "signers must be validator indices")
        if not isinstance(obj["chain"], str):
            raise ChainError("cert_schema", "chain")
        return cls(chain=obj["chain"], height=_int(obj, "height", 1, "cert_schema"),
                   hash=_hex64(obj, "hash", "cert_schema"), signers=tuple(signers),
                   signature=_sig_hex(obj, "sig", 96, "cert_schema"))
