"""Binary Merkle trees over a block's transactions, RFC 6962 style.

Leaves and inner nodes are hashed with different prefixes (0x00, 0x01), so an
inner node can never pass for a leaf. Pairing neighbours level by level and
promoting an odd last node builds exactly RFC 6962's tree (split at the largest
power of two below n), so paths are at most ceil(log2 n) long.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

__all__ = ["EMPTY_ROOT", "leaf_hash", "leaf_hashes", "root", "root_of_leaves", "path", "path_of_leaves",
           "verify_path"]

EMPTY_ROOT = hashlib.sha256(b"").hexdigest()
_LEAF = hashlib.sha256(b"\x00")


def leaf_hash(data: bytes) -> bytes:
    h = _LEAF.copy()   # the prefix hashed once: no concatenated copy of the leaf
    h.update(data)
    return h.digest()


def leaf_hashes(txs: Sequence[bytes]) -> list[bytes]:
    """Every leaf's hash; a body is hashed once, then its root and any path come from these."""
    copy = _LEAF.copy
    out = []
    for t in txs:
        h = copy()
        h.update(t)
        out.append(h.digest())
    return out


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _root(hashes: Sequence[bytes]) -> bytes:
    level = list(hashes)
    while len(level) > 1:
        nxt = [_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def root(txs: Sequence[bytes]) -> str:
    """Hex root of the transactions; `EMPTY_ROOT` for an empty block."""
    return root_of_leaves(leaf_hashes(txs))


def root_of_leaves(leaves: Sequence[bytes]) -> str:
    return _root(leaves).hex() if leaves else EMPTY_ROOT


def path(txs: Sequence[bytes], index: int) -> list[str]:
    """Audit path of transaction `index`: sibling hashes from the leaf upwards."""
    if not 0 <= index < len(txs):
        raise IndexError(f"transaction {index} not in a block of {len(txs)}")
    return path_of_leaves(leaf_hashes(txs), index)


def path_of_leaves(leaves: Sequence[bytes], index: int) -> list[str]:
    if not 0 <= index < len(leaves):
        raise IndexError(f"transaction {index} not in a block of {len(leaves)}")
    out: list[str] = []
    level = list(leaves)
    i = index
    while len(level) > 1:
        sib = i ^ 1
        if sib < len(level):
            out.append(level[sib].hex())
        nxt = [_node(level[j], level[j + 1]) for j in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level, i = nxt, i // 2
    return out


def verify_path(root_hex: str, tx: bytes, index: int, size: int, siblings: Sequence[str]) -> bool:
    """True when `tx` is leaf `index` of a `size`-leaf tree with this root."""
    if not 0 <= index < size:
        return False
    try:
        sib = [bytes.fromhex(s) for s in siblings]
    except (TypeError, ValueError):
        return False
    h, i, n, k = leaf_hash(tx), index, size, 0
    while n > 1:
        if i ^ 1 < n:  # a sibling exists at this level (else the node is promoted)
            if k >= len(sib) or len(sib[k]) != 32:
                return False
            h = _node(sib[k], h) if i & 1 else _node(h, sib[k])
            k += 1
        i, n = i // 2, (n + 1) // 2
    return k == len(sib) and h.hex() == root_hex
