"""What a storage node signs with its BLS key: storage receipts and audit answers.

A receipt says "I hold the body of this certified block" (seed 003's second
verification); it is sent only once the body is durable. A receipt batch says
it of several blocks under one signature (a fill keeps bodies a response at a
time, and a BLS signature per body was a third of its CPU). An audit answer says
"here is transaction `index` of that block, for your `nonce`", with its Merkle
path to the certified tx root; the signature covers the transaction and the
path, so a signed answer that does not verify is proof against its signer
(`audit_outcome`). Each signed message has its own domain tag, so
no signature can pass for another kind (or for a validator's vote).
Verification returns False / raises `ChainError`, never anything else.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

from certlog import bls, merkle
from certlog.block import ChainError, Header, canonical

from .storagewire import KINDS, NODE_RE, NONCE_RE

__all__ = ["StorageReceipt", "receipt_message", "sign_receipt", "verify_receipt", "ReceiptBatch", "batch_message",
           "sign_receipts", "verify_receipts", "load_receipt", "AuditAnswer",
           "audit_message", "answer_audit", "answer_audit_proof", "check_audit", "audit_outcome", "AUDIT_OUTCOMES"]

RECEIPT_TAG = "gl-storage-receipt-v1"
BATCH_TAG = "gl-storage-receipts-v1"
BATCH_MAX = 1024    # blocks in one receipt batch (~75 bytes each)
AUDIT_TAG = "gl-storage-audit-v2"   # v2: the path is signed too
AUDIT_OUTCOMES = ("ok", "wrong", "late", "missing")


def _hex(obj: dict, key: str, length: int, reason: str) -> bytes:
    v = obj.get(key)
    try:
        if not isinstance(v, str) or len(v) != 2 * length:
            raise ValueError
        return bytes.fromhex(v)
    except ValueError:
        raise ChainError(reason, f"{key} must be {length} bytes of hex") from None


def _str(obj: dict, key: str, reason: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not v or len(v) > 64 or "\n" in v:
        raise ChainError(reason, f"{key} must be a short string")
    return v


def _height(obj: dict, key: str, reason: str, lo: int = 1) -> int:
    v = obj.get(key)
    if type(v) is not int or v < lo:
        raise ChainError(reason, f"{key} must be an integer >= {lo}")
    return v


# -- storage receipts -------------------------------------------------------------

def receipt_message(chain: str, height: int, header_hash: str, node: str, kind: str) -> bytes:
    return f"{RECEIPT_TAG}\n{chain}\n{height}\n{header_hash}\n{node}\n{kind}".encode("ascii")


@dataclass(frozen=True, slots=True)
class StorageReceipt:
    chain: str
    height: int
    hash: str          # the certified header's hash
    node: str
    kind: str          # full | heavy | light
    signature: bytes

    def message(self) -> bytes:
        return receipt_message(self.chain, self.height, self.hash, self.node, self.kind)

    def to_dict(self) -> dict[str, Any]:
        return {"chain": self.chain, "height": self.height, "hash": self.hash, "node": self.node,
                "kind": self.kind, "sig": self.signature.hex()}

    def encode(self) -> bytes:
        return canonical(self.to_dict())

    @classmethod
    def from_dict(cls, obj: Any) -> "StorageReceipt":
        if not isinstance(obj, dict) or set(obj) != {"chain", "height", "hash", "node", "kind", "sig"}:
            raise ChainError("receipt_schema", "a receipt has chain, height, hash, node, kind, sig")
        node, kind = _str(obj, "node", "receipt_schema"), obj.get("kind")
        if not NODE_RE.match(node) or kind not in KINDS:
            raise ChainError("receipt_schema", "node name or kind")
        return cls(_str(obj, "chain", "receipt_schema"), _height(obj, "height", "receipt_schema"),
                   _hex(obj, "hash", 32, "receipt_schema").hex(), node, kind,
                   _hex(obj, "sig", bls.SIGNATURE_LEN, "receipt_schema"))


def sign_receipt(sk: int, header: Header, node: str, kind: str) -> StorageReceipt:
    r = StorageReceipt(header.chain, header.height, header.hash, node, kind, b"")
    return StorageReceipt(r.chain, r.height, r.hash, node, kind, bls.Sign(sk, r.message()))


def verify_receipt(receipt: StorageReceipt, public_key: bytes, header: Header | None = None) -> bool:
    """True when `public_key` signed this receipt (and, given `header`, it is that header's)."""
    if header is not None and (receipt.chain, receipt.height, receipt.hash) != (header.chain, header.height,
                                                                                header.hash):
        return False
    return bls.Verify(public_key, receipt.message(), receipt.signature)


# -- receipt batches: one signature over a list of (height, header hash) -----------------

def batch_message(chain: str, node: str, kind: str, blocks: Sequence[tuple[int, str]]) -> bytes:
    # One line per block: chain, node and kind can hold no newline (`_str`), heights
    # are decimal and hashes hex, so the list reads back one way only.
    lines = [BATCH_TAG, chain, node, kind] + [f"{h} {hh}" for h, hh in blocks]
    return "\n".join(lines).encode("ascii")


@dataclass(frozen=True, slots=True)
class ReceiptBatch:
    chain: str
    node: str
    kind: str
    blocks: tuple[tuple[int, str], ...]   # (height, certified header hash), heights strictly increasing
    signature: bytes

    def message(self) -> bytes:
        return batch_message(self.chain, self.node, self.kind, self.blocks)

    def receipts(self) -> dict[int, str]:
        """height -> the header hash this batch receipts at that height."""
        return dict(self.blocks)

    def to_dict(self) -> dict[str, Any]:
        return {"chain": self.chain, "node": self.node, "kind": self.kind,
                "blocks": [[h, hh] for h, hh in self.blocks], "sig": self.signature.hex()}

    def encode(self) -> bytes:
        return canonical(self.to_dict())

    @classmethod
    def from_dict(cls, obj: Any) -> "ReceiptBatch":
        if not isinstance(obj, dict) or set(obj) != {"chain", "node", "kind", "blocks", "sig"}:
            raise ChainError("receipt_schema", "a receipt batch has chain, node, kind, blocks, sig")
        node, kind, blocks = _str(obj, "node", "receipt_schema"), obj.get("kind"), obj.get("blocks")
        if not NODE_RE.match(node) or kind not in KINDS:
            raise ChainError("receipt_schema", "node name or kind")
        if not isinstance(blocks, list) or not 1 <= len(blocks) <= BATCH_MAX:
            raise ChainError("receipt_schema", f"blocks: 1 to {BATCH_MAX} [height, hash] pairs")
        out: list[tuple[int, str]] = []
        for b in blocks:
            if not isinstance(b, list) or len(b) != 2:
                raise ChainError("receipt_schema", "blocks: [height, hash] pairs")
            entry = {"height": b[0], "hash": b[1]}
            h, hh = _height(entry, "height", "receipt_schema"), _hex(entry, "hash", 32, "receipt_schema").hex()
            if hh != b[1] or (out and h <= out[-1][0]):
                raise ChainError("receipt_schema", "blocks: lowercase hashes, heights strictly increasing")
            out.append((h, hh))
        return cls(_str(obj, "chain", "receipt_schema"), node, kind, tuple(out),
                   _hex(obj, "sig", bls.SIGNATURE_LEN, "receipt_schema"))


def sign_receipts(sk: int, headers: Sequence[Header], node: str, kind: str) -> ReceiptBatch:
    """One signature receipting every header of `headers` (one chain, any order)."""
    blocks = tuple(sorted((h.height, h.hash) for h in headers))
    chains = {h.chain for h in headers}
    if len(chains) != 1 or len(blocks) > BATCH_MAX or len({h for h, _ in blocks}) != len(blocks):
        raise ValueError("a receipt batch covers 1..BATCH_MAX distinct heights of one chain")
    chain = chains.pop()
    return ReceiptBatch(chain, node, kind, blocks, bls.Sign(sk, batch_message(chain, node, kind, blocks)))


def verify_receipts(batch: ReceiptBatch, public_key: bytes) -> bool:
    """True when `public_key` signed this batch: every (height, hash) in it, exactly."""
    return bls.Verify(public_key, batch.message(), batch.signature)


def load_receipt(obj: Any) -> StorageReceipt | ReceiptBatch:
    """A published receipt, single (`hash`) or batch (`blocks`); `ChainError` otherwise."""
    if isinstance(obj, dict) and "blocks" in obj:
        return ReceiptBatch.from_dict(obj)
    return StorageReceipt.from_dict(obj)


# -- audit answers --------------------------------------------------------------------

def path_digest(path: Sequence[str]) -> str:
    return hashlib.sha256(",".join(path).encode()).hexdigest()


def audit_message(nonce: str, chain: str, height: int, index: int, tx_hash: str, path_hash: str,
                  node: str) -> bytes:
    return f"{AUDIT_TAG}\n{nonce}\n{chain}\n{height}\n{index}\n{tx_hash}\n{path_hash}\n{node}".encode("ascii")


@dataclass(frozen=True, slots=True)
class AuditAnswer:
    chain: str
    height: int
    index: int
    nonce: str
    tx: bytes
    path: tuple[str, ...]   # Merkle siblings, leaf upwards (certlog.merkle)
    node: str
    signature: bytes

    def message(self) -> bytes:
        return audit_message(self.nonce, self.chain, self.height, self.index,
                             hashlib.sha256(self.tx).hexdigest(), path_digest(self.path), self.node)

    def to_dict(self) -> dict[str, Any]:
        return {"chain": self.chain, "height": self.height, "index": self.index, "nonce": self.nonce,
                "tx": self.tx.hex(), "path": list(self.path), "node": self.node, "sig": self.signature.hex()}

    @classmethod
    def from_dict(cls, obj: Any) -> "AuditAnswer":
        keys = {"chain", "height", "index", "nonce", "tx", "path", "node", "sig"}
        if not isinstance(obj, dict) or set(obj) != keys:
            raise ChainError("audit_schema", f"an audit answer has {sorted(keys)}")
        nonce, tx, path = obj["nonce"], obj["tx"], obj["path"]
        if not isinstance(nonce, str) or not NONCE_RE.match(nonce):
            raise ChainError("audit_schema", "nonce")
        if not isinstance(path, list) or len(path) > 64 or not all(isinstance(p, str) for p in path):
            raise ChainError("audit_schema", "path must be a list of hex hashes")
        try:
            raw = bytes.fromhex(tx) if isinstance(tx, str) else None
        except ValueError:
            raw = None
        if raw is None:
            raise ChainError("audit_schema", "tx must be hex")
        return cls(_str(obj, "chain", "audit_schema"), _height(obj, "height", "audit_schema"),
                   _height(obj, "index", "audit_schema", 0), nonce, raw, tuple(path),
                   _str(obj, "node", "audit_schema"), _hex(obj, "sig", bls.SIGNATURE_LEN, "audit_schema"))


def answer_audit(sk: int, node: str, header: Header, txs: Sequence[bytes], index: int, nonce: str) -> AuditAnswer:
    """The signed answer to an audit of transaction `index` of this block (IndexError if none)."""
    return answer_audit_proof(sk, node, header, txs[index], merkle.path(txs, index), index, nonce)


def answer_audit_proof(sk: int, node: str, header: Header, tx: bytes, path: Sequence[str], index: int,
                       nonce: str) -> AuditAnswer:
    """The same from the transaction and its path (a store serves those without the body)."""
    path = tuple(path)
    a = AuditAnswer(header.chain, header.height, index, nonce, bytes(tx), path, node, b"")
    return AuditAnswer(a.chain, a.height, index, nonce, a.tx, path, node, bls.Sign(sk, a.message()))


def check_audit(answer: AuditAnswer, header: Header, *, nonce: str, index: int, node: str,
                public_key: bytes) -> None:
    """Raise `ChainError` unless `answer` is `node`'s signed answer, for exactly this
    nonce and index, with a transaction the certified `header` commits to."""
    h = header.height
    if (answer.chain, answer.height) != (header.chain, h):
        raise ChainError("audit_wrong_block", f"answer is for {answer.chain}/{answer.height}", height=h)
    if answer.nonce != nonce:
        raise ChainError("audit_nonce", "answer is for another challenge", height=h)
    if answer.index != index or answer.node != node:
        raise ChainError("audit_wrong_question", f"tx {answer.index} from {answer.node}", height=h)
    if not merkle.verify_path(header.tx_root, answer.tx, index, header.txs, answer.path):
        raise ChainError("audit_bad_path", f"tx {index} is not in block {h}", height=h)
    if not bls.Verify(public_key, answer.message(), answer.signature):
        raise ChainError("audit_signature", f"not signed by {node}", height=h)


def audit_outcome(answer: AuditAnswer, header: Header, *, nonce: str, index: int, node: str,
                  public_key: bytes) -> str:
    """`ok` when the answer passes `check_audit`; `wrong` when it is `node`'s signed
    answer to exactly this question whose transaction and path do not lead to the
    certified tx root (proof against the node: the signature covers both). Anything
    else (another nonce, question, block or signer) proves nothing about `node`:
    `ChainError` with `check_audit`'s reason, and the answer counts as not given."""
    try:
        check_audit(answer, header, nonce=nonce, index=index, node=node, public_key=public_key)
        return "ok"
    except ChainError as exc:
        if exc.reason == "audit_bad_path" and bls.Verify(public_key, answer.message(), answer.signature):
            return "wrong"
        raise
