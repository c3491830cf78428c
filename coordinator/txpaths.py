"""Merkle paths of stored blocks, served without hashing a block's body again.

`certlog.merkle` builds a block's RFC 6962 tree by pairing neighbours level by
level (an odd last node moves up unchanged). Here that tree is stored cut into
subtrees four levels high: chunk c of group g holds the nodes of levels
4g..4g+3 that lie under node c of level 4g+4 (at most 16 + 8 + 4 + 2 hashes).
Pairs never straddle a chunk (chunks start at even positions), so a
transaction's path is read from one chunk per group - four rows for a block of
10,000 transactions, and no hashing at all.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

from certlog.merkle import _node, leaf_hash

__all__ = ["GROUP", "subtrees", "chunks", "path"]

GROUP = 4  # levels per chunk: 4 rows per path for 2^13..2^16 transactions
_WIDTH = 1 << GROUP


def _sizes(n: int) -> list[int]:
    """Nodes per level, from the leaves (n) to the root (1)."""
    sizes = [n]
    while sizes[-1] > 1:
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def subtrees(txs: Sequence[bytes]) -> Iterator[tuple[int, int, bytes]]:
    """(group, chunk, concatenated hashes) of the tree over `txs`; nothing for
    a block of fewer than two transactions (its path is empty)."""
    levels = [[leaf_hash(t) for t in txs]]
    while len(levels[-1]) > 1:
        lv = levels[-1]
        nxt = [_node(lv[j], lv[j + 1]) for j in range(0, len(lv) - 1, 2)]
        if len(lv) % 2:
            nxt.append(lv[-1])
        levels.append(nxt)
    top = len(levels) - 1  # the root's level: no sibling there
    for g in range(0, (top + GROUP - 1) // GROUP):
        for c in range((len(levels[g * GROUP]) + _WIDTH - 1) // _WIDTH):
            parts = []
            for k in range(GROUP):
                lv = g * GROUP + k
                if lv >= top:
                    break
                w = _WIDTH >> k
                parts.extend(levels[lv][c * w:(c + 1) * w])
            yield g, c, b"".join(parts)


def chunks(n: int, index: int) -> list[tuple[int, int]]:
    """The (group, chunk) rows `path(n, index, ...)` reads."""
    top = (n - 1).bit_length()  # levels above the leaves
    return [(g, index >> (g * GROUP + GROUP)) for g in range((top + GROUP - 1) // GROUP)]


def path(n: int, index: int, chunk: Callable[[int, int], bytes]) -> list[str]:
    """The audit path of transaction `index` of `n` (what `certlog.merkle.path`
    gives), from `chunk(group, c)`; ValueError when a stored chunk has the wrong size."""
    if not 0 <= index < n:
        raise IndexError(f"transaction {index} not in a block of {n}")
    sizes = _sizes(n)
    top = len(sizes) - 1
    out: list[str] = []
    for g in range(0, (top + GROUP - 1) // GROUP):
        c = index >> (g * GROUP + GROUP)
        blob = chunk(g, c)
        off = 0
        for k in range(GROUP):
            lv = g * GROUP + k
            if lv >= top:
                break
            w = _WIDTH >> k
            start = c * w
            count = min(w, sizes[lv] - start)
            sib = (index >> lv) ^ 1
            if sib < sizes[lv]:
                pos = off + (sib - start) * 32
                out.append(blob[pos:pos + 32].hex())
            off += count * 32
        if off != len(blob):
            raise ValueError(f"stored Merkle chunk {g}/{c} has {len(blob)} bytes, expected {off}")
    return out
