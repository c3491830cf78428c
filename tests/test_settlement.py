"""Trustee policy, threshold decryption of certified totals, bills and verify-bill:
in-process over real certified chains in SQLite (the processes are in
test_settlement_network.py)."""

from __future__ import annotations

import copy
import json

import pytest

from aggregator.areaapp import AccountState
from certlog import bls
from certlog.store import connect
from coordinator.decrypt import bill_item, check_bill_item, sign_request
from coordinator.settle import InvalidBill, Period, bill_id, covers, make_bill, verify_bill
from coordinator.tariff import Tariff
from coordinator.threshold import PartialBatch
from coordinator.trustee import Policy, Trustee, verify_decision
from gridledger.wire import unpack_slots

from settlekit import AREA, START, build_world

COORD_SK = bls.KeyGen(b"\x33" * 32)
COORD_PK = bls.SkToPk(COORD_SK)
POLICY = Policy(min_readings=10, min_period_s=3600)
TARIFF = Tariff.from_dict({
    "name": "test time-of-use", "currency": "EUR", "minor_units": 2, "standing_charge_per_day": "0.30",
    "band": [{"band": b, "name": f"band {b}", "import_per_kwh": f"0.{10 + b}", "export_per_kwh": "0.05"}
             for b in range(8)]})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def make_trustee(world, tmp, i: int, policy: Policy = POLICY) -> Trustee:
    tmp.mkdir(parents=True, exist_ok=True)
    return Trustee(f"t{i + 1}", world.shares[i], bls.KeyGen(bytes([0x60 + i]) * 32), COORD_PK, {AREA: world.vset},
                   policy, connect(tmp / f"trustee{i}.db"))


def item(world, account: str, h0: int, h1: int) -> dict:
    return bill_item(AREA, account, world.ledger.state_proof(account, h0) if h0 else None,
                     world.ledger.state_proof(account, h1))


def ask(trustees, items, sk=COORD_SK):
    """Each trustee's response to one signed request (with partials)."""
    req = sign_request("coord", items, sk)
    return [t.answer(json.loads(json.dumps(req)))[0] for t in trustees]


def settle_one(world, trustees, account: str, period: Period) -> dict:
    h0, h1 = world.ledger.boundary(account, period.start + 1), world.ledger.boundary(account, period.end + 1)
    it = item(world, account, h0, h1)
    f = check_bill_item(it, {AREA: world.vset}, world.key.kid, world.key.nsquare)
    answers = ask(trustees, [it])
    assert all(a["items"][0]["status"] == "accepted" for a in answers), answers
    batches = [PartialBatch.from_dict(a["partials"]) for a in answers]
    plain = world.key.combine([f.c], batches).plaintexts[0]
    return make_bill(chain=AREA, account=account, period=period, start=it["from"], end=it["to"],
                     slots=unpack_slots(plain), readings=f.readings, tariff=TARIFF, covered=covers(f), key_proof=world.key_proof(),
                     registry_chain="registry", cs=[f.c], position=0, batches=batches)


def test_bills_equal_the_truth_with_every_pair_of_trustees(world, tmp_path):
    """The period's ends fall between blocks here (blocks of 2 h): the bill is exact."""
    period = Period("p", START, START + 8 * 3600)
    for pair in [(0, 1), (1, 2), (0, 2)]:
        trustees = [make_trustee(world, tmp_path / f"{pair}", i) for i in pair]
        for account in world.accounts:
            bill = settle_one(world, trustees, account, period)
            assert bill["energy_wh"] == world.truth_between(account, period.start, period.end)
            expected = sum(1 for t, _ in world.truth[account] if period.start < t <= period.end)
            assert bill["readings"] == expected == 32
            assert (bill["covers"]["after_t"], bill["covers"]["through_t"]) == (period.start, period.end)
            summary = verify_bill(json.loads(json.dumps(bill)), world.vset)
            assert summary["total"] == TARIFF.charge(bill["energy_wh"], period.days).total


def _state(world, account, h) -> AccountState:
    return AccountState.decode(bytes.fromhex(world.ledger.state_proof(account, h)["leaf"]))


def test_policy_refuses_and_logs_signed_decisions(world, tmp_path):
    acct = world.accounts[0]
    head = world.area.height
    t = make_trustee(world, tmp_path, 0)
    cases = {
        "single_interval": item(world, acct, head - 1, head),           # the tail blocks hold one reading each
        "too_few_readings": item(world, acct, 1, 2),                    # 8 readings < 10
    }
    forged = item(world, acct, 1, 4)
    leaf = bytearray.fromhex(forged["to"]["leaf"])
    leaf[-1] ^= 1
    forged["to"]["leaf"] = leaf.hex()
    cases["bad_state_proof"] = forged
    short = item(world, acct, 1, 4)
    short["to"]["cert"]["signers"] = short["to"]["cert"]["signers"][:2]
    cases["cert_quorum"] = short
    moved = item(world, acct, 1, 4)
    moved["to"]["header"]["time"] += 1
    cases["cert_mismatch"] = moved
    other = item(world, acct, 1, 4)
    other["chain"] = "elsewhere"
    cases["unknown_chain"] = other
    resp, cs, records = t.decide(sign_request("coord", list(cases.values()), COORD_SK))
    assert [v["reason"] for v in resp["items"]] == list(cases), resp
    assert cs == []
    pk = bls.SkToPk(t.sk)
    assert len(records) == len(cases) and all(verify_decision(r, pk) for r in records)
    forged_rec = dict(records[0], verdict="accepted")
    assert not verify_decision(forged_rec, pk)
    rows = t.conn.execute("SELECT verdict, reason FROM trustee_decisions").fetchall()
    assert rows == [("refused", r) for r in cases]

    # Too short in time: 16 readings of 15 minutes are 4 hours.
    strict = make_trustee(world, tmp_path / "strict", 1, Policy(min_readings=10, min_period_s=5 * 3600))
    resp, _, _ = strict.decide(sign_request("coord", [item(world, acct, 1, 3)], COORD_SK))
    assert resp["items"][0]["reason"] == "period_too_short"

    # Not signed by the coordinator: refused whole, and logged.
    resp, cs, records = t.decide(sign_request("coord", [item(world, acct, 0, 4)], bls.KeyGen(b"\x44" * 32)))
    assert resp["reason"] == "bad_request_signature" and cs == [] and records[0]["reason"] == "bad_request_signature"
    resp, _, _ = t.decide({"v": 1, "items": "x"})
    assert resp["reason"] == "request_schema"


def test_no_differencing_across_requests(world, tmp_path):
    """[0, h3) and then [0, h4) would subtract to one block of 8 readings: refused.
    A bill that starts where the last one ended is fine, and asking again is idempotent."""
    acct = world.accounts[1]
    t = make_trustee(world, tmp_path, 2)
    ok = lambda *hs: t.decide(sign_request("coord", [item(world, acct, *hs)], COORD_SK))[0]["items"][0]  # noqa
    assert ok(0, 3)["status"] == "accepted"                      # 24 readings
    assert ok(0, 4)["reason"] == "overlaps_decrypted"            # 32 - 24 = 8 < 10
    assert ok(2, 5)["reason"] == "overlaps_decrypted"            # cut at 16: 24 - 16 = 8
    assert ok(3, 5)["status"] == "accepted"                      # 24 -> 40
    assert ok(0, 3)["status"] == "accepted"                      # the same question again
    # Fresh state: a restarted trustee remembers its boundaries.
    again = Trustee(t.name, t.share, t.sk, COORD_PK, t.validators, POLICY, connect(tmp_path / "trustee2.db"))
    resp = again.decide(sign_request("coord", [item(world, acct, 0, 4)], COORD_SK))[0]
    assert resp["items"][0]["reason"] == "overlaps_decrypted"


def test_partials_from_a_lying_trustee_are_caught_and_named(world, tmp_path):
    acct = world.accounts[2]
    trustees = [make_trustee(world, tmp_path, i) for i in range(3)]
    it = item(world, acct, 0, 5)
    f = check_bill_item(it, {AREA: world.vset}, world.key.kid, world.key.nsquare)
    answers = ask(trustees, [it])
    batches = [PartialBatch.from_dict(a["partials"]) for a in answers]
    liar = batches[1]
    bad = PartialBatch(liar.index, (liar.values[0] * 4 % world.key.nsquare,), liar.e, liar.z)
    combined = world.key.combine([f.c], [batches[0], bad, batches[2]])
    assert set(combined.bad) == {bad.index} and combined.used == (batches[0].index, batches[2].index)
    readings = _state(world, acct, 5).count
    assert f.readings == readings == 40
    assert unpack_slots(combined.plaintexts[0]) == world.truth_between(acct, 0, world.truth[acct][readings - 1][0])


def test_verify_bill_rejects_any_altered_field_proof_or_certificate(world, tmp_path):
    trustees = [make_trustee(world, tmp_path, i) for i in (0, 2)]
    period = Period("p", START, START + 8 * 3600)
    bill = settle_one(world, trustees, world.accounts[0], period)
    verify_bill(copy.deepcopy(bill), world.vset)

    def edit(path, fn):
        b = copy.deepcopy(bill)
        *parents, last = path
        obj = b
        for p in parents:
            obj = obj[p]
        obj[last] = fn(obj[last])
        return b

    flip_hex = lambda h: h[:-1] + ("0" if h[-1] != "0" else "1")  # noqa: E731
    edits = {
        ("account",): lambda v: "acct-m1",
        ("readings",): lambda v: v + 1,
        ("covers", "through_t"): lambda v: v - 900,
        ("energy_wh", 0): lambda v: v + 1,
        ("period", "to"): lambda v: v - 7 * 3600,
        ("charges", "total"): lambda v: "0.00",
        ("tariff", "standing_charge_per_day"): lambda v: "0.31",
        ("proofs", "to", "leaf"): flip_hex,
        ("proofs", "to", "proof", 0): flip_hex,
        ("proofs", "to", "cert", "sig"): flip_hex,
        ("proofs", "to", "header", "time"): lambda v: v + 1,
        ("proofs", "from", "height"): lambda v: v + 1,
        ("proofs", "key", "state", "leaf"): flip_hex,
        ("proofs", "decryption", "ciphertexts", 0): flip_hex,
        ("proofs", "decryption", "partials", 0, "z"): flip_hex,
        ("proofs", "decryption", "partials", 1, "values", 0): flip_hex,
    }
    for path, fn in edits.items():
        tampered = edit(path, fn)
        with pytest.raises(InvalidBill) as exc:       # caught by its id ...
            verify_bill(tampered, world.vset)
        assert exc.value.reason == "bill_id", path
        tampered["bill_id"] = bill_id(tampered)      # ... and by the check it breaks
        with pytest.raises(InvalidBill) as exc:
            verify_bill(tampered, world.vset)
        assert exc.value.reason != "bill_id", path
    dropped = copy.deepcopy(bill)
    dropped["proofs"]["decryption"]["partials"].pop()
    dropped["bill_id"] = bill_id(dropped)
    with pytest.raises(InvalidBill, match="too_few_partials"):
        verify_bill(dropped, world.vset)
    with pytest.raises(InvalidBill):
        verify_bill({"v": 1}, world.vset)
