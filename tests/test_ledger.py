"""The coordinator's read side in process: exact, interval and state answers over a
certified chain verify, boundary() is right, and every tamper is refused with its reason."""

from __future__ import annotations

import copy
import json
import shutil

import pytest

from aggregator.areaapp import equivocation_alert
from aggregator.registry import MeterEntry, Registry
from certlog import merkle
from certlog.block import ChainError
from certlog.store import ChainStore, connect
from coordinator import txpaths
from coordinator.ledger import (AreaLedger, verify_exact, verify_interval, verify_interval_page,
                                verify_state_proof)
from gridledger.meterkeys import MeterKey
from gridledger.wire import make_reading

from chainkit import CHAIN, Area, certify, replica, validator_keys, validator_set, voters
from helpers import SimMeter

ACCOUNTS = {"m1": "acct-m1", "m2": "acct-m2", "x1": "acct-x", "x2": "acct-x"}  # x2 replaces x1


class Bed:
    """Seven certified blocks: m1 and m2 two readings a block, acct-x one a block on
    x1 until x2 replaces it in block 4, an equivocation alert in block 2."""

    def __init__(self, tmp):
        keys = {m: MeterKey(m, bytes([i + 1]) * 32) for i, m in enumerate(ACCOUNTS)}
        self.area = Area({m: SimMeter(k) for m, k in keys.items()},
                         Registry([MeterEntry(m, a, keys[m].public_hex) for m, a in ACCOUNTS.items()]))
        self.sks = validator_keys(4)
        self.vset = validator_set(self.sks)
        self.tmp = tmp
        vs = voters(tmp, self.area, self.sks)
        self.prop = replica(tmp / "gw.db", self.area, self.vset)
        self.ledger = AreaLedger(self.prop.store, CHAIN, registry=self.area.registry)
        self.prop.listeners.append(self.ledger.index)
        m = self.area.meters
        for b in range(1, 8):
            txs = [m[name].next(wh=b) for name in ("m1", "m1", "m2", "m2")]
            if b == 4:
                m["x2"].t = m["x1"].t  # the replacement's first interval follows the old meter's last
            txs.append(m["x1" if b < 4 else "x2"].next(wh=b))
            txs = [r.to_json() for r in txs]
            if b == 2:
                real = m["m2"].sent[-1]
                twin = make_reading(meter="m2", seq=real.seq, t=real.t, dt=real.dt, prev=real.prev, kid=real.kid,
                                    c=real.ciphertext + 2, sign=m["m2"].key.sign)
                txs.append(equivocation_alert(real, twin))
            certify(self.prop, vs, txs, voting=vs[:3])

    def sent(self, account: str):
        return [r for m, a in ACCOUNTS.items() if a == account for r in self.area.meters[m].sent]

    def times(self, account: str) -> list[int]:
        return [r.t for r in self.sent(account)]


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    return Bed(tmp_path_factory.mktemp("ledger"))


def wire(obj):
    """Through JSON, as an answer travels."""
    return json.loads(json.dumps(obj))


def reason(fn, *args, **kw) -> str:
    with pytest.raises(ChainError) as e:
        fn(*args, **kw)
    return e.value.reason


def test_the_index_holds_every_reading_and_skips_alerts(bed):
    assert bed.ledger.height == 7
    n = dict(bed.ledger.store.conn.execute(
        "SELECT account, COUNT(*) FROM ledger_readings JOIN ledger_accounts ON id = aid GROUP BY account"))
    assert n == {"acct-m1": 14, "acct-m2": 14, "acct-x": 7}


@pytest.mark.parametrize("account", ["acct-m1", "acct-x"])
def test_an_exact_answer_proves_the_latest_state_and_reading(bed, account):
    got = verify_exact(wire(bed.ledger.exact(account)), bed.vset, CHAIN, account=account)
    last = bed.sent(account)[-1]
    assert got.height == 7 and got.reading == last
    assert (got.state.meter, got.state.hash, got.state.count) == (last.meter, last.hash, len(bed.sent(account)))
    # ... and as of an earlier height: the state then, and that block's reading.
    old = verify_exact(wire(bed.ledger.exact(account, height=3)), bed.vset, CHAIN, account=account)
    assert old.height == 3 and old.state.count == len(bed.sent(account)) * 3 // 7 and old.reading.t == old.state.last_t


def test_an_unknown_account_is_proven_absent(bed):
    got = verify_exact(wire(bed.ledger.exact("acct-nobody")), bed.vset, CHAIN, account="acct-nobody")
    assert got.state is None and got.reading is None and got.height == 7
    assert verify_interval(wire(bed.ledger.interval("acct-nobody", 0, 2 ** 40)), bed.vset, CHAIN,
                           "acct-nobody", 0, 2 ** 40) == []


def windows(ts: list[int]) -> list[tuple[int, int]]:
    """Intervals over the edges: whole history, inside, one reading, exactly at a
    time, between two readings, before the first, after the last."""
    return [(0, ts[-1] + 10 ** 6), (ts[3], ts[-3]), (ts[2], ts[4]), (ts[3], ts[3]), (ts[2] + 1, ts[5] - 1), (ts[0] - 900, ts[0]),
            (0, ts[0] - 1), (ts[-1], ts[-1] + 900), (ts[-1] + 1, ts[-1] + 900), (ts[1], ts[-2])]


@pytest.mark.parametrize("account", ["acct-m1", "acct-m2", "acct-x"])
def test_interval_answers_are_exactly_the_readings_in_range(bed, account):
    ts = bed.times(account)
    for t1, t2 in windows(ts):
        got = verify_interval(wire(bed.ledger.interval(account, t1, t2)), bed.vset, CHAIN, account, t1, t2,
                              min_height=7)
        assert got == [r for r in bed.sent(account) if t1 <= r.t <= t2], (t1, t2)


def test_every_header_certified_when_asked(bed):
    ts = bed.times("acct-m1")
    resp = wire(bed.ledger.interval("acct-m1", ts[3], ts[9], certs="all"))
    assert all(e["cert"] for e in resp["headers"])
    got = verify_interval(resp, bed.vset, CHAIN, "acct-m1", ts[3], ts[9], require_certificates=True)
    assert [r.seq for r in got] == list(range(4, 11))
    linked = wire(bed.ledger.interval("acct-m1", ts[3], ts[9]))
    assert sum(1 for e in linked["headers"] if e["cert"]) == 1
    assert reason(verify_interval, linked, bed.vset, CHAIN, "acct-m1", ts[3], ts[9],
                  require_certificates=True) == "uncertified_header"


def test_pages_follow_the_cursor_and_a_page_is_not_a_whole_answer(bed):
    ts = bed.times("acct-x")
    t1, t2, got = ts[0], ts[-1], []
    while True:
        resp = wire(bed.ledger.interval("acct-x", t1, t2, limit=2))
        page = verify_interval_page(resp, bed.vset, CHAIN, "acct-x", t1, t2)
        got += page.readings
        if page.next is None:
            break
        assert reason(verify_interval, resp, bed.vset, CHAIN, "acct-x", t1, t2) == "partial_answer"
        t1 = page.next
    assert got == bed.sent("acct-x")


def test_boundary_is_the_greatest_height_whose_state_ends_before_t(bed):
    """Checked against the certified states themselves, at every height, for times
    before, at, between and after readings, across the meter replacement."""
    for account in ("acct-m1", "acct-x"):
        states = [verify_state_proof(wire(bed.ledger.state_proof(account, h)), bed.vset, CHAIN, account=account)
                  for h in range(1, 8)]
        for t in sorted({x + d for x in bed.times(account) for d in (-1, 0, 1)} | {0, 2 ** 40}):
            want = max([h for h, st in enumerate(states, 1) if st is not None and st.last_t < t], default=0)
            assert bed.ledger.boundary(account, t) == want, (account, t)


def test_boundary_cases(bed):
    m1, x = bed.times("acct-m1"), bed.times("acct-x")
    b = bed.ledger.boundary
    assert b("acct-m1", m1[0]) == 0 and b("acct-m1", m1[0] - 1) == 0  # nothing before the first reading
    assert b("acct-m1", m1[2]) == 1 and b("acct-m1", m1[3]) == 1      # a reading exactly at t is not before t
    assert b("acct-m1", m1[2] + 1) == 1   # seq 3 and 4 share block 2, and seq 4 is not before t
    assert b("acct-m1", m1[3] + 1) == 2
    assert b("acct-x", x[3]) == 3 and b("acct-x", x[3] + 1) == 4      # the account continues on x2 in block 4
    assert b("acct-x", x[-1] + 1) == 7 and b("acct-nobody", x[-1]) == 0
    assert b("acct-m1", m1[-1] + 1, height=5) == 5


def test_a_reopened_ledger_catches_up_and_indexing_is_idempotent(bed, tmp_path):
    """A copy of the replica with no index indexes every block on catch_up; a second
    catch_up and a repeated listener call change nothing; answers are the same."""
    bed.prop.store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    shutil.copy(bed.tmp / "gw.db", tmp_path / "copy.db")
    conn = connect(tmp_path / "copy.db")
    for table in ("ledger_blocks", "ledger_accounts", "ledger_readings"):
        conn.execute(f"DELETE FROM {table}")
    led = AreaLedger(ChainStore(conn), CHAIN, registry=bed.area.registry)
    assert led.height == 0 and reason(led.exact, "acct-m1") == "empty_chain"
    assert led.catch_up() == 7 and led.catch_up() == 0
    header, _ = led.certified(5)
    led.index(header, led.store.txs(5))
    assert conn.execute("SELECT COUNT(*) FROM ledger_readings").fetchone()[0] == 35
    ts = bed.times("acct-x")
    assert led.interval("acct-x", ts[1], ts[5]) == bed.ledger.interval("acct-x", ts[1], ts[5])


def test_an_index_in_the_old_layout_is_rebuilt_from_the_blocks(bed, tmp_path):
    """A ledger file from before readings were kept in the index (no `data` column)
    is dropped on open and rebuilt by catch_up; answers are the same as before."""
    bed.prop.store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    shutil.copy(bed.tmp / "gw.db", tmp_path / "old.db")
    conn = connect(tmp_path / "old.db")
    conn.executescript("DROP TABLE ledger_readings; CREATE TABLE ledger_readings (aid INTEGER NOT NULL, "
                       "n INTEGER NOT NULL, t INTEGER NOT NULL, height INTEGER NOT NULL, idx INTEGER NOT NULL, "
                       "fresh INTEGER NOT NULL, path BLOB NOT NULL, PRIMARY KEY (aid, n)) WITHOUT ROWID;")
    led = AreaLedger(ChainStore(conn), CHAIN, registry=bed.area.registry)
    assert led.height == 0 and conn.execute("SELECT COUNT(*) FROM ledger_accounts").fetchone()[0] == 0
    assert led.catch_up() == 7
    ts = bed.times("acct-m1")
    assert led.interval("acct-m1", ts[0], ts[-1]) == bed.ledger.interval("acct-m1", ts[0], ts[-1])
    assert led.exact("acct-x") == bed.ledger.exact("acct-x")


def test_a_registry_that_disagrees_with_the_certified_state_stops_the_index(bed, tmp_path):
    bed.prop.store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    shutil.copy(bed.tmp / "gw.db", tmp_path / "copy.db")
    conn = connect(tmp_path / "copy.db")
    for table in ("ledger_blocks", "ledger_accounts", "ledger_readings"):
        conn.execute(f"DELETE FROM {table}")
    wrong = Registry([MeterEntry(m, "acct-m2" if m == "m1" else a, f"{i:064x}")
                      for i, (m, a) in enumerate(ACCOUNTS.items())])
    led = AreaLedger(ChainStore(conn), CHAIN, registry=wrong)
    with pytest.raises(ChainError) as e:
        led.catch_up()
    assert (e.value.reason, e.value.height) == ("index_mismatch", 1)


def test_bad_queries_are_refused_with_a_reason(bed):
    led = bed.ledger
    assert reason(led.interval, "acct-m1", 10, 5) == "bad_query"
    assert reason(led.interval, "acct-m1", -1, 5) == "bad_query"
    assert reason(led.interval, "acct-m1", 0, 5, limit=0) == "bad_query"
    assert reason(led.exact, "") == "bad_query" and reason(led.exact, "x" * 65) == "bad_query"
    assert reason(led.exact, "acct-m1", height=8) == "unknown_height"
    assert reason(led.state_proof, "acct-m1", 0) == "unknown_height"
    assert reason(led.certified, 99) == "unknown_height"


@pytest.mark.parametrize("n", [1, 2, 3, 15, 16, 17, 31, 32, 33, 255, 256, 257, 1000])
def test_the_stored_paths_are_the_paths_certlog_merkle_gives(n):
    txs = [b"tx %d" % i for i in range(n)]
    assert [txpaths.split(p) for p in txpaths.paths(txs, range(n))] == [merkle.path(txs, i) for i in range(n)]
    with pytest.raises(IndexError):
        txpaths.paths(txs, [n])


# -- tampering -------------------------------------------------------------------

def flip(s: str, i: int) -> str:
    """One hex digit (or character) changed, still hex where it was."""
    return s[:i] + ("1" if s[i] == "0" else "0") + s[i + 1:]


def _interval(bed, account="acct-m1"):
    ts = bed.times(account)
    return ts[3], ts[9], wire(bed.ledger.interval(account, ts[3], ts[9]))


def _in_range(resp, t1, t2) -> list[int]:
    return [i for i, r in enumerate(resp["readings"]) if t1 <= json.loads(r["tx"])["t"] <= t2]


def tamper(bed, kind):
    t1, t2, resp = _interval(bed)
    rs, hs = resp["readings"], resp["headers"]
    inside = _in_range(resp, t1, t2)
    if kind == "omit_first":
        del rs[inside[0]]
    elif kind == "omit_middle":
        del rs[inside[3]]
    elif kind == "omit_last":
        del rs[-1]  # the reading just after t2, which the upper anchor's state holds
    elif kind == "omit_last_in_range":
        del rs[inside[-1]]
    elif kind == "insert_other_account":
        other = wire(bed.ledger.interval("acct-m2", t1, t2))["readings"][2]
        rs.append(other)
        rs.sort(key=lambda r: (r["height"], r["index"]))
    elif kind == "forged_reading":
        r = bed.area.meters["m1"].sent[5]
        fake = make_reading(meter="m1", seq=r.seq, t=r.t, dt=r.dt, prev=r.prev, kid=r.kid, c=r.ciphertext + 1,
                            sign=bed.area.meters["m1"].key.sign)  # a genuine signature, never certified
        rs[inside[2]]["tx"] = fake.to_json().decode()
    elif kind == "reordered":
        rs[inside[1]], rs[inside[2]] = rs[inside[2]], rs[inside[1]]
    elif kind == "tx_byte":
        rs[inside[1]]["tx"] = flip(rs[inside[1]]["tx"], 300)
    elif kind == "path_byte":
        rs[inside[1]]["path"][0] = flip(rs[inside[1]]["path"][0], 7)
    elif kind == "proof_byte":
        resp["anchors"][-1]["proof"][0] = flip(resp["anchors"][-1]["proof"][0], 20)
    elif kind == "leaf_swapped":
        resp["anchors"][-1]["leaf"] = resp["anchors"][0]["leaf"]
    elif kind == "linked_header_byte":
        hs[1]["header"]["time"] += 1
    elif kind == "top_header_byte":
        hs[-1]["header"]["tx_root"] = flip(hs[-1]["header"]["tx_root"], 0)
    elif kind == "cert_byte":
        hs[-1]["cert"]["sig"] = flip(hs[-1]["cert"]["sig"], 10)
    elif kind == "cert_too_few_signers":
        hs[-1]["cert"]["signers"] = hs[-1]["cert"]["signers"][:2]
    elif kind == "reading_from_other_height":
        rs[inside[1]]["height"] += 1
    elif kind == "header_of_other_height":
        header, cert = bed.ledger.certified(7)
        hs[-1] = {"header": header.to_dict(), "cert": cert.to_dict()}
    elif kind == "lower_anchor_too_late":
        resp["anchors"][0] = wire(bed.ledger.state_proof("acct-m1", resp["anchors"][0]["height"] + 1))
        resp["anchors"][0] = {k: resp["anchors"][0][k] for k in ("height", "leaf", "proof")}
    elif kind == "other_chain":
        for e in hs:
            e["header"]["chain"] = "area2"
    return t1, t2, resp


@pytest.mark.parametrize("kind, expected", [
    ("omit_first", "broken_chain"),
    ("omit_middle", "broken_chain"),
    ("omit_last", "anchor_mismatch"),
    ("omit_last_in_range", "broken_chain"),
    ("insert_other_account", "broken_chain"),
    ("forged_reading", "bad_merkle_path"),
    ("reordered", "reading_order"),
    ("tx_byte", "bad_merkle_path"),
    ("path_byte", "bad_merkle_path"),
    ("proof_byte", "bad_state_proof"),
    ("leaf_swapped", "bad_state_proof"),
    ("linked_header_byte", "unlinked_header"),
    ("top_header_byte", "cert_mismatch"),
    ("cert_byte", "cert_signature"),
    ("cert_too_few_signers", "cert_quorum"),
    ("reading_from_other_height", "bad_merkle_path"),
    ("header_of_other_height", "unlinked_header"),
    ("lower_anchor_too_late", "incomplete_start"),
    ("other_chain", "wrong_chain"),
])
def test_a_tampered_interval_answer_is_refused_with_its_reason(bed, kind, expected):
    t1, t2, resp = tamper(bed, kind)
    assert reason(verify_interval, resp, bed.vset, CHAIN, "acct-m1", t1, t2) == expected


def test_the_untampered_answer_of_the_tamper_tests_verifies(bed):
    t1, t2, resp = tamper(bed, "none")
    assert len(verify_interval(resp, bed.vset, CHAIN, "acct-m1", t1, t2)) == 7


def test_an_answer_about_another_account_or_range_is_refused(bed):
    t1, t2, resp = _interval(bed)
    assert reason(verify_interval, resp, bed.vset, CHAIN, "acct-m2", t1, t2) == "wrong_account"
    assert reason(verify_interval, resp, bed.vset, CHAIN, "acct-m1", t1 - 1, t2) == "wrong_interval"
    resp["to"] = t2 + 5  # a server claiming more than was asked
    assert reason(verify_interval, resp, bed.vset, CHAIN, "acct-m1", t1, t2) == "wrong_interval"


def test_a_stale_answer_is_refused_when_the_client_knows_a_later_head(bed):
    ts = bed.times("acct-m1")
    t1, t2 = ts[10], ts[-1] + 900  # reaching past the last reading: complete only as of its height
    old = wire(bed.ledger.interval("acct-m1", t1, t2, height=6))
    assert len(verify_interval(old, bed.vset, CHAIN, "acct-m1", t1, t2)) == 2  # true as of height 6
    assert reason(verify_interval, old, bed.vset, CHAIN, "acct-m1", t1, t2, min_height=7) == "stale_answer"
    ex = wire(bed.ledger.exact("acct-m1", height=6))
    assert reason(verify_exact, ex, bed.vset, CHAIN, account="acct-m1", min_height=7) == "stale_answer"


def test_a_replacement_history_cannot_be_spliced(bed):
    """acct-x moved from x1 to x2 in block 4: the answer carries a state anchor
    just before that block; without it, or with another meter's chain spliced
    in for x1's, the answer is refused."""
    ts = bed.times("acct-x")
    t1, t2 = 0, ts[-1]
    resp = wire(bed.ledger.interval("acct-x", t1, t2))
    assert [a["height"] for a in resp["anchors"]] == [0, 3, 7]
    assert verify_interval(resp, bed.vset, CHAIN, "acct-x", t1, t2) == bed.sent("acct-x")
    dropped = copy.deepcopy(resp)
    del dropped["anchors"][1]
    assert reason(verify_interval, dropped, bed.vset, CHAIN, "acct-x", t1, t2) == "unpinned_segment"
    # m2's first three readings (blocks 1-2) in place of x1's three, the anchor dropped:
    # the count still fits, a hash chain links them, only the pinning rule catches it.
    spliced = copy.deepcopy(dropped)
    m2 = wire(bed.ledger.interval("acct-m2", 0, bed.times("acct-m2")[2]))["readings"][:3]
    spliced["readings"] = m2 + spliced["readings"][3:]
    spliced["readings"].sort(key=lambda r: (r["height"], r["index"]))
    assert reason(verify_interval, spliced, bed.vset, CHAIN, "acct-x", t1, t2) == "unpinned_segment"
    # From x1's second reading: anchors at 1 (x1 seq 1) and 3 (x1 seq 3). Dropping x1's
    # last reading and the anchor that holds it leaves one fresh start; the count is off.
    resp = wire(bed.ledger.interval("acct-x", ts[1], t2))
    assert [a["height"] for a in resp["anchors"]] == [1, 3, 7]
    del resp["anchors"][1]
    del resp["readings"][1]
    assert reason(verify_interval, resp, bed.vset, CHAIN, "acct-x", ts[1], t2) == "count_mismatch"


@pytest.mark.parametrize("kind, expected", [
    ("older_reading", "anchor_mismatch"), ("leaf_byte", "bad_state_proof"), ("state_height", "bad_state_proof"),
    ("no_reading", "answer_schema"), ("other_account", "wrong_account"),
])
def test_a_tampered_exact_answer_is_refused(bed, kind, expected):
    resp = wire(bed.ledger.exact("acct-m1"))
    if kind == "older_reading":
        resp = wire(bed.ledger.exact("acct-m1"))
        resp["reading"]["index"] = 0  # seq 13, the block's first reading of m1
        resp["reading"]["tx"] = bed.area.meters["m1"].sent[-2].to_json().decode()
        resp["reading"]["path"] = wire(bed.ledger.interval("acct-m1", *[bed.times("acct-m1")[-2]] * 2))[
            "readings"][-2]["path"]
    elif kind == "leaf_byte":
        resp["state"]["leaf"] = flip(resp["state"]["leaf"], 40)
    elif kind == "state_height":
        resp["headers"] = wire(bed.ledger.exact("acct-m1", height=6, certs="all"))["headers"] + resp["headers"]
        resp["state"]["height"] = 6
    elif kind == "no_reading":
        resp["reading"] = None
    elif kind == "other_account":
        resp["account"] = "acct-m2"
    account = "acct-m1"
    got = reason(verify_exact, resp, bed.vset, CHAIN, account=account)
    assert got == expected


@pytest.mark.parametrize("kind, expected", [
    ("none", None), ("leaf_byte", "bad_state_proof"), ("proof_truncated", "bad_state_proof"),
    ("header_of_other_height", "cert_mismatch"), ("cert_too_few_signers", "cert_quorum"),
    ("height_label", "wrong_height"), ("other_account", "wrong_account"),
])
def test_a_state_proof_for_settlement(bed, kind, expected):
    obj = wire(bed.ledger.state_proof("acct-x", 5))
    if kind == "leaf_byte":
        obj["leaf"] = flip(obj["leaf"], 30)
    elif kind == "proof_truncated":
        obj["proof"] = obj["proof"][:-1]
    elif kind == "header_of_other_height":
        obj["header"] = wire(bed.ledger.state_proof("acct-x", 4))["header"]
        obj["height"] = 4
    elif kind == "cert_too_few_signers":
        obj["cert"]["signers"] = [0, 1]
    elif kind == "height_label":
        obj["height"] = 4
    elif kind == "other_account":
        obj["account"] = "acct-m1"
    if expected is None:
        st = verify_state_proof(obj, bed.vset, CHAIN, account="acct-x")
        assert (st.meter, st.seq, st.count) == ("x2", 2, 5)
    else:
        assert reason(verify_state_proof, obj, bed.vset, CHAIN, account="acct-x") == expected


def test_stores_are_created_with_8_kib_pages(tmp_path):
    """A reading (~1.35 KB) fits in an 8 KiB page; in SQLite's default 4 KiB page it
    would spill into an overflow page of its own (~3.4x the disk)."""
    from aggregator.store import GatewayStore
    store = GatewayStore(tmp_path / "gateway.db")
    assert store.db.execute("PRAGMA page_size").fetchone()[0] == 8192
    conn = connect(tmp_path / "chain.db")
    ChainStore(conn)
    assert conn.execute("PRAGMA page_size").fetchone()[0] == 8192
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
