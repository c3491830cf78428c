"""How chain messages travel over MQTT: topics and JSON bodies.

    gl/v1/chains/{chain}/proposals        {"header": {...}, "txs": [str, ...], "proposer_sig": hex}
    gl/v1/chains/{chain}/votes            {"chain", "height", "hash", "validator", "sig"}
    gl/v1/chains/{chain}/certs            {"header": {...}, "cert": {...}}
    gl/v1/chains/{chain}/sync             {"validator": i, "from": height}
    gl/v1/chains/{chain}/blocks/{i}       {"header": {...}, "txs": [...], "cert": {...}}

Transactions are UTF-8 text (apps use canonical JSON). Every parse failure is a
`ChainError` with a reason; nothing here trusts its input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .block import Certificate, ChainError, Header, Vote, canonical

__all__ = ["Topics", "BlockMsg", "encode_block", "decode_block", "decode_vote", "decode_json", "MAX_MESSAGE", "SYNC_BATCH"]

MAX_MESSAGE = 64 * 1024 * 1024
SYNC_BATCH = 32  # blocks served per catch-up request


class Topics:
    def __init__(self, chain: str):
        base = f"gl/v1/chains/{chain}"
        self.proposals = f"{base}/proposals"
        self.votes = f"{base}/votes"
        self.certs = f"{base}/certs"
        self.sync = f"{base}/sync"
        self._blocks = f"{base}/blocks/"

    def blocks(self, validator: int | str) -> str:
        return f"{self._blocks}{validator}"


def decode_json(payload: bytes) -> Any:
    if len(payload) > MAX_MESSAGE:
        raise ChainError("message_size", f"{len(payload)} bytes")
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ChainError("message_json", str(exc)[:80]) from None


@dataclass(frozen=True, slots=True)
class BlockMsg:
    header: Header
    txs: list[bytes] | None
    cert: Certificate | None
    proposer_sig: bytes | None = None


def encode_block(header: Header, txs: list[bytes] | None = None, cert: Certificate | None = None,
                 proposer_sig: bytes | None = None) -> bytes:
    obj: dict[str, Any] = {"header": header.to_dict()}
    if proposer_sig is not None:
        obj["proposer_sig"] = proposer_sig.hex()
    if txs is not None:
        obj["txs"] = [t.decode("utf-8") for t in txs]
    if cert is not None:
        obj["cert"] = cert.to_dict()
    return canonical(obj)


def decode_block(payload: bytes) -> BlockMsg:
    obj = decode_json(payload)
    if not isinstance(obj, dict) or "header" not in obj:
        raise ChainError("message_schema", "expected an object with a header")
    header = Header.from_dict(obj["header"])
    txs = obj.get("txs")
    if txs is not None:
        if not isinstance(txs, list) or not all(isinstance(t, str) for t in txs):
            raise ChainError("message_schema", "txs must be a list of strings")
        try:
            txs = [t.encode("utf-8") for t in txs]
        except UnicodeEncodeError:
            raise ChainError("message_schema", "txs must be valid UTF-8") from None
    cert = Certificate.from_dict(obj["cert"]) if obj.get("cert") is not None else None
    sig = obj.get("proposer_sig")
    if sig is not None:
        try:
            sig = bytes.fromhex(sig)
        except (TypeError, ValueError):
            raise ChainError("message_schema", "proposer_sig must be hex") from None
    return BlockMsg(header, txs, cert, sig)


def decode_vote(payload: bytes) -> Vote:
    return Vote.from_dict(decode_json(payload))
