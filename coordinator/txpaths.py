"""Merkle paths of a block's transactions, all from one pass over its tree.

`certlog.merkle.path` builds the whole tree for one path; the index stores the
path of every reading it indexes, so it builds each block's tree once (the
RFC 6962 tree `certlog.merkle` defines: neighbours paired level by level, an odd
last node moved up) and reads the siblings of each transaction off it.
"""

from __future__ import annotations

from typing import Iterable

from certlog.merkle import _node, leaf_hash

__all__ = ["paths", "split"]


def paths(txs: list[bytes], indices: Iterable[int]) -> list[bytes]:
    """The audit path of each transaction in `indices`, its sibling hashes from the
    leaf up, concatenated (what `certlog.merkle.path` gives, as bytes)."""
    levels = [[leaf_hash(t) for t in txs]]
    while len(levels[-1]) > 1:
        lv = levels[-1]
        nxt = [_node(lv[j], lv[j + 1]) for j in range(0, len(lv) - 1, 2)]
        if len(lv) % 2:
            nxt.append(lv[-1])
        levels.append(nxt)
    out = []
    for i in indices:
        if not 0 <= i < len(txs):
            raise IndexError(f"transaction {i} not in a block of {len(txs)}")
        sib = []
        for lv in levels[:-1]:
            if i ^ 1 < len(lv):
                sib.append(lv[i ^ 1])
            i //= 2
        out.append(b"".join(sib))
    return out


def split(path: bytes) -> list[str]:
    """A stored path as the list of hex hashes answers carry."""
    return [path[k:k + 32].hex() for k in range(0, len(path), 32)]
