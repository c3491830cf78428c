"""Deciding what to do with one incoming reading: pure logic, no I/O.

Checks run in this order and stop at the first failure:

1. Who sent what, cheapest first: shape (``parse_reading``: ``oversized`` before
   decoding, then ``malformed_json``, ``missing_field``, ``bad_type``,
   ``unsupported_version``, ``bad_value``), ``topic_mismatch``, ``unknown_meter``,
   ``unknown_key_id``, ``ciphertext_range``, ``bad_signature``. Everything below
   runs only on readings the registered meter provably signed.
2. The seq against the meter's head H (the last accepted reading: seq, hash, t).
   For ``seq <= H.seq`` the gateway compares with the reading it holds at that
   seq (H itself, one accepted but not yet committed, or the store's):

   - same hash: ``duplicate``, acked again and stored once;
   - different hash: ``equivocation``, kept as evidence, ``conflicts_with`` is the
     held reading's hash: the meter signed two readings for one seq;
   - nothing held (the store no longer has it, or the lookup failed):
     ``replayed_seq``, not evidence, as there is nothing to prove a conflict
     against and a captured old reading replayed forever must not fill the store.

   ``seq > H.seq + 1`` is a ``seq_gap``.
3. For ``seq == H.seq + 1``: ``prev != H.hash`` is ``prev_mismatch``, kept as
   evidence (``conflicts_with`` is H's hash, None before a meter's first reading).
4. The clock, last, and only for a reading that would move the head:
   ``clock_skew`` when ``t > now() + max_future_s`` or when its interval
   ``[t - dt, t]`` starts before H.t (so t is also strictly after H.t; H.t is 0
   before the first reading, so no interval starts before 1970). A duplicate
   is acked whatever the clocks say now, and a forked chain stays evidence
   whatever its timestamps. A skewed reading is not evidence: the gateway's own
   clock may be the wrong one, and a reading only ahead of it is taken once the
   clock catches up.

``Ingest.check`` never raises: every failure is a ``reject`` verdict with a reason
from ``REASONS``, each counted. A registry verifier that raises counts as a bad
signature; anything else unexpected (a bug) refuses the reading as
``malformed_json`` with the error in ``detail``, and never accepts it.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Sequence

import gmpy2

from gridledger.errors import Rejected
from gridledger.paillier import PublicKey
from gridledger.wire import ZERO_HASH, MAX_PAYLOAD, Reading, parse_reading

from .registry import Registry

__all__ = ["ChainHead", "Verdict", "Ingest", "REASONS", "REASON_CLASS", "REASON_CLASSES",
           "MAX_FUTURE_S", "class_counts"]

# The rejection classes of issue 5, for metrics; each reason below belongs to one.
REASON_CLASSES = ("schema", "size", "unknown_meter", "key_id", "range", "signature",
                  "replayed_seq", "gap", "prev_mismatch", "clock_skew", "equivocation")

# Every reason a reading can be refused for, in check order, with its class.
REASON_CLASS = {
    "oversized": "size",
    "malformed_json": "schema",
    "missing_field": "schema",
    "bad_type": "schema",
    "bad_value": "schema",
    "unsupported_version": "schema",
    "topic_mismatch": "schema",
    "unknown_meter": "unknown_meter",
    "unknown_key_id": "key_id",
    "ciphertext_range": "range",
    "bad_signature": "signature",
    "replayed_seq": "replayed_seq",
    "equivocation": "equivocation",
    "seq_gap": "gap",
    "prev_mismatch": "prev_mismatch",
    "clock_skew": "clock_skew",
}
REASONS = tuple(REASON_CLASS)  # counters start at zero for each

# How far a reading's end may lie ahead of the gateway's clock. Meters keep time
# by NTP or an RTC that drifts seconds a day; more slack lets a meter with a fast
# clock claim intervals that have not happened yet.
MAX_FUTURE_S = 300


def class_counts(counts: Mapping[str, int]) -> dict[str, int]:
    """Per-reason counters summed per class, every class present; other keys ignored."""
    out = dict.fromkeys(REASON_CLASSES, 0)
    for reason, n in counts.items():
        if reason in REASON_CLASS:
            out[REASON_CLASS[reason]] += n
    return out


@dataclass(slots=True)
class ChainHead:
    """The last accepted reading of one meter (t = 0: none yet, or not known)."""
    seq: int = 0
    hash: str = ZERO_HASH
    t: int = 0


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: Literal["accept", "duplicate", "reject"]
    reading: Reading | None = None
    reason: str | None = None
    detail: str = ""
    seq: int | None = None
    evidence: bool = False  # a validly signed reading that conflicts with the chain
    conflicts_with: str | None = None  # hash of the held reading it conflicts with


_set_kind, _set_reading, _set_reason, _set_detail, _set_seq, _set_evidence, _set_conflicts = (
    getattr(Verdict, name).__set__ for name in ("kind", "reading", "reason", "detail", "seq", "evidence",
                                               "conflicts_with"))


def _accepted(r: Reading, seq: int) -> Verdict:
    """`Verdict("accept", reading=r, seq=seq)` through the slots' setters: the frozen
    dataclass's __init__ goes through object.__setattr__ for each of its seven fields."""
    v = object.__new__(Verdict)
    _set_kind(v, "accept")
    _set_reading(v, r)
    _set_reason(v, None)
    _set_detail(v, "")
    _set_seq(v, seq)
    _set_evidence(v, False)
    _set_conflicts(v, None)
    return v


@dataclass
class Ingest:
    registry: Registry
    paillier: PublicKey
    heads: dict[str, ChainHead]
    stored_hash: Callable[[str, int], str | None]  # hash of a stored reading, or None
    max_payload: int = MAX_PAYLOAD
    max_future_s: int = MAX_FUTURE_S
    now: Callable[[], float] = time.time
    counts: Counter = field(default_factory=Counter)
    _pending: dict[tuple[str, int], str] = field(default_factory=dict)

    def check(self, topic_meter: str, payload: bytes) -> Verdict:
        """The verdict on one message, every check in the documented order."""
        return self._judge(((topic_meter, payload),), None)[0]

    def check_batch(self, items: Sequence[tuple[str, bytes]]) -> list[Verdict]:
        """The verdicts `check` gives item by item, with one gcd for the whole batch.

        gcd(c, n) costs more than a modmul, so per reading the range check is the
        bounds, c mod n != 0 (which refuses the non-units anyone can write, the
        multiples of n) and a product mod n; one gcd at the end proves every c that
        got past its range check a unit (a prime of n divides the product exactly
        when it divides a factor). Only when it does not is the batch undone and
        checked item by item: that takes a c sharing one prime with n, which only
        someone who can factor n can write, so it is no lever for making the
        gateway verify signatures twice."""
        units: list[int] = []
        undo: dict[str, tuple[int, str, int] | None] = {}
        counts = self.counts.copy()
        pending = len(self._pending)
        verdicts = self._judge(items, (units, undo))
        if not units:
            return verdicts
        n = self.paillier._n
        product = units[0]
        for c in units[1:]:
            product = product * c % n
        if gmpy2.gcd(product, n) == 1:
            return verdicts
        for meter, head in undo.items():  # back to where the batch started
            if head is None:
                del self.heads[meter]
            else:
                h = self.heads[meter]
                h.seq, h.hash, h.t = head
        for key in list(self._pending)[pending:]:
            del self._pending[key]
        self.counts.clear()
        self.counts.update(counts)
        return [self.check(m, p) for m, p in items]

    def _judge(self, items: Sequence[tuple[str, bytes]], batch) -> list[Verdict]:
        """Each item's verdict, counted. Accepts, the common case, are counted once
        at the end: a Counter update per reading is a tenth of a reading's checks."""
        out = []
        accepted = 0
        counts = self.counts
        check = self._check
        for topic_meter, payload in items:
            try:
                v = check(topic_meter, payload, batch)
            except Rejected as r:
                v = Verdict("reject", reason=r.reason, detail=r.detail, seq=r.seq)
            except Exception as exc:  # a bug must refuse the reading, not accept it or stop the gateway
                v = Verdict("reject", reason="malformed_json", detail=f"unexpected {exc!r}"[:160])
            if v.kind == "accept":
                accepted += 1
            else:
                counts[v.reason or v.kind] += 1
            out.append(v)
        if accepted:
            counts["accept"] += accepted
        return out

    def committed(self) -> None:
        """The readings accepted so far are durable; forget the pending set."""
        self._pending.clear()

    def _check(self, topic_meter: str, payload: bytes, batch) -> Verdict:
        r = parse_reading(payload, max_size=self.max_payload)
        meter, seq = r.meter, r.seq
        if meter != topic_meter:
            raise Rejected("topic_mismatch", f"topic meter {topic_meter!r}, payload meter {meter!r}", seq=seq)
        verify = self.registry.verifier(meter)  # None: not registered
        if verify is None:
            raise Rejected("unknown_meter", meter, seq=seq)
        paillier = self.paillier
        if r.kid != paillier.kid:
            raise Rejected("unknown_key_id", f"kid {r.kid}, area key {paillier.kid}", seq=seq)
        c = r.ciphertext_mpz
        if batch is None:
            ok = paillier.in_ciphertext_space(c)
        else:  # the gcd is deferred to the batch's end (check_batch); multiples of n, which anyone can write, are not
            ok = 0 < c < paillier._nsq
            if ok:
                residue = c % paillier._n
                ok = residue != 0
                if ok:
                    batch[0].append(residue)
        if not ok:
            raise Rejected("ciphertext_range", "c is not a unit below n^2", seq=seq)
        try:
            signed = verify(r.signed_bytes, bytes.fromhex(r.sig))
        except Exception:  # a verifier that cannot decide has not verified
            signed = False
        if not signed:
            raise Rejected("bad_signature", f"seq {seq}", seq=seq)

        heads = self.heads
        head = heads.get(meter) or ChainHead()  # added to heads only on accept
        if seq <= head.seq:
            return self._used_seq(head, r)
        if seq != head.seq + 1:
            raise Rejected("seq_gap", f"expected seq {head.seq + 1}, got {seq}", seq=seq)
        if r.prev != head.hash:
            return Verdict("reject", reading=r, reason="prev_mismatch", seq=seq, evidence=True,
                           conflicts_with=head.hash if head.seq else None,
                           detail=f"prev does not chain to seq {head.seq}")
        t = r.t
        now = self.now()
        if t > now + self.max_future_s:
            raise Rejected("clock_skew", f"t {t} is {t - int(now)} s ahead of the gateway", seq=seq)
        if t - r.dt < head.t:
            raise Rejected("clock_skew", f"interval starts at {t - r.dt}, before seq {head.seq} ended at {head.t}",
                           seq=seq)
        if batch is not None:
            undo = batch[1]
            if meter not in undo:
                undo[meter] = (head.seq, head.hash, head.t) if meter in heads else None
        head.seq, head.hash, head.t = seq, r.hash, t
        heads[meter] = head
        self._pending[(meter, seq)] = r.hash
        return _accepted(r, seq)

    def _used_seq(self, head: ChainHead, r: Reading) -> Verdict:
        """A validly signed reading for a seq at or below the head: duplicate, equivocation or replay."""
        lookup = ""
        if r.seq == head.seq:
            held = head.hash
        else:
            held = self._pending.get((r.meter, r.seq))
            if held is None:
                try:
                    held = self.stored_hash(r.meter, r.seq)
                except Exception as exc:  # the store cannot answer: no comparison, say why
                    lookup = f"; lookup failed: {exc!r}"[:120]
        if held == r.hash:
            return Verdict("duplicate", reading=r, seq=r.seq)
        if held is None:
            return Verdict("reject", reading=r, reason="replayed_seq", seq=r.seq,
                           detail=f"seq {r.seq} is at or below head {head.seq} and no longer held{lookup}")
        return Verdict("reject", reading=r, reason="equivocation", seq=r.seq, evidence=True, conflicts_with=held,
                       detail=f"seq {r.seq} already holds a different reading")
