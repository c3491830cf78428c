"""Reliability (seed 000's RV = CP·NP·CRE/√T) and placement by it: pure functions.

Every term is an integer in parts per thousand (CP, NP, CRE) or a count (T), so a
snapshot is exact JSON and every replica ranks it the same way, bit for bit:

    CP   free capacity share the node reports in its inventory answer
         (1000 · free / capacity; a node with no configured capacity reports 1000)
    NP   network performance seen by the verifier: 1000 · ref / max(ref, rtt),
         rtt the median of the node's last inventory round trips (ms); 0 when it
         has not answered lately
    CRE  credibility, from `cre_start`, moved by audit outcomes (`cre_after`)
    T    load: blocks placed on the node now (P-chain state, so anyone holding
         the P chain can check it)

RV = CP·NP·CRE / √(T+1) (the +1 keeps a node with nothing placed finite). Ranking
compares RV² = (CP·NP·CRE)² / (T+1) as exact fractions, never floats.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Mapping, Sequence

__all__ = ["Measure", "rv", "rv_key", "rank", "place", "np_from_rtts", "cp_from_report", "Credibility",
           "SCALE", "cre_after", "CRE_DROP", "CRE_GAIN_DIV"]

SCALE = 1000  # parts per thousand

# CRE after one audit outcome. A correct answer closes 1/CRE_GAIN_DIV of the gap to
# 1000 (at least 1), so trust comes back slowly: after one wrong answer (600),
# 14 good ones bring it back to 900 and 50 to 1000.
# A wrong answer is signed proof of bad data: a large drop. Late and missing answers
# may be the network's fault (and are the verifier's word): smaller drops.
CRE_GAIN_DIV = 10
CRE_DROP = {"wrong": 400, "late": 50, "missing": 100}


@dataclass(frozen=True, slots=True)
class Measure:
    """One node's terms in a snapshot."""
    node: str
    cp: int
    np: int
    cre: int
    t: int

    def __post_init__(self):
        for k in ("cp", "np", "cre"):
            v = getattr(self, k)
            if type(v) is not int or not 0 <= v <= SCALE:
                raise ValueError(f"{k} must be an integer in [0, {SCALE}]")
        if type(self.t) is not int or self.t < 0:
            raise ValueError("t must be a non-negative integer")

    def to_dict(self) -> dict:
        return {"node": self.node, "cp": self.cp, "np": self.np, "cre": self.cre, "t": self.t}


def rv(m: Measure) -> float:
    """RV in [0, 1] for logs and docs; ranking uses `rv_key`."""
    return m.cp * m.np * m.cre / SCALE ** 3 / math.sqrt(m.t + 1)


def rv_key(m: Measure) -> Fraction:
    """RV², exactly: orders nodes as RV does (RV ≥ 0)."""
    return Fraction((m.cp * m.np * m.cre) ** 2, m.t + 1)


def _tie(block_hash: str, node: str) -> bytes:
    # A per-block tie-break: equal nodes share the load instead of one name always winning.
    return hashlib.sha256(f"{block_hash}\n{node}".encode()).digest()


def rank(block_hash: str, snapshot: Iterable[Measure]) -> list[str]:
    """Nodes by RV, highest first; ties by SHA-256(block hash ‖ node)."""
    return [m.node for m in sorted(snapshot, key=lambda m: (-rv_key(m), _tie(block_hash, m.node)))]


def place(block_hash: str, full: Sequence[str], snapshot: Iterable[Measure], replicas: int) -> tuple[str, ...]:
    """The nodes a block goes to: every full node (sorted), then the `replicas` best of
    the snapshot's (heavy and light) nodes by RV, best first."""
    return tuple(sorted(full)) + tuple(rank(block_hash, snapshot)[:max(replicas, 0)])


def np_from_rtts(rtts_ms: Sequence[float], ref_ms: float) -> int:
    """NP from the node's recent round trips (None: no answer): 0 after a miss."""
    if not rtts_ms or rtts_ms[-1] is None:
        return 0
    seen = sorted(r for r in rtts_ms if r is not None)
    mid = seen[len(seen) // 2]
    return int(SCALE * ref_ms // max(ref_ms, mid))


def cp_from_report(free: int, capacity: int) -> int:
    """CP from a node's reported free and total bytes (capacity 0: not limited)."""
    if capacity <= 0:
        return SCALE
    return SCALE * min(max(free, 0), capacity) // capacity


def cre_after(cre: int, outcome: str) -> int:
    """CRE after an audit `outcome` (ok, wrong, late, missing), bounded to [0, SCALE]."""
    if outcome == "ok":
        return min(SCALE, cre + max(1, (SCALE - cre) // CRE_GAIN_DIV)) if cre < SCALE else SCALE
    return max(0, cre - CRE_DROP[outcome])


class Credibility:
    """CRE per node: every node starts at `start`; audit outcomes move it (`record`)."""

    def __init__(self, start: int = SCALE, known: Mapping[str, int] | None = None):
        if not 0 <= start <= SCALE:
            raise ValueError(f"start must be in [0, {SCALE}]")
        self.start = start
        self._cre = dict(known or {})

    def __getitem__(self, node: str) -> int:
        return self._cre.get(node, self.start)

    def adjust(self, node: str, delta: int) -> int:
        """Raise or lower a node's CRE, clamped to [0, SCALE]; the new value."""
        self._cre[node] = min(SCALE, max(0, self[node] + delta))
        return self._cre[node]

    def record(self, node: str, outcome: str) -> int:
        """Apply one audit outcome by `cre_after`, through `adjust`; the new CRE."""
        return self.adjust(node, cre_after(self[node], outcome) - self[node])
