"""Properties of the gateway's ingest checks (hypothesis, derandomized): whatever arrives,
`Ingest.check` returns a typed verdict, and it accepts only what an independent reading of
DESIGN section 4 accepts (Ed25519 via `cryptography`, kid, ciphertext range, chain, clock)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import astuple, dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, event, given, settings, strategies as st

from aggregator.ingest import REASONS, ChainHead, Ingest, Verdict
from gridledger.paillier import encrypt_raw
from gridledger.wire import ZERO_HASH, Reading, kid_of, make_reading

from helpers import N, PRIV, make_ingest, meter_keys

SETTINGS = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

METERS = ("m1", "m2", "m3")
KEYS = meter_keys(METERS)
T0 = 1795160700
DT = 900
LENGTH = 5  # honest readings per meter
CTS = [encrypt_raw(N, m) for m in (100, 200 << 48, 300)]  # costly, so a few are shared
P = PRIV.p  # one prime of the test modulus


def signed(meter: str, seq: int, prev: str, t: int, c: int) -> Reading:
    return make_reading(meter=meter, seq=seq, t=t, dt=DT, prev=prev, kid=kid_of(N), c=c, sign=KEYS[meter].sign)


def honest_chain(meter: str) -> list[Reading]:
    out, prev = [], ZERO_HASH
    for seq in range(1, LENGTH + 1):
        out.append(signed(meter, seq, prev, T0 + DT * seq, CTS[0]))
        prev = out[-1].hash
    return out


HONEST = {m: honest_chain(m) for m in METERS}
NOW = T0 + DT * LENGTH  # the gateway's clock, unless a test moves it


class Clock:
    def __init__(self, t: float = NOW):
        self.t = t

    def __call__(self) -> float:
        return self.t


# --- the independent check: DESIGN section 4 re-read from the raw payload, not via gridledger.wire

_PUB = {m: Ed25519PrivateKey.from_private_bytes(k.seed).public_key() for m, k in KEYS.items()}
_KID = hashlib.sha256(str(N).encode()).digest()[:8].hex()
_SPELLING = {"meter": r"[A-Za-z0-9_-]{1,32}", "prev": r"[0-9a-f]{64}", "kid": r"[0-9a-f]{16}",
             "sig": r"[0-9a-f]{128}", "c": r"[1-9a-f][0-9a-f]*"}


@dataclass
class Head:
    """The oracle's own view of a meter's last accepted reading (not aggregator.ingest's)."""
    seq: int = 0
    hash: str = ZERO_HASH
    t: int = 0


def message(obj: dict) -> bytes:
    """The signed bytes of DESIGN section 4, from the JSON fields as they are."""
    return "\n".join(["gl-reading-v1", obj["meter"], str(obj["seq"]), str(obj["t"]), str(obj["dt"]),
                      obj["prev"], obj["kid"], obj["c"]]).encode("ascii")


def authentic(topic: str, payload: bytes) -> tuple[dict, str]:
    """Assert the payload is a v1 reading its registered meter signed under the area key;
    return the JSON object and the reading's hash."""
    obj = json.loads(payload.decode("utf-8"))
    assert type(obj) is dict
    assert all(type(obj[k]) is int for k in ("v", "seq", "t", "dt"))
    assert all(type(obj[k]) is str for k in _SPELLING)
    assert all(re.fullmatch(rx, obj[k]) for k, rx in _SPELLING.items())
    assert obj["v"] == 1 and obj["seq"] >= 1 and obj["t"] >= 0 and obj["dt"] > 0
    assert obj["meter"] == topic and topic in _PUB
    msg = message(obj)
    _PUB[topic].verify(bytes.fromhex(obj["sig"]), msg)  # raises InvalidSignature
    assert obj["kid"] == _KID
    c = int(obj["c"], 16)
    assert 0 < c < N * N and math.gcd(c, N) == 1
    return obj, hashlib.sha256(msg).hexdigest()


def assert_acceptable(topic: str, payload: bytes, head: Head, now: float) -> str:
    """Assert accepting this payload is right after `head`; return the reading's hash."""
    obj, h = authentic(topic, payload)
    assert obj["seq"] == head.seq + 1 and obj["prev"] == head.hash
    assert obj["t"] <= now + 300 and obj["t"] - obj["dt"] >= head.t
    return h


def judged(ingest: Ingest, topic: str, payload: bytes) -> Verdict:
    """Ingest.check, asserting it returned a well-formed verdict and counted it once."""
    before = sum(ingest.counts.values())
    v = ingest.check(topic, payload)
    assert isinstance(v, Verdict)
    if v.kind == "reject":
        assert v.reason in REASONS
    else:
        assert v.kind in ("accept", "duplicate") and v.reason is None and not v.evidence
    assert sum(ingest.counts.values()) == before + 1
    event(v.reason or v.kind)  # the verdict mix, in --hypothesis-show-statistics
    return v


def heads_of(ingest: Ingest) -> dict[str, tuple[int, str, int]]:
    return {m: (h.seq, h.hash, h.t) for m, h in ingest.heads.items()}


def gate_after(meter: str, k: int) -> Ingest:
    """An Ingest that has accepted the first k honest readings of `meter`."""
    ingest = make_ingest(KEYS, now=Clock())
    for r in HONEST[meter][:k]:
        assert ingest.check(meter, r.to_json()).kind == "accept"
    return ingest


def head_after(meter: str, k: int) -> Head:
    return Head(k, HONEST[meter][k - 1].hash, HONEST[meter][k - 1].t) if k else Head()


def judge_against_honest(meter: str, k: int, topic: str, payload: bytes) -> Verdict:
    """Check `payload` after k honest readings of `meter` (none of the others); any accept or
    duplicate must hold up independently."""
    ingest = gate_after(meter, k)
    before = heads_of(ingest)
    v = judged(ingest, topic, payload)
    if v.kind == "accept":
        head = head_after(meter, k) if topic == meter else Head()
        h = assert_acceptable(topic, payload, head, NOW)
        assert h == v.reading.hash and heads_of(ingest)[topic][:2] == (head.seq + 1, h)
    else:
        assert heads_of(ingest) == before  # nothing but an accept moves a head
    if v.kind == "duplicate":
        obj, h = authentic(topic, payload)
        assert topic == meter and obj["seq"] <= k and h == HONEST[meter][obj["seq"] - 1].hash
    return v


# --- 1. arbitrary input

topics = st.one_of(st.sampled_from(METERS + ("m9",)), st.text(max_size=40))
nasty = st.sampled_from([
    b"", b"null", b"[]", b"{}", b"[" * 3000, b'{"a":' * 2000, b'{"seq": ' + b"9" * 5000 + b"}",
    b"\xef\xbb\xbf" + HONEST["m1"][0].to_json(), HONEST["m1"][0].to_json().decode().encode("utf-16"),
    b'{"v": NaN}', b'{"v": 1e999}', b"\x00" * 100, b" " * 9000,
])


@SETTINGS
@given(topic=topics, payload=st.one_of(st.binary(max_size=9000), nasty))
def test_arbitrary_bytes_get_a_typed_rejection(topic, payload):
    """Random and hostile bytes (deep nesting, 5000-digit ints, BOM, UTF-16, NaN) never raise and
    are refused with a reason from REASONS."""
    assert judge_against_honest("m1", 1, topic, payload).kind == "reject"


FIELDS = ("v", "meter", "seq", "t", "dt", "prev", "kid", "c", "sig")
leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(),
    st.sampled_from([0, 1, -1, 2**63, -(2**63) - 1, 10**4299, N, N * N, N * N + 1, NOW + 301]),
    st.text(max_size=40), st.text(st.characters(categories=["Cs", "Lo", "Nd", "Zs"]), max_size=10),
    st.text("0123456789abcdefABCDEF x", min_size=14, max_size=130),
    st.sampled_from([getattr(r, f) for r in HONEST["m2"][:2] for f in ("meter", "prev", "kid", "c", "sig")]),
)
json_values = st.recursive(
    leaves, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=8)
# Well-typed values that are wrong in one way each: version, registry, key id, range, signature.
plausible = st.sampled_from([
    ("v", 2), ("v", 0), ("meter", "m9"), ("meter", "m2"), ("seq", 0), ("seq", 7), ("t", NOW + 10**6), ("dt", 0),
    ("dt", 10**9), ("kid", "00" * 8), ("c", format(N, "x")), ("c", format(N * N, "x")), ("c", "1"),
    ("c", "0" + HONEST["m1"][0].c), ("sig", HONEST["m2"][0].sig), ("sig", HONEST["m1"][0].sig.upper()),
    ("prev", "ab" * 32), ("prev", ZERO_HASH),
])
edits = st.one_of(
    st.lists(plausible.map(lambda kv: ("set", *kv)), min_size=1, max_size=2),
    st.lists(st.one_of(
        st.tuples(st.just("drop"), st.sampled_from(FIELDS)),
        st.tuples(st.just("set"), st.sampled_from(FIELDS), json_values),
        st.tuples(st.just("extra"), st.one_of(st.text(max_size=8), st.sampled_from(FIELDS)), json_values),
    ), max_size=4),
)


@st.composite
def json_objects(draw) -> tuple[str, int, str, bytes]:
    """A meter, how many honest readings it has sent, a topic, and a payload made by editing one of
    its honest readings (maybe not edited at all, maybe re-signed, maybe wrapped in a list)."""
    meter = draw(st.sampled_from(METERS))
    k = draw(st.integers(0, LENGTH - 1))
    obj = json.loads(HONEST[meter][draw(st.just(k) | st.integers(0, LENGTH - 1))].to_json())  # often the next one
    for op, *args in draw(edits):
        if op == "drop":
            obj.pop(args[0], None)
        else:
            obj[args[0]] = args[1]
    if draw(st.booleans()):  # sign the edit as the claimed meter would, so checks past the signature run
        try:
            obj["sig"] = KEYS[obj["meter"]].sign(message(obj)).hex()
        except (KeyError, TypeError, ValueError):  # unsignable: missing, mistyped or non-ASCII fields
            pass
    shape = draw(st.sampled_from(["object", "object", "object", "list", "value"]))
    doc = {"object": obj, "list": [obj], "value": obj.get("seq")}[shape]
    payload = json.dumps(doc, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    claimed = obj.get("meter") if isinstance(obj, dict) and isinstance(obj.get("meter"), str) else meter
    topic = draw(st.one_of(st.just(meter), st.just(claimed), topics))
    return meter, k, topic, payload


@SETTINGS
@given(json_objects())
def test_edited_json_is_never_accepted_unless_it_is_a_valid_next_reading(case):
    """Honest readings with fields dropped, retyped or replaced (huge ints, unicode, nesting, other
    meters' values), extra fields, wrong topics, re-signed or not: every verdict is typed, and every
    accept passes the independent check of signature, kid, range, chain and clock."""
    judge_against_honest(*case)


# --- 2. byte mutations of a valid payload

def canonical(payload: bytes) -> str | None:
    try:
        return json.dumps(json.loads(payload.decode("utf-8")), sort_keys=True)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


positions = st.integers(0, 10**6)
mutations = st.lists(st.one_of(
    st.tuples(st.just("replace"), positions, st.integers(0, 255) | st.sampled_from(b"0123456789abcdef")),
    st.tuples(st.just("flip"), positions, st.integers(0, 7)),
    st.tuples(st.just("insert"), positions, st.sampled_from(b' \t\n\r,:"{}[]0a\\')),
    st.tuples(st.just("delete"), positions, st.just(0)),
), min_size=1, max_size=5)


def mutate(payload: bytes, ops) -> bytes:
    b = bytearray(payload)
    for op, pos, val in ops:
        if op == "insert":
            b.insert(pos % (len(b) + 1), val)
        elif b:
            i = pos % len(b)
            if op == "replace":
                b[i] = val
            elif op == "flip":
                b[i] ^= 1 << val
            else:
                del b[i]
    return bytes(b)


@SETTINGS
@given(meter=st.sampled_from(METERS), k=st.integers(0, LENGTH - 1), ops=mutations)
def test_byte_mutations_of_a_valid_reading_never_accept_other_signed_content(meter, k, ops):
    """Replacing, flipping, inserting or deleting bytes of the next valid payload yields a typed
    rejection, or, if the JSON it decodes to is unchanged, the very same accept."""
    original = HONEST[meter][k]
    payload = mutate(original.to_json(), ops)
    v = judge_against_honest(meter, k, meter, payload)
    if canonical(payload) == canonical(original.to_json()):
        assert v.kind == "accept"
    if v.kind == "accept":
        assert (v.reading.signed_bytes, v.reading.sig) == (original.signed_bytes, original.sig)


@SETTINGS
@given(meter=st.sampled_from(METERS), k=st.integers(0, LENGTH - 1), data=st.data())
def test_json_equivalent_spellings_are_the_same_reading(meter, k, data):
    """Key order, whitespace and \\u escapes do not change a reading: the same accept, the same hash."""
    original = HONEST[meter][k]
    obj = json.loads(original.to_json())
    keys = data.draw(st.permutations(list(obj)))
    text = json.dumps({key: obj[key] for key in keys}, indent=data.draw(st.sampled_from([None, 0, 2, "\t"])),
                      separators=data.draw(st.sampled_from([None, (",", ":"), (" , ", " : ")])))
    if data.draw(st.booleans()):  # spell the meter id with \u escapes
        text = text.replace(f'"{meter}"', '"' + "".join(f"\\u{ord(ch):04x}" for ch in meter) + '"', 1)
    v = judge_against_honest(meter, k, meter, text.encode())
    assert v.kind == "accept" and v.reading.hash == original.hash


# --- 3. sequences: honest progress, duplicates, replays, forks, skewed clocks, archiving

def rivals(meter: str) -> list[Reading]:
    """Validly signed readings that compete with the honest chain: a second history from seq 2 on,
    and at every seq one dated ahead of the clock and one overlapping the previous interval."""
    a = HONEST[meter]
    out, prev = [], a[0].hash
    for seq in range(2, LENGTH + 1):
        out.append(signed(meter, seq, prev, T0 + DT * seq, CTS[1]))
        prev = out[-1].hash
    for seq in range(1, LENGTH + 1):
        prev, t_prev = (a[seq - 2].hash, a[seq - 2].t) if seq > 1 else (ZERO_HASH, T0)
        out.append(signed(meter, seq, prev, NOW + 2 * DT, CTS[2]))  # ahead until the clock moves 2 intervals
        out.append(signed(meter, seq, prev, t_prev + 1, CTS[2]))  # overlaps the previous interval
    return out


def unfit(meter: str) -> list[Reading]:
    """Signed, chained to the honest history, but under another Paillier key, with a
    multiple of n, or with a multiple of one prime of n (what only a holder of the
    factors can make, and no cheaper test than a gcd tells from a unit): three per seq."""
    out = []
    for r in HONEST[meter]:
        out.append(make_reading(meter=meter, seq=r.seq, t=r.t, dt=DT, prev=r.prev, kid="00" * 8, c=CTS[2],
                                sign=KEYS[meter].sign))
        out.append(signed(meter, r.seq, r.prev, r.t, N * 7))
        out.append(signed(meter, r.seq, r.prev, r.t, P * 7))
    return out


CONTENDERS = {m: HONEST[m] + rivals(m) for m in METERS}
UNFIT = {m: unfit(m) for m in METERS}
POOL = {m: CONTENDERS[m] + UNFIT[m] for m in METERS}
SUCCESSOR = {r.hash: nxt for m in METERS for r, nxt in zip(POOL[m], POOL[m][1:]) if nxt.prev == r.hash}
FIRST = {m: HONEST[m][0] for m in METERS}

# What happens next, weighted: a meter makes progress, something lands near its head (a re-send,
# a rival, a skewed or unfit reading), or the gateway commits, its clock ticks, or it archives.
OPS = ("next",) * 4 + ("near",) * 3 + ("resend",) * 2 + ("commit",) * 2 + ("archive",) * 2 + (
    "pool", "elsewhere", "unfit", "tick")
events = st.lists(st.tuples(st.sampled_from(OPS), st.sampled_from(METERS), st.integers(0, 63)),
                  min_size=20, max_size=80)


class Model:
    """What the gateway should hold: per meter the accepted readings, what is committed, what archived."""

    def __init__(self):
        self.accepted: dict[str, list[Reading]] = {m: [] for m in METERS}
        self.pending: dict[tuple[str, int], str] = {}
        self.store: dict[tuple[str, int], str] = {}  # the Ingest reads this one too

    def head(self, meter: str) -> Head:
        acc = self.accepted[meter]
        return Head(len(acc), acc[-1].hash, acc[-1].t) if acc else Head()

    def held(self, meter: str, seq: int) -> str | None:
        if seq == len(self.accepted[meter]):
            return self.accepted[meter][-1].hash
        return self.pending.get((meter, seq)) or self.store.get((meter, seq))

    def expect(self, topic: str, r: Reading, now: float) -> tuple:
        """(kind, reason, evidence, conflicts_with) for a validly signed pool reading."""
        if r.meter != topic:
            return "reject", "topic_mismatch", False, None
        if r.kid != _KID:
            return "reject", "unknown_key_id", False, None
        if math.gcd(r.ciphertext, N) != 1:
            return "reject", "ciphertext_range", False, None
        head = self.head(r.meter)
        if r.seq <= head.seq:
            held = self.held(r.meter, r.seq)
            if held == r.hash:
                return "duplicate", None, False, None
            if held is None:
                return "reject", "replayed_seq", False, None
            return "reject", "equivocation", True, held
        if r.seq > head.seq + 1:
            return "reject", "seq_gap", False, None
        if r.prev != head.hash:
            return "reject", "prev_mismatch", True, head.hash if head.seq else None
        if r.t > now + 300 or r.t - r.dt < head.t:
            return "reject", "clock_skew", False, None
        return "accept", None, False, None


@settings(SETTINGS, max_examples=250)  # each example is 20-80 checks
@given(events)
def test_interleavings_accept_exactly_a_chain_per_meter(script):
    """Any interleaving of honest progress, re-sends, replays, forks, skewed readings, wrong topics,
    commits, clock ticks and archiving: each meter's accepted readings form one gap-free chain from
    seq 1, none is accepted twice, and every verdict (equivocation and prev_mismatch as evidence,
    naming the held reading) is the one the model predicts."""
    model, clock = Model(), Clock()
    ingest = make_ingest(KEYS, now=clock, store=model.store)
    seen = Counter()
    for op, meter, arg in script:
        if op == "commit":
            model.store.update(model.pending)
            model.pending.clear()
            ingest.committed()
            continue
        if op == "tick":
            clock.t += DT
            continue
        acc = model.accepted[meter]
        if op == "archive":  # the store lets go of an old reading: no longer comparable
            model.store.pop((meter, 1 + arg % max(len(acc), 1)), None)
            continue
        r, topic = pick(op, meter, arg, acc)
        if r is None:
            continue
        want = model.expect(topic, r, clock.t)
        head = model.head(meter)
        v = judged(ingest, topic, r.to_json())
        seen[v.reason or v.kind] += 1
        assert (v.kind, v.reason, v.evidence, v.conflicts_with) == want, v.detail
        if v.kind == "accept":
            assert assert_acceptable(topic, r.to_json(), head, clock.t) == r.hash
            acc.append(r)
            model.pending[(meter, r.seq)] = r.hash
    assert Counter(ingest.counts) == seen
    for meter, acc in model.accepted.items():
        assert [r.seq for r in acc] == list(range(1, len(acc) + 1))
        assert [r.prev for r in acc] == [ZERO_HASH, *(r.hash for r in acc)][:len(acc)]
        assert len({r.hash for r in acc}) == len(acc)
        assert astuple(ingest.heads.get(meter, ChainHead())) == astuple(model.head(meter))


def pick(op: str, meter: str, arg: int, acc: list[Reading]) -> tuple[Reading | None, str]:
    """The reading (None: nothing to send) and topic of one scripted arrival, given the meter's accepted ones."""
    topic = meter
    if op == "next":
        return (SUCCESSOR.get(acc[-1].hash) if acc else FIRST[meter]), topic
    if op == "near":  # a pool reading for a seq within one of the head: where conflicts happen
        near = [p for p in CONTENDERS[meter] if abs(p.seq - len(acc) - 0.5) <= 1.5]
        return near[arg % len(near)], topic
    if op == "unfit":  # the next seq, chained to the honest history, but not under the area key
        return UNFIT[meter][3 * min(len(acc), LENGTH - 1) + arg % 3], topic
    if op == "resend":
        return (acc[arg % len(acc)] if acc else None), topic
    if op == "elsewhere":
        topic = METERS[(METERS.index(meter) + 1) % len(METERS)]
    return POOL[meter][arg % len(POOL[meter])], topic


@settings(SETTINGS, max_examples=200)
@given(events, st.lists(st.integers(1, 12), min_size=1, max_size=12))
def test_a_batch_gets_the_verdicts_one_by_one_would(script, sizes):
    """`check_batch` (one gcd per batch; undone and redone one by one when a non-unit
    hides in it) gives exactly the verdicts, heads, pending readings and counters of
    `check` called on each message in turn, for any interleaving and batch sizes."""
    stores: tuple[dict, dict] = ({}, {})
    clocks = (Clock(), Clock())
    one, many = (make_ingest(KEYS, now=clocks[i], store=stores[i]) for i in (0, 1))
    accepted = {m: [] for m in METERS}
    batch: list[tuple[str, bytes]] = []
    expected: list[Verdict] = []
    size = iter(sizes * 10)

    def flush() -> None:
        if batch:
            got = many.check_batch(batch)
            assert got == expected
            batch.clear()
            expected.clear()

    for op, meter, arg in script:
        if op in ("commit", "tick", "archive"):
            flush()
            for ing, store, clock in zip((one, many), stores, clocks):
                if op == "commit":
                    store.update(ing._pending)
                    ing.committed()
                elif op == "tick":
                    clock.t += DT
                else:
                    store.pop((meter, 1 + arg % max(len(accepted[meter]), 1)), None)
            continue
        r, topic = pick(op, meter, arg, accepted[meter])
        if r is None:
            continue
        v = one.check(topic, r.to_json())
        if v.kind == "accept":
            accepted[meter].append(r)
        batch.append((topic, r.to_json()))
        expected.append(v)
        if len(batch) >= next(size, 4):
            flush()
    flush()
    assert one.counts == many.counts
    assert one._pending == many._pending
    assert {m: astuple(h) for m, h in one.heads.items()} == {m: astuple(h) for m, h in many.heads.items()}
