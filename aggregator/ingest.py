"""Deciding what to do with one incoming reading: pure logic, no I/O.

Checks run cheapest-first and stop at the first failure: shape, topic, registry,
key id, ciphertext range, signature, then the meter's hash chain (seq and prev).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Literal

from gridledger.errors import Rejected
from gridledger.paillier import PublicKey, in_ciphertext_space
from gridledger.wire import ZERO_HASH, MAX_PAYLOAD, Reading, parse_reading

from .registry import Registry

__all__ = ["ChainHead", "Verdict", "Ingest", "REASONS"]

# Every reason a reading can be refused for; counters start at zero for each.
REASONS = ("oversized", "malformed_json", "missing_field", "bad_type", "bad_value",
           "unsupported_version", "topic_mismatch", "unknown_meter", "unknown_key_id",
           "ciphertext_range", "bad_signature", "replayed_seq", "seq_gap", "prev_mismatch")


@dataclass(slots=True)
class ChainHead:
    """The last accepted reading of one meter."""
    seq: int = 0
    hash: str = ZERO_HASH


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: Literal["accept", "duplicate", "reject"]
    reading: Reading | None = None
    reason: str | None = None
    detail: str = ""
    seq: int | None = None
    evidence: bool = False  # a validly signed reading that conflicts with the chain


@dataclass
class Ingest:
    registry: Registry
    paillier: PublicKey
    heads: dict[str, ChainHead]
    stored_hash: Callable[[str, int], str | None]  # hash of a stored reading, or None
    max_payload: int = MAX_PAYLOAD
    counts: Counter = field(default_factory=Counter)
    _pending: dict[tuple[str, int], str] = field(default_factory=dict)

    def check(self, topic_meter: str, payload: bytes) -> Verdict:
        try:
            v = self._check(topic_meter, payload)
        except Rejected as r:
            v = Verdict("reject", reason=r.reason, detail=r.detail, seq=r.seq)
        self.counts[v.reason or v.kind] += 1
        return v

    def committed(self) -> None:
        """The readings accepted so far are durable; forget the pending set."""
        self._pending.clear()

    def _check(self, topic_meter: str, payload: bytes) -> Verdict:
        r = parse_reading(payload, max_size=self.max_payload)
        if r.meter != topic_meter:
            raise Rejected("topic_mismatch", f"topic meter {topic_meter!r}, payload meter {r.meter!r}", seq=r.seq)
        if r.meter not in self.registry:
            raise Rejected("unknown_meter", r.meter, seq=r.seq)
        if r.kid != self.paillier.kid:
            raise Rejected("unknown_key_id", f"kid {r.kid}, area key {self.paillier.kid}", seq=r.seq)
        if not in_ciphertext_space(self.paillier.n, r.ciphertext):
            raise Rejected("ciphertext_range", "c is not a unit below n^2", seq=r.seq)
        if not self.registry.verify(r.meter, r.signed_bytes, bytes.fromhex(r.sig)):
            raise Rejected("bad_signature", f"seq {r.seq}", seq=r.seq)
        head = self.heads.setdefault(r.meter, ChainHead())
        h = r.hash
        if r.seq <= head.seq:
            known = head.hash if r.seq == head.seq else (
                self._pending.get((r.meter, r.seq)) or self.stored_hash(r.meter, r.seq))
            if known == h:
                return Verdict("duplicate", reading=r, seq=r.seq)
            return Verdict("reject", reading=r, reason="replayed_seq", seq=r.seq, evidence=True,
                           detail=f"seq {r.seq} already holds a different reading")
        if r.seq != head.seq + 1:
            raise Rejected("seq_gap", f"expected seq {head.seq + 1}, got {r.seq}", seq=r.seq)
        if r.prev != head.hash:
            return Verdict("reject", reading=r, reason="prev_mismatch", seq=r.seq, evidence=True,
                           detail=f"prev does not chain to seq {head.seq}")
        head.seq, head.hash = r.seq, h
        self._pending[(r.meter, r.seq)] = h
        return Verdict("accept", reading=r, seq=r.seq)
