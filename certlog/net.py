"""How chain messages travel over MQTT: topics and JSON bodies.

    gl/v1/chains/{chain}/proposals        framed: {"header": {...}, "proposer_sig": hex} + txs
    gl/v1/chains/{chain}/votes            {"chain", "height", "hash", "validator", "sig"}
    gl/v1/chains/{chain}/certs            {"header": {...}, "cert": {...}}
    gl/v1/chains/{chain}/sync             {"validator": i, "from": height}
    gl/v1/chains/{chain}/blocks/{i}       framed: {"header": {...}, "cert": {...}} + txs

"framed" (`encode_block`): b"GLB\x01", the length of the fields' canonical JSON (4
bytes, big-endian), that JSON, the number of transactions (4 bytes), then each
transaction as its length (4 bytes) and its bytes. Transactions are UTF-8 text (apps
use canonical JSON). Every parse failure is a `ChainError` with a reason; nothing here
trusts its input.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from .block import Certificate, ChainError, Header, Vote, canonical

__all__ = ["Topics", "BlockMsg", "encode_block", "decode_block", "decode_vote", "decode_json", "MAX_MESSAGE", "SYNC_BATCH"]

MAX_MESSAGE = 64 * 1024 * 1024
BODY_MAGIC = b"GLB\x01"  # a block message with its transactions framed (`encode_block`)
_U32 = struct.Struct(">I")
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
    """A block message. Without transactions: canonical JSON of the fields. With them
    (proposals, served blocks): `BODY_MAGIC`, then the canonical JSON of the other fields
    and the transactions, each prefixed by its length (4 bytes, big-endian), the count
    first. A proposal carries a megabyte of transactions; as JSON strings each would be
    escaped by the proposer and unescaped by every validator, a character at a time."""
    obj: dict[str, Any] = {"header": header.to_dict()}
    if proposer_sig is not None:
        obj["proposer_sig"] = proposer_sig.hex()
    if cert is not None:
        obj["cert"] = cert.to_dict()
    meta = canonical(obj)
    if txs is None:
        return meta
    parts = [BODY_MAGIC, _U32.pack(len(meta)), meta, _U32.pack(len(txs))]
    for t in txs:
        parts += (_U32.pack(len(t)), t)
    return b"".join(parts)


def decode_block(payload: bytes) -> BlockMsg:
    """A block message in either form `encode_block` writes (JSON with "txs" as strings
    is also read: what proposers wrote before the framed form)."""
    if len(payload) > MAX_MESSAGE:
        raise ChainError("message_size", f"{len(payload)} bytes")
    txs = None
    if payload[:4] == BODY_MAGIC:
        obj, txs = _framed(payload)
    else:
        obj = decode_json(payload)
        if not isinstance(obj, dict) or "header" not in obj:
            raise ChainError("message_schema", "expected an object with a header")
        txs = obj.get("txs")
        if txs is not None:
            if not isinstance(txs, list) or not all(isinstance(t, str) for t in txs):
                raise ChainError("message_schema", "txs must be a list of strings")
            try:
                txs = [t.encode("utf-8") for t in txs]
            except UnicodeEncodeError:
                raise ChainError("message_schema", "txs must be valid UTF-8") from None
    header = Header.from_dict(obj["header"])
    cert = Certificate.from_dict(obj["cert"]) if obj.get("cert") is not None else None
    sig = obj.get("proposer_sig")
    if sig is not None:
        try:
            sig = bytes.fromhex(sig)
        except (TypeError, ValueError):
            raise ChainError("message_schema", "proposer_sig must be hex") from None
    return BlockMsg(header, txs, cert, sig)


def _framed(payload: bytes) -> tuple[dict, list[bytes]]:
    """The fields and transactions of a framed block message; `ChainError` for any
    length that runs past the end, bytes left over, or a transaction not UTF-8."""
    view, end = memoryview(payload), len(payload)
    try:
        (meta_len,) = _U32.unpack_from(payload, 4)
        at = 8 + meta_len
        if at + 4 > end:
            raise ChainError("message_frame", f"fields of {meta_len} bytes run past the message's {end}")
        obj = decode_json(bytes(view[8:at]))
        if not isinstance(obj, dict) or "header" not in obj or "txs" in obj:
            raise ChainError("message_schema", "expected an object with a header and no txs field")
        (count,) = _U32.unpack_from(payload, at)
        at += 4
        if count * 4 > end - at:
            raise ChainError("message_frame", f"{count} transactions cannot fit {end - at} bytes")
        txs = []
        for _ in range(count):
            (n,) = _U32.unpack_from(payload, at)
            at += 4
            if at + n > end:
                raise ChainError("message_frame", f"transaction {len(txs)} of {n} bytes runs past the end")
            t = bytes(view[at:at + n])
            if not t.isascii():
                t.decode("utf-8")
            txs.append(t)
            at += n
    except struct.error:
        raise ChainError("message_frame", "truncated") from None
    except UnicodeDecodeError:
        raise ChainError("message_schema", "txs must be valid UTF-8") from None
    if at != end:
        raise ChainError("message_frame", f"{end - at} bytes after the last transaction")
    return obj, txs


def decode_vote(payload: bytes) -> Vote:
    return Vote.from_dict(decode_json(payload))
