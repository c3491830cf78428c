"""The gateway's ingest checks as pure logic (no MQTT, no SQLite): every reason is reachable,
and the order of the chain and clock checks is the one aggregator/ingest.py documents."""

from __future__ import annotations

import json

import pytest

from aggregator.ingest import REASON_CLASS, REASON_CLASSES, REASONS, ChainHead, class_counts
from gridledger.wire import ZERO_HASH, Reading, kid_of, make_reading

from helpers import N, make_ingest, meter_keys

KEYS = meter_keys(["m1", "m2"])
T0 = 1795160700
C1, C2 = 0x1234567, 0x7654321  # units mod n^2: odd, and n's factors are 1024-bit primes


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def reading(seq: int, prev: str, *, t: int | None = None, c: int = C1, meter: str = "m1", dt: int = 900,
            kid: str = kid_of(N), key: str | None = None) -> Reading:
    return make_reading(meter=meter, seq=seq, t=T0 + 900 * seq if t is None else t, dt=dt, prev=prev, kid=kid,
                        c=c, sign=KEYS[key or meter].sign)


def chain(length: int, meter: str = "m1") -> list[Reading]:
    out, prev = [], ZERO_HASH
    for seq in range(1, length + 1):
        out.append(reading(seq, prev, meter=meter))
        prev = out[-1].hash
    return out


def body(r: Reading, *, drop: tuple[str, ...] = (), **changes) -> bytes:
    obj = json.loads(r.to_json()) | changes
    return json.dumps({k: v for k, v in obj.items() if k not in drop}).encode()


@pytest.fixture
def gate():
    """An Ingest holding m1's seq 1 (committed to the store) and seq 2 (head); the clock is at seq 3's end."""
    store: dict[tuple[str, int], str] = {}
    clock = Clock(T0 + 2700)
    ingest = make_ingest(KEYS, now=clock, store=store)
    a = chain(3)
    assert ingest.check("m1", a[0].to_json()).kind == "accept"
    store[("m1", 1)] = a[0].hash
    ingest.committed()
    assert ingest.check("m1", a[1].to_json()).kind == "accept"
    return ingest, store, clock, a


def cases(a: list[Reading]) -> dict[str, tuple[str, bytes]]:
    """One (topic meter, payload) per reason, against the `gate` fixture's state with seq 1 archived."""
    nxt = a[2]
    return {
        "oversized": ("m1", b" " * 9000),
        "malformed_json": ("m1", b"[" * 3000),  # deeper than Python's recursion limit
        "missing_field": ("m1", body(nxt, drop=("sig",))),
        "bad_type": ("m1", body(nxt, seq=str(nxt.seq))),
        "bad_value": ("m1", body(nxt, seq=0)),
        "unsupported_version": ("m1", body(nxt, v=2)),
        "topic_mismatch": ("m2", nxt.to_json()),
        "unknown_meter": ("m9", body(nxt, meter="m9")),
        "unknown_key_id": ("m1", reading(3, a[1].hash, kid="00" * 8).to_json()),
        "ciphertext_range": ("m1", reading(3, a[1].hash, c=N).to_json()),
        "bad_signature": ("m1", body(nxt, t=nxt.t + 1)),
        "replayed_seq": ("m1", a[0].to_json()),
        "equivocation": ("m1", reading(2, a[0].hash, c=C2).to_json()),
        "seq_gap": ("m1", reading(4, a[2].hash).to_json()),
        "prev_mismatch": ("m1", reading(3, "ab" * 32).to_json()),
        "clock_skew": ("m1", reading(3, a[1].hash, t=T0 + 2700 + 301).to_json()),
    }


def test_every_reason_is_reachable_and_counted(gate):
    """Each reason in REASONS has an input that yields it, and each verdict is counted once."""
    ingest, store, _, a = gate
    del store[("m1", 1)]  # archived: a re-sent seq 1 can no longer be compared
    table = cases(a)
    assert set(table) == set(REASONS)
    for reason, (topic, payload) in table.items():
        v = ingest.check(topic, payload)
        assert (v.kind, v.reason) == ("reject", reason), v.detail
        assert ingest.counts[reason] == 1
    assert ingest.heads["m1"] == ChainHead(2, a[1].hash, a[1].t)


def test_reason_classes_are_the_issues_eleven():
    """Every reason maps to one of issue 5's classes and every class has a reason."""
    assert tuple(REASON_CLASS) == REASONS
    assert len(REASON_CLASSES) == 11 and set(REASON_CLASS.values()) == set(REASON_CLASSES)
    counts = class_counts({"bad_type": 2, "malformed_json": 1, "oversized": 4, "accept": 9})
    assert counts["schema"] == 3 and counts["size"] == 4 and sum(counts.values()) == 7


@pytest.mark.parametrize("where", ["head", "pending", "stored"])
def test_equivocation_is_evidence_and_names_the_held_reading(gate, where):
    """A different validly signed reading for a held seq is equivocation, carrying the held hash,
    whether the held one is the head, accepted but uncommitted, or in the store."""
    ingest, _, _, a = gate
    if where == "pending":
        assert ingest.check("m1", a[2].to_json()).kind == "accept"
    seq = {"head": 2, "pending": 2, "stored": 1}[where]
    twin = reading(seq, a[seq - 2].hash if seq > 1 else ZERO_HASH, c=C2)
    v = ingest.check("m1", twin.to_json())
    assert (v.reason, v.evidence, v.conflicts_with) == ("equivocation", True, a[seq - 1].hash)


def test_a_used_seq_no_longer_held_is_replayed_seq_without_evidence(gate):
    """If the store no longer has the old reading there is nothing to compare: replayed_seq, not evidence."""
    ingest, store, _, a = gate
    del store[("m1", 1)]
    for r in (a[0], reading(1, ZERO_HASH, c=C2)):
        v = ingest.check("m1", r.to_json())
        assert (v.reason, v.evidence, v.conflicts_with) == ("replayed_seq", False, None)


def test_duplicates_are_acked_even_when_the_clock_has_moved_back(gate):
    """Duplicate detection precedes the clock checks: a stored reading re-sent is a duplicate
    even if the gateway's clock now puts it in the future."""
    ingest, _, clock, a = gate
    clock.t = T0
    assert [ingest.check("m1", r.to_json()).kind for r in a[:2]] == ["duplicate", "duplicate"]


def test_a_forked_chain_stays_evidence_whatever_its_timestamps(gate):
    """prev_mismatch and equivocation precede the clock checks, so skewed forks are still evidence."""
    ingest, _, clock, a = gate
    far = clock.t + 10**6
    v = ingest.check("m1", reading(3, "ab" * 32, t=int(far)).to_json())
    assert (v.reason, v.evidence, v.conflicts_with) == ("prev_mismatch", True, a[1].hash)
    v = ingest.check("m1", reading(2, a[0].hash, t=int(far), c=C2).to_json())
    assert (v.reason, v.evidence) == ("equivocation", True)


def test_a_first_reading_that_does_not_start_the_chain_conflicts_with_nothing():
    ingest = make_ingest(KEYS, now=Clock(T0 + 900))
    v = ingest.check("m1", reading(1, "ab" * 32).to_json())
    assert (v.reason, v.evidence, v.conflicts_with) == ("prev_mismatch", True, None)


def test_clock_skew_bounds_the_future_and_forbids_overlap(gate):
    """t may be at most max_future_s ahead of the clock; the interval [t - dt, t] may not start
    before the previous reading's t. Neither is evidence, and a reading only ahead of the clock
    is accepted once the clock catches up."""
    ingest, _, clock, a = gate
    ahead = reading(3, a[1].hash, t=int(clock.t) + 301)
    v = ingest.check("m1", ahead.to_json())
    assert (v.reason, v.evidence) == ("clock_skew", False)
    # Same end as seq 2; a 2 s interval overlapping it by 1 s; a full interval overlapping it by 1 s.
    for t, dt in ((a[1].t, 900), (a[1].t + 1, 2), (a[1].t + 899, 900)):
        v = ingest.check("m1", reading(3, a[1].hash, t=t, dt=dt).to_json())
        assert (v.reason, v.evidence) == ("clock_skew", False)
    clock.t = ahead.t - 300
    assert ingest.check("m1", ahead.to_json()).kind == "accept"
    assert ingest.heads["m1"].t == ahead.t


def test_an_interval_may_start_exactly_where_the_last_one_ended(gate):
    ingest, _, _, a = gate
    assert ingest.check("m1", reading(3, a[1].hash, t=a[1].t + 1, dt=1).to_json()).kind == "accept"


def test_an_interval_may_end_exactly_max_future_s_ahead():
    ingest = make_ingest(KEYS, now=Clock(T0))
    assert ingest.check("m1", reading(1, ZERO_HASH, t=T0 + 300).to_json()).kind == "accept"


def test_a_head_loaded_without_t_still_checks_the_chain(gate):
    """The store builds ChainHead(seq, hash) positionally; t then defaults to 0 (no overlap check)."""
    ingest, _, _, a = gate
    ingest.heads["m1"] = ChainHead(2, a[1].hash)
    assert ingest.check("m1", a[2].to_json()).kind == "accept"


def test_failing_adapters_give_verdicts_not_exceptions(gate):
    """A store lookup that raises is a replayed_seq saying so; a verifier that raises is a bad signature."""
    ingest, _, _, a = gate

    def broken(meter, seq):
        raise OSError("disk gone")

    ingest.stored_hash = broken
    v = ingest.check("m1", a[0].to_json())
    assert v.reason == "replayed_seq" and "disk gone" in v.detail

    def exploding(msg, sig):
        raise RuntimeError("verifier bug")

    ingest.registry.verifier = lambda meter: exploding
    assert ingest.check("m1", a[2].to_json()).reason == "bad_signature"
    assert ingest.heads["m1"].seq == 2


def test_a_batch_with_a_hidden_non_unit_is_redone_one_by_one():
    """check_batch defers the gcd to one per batch. A c sharing one prime with n (only a
    holder of the factors can write one) passes the cheap per-reading test, so the batch's
    gcd fails and the batch is undone and judged item by item: the verdicts, heads and
    counters are exactly those of `check` in turn, and nothing of the bad reading stays."""
    from helpers import PRIV
    a, b = chain(3), chain(2, meter="m2")
    hidden = reading(3, a[1].hash, c=PRIV.p * 7)  # a non-unit, not a multiple of n
    assert hidden.ciphertext % N != 0
    items = [("m1", a[0].to_json()), ("m2", b[0].to_json()), ("m1", a[1].to_json()),
             ("m1", hidden.to_json()), ("m1", a[2].to_json()), ("m2", b[1].to_json())]
    one, many = (make_ingest(KEYS, now=Clock(T0 + 2700), store={}) for _ in range(2))
    expected = [one.check(m, p) for m, p in items]
    assert [v.reason or v.kind for v in expected] == ["accept", "accept", "accept", "ciphertext_range",
                                                      "accept", "accept"]
    assert many.check_batch(items) == expected
    assert many.counts == one.counts and many._pending == one._pending
    assert many.heads == one.heads and many.heads["m1"].seq == 3


def test_a_batch_refuses_a_multiple_of_n_at_once():
    """The non-units anyone can write, multiples of n, are refused by the cheap test itself."""
    a = chain(2)
    ingest = make_ingest(KEYS, now=Clock(T0 + 2700), store={})
    got = ingest.check_batch([("m1", a[0].to_json()), ("m1", reading(2, a[0].hash, c=N * 3).to_json()),
                              ("m1", a[1].to_json())])
    assert [v.reason or v.kind for v in got] == ["accept", "ciphertext_range", "accept"]
