"""What a storage node answers: one request in, one response out, over its store.

No MQTT here: `StorageServer.answer` takes a parsed request and returns the
response bytes (`storagewire` framing). Every refusal is a typed error response
(`{"ok": false, "error": reason}`), never an exception. Bodies go out as the
store keeps them (their transfer bytes, CRC checked on read: no decoding, no
re-encoding); a body being sent in chunks is kept in a small cache, so a body of n
chunks is read once, not n times. A transaction is one read and its path comes from
the indexed leaf hashes; every answer is checked against the certified tx root
before it leaves. A body that fails a check is answered `corrupt` (and dropped by
the store, so the node fetches it again).
"""

from __future__ import annotations

import json
from collections import Counter, OrderedDict

from certlog import merkle
from certlog.block import ChainError

from .receipts import answer_audit_proof
from .storagestore import StorageStore
from .storagewire import RANGES_MAX, Request, chunk_count, chunk_of, encode_response

__all__ = ["StorageServer", "error_response"]

CACHE_BYTES = 64 * 1024 * 1024  # encoded bodies kept for chunked reads in flight


def error_response(req_id: str, reason: str, detail: str = "") -> bytes:
    return encode_response({"id": req_id, "ok": False, "error": reason, "detail": detail[:200]})


class StorageServer:
    def __init__(self, store: StorageStore, *, node: str, kind: str, secret_key: int, capacity: int = 0):
        self.store = store
        self.node, self.kind = node, kind
        self.capacity = capacity  # bytes offered for bodies (0: not limited); reported for RV's CP
        self._sk = secret_key
        self.counts: Counter[str] = Counter()
        self._cache: OrderedDict[tuple[int, str], bytes] = OrderedDict()
        self._cached = 0

    def answer(self, req: Request) -> bytes:
        try:
            meta, data = getattr(self, f"_{req.op}")(**req.args)
        except ChainError as exc:
            self.counts[f"{req.op}_{exc.reason}"] += 1
            return error_response(req.id, exc.reason, exc.detail)
        self.counts[f"served_{req.op}"] += 1
        return encode_response({"id": req.id, "ok": True, "op": req.op, **meta}, data)

    # -- the operations: (meta, raw bytes) or ChainError -------------------------------
    def _inventory(self, after: int) -> tuple[dict, bytes]:
        ranges = self.store.body_ranges(after, RANGES_MAX + 1)
        return {"node": self.node, "kind": self.kind, "height": self.store.header_height(),
                "bodies": [list(r) for r in ranges[:RANGES_MAX]], "more": len(ranges) > RANGES_MAX,
                "used": self.store.used_bytes(), "capacity": self.capacity}, b""

    def _headers(self, lo: int, hi: int) -> tuple[dict, bytes]:
        rows = self.store.raw_headers(lo, hi)
        return {"headers": [{"header": json.loads(h), "cert": json.loads(c)} for h, c in rows]}, b""

    def _body(self, height: int, hash: str, chunk: int, chunk_size: int) -> tuple[dict, bytes]:
        data = self._held(height, hash)
        meta = {"height": height, "hash": hash, "chunk": chunk, "chunks": chunk_count(len(data), chunk_size),
                "size": len(data), "chunk_size": chunk_size}
        return meta, chunk_of(data, chunk, chunk_size)

    def _bodies(self, want: list[tuple[int, str]], chunk_size: int) -> tuple[dict, bytes]:
        """Whole bodies, in the order asked, while they fit `chunk_size` together: the
        ones not held are named `missing`, the ones larger than a chunk alone `large`
        (fetched with `body`), the rest left unanswered for the next request."""
        listed, parts, missing, large, used = [], [], [], [], 0
        for height, header_hash in want:
            try:
                data = self._held(height, header_hash)
            except ChainError:
                missing.append(height)
                continue
            if len(data) > chunk_size:
                large.append(height)
            elif used + len(data) > chunk_size:
                break
            else:
                listed.append([height, len(data)])
                parts.append(data)
                used += len(data)
        return {"bodies": listed, "missing": missing, "large": large}, b"".join(parts)

    def _tx(self, height: int, index: int) -> tuple[dict, bytes]:
        header, cert = self._header(height)
        tx, path = self._proof(header, index)
        return {"height": height, "index": index, "tx": tx.hex(), "path": path,
                "header": header.to_dict(), "cert": cert.to_dict()}, b""

    def _audit(self, height: int, index: int, nonce: str) -> tuple[dict, bytes]:
        header, _ = self._header(height)
        tx, path = self._proof(header, index)
        return {"answer": answer_audit_proof(self._sk, self.node, header, tx, path, index, nonce).to_dict()}, b""

    # -- reading the store ---------------------------------------------------------------
    def _header(self, height: int):
        held = self.store.header(height)
        if held is None:
            raise ChainError("unknown_height", f"no certified header at {height}", height=height)
        return held

    def _proof(self, header, index: int) -> tuple[bytes, list[str]]:
        """Transaction `index` of the held body of `header` and its path, checked against
        the certified tx root."""
        height = header.height
        n = self.store.tx_count(height)
        if n is None:
            raise ChainError("not_held", f"body {height} is not kept here", height=height)
        if index >= n:
            raise ChainError("no_such_tx", f"block {height} has {n} transactions", height=height)
        proof = self.store.tx_proof(height, index)
        if proof is None or not merkle.verify_path(header.tx_root, proof[0], index, header.txs, proof[1]):
            if proof is not None:   # bytes and leaf agree, but not with the header: the index itself is off
                self.store.forget_corrupt(height, None)
            raise ChainError("corrupt", f"transaction {index} of body {height} does not read back", height=height)
        return proof

    def _held(self, height: int, header_hash: str) -> bytes:
        """The transfer bytes of the body at `height`, if it is the one of `header_hash`."""
        key = (height, header_hash)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        held = self.store.header(height)
        if held is None or held[0].hash != header_hash:
            raise ChainError("not_held", f"no header {header_hash[:16]}… at {height}", height=height)
        data = self.store.body_bytes(height)
        if data is None:
            raise ChainError("not_held", f"body {height} is not kept here", height=height)
        self._cache[key] = data
        self._cached += len(data)
        while self._cached > CACHE_BYTES and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= len(old)
        return data
