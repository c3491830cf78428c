"""Area totals (issue 7 item 7): what a trustee decrypts for a load curve, and what
it refuses - in process over real certified chains in SQLite, with settlekit's
small threshold key (the processes and the CLI are in test_loadcurve_network.py)."""

from __future__ import annotations

import copy
import json

import pytest

from certlog import bls
from certlog.store import connect
from coordinator.areatotal import area_item, check_area_item, smallest_atom
from coordinator.decrypt import DecryptError, sign_request
from coordinator.threshold import PartialBatch
from coordinator.trustee import Policy, Trustee, verify_decision
from gridledger.wire import BANDS, unpack_slots

from settlekit import AREA, START, build_world

COORD_SK = bls.KeyGen(b"\x35" * 32)
K = 4
POLICY = Policy(min_readings=10, min_period_s=3600, min_meters=K)
T0 = START - 8 * 900          # settlekit's meters start here: readings end at T0 + 900 k
METERS = [f"m{i}" for i in range(12)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"), accounts=len(METERS), readings=16, per_block=8, tail=0)


def make_trustee(world, tmp, i: int, policy: Policy = POLICY) -> Trustee:
    tmp.mkdir(parents=True, exist_ok=True)
    return Trustee(f"t{i + 1}", world.shares[i], bls.KeyGen(bytes([0x60 + i]) * 32), bls.SkToPk(COORD_SK),
                   {AREA: world.vset}, policy, connect(tmp / f"trustee{i}.db"))


def area(world, t: int, meters=METERS, *, extra=()) -> dict:
    """The area item of interval `t` over `meters` (plus `extra` ledger readings)."""
    rows = [r for r in world.ledger.readings_ending(t) if json.loads(r["tx"])["meter"] in meters] + list(extra)
    blocks = [world.ledger.certified(h) for h in sorted({r["height"] for r in rows})]
    return area_item(AREA, t, blocks, rows)


def truth(world, t: int, meters=METERS) -> list[int]:
    slots = [0] * (2 * BANDS)
    for m in meters:
        for s, v in dict(world.truth[f"acct-{m}"])[t].items():
            slots[s] += v
    return slots


def verdicts(trustee, items) -> list[str]:
    resp, _, _ = trustee.decide(sign_request("coord", items, COORD_SK))
    return [v["reason"] or v["status"] for v in resp["items"]]


def test_an_area_total_decrypts_to_the_sum_of_its_meters_readings(world, tmp_path):
    trustees = [make_trustee(world, tmp_path, i) for i in (0, 2)]
    items = [area(world, T0 + 900 * j) for j in (1, 9, 16)]   # the first, a middle and the last interval
    req = sign_request("coord", items, COORD_SK)
    answers = [t.answer(json.loads(json.dumps(req)))[0] for t in trustees]
    assert all(v["status"] == "accepted" for a in answers for v in a["items"]), answers
    facts = [check_area_item(it, {AREA: world.vset}, world.key.kid, world.key.nsquare) for it in items]
    plain = world.key.combine([f.c for f in facts], [PartialBatch.from_dict(a["partials"]) for a in answers])
    for it, f, m in zip(items, facts, plain.plaintexts):
        assert unpack_slots(m) == truth(world, it["t"]) and len(f.meters) == len(METERS) and f.dt == 900


def test_fewer_than_k_meters_are_refused_and_logged_signed(world, tmp_path):
    t = make_trustee(world, tmp_path, 0)
    resp, cs, records = t.decide(sign_request("coord", [area(world, T0 + 900, METERS[:K - 1])], COORD_SK))
    assert resp["items"][0]["reason"] == "too_few_meters" and cs == []
    rec = records[0]
    assert (rec["kind"], rec["verdict"], rec["meters"], rec["t"]) == ("area", "refused", K - 1, T0 + 900)
    assert verify_decision(rec, bls.SkToPk(t.sk)) and not verify_decision(dict(rec, meters=K), bls.SkToPk(t.sk))
    stored = t.conn.execute("SELECT verdict, reason, record FROM trustee_decisions").fetchall()
    assert [(v, r) for v, r, _ in stored] == [("refused", "too_few_meters")]
    assert verify_decision(json.loads(stored[0][2]), bls.SkToPk(t.sk))


def test_forged_mixed_and_duplicated_readings_are_refused_with_their_reason(world, tmp_path):
    t1, t2 = T0 + 900 * 3, T0 + 900 * 12            # in different blocks
    other = world.ledger.readings_ending(t2)[0]
    base = area(world, t1)
    cases = {"mixed_intervals": area(world, t1, METERS[1:], extra=[other])}
    dup = copy.deepcopy(base)
    dup["readings"].append(dup["readings"][0])
    cases["duplicate_meter"] = dup
    flipped = copy.deepcopy(base)
    tx = flipped["readings"][2]["tx"]
    at = tx.index('"c":"') + 9
    flipped["readings"][2]["tx"] = tx[:at] + ("1" if tx[at] != "1" else "2") + tx[at + 1:]
    cases["bad_inclusion"] = flipped
    moved = copy.deepcopy(base)
    moved["readings"][0]["index"] += 1
    cases["bad_inclusion "] = moved                     # a true reading at the wrong place
    quorum = copy.deepcopy(base)
    quorum["blocks"][0]["cert"]["signers"] = quorum["blocks"][0]["cert"]["signers"][:2]
    cases["cert_quorum"] = quorum
    sig = copy.deepcopy(base)
    s = sig["blocks"][0]["cert"]["sig"]
    sig["blocks"][0]["cert"]["sig"] = s[:40] + ("0" if s[40] != "0" else "1") + s[41:]
    cases["cert_signature"] = sig
    header = copy.deepcopy(base)
    header["blocks"][0]["header"]["time"] += 1
    cases["cert_mismatch"] = header
    chain = copy.deepcopy(base)
    chain["chain"] = "elsewhere"
    cases["unknown_chain"] = chain
    trustee = make_trustee(world, tmp_path, 1)
    assert verdicts(trustee, list(cases.values())) == [r.strip() for r in cases]
    assert verdicts(trustee, [base]) == ["accepted"]   # what each case was forged from


def test_readings_under_another_key_are_refused(world):
    with pytest.raises(DecryptError) as exc:
        check_area_item(area(world, T0 + 900), {AREA: world.vset}, "00" * 8, world.key.nsquare)
    assert exc.value.reason == "wrong_key"


def test_no_differencing_between_meter_sets_of_one_interval(world, tmp_path):
    """S then S + {m} would give m's reading: refused. S again, a disjoint set, and
    their union (whose atoms are S and the other set) are fine; a set that would cut
    an atom below k is not. Another interval is another family. A restarted trustee
    remembers."""
    t = make_trustee(world, tmp_path, 2)
    at = T0 + 900 * 5
    S, T = METERS[:4], METERS[4:8]
    ask = lambda *sets, when=at: verdicts(t, [area(world, when, s) for s in sets])  # noqa: E731
    assert ask(S) == ["accepted"]
    assert ask(S + METERS[4:5]) == ["overlaps_decrypted"]
    assert ask(S) == ["accepted"]
    assert ask(T, S + T) == ["accepted", "accepted"]
    assert ask(S + T[:2]) == ["overlaps_decrypted"]          # atoms {m4, m5} and {m6, m7}
    assert ask(METERS[1:5]) == ["overlaps_decrypted"]        # {m0} and {m4} alone
    assert ask(METERS[8:12], METERS) == ["accepted", "accepted"]
    assert ask(S + METERS[4:5], when=at + 900) == ["accepted"]
    # Within one request, the second of two differing sets is caught too.
    assert ask(METERS[:5], METERS[:6], when=at + 1800) == ["accepted", "overlaps_decrypted"]
    again = Trustee(t.name, t.share, t.sk, t.coordinator_public, t.validators, POLICY,
                    connect(tmp_path / "trustee2.db"))
    assert verdicts(again, [area(world, at, S + METERS[4:5])]) == ["overlaps_decrypted"]
    rec = json.loads(again.conn.execute("SELECT record FROM trustee_decisions ORDER BY id DESC").fetchone()[0])
    assert rec["reason"] == "overlaps_decrypted" and rec["meters"] == 5 and verify_decision(rec, bls.SkToPk(t.sk))


def test_smallest_atom_counts_members_by_the_sets_that_hold_them():
    f = frozenset
    assert smallest_atom([]) > 10 ** 9
    assert smallest_atom([f("abcd")]) == 4
    assert smallest_atom([f("abcd"), f("abcde")]) == 1
    assert smallest_atom([f("abcd"), f("efgh"), f("abcdefgh")]) == 4
    assert smallest_atom([f("abcd"), f("cdef")]) == 2


def test_malformed_area_items_are_refused_typed_never_a_crash(world, tmp_path):
    base = area(world, T0 + 900 * 7, METERS[:K])
    trustee = make_trustee(world, tmp_path, 0)

    def variant(fn):
        it = copy.deepcopy(base)
        fn(it)
        return it

    bad = [
        {"kind": "area"}, [], "x", None,
        variant(lambda it: it.update(t="0")), variant(lambda it: it.update(t=True)),
        variant(lambda it: it.update(extra=1)), variant(lambda it: it.update(blocks=[])),
        variant(lambda it: it.update(readings={})), variant(lambda it: it["blocks"].append(it["blocks"][0])),
        variant(lambda it: it["blocks"][0].update(header=[])), variant(lambda it: it["blocks"][0].pop("cert")),
        variant(lambda it: it["blocks"][0]["cert"].update(signers="all")),
        variant(lambda it: it["blocks"][0]["header"].update(app={"kid": [1]})),
        variant(lambda it: it["readings"][0].update(height=10 ** 30)),
        variant(lambda it: it["readings"][0].update(index=-1)),
        variant(lambda it: it["readings"][0].update(index=10 ** 30)),
        variant(lambda it: it["readings"][0].update(tx="é")),
        variant(lambda it: it["readings"][0].update(tx="")),
        variant(lambda it: it["readings"][0].update(path=[None, 3])),
        variant(lambda it: it["readings"][0].update(path="00")),
        variant(lambda it: it["readings"][0].pop("path")),
        variant(lambda it: it["readings"].append([])),
    ]
    resp, cs, records = trustee.decide(sign_request("coord", bad, COORD_SK))
    reasons = [v["reason"] for v in resp["items"]]
    assert cs == [] and all(isinstance(r, str) and r for r in reasons), reasons
    assert set(reasons) <= {"item_schema", "header_schema", "cert_schema", "bad_inclusion", "unknown_chain"}, reasons
    assert all(verify_decision(r, bls.SkToPk(trustee.sk)) for r in records)
