"""How storage nodes talk over MQTT: topics, requests, responses, bodies and chunks.

    gl/v1/storage/{chain}/{node}/req      request   {"id", "from", "op", ...}           QoS 0
    gl/v1/storage/{chain}/{node}/resp     response  JSON line, then optionally "\\n" + raw bytes
    gl/v1/storage/{chain}/{node}/store    placement {"heights": [...]} or {"block": {...}}   QoS 1
    gl/v1/storage/{chain}/{node}/store    or a role change {"role": "full"} (promotion) from the verifier
    gl/v1/storage/{chain}/{node}/alive    {"node", "alive", "kind"} retained; the last will says alive false
    gl/v1/storage/{chain}/receipts        signed storage receipts                          QoS 1

A response goes to the requester's own `resp` topic, named by the request's
`from`, never to a topic the request chooses. A body travels as bytes
(`encode_body`) cut into chunks of at most `CHUNK_MAX`, or several small bodies
whole in one response of at most `CHUNK_MAX` (`bodies`). Every parse failure is
a `StorageError` with a stable reason; nothing here trusts its input.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any, Collection, Sequence

from certlog.block import ChainError, canonical
from certlog.net import decode_block

__all__ = ["StorageError", "StorageTopics", "NODE_RE", "KINDS", "OPS", "Request", "parse_request",
           "encode_request", "encode_response", "parse_response", "encode_body", "decode_body", "chunk_of",
           "chunk_count", "Reassembly", "split_bodies", "Placement", "parse_placement", "encode_placement", "liveness", "parse_liveness", "CHUNK_MAX",
           "CHUNK_MIN", "BODY_MAX", "BODIES_MAX", "HEADERS_MAX", "RANGES_MAX", "REQUEST_MAX"]

# A chunk of 256 KiB is a fraction of any broker's message limit (Mosquitto's is
# 256 MiB, AWS IoT's 128 KiB would need a smaller `chunk_size`), and a window of a
# few per peer keeps the broker's memory per transfer to about a megabyte.
CHUNK_MAX = 256 * 1024
CHUNK_MIN = 1024
BODY_MAX = 64 * 1024 * 1024   # the chain's own message limit (certlog.net.MAX_MESSAGE)
TXS_MAX = 1_000_000
HEADERS_MAX = 128             # certified headers per response (~0.8 KB each)
BODIES_MAX = 32               # bodies asked for in one `bodies` request (~80 bytes each: fits REQUEST_MAX)
RANGES_MAX = 1024             # inventory ranges per response
REQUEST_MAX = 4096            # bytes: every request is small
NODE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
NONCE_RE = re.compile(r"[0-9a-f]{32,128}\Z")
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
KINDS = ("full", "heavy", "light")
OPS = ("inventory", "headers", "body", "bodies", "tx", "audit")


class StorageError(ChainError):
    """A storage message, request or transfer refused; `reason` is a stable code."""


class StorageTopics:
    def __init__(self, chain: str):
        self.base = f"gl/v1/storage/{chain}"
        self.receipts = f"{self.base}/receipts"

    def requests(self, node: str) -> str:
        return f"{self.base}/{node}/req"

    def responses(self, node: str) -> str:
        return f"{self.base}/{node}/resp"

    def store(self, node: str) -> str:
        return f"{self.base}/{node}/store"

    def alive(self, node: str) -> str:
        return f"{self.base}/{node}/alive"

    def node_of(self, topic: str) -> str | None:
        """The node a `{base}/{node}/...` topic names (None: not one of ours)."""
        parts = topic[len(self.base) + 1:].split("/") if topic.startswith(self.base + "/") else []
        return parts[0] if len(parts) == 2 and NODE_RE.match(parts[0]) else None


def liveness(node: str, alive: bool, kind: str = "") -> bytes:
    """A node's liveness message: its retained "alive" on connect, its last will otherwise."""
    return canonical({"node": node, "alive": alive, "kind": kind})


def parse_liveness(payload: bytes) -> tuple[str, bool]:
    obj = _json(payload, 256, "bad_liveness")
    if not isinstance(obj, dict) or not isinstance(obj.get("node"), str) or type(obj.get("alive")) is not bool:
        raise StorageError("bad_liveness", "{node, alive, kind}")
    return obj["node"], obj["alive"]


def _json(payload: bytes, limit: int, reason: str) -> Any:
    if len(payload) > limit:
        raise StorageError(reason, f"{len(payload)} bytes, at most {limit}")
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise StorageError(reason, f"not JSON: {str(exc)[:60]}") from None


def _uint(obj: dict, key: str, lo: int = 0, hi: int = 2 ** 62, reason: str = "bad_request") -> int:
    v = obj.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise StorageError(reason, f"{key} must be an integer in [{lo}, {hi}]")
    return v


# -- requests -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Request:
    id: str
    sender: str               # the requester's node name: the response goes to its resp topic
    op: str
    args: dict[str, Any]      # op-specific, checked by `parse_request`


def encode_request(req_id: str, sender: str, op: str, **args: Any) -> bytes:
    return canonical({"id": req_id, "from": sender, "op": op, **args})


def parse_request(payload: bytes) -> Request:
    """A checked request. A request whose `id` and `from` are readable but whose
    rest is bad raises `StorageError` with `.request` set, so it can be answered."""
    obj = _json(payload, REQUEST_MAX, "bad_request")
    if not isinstance(obj, dict):
        raise StorageError("bad_request", "a request is a JSON object")
    rid, sender = obj.get("id"), obj.get("from")
    if not (isinstance(rid, str) and REQUEST_ID_RE.match(rid) and isinstance(sender, str) and NODE_RE.match(sender)):
        raise StorageError("bad_request", "id and from must be short names")
    op = obj.get("op")
    try:
        if op not in OPS:
            raise StorageError("unknown_op", f"{str(op)[:32]!r}")
        args = _ARGS[op](obj)
    except StorageError as exc:
        exc.request = Request(rid, sender, str(op)[:32], {})
        raise
    return Request(rid, sender, op, args)


def _inventory_args(obj: dict) -> dict:
    return {"after": _uint(obj, "after")} if "after" in obj else {"after": 0}


def _headers_args(obj: dict) -> dict:
    lo = _uint(obj, "lo", 1)
    hi = _uint(obj, "hi", lo)
    return {"lo": lo, "hi": min(hi, lo + HEADERS_MAX - 1)}


def _body_args(obj: dict) -> dict:
    return {"height": _uint(obj, "height", 1), "hash": _hash(obj.get("hash")),
            "chunk": _uint(obj, "chunk", 0, BODY_MAX),
            "chunk_size": _uint(obj, "chunk_size", CHUNK_MIN, CHUNK_MAX)}


def _hash(h: Any) -> str:
    if not isinstance(h, str) or len(h) != 64:
        raise StorageError("bad_request", "hash: the certified header's hash the body must match")
    return h


def _bodies_args(obj: dict) -> dict:
    want = obj.get("want")
    if not isinstance(want, list) or not 1 <= len(want) <= BODIES_MAX:
        raise StorageError("bad_request", f"want: 1 to {BODIES_MAX} [height, hash] pairs")
    pairs = []
    for w in want:
        if not isinstance(w, list) or len(w) != 2 or type(w[0]) is not int or not 1 <= w[0] <= 2 ** 62:
            raise StorageError("bad_request", "want: [height, hash] pairs")
        pairs.append((w[0], _hash(w[1])))
    return {"want": pairs, "chunk_size": _uint(obj, "chunk_size", CHUNK_MIN, CHUNK_MAX)}


def _tx_args(obj: dict) -> dict:
    return {"height": _uint(obj, "height", 1), "index": _uint(obj, "index", 0, TXS_MAX)}


def _audit_args(obj: dict) -> dict:
    nonce = obj.get("nonce")
    if not isinstance(nonce, str) or not NONCE_RE.match(nonce):
        raise StorageError("bad_request", "nonce must be 16 to 64 bytes of lowercase hex")
    return {**_tx_args(obj), "nonce": nonce}


_ARGS = {"inventory": _inventory_args, "headers": _headers_args, "body": _body_args, "bodies": _bodies_args,
         "tx": _tx_args, "audit": _audit_args}


# -- responses: one JSON line, then the raw bytes of a chunk (if any) ---------------

def encode_response(meta: dict[str, Any], data: bytes = b"") -> bytes:
    head = canonical(meta)  # canonical JSON has no newline: the first one ends it
    return head + b"\n" + data if data else head


def parse_response(payload: bytes) -> tuple[dict[str, Any], bytes]:
    head, sep, data = bytes(payload).partition(b"\n")
    meta = _json(head, 4 * CHUNK_MAX, "bad_response")
    if not isinstance(meta, dict) or not isinstance(meta.get("id"), str):
        raise StorageError("bad_response", "a response is a JSON object with the request's id")
    if len(data) > CHUNK_MAX:
        raise StorageError("bad_chunk", f"{len(data)} bytes of data, at most {CHUNK_MAX}")
    return meta, data


# -- bodies and chunks --------------------------------------------------------------

_U32 = struct.Struct(">I")


def encode_body(txs: Sequence[bytes]) -> bytes:
    """A body's transfer bytes: the count, then each transaction as length + bytes
    (binary-safe: a node serves what it holds, even bytes that are not UTF-8)."""
    parts = [_U32.pack(len(txs))]
    for t in txs:
        parts += (_U32.pack(len(t)), bytes(t))
    return b"".join(parts)


def decode_body(data: bytes, *, views: bool = False) -> list[bytes]:
    """The transactions of a body's transfer bytes; `views`: as memoryviews into `data`
    (no copy per transaction: the fill hashes them and writes `data` as it is)."""
    view = memoryview(data)
    if len(view) < 4:
        raise StorageError("body_format", "shorter than its count")
    (n,), off = _U32.unpack_from(view, 0), 4
    if n > TXS_MAX or n * 4 > len(view) - off:
        raise StorageError("body_format", f"{n} transactions cannot fit {len(view)} bytes")
    txs = []
    for _ in range(n):
        if off + 4 > len(view):
            raise StorageError("body_format", "truncated length")
        (size,) = _U32.unpack_from(view, off)
        off += 4
        if off + size > len(view):
            raise StorageError("body_format", "truncated transaction")
        txs.append(view[off:off + size])
        off += size
    if off != len(view):
        raise StorageError("body_format", f"{len(view) - off} bytes after the last transaction")
    return txs if views else [bytes(t) for t in txs]


def split_bodies(listed: Any, data: bytes, asked: Collection[int]) -> list[tuple[int, bytes]]:
    """A `bodies` response's data cut into (height, transfer bytes) as its `bodies`
    list says: each height one that was asked, once, the sizes adding up exactly."""
    if not isinstance(listed, list):
        raise StorageError("bad_response", "bodies must be a list of [height, size]")
    out, off, seen = [], 0, set()
    for item in listed:
        if (not isinstance(item, list) or len(item) != 2 or not all(type(x) is int for x in item)
                or item[0] not in asked or item[0] in seen or not 4 <= item[1] <= len(data) - off):
            raise StorageError("bad_chunk", f"body entry {str(item)[:40]} does not fit the response")
        seen.add(item[0])
        out.append((item[0], data[off:off + item[1]]))
        off += item[1]
    if off != len(data):
        raise StorageError("bad_chunk", f"{len(data) - off} bytes after the last body")
    return out


def chunk_count(size: int, chunk_size: int) -> int:
    return max(1, -(-size // chunk_size))


def chunk_of(data: bytes, index: int, chunk_size: int) -> bytes:
    if not 0 <= index < chunk_count(len(data), chunk_size):
        raise StorageError("no_such_chunk", f"chunk {index} of {chunk_count(len(data), chunk_size)}")
    return data[index * chunk_size:(index + 1) * chunk_size]


class Reassembly:
    """One body arriving in chunks of `chunk_size`, `size` bytes in all (as the
    first chunk's response said). Every chunk must be exactly where and as long as
    it claims; a second copy of a chunk must equal the first."""

    def __init__(self, size: int, chunk_size: int):
        if type(size) is not int or not 4 <= size <= BODY_MAX:
            raise StorageError("bad_chunk", f"body size {size!r} out of range")
        if not CHUNK_MIN <= chunk_size <= CHUNK_MAX:
            raise StorageError("bad_chunk", f"chunk size {chunk_size!r} out of range")
        self.size, self.chunk_size = size, chunk_size
        self.count = chunk_count(size, chunk_size)
        self._buf = bytearray(size)
        self._have: set[int] = set()

    def missing(self) -> list[int]:
        return [i for i in range(self.count) if i not in self._have]

    def add(self, index: int, data: bytes) -> None:
        if type(index) is not int or not 0 <= index < self.count:
            raise StorageError("bad_chunk", f"chunk {index!r} of {self.count}")
        start = index * self.chunk_size
        want = min(self.chunk_size, self.size - start)
        if len(data) != want:
            raise StorageError("bad_chunk", f"chunk {index} has {len(data)} bytes, {want} expected")
        if index in self._have:
            if self._buf[start:start + want] != data:
                raise StorageError("bad_chunk", f"chunk {index} arrived twice, different")
            return
        self._buf[start:start + want] = data
        self._have.add(index)

    @property
    def complete(self) -> bool:
        return len(self._have) == self.count

    def data(self) -> bytes:
        if not self.complete:
            raise StorageError("bad_chunk", f"chunks {self.missing()[:8]} missing")
        return bytes(self._buf)


# -- placements -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Placement:
    """Bodies a node is asked to keep: by height (it fetches them from its peers),
    or one certified block carried whole (`certlog.net.encode_block` form); or the
    verifier's word that the node's kind is now `role` (a promotion, a readmission)."""
    heights: tuple[int, ...] = ()
    block: dict | None = None
    by: str = ""
    role: str = ""


PLACEMENT_HEIGHTS_MAX = 4096


def encode_placement(*, heights: Sequence[int] = (), block: bytes | None = None, by: str = "",
                     role: str = "") -> bytes:
    obj: dict[str, Any] = {"by": by}
    if role:
        obj["role"] = role
    if heights:
        obj["heights"] = list(heights)
    if block is not None:  # carried as the JSON form of a block message (decode_block reads both)
        m = decode_block(block)
        obj["block"] = {"header": m.header.to_dict(), **({"txs": [t.decode() for t in m.txs]} if m.txs is not None else {}),
                        **({"cert": m.cert.to_dict()} if m.cert is not None else {})}
    return canonical(obj)


def parse_placement(payload: bytes) -> Placement:
    obj = _json(payload, BODY_MAX, "bad_placement")
    if not isinstance(obj, dict) or sum(k in obj for k in ("heights", "block", "role")) != 1:
        raise StorageError("bad_placement", "a placement has heights, a block or a role")
    by = obj.get("by", "")
    if not isinstance(by, str) or len(by) > 64:
        raise StorageError("bad_placement", "by must be a short name")
    if "role" in obj:
        if obj["role"] not in KINDS:
            raise StorageError("bad_placement", f"role must be one of {', '.join(KINDS)}")
        return Placement(role=obj["role"], by=by)
    if "block" in obj:
        if not isinstance(obj["block"], dict):
            raise StorageError("bad_placement", "block must be an object")
        return Placement(block=obj["block"], by=by)
    hs = obj["heights"]
    if (not isinstance(hs, list) or not 0 < len(hs) <= PLACEMENT_HEIGHTS_MAX
            or not all(type(h) is int and 1 <= h <= 2 ** 62 for h in hs)):
        raise StorageError("bad_placement", f"heights: 1 to {PLACEMENT_HEIGHTS_MAX} heights >= 1")
    return Placement(heights=tuple(sorted(set(hs))), by=by)
