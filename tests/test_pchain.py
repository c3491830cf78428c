"""RV, placement by RV, and the P chain's app (in process, real BLS): placements and
receipts certified on the engine; forged, misplaced and duplicate receipts refused;
`stored` turning exactly past 2/3 of the chosen nodes."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest

from aggregator.pchainapp import (PChainApp, PGenesis, PNode, block_key, decode_block_leaf, dump_pgenesis,
                                  load_pgenesis, placement_tx, receipt_tx, stored_now)
from aggregator.receipts import StorageReceipt, sign_receipt
from aggregator.reliability import Credibility, Measure, cp_from_report, np_from_rtts, place, rank, rv, rv_key
from certlog import bls
from certlog.app import InvalidBlock
from certlog.block import Certificate, canonical
from certlog.mpt import Trie
from certlog.store import NodeDB

from storagekit import make_chain

NODES = {"s1": "full", "s2": "full", "h1": "heavy", "h2": "heavy", "l1": "light"}
NODE_SKS = {n: bls.KeyGen(bytes([i + 50]) * 32) for i, n in enumerate(NODES)}


# -- RV -------------------------------------------------------------------------------

def test_rv_is_cp_np_cre_over_root_of_load_plus_one():
    assert rv(Measure("a", 1000, 1000, 1000, 0)) == 1.0
    assert rv(Measure("a", 500, 1000, 1000, 3)) == 0.25                 # 0.5 / √4
    assert rv(Measure("a", 1000, 0, 1000, 0)) == 0.0                     # unreachable: last
    assert rv_key(Measure("a", 500, 1000, 1000, 3)) == Fraction(500 * 10**6, 1) ** 2 / 4


@pytest.mark.parametrize("field,value", [("cp", -1), ("np", 1001), ("cre", 0.5), ("t", -1), ("t", 1.0)])
def test_measures_out_of_range_are_refused(field, value):
    args = {"node": "a", "cp": 1000, "np": 1000, "cre": 1000, "t": 0, field: value}
    with pytest.raises(ValueError):
        Measure(**args)


def test_np_cp_and_credibility_terms():
    assert np_from_rtts([10.0, 12.0, 11.0], 50) == 1000                 # faster than the reference
    assert np_from_rtts([100.0, 200.0, 400.0], 50) == 250               # median 200 ms
    assert np_from_rtts([10.0, None], 50) == 0 and np_from_rtts([], 50) == 0   # missed the last probe
    assert cp_from_report(250, 1000) == 250 and cp_from_report(5, 0) == 1000
    assert cp_from_report(2000, 1000) == 1000 and cp_from_report(-3, 1000) == 0
    cre = Credibility(900)
    assert cre["h1"] == 900 and cre.adjust("h1", 300) == 1000 and cre.adjust("h1", -1200) == 0


def test_rank_prefers_high_rv_and_breaks_ties_by_block_hash():
    a, b, c = Measure("a", 1000, 1000, 1000, 0), Measure("b", 1000, 1000, 1000, 2), Measure("c", 1000, 500, 1000, 0)
    assert rank("00" * 32, [c, b, a]) == ["a", "b", "c"]               # 1, 1/√3 (load), 1/2 (network)
    twins = [Measure(n, 1000, 1000, 1000, 0) for n in ("x", "y")]
    orders = {tuple(rank(f"{i:064x}", twins)) for i in range(16)}
    assert orders == {("x", "y"), ("y", "x")}                           # ties spread over blocks
    assert rank("ab" * 32, twins) == rank("ab" * 32, twins[::-1])       # and never depend on input order


def test_place_gives_every_full_node_plus_the_best_replicas():
    snap = [Measure("h1", 1000, 1000, 1000, 5), Measure("h2", 1000, 1000, 1000, 0), Measure("l1", 100, 1000, 1000, 0)]
    assert place("00" * 32, ["s2", "s1"], snap, 2) == ("s1", "s2", "h2", "h1")
    assert place("00" * 32, ["s1"], snap, 0) == ("s1",)
    assert place("00" * 32, ["s1"], snap, 9) == ("s1", "h2", "h1", "l1")


def test_stored_needs_more_than_two_thirds():
    assert [stored_now(k, 4) for k in range(5)] == [False, False, False, True, True]
    assert [stored_now(k, 3) for k in range(4)] == [False, False, False, True]


# -- the app ------------------------------------------------------------------------

def make_bed():
    """Three certified area blocks, the P chain's app and its genesis (the NODES)."""
    blocks, vset, _ = make_chain(3)
    genesis = PGenesis("area1", 2, tuple(PNode(n, k, bls.SkToPk(NODE_SKS[n])) for n, k in NODES.items()))
    return blocks, PChainApp(genesis, vset), genesis


@pytest.fixture
def bed():
    return make_bed()


class State:
    """An app's state over an in-memory node store, block by block."""

    def __init__(self, app):
        self.app, self.nodes, self.root = app, NodeDB(None), app.genesis_root
        self.t = 1000

    def run(self, txs, *, trusted=False):
        self.t += 1
        out = self.app.execute(self.nodes, self.root, self.t, txs, trusted=trusted)
        self.root = out.state_root
        return out

    def block(self, height):
        raw = Trie(self.nodes, bytes.fromhex(self.root)).get(block_key(height))
        return decode_block_leaf(raw) if raw else None

    def load(self, node):
        from aggregator.pchainapp import node_key
        import rlp
        raw = Trie(self.nodes, bytes.fromhex(self.root)).get(node_key(node))
        return int.from_bytes(rlp.decode(raw)[0], "big") if raw else 0


def snapshot(st: State, genesis: PGenesis, **cp) -> list[Measure]:
    return [Measure(n, cp.get(n, 1000), 1000, 1000, st.load(n)) for n in genesis.candidates]


def placement(st, genesis, block, **cp):
    snap = snapshot(st, genesis, **cp)
    return placement_tx(block.cert, place(block.header.hash, genesis.full, snap, genesis.replicas), snap)


def receipt(block, node):
    return receipt_tx(sign_receipt(NODE_SKS[node], block.header, node, NODES[node]))


def test_placements_and_receipts_make_a_block_stored_exactly_past_two_thirds(bed):
    blocks, app, genesis = bed
    st = State(app)
    b1 = blocks[0]
    out = st.run([placement(st, genesis, b1, l1=100)])
    chosen = st.block(1)["nodes"]
    assert chosen[:2] == ["s1", "s2"] and sorted(chosen[2:]) == ["h1", "h2"] and len(chosen) == 4
    assert out.app == {"genesis": genesis.digest, "placements": 1, "receipts": 0, "replacements": 0, "stored": 0}
    st.run([receipt(b1, "s1"), receipt(b1, "h2")])
    assert st.block(1)["receipted"] == ["h2", "s1"] and not st.block(1)["stored"]   # 2 of 4: not > 2/3
    out = st.run([receipt(b1, "s2")])
    assert st.block(1)["stored"] and out.app["stored"] == 1                          # 3 of 4
    out = st.run([receipt(b1, "h1")])
    assert st.block(1)["stored"] and out.app["stored"] == 0                          # counted once
    assert st.load("h1") == st.load("h2") == 1 and st.load("l1") == 0
    # the next placement must carry the loads: h1 and h2 now have T = 1, so l1 ranks first
    st.run([placement(st, genesis, blocks[1])])
    assert st.block(2)["nodes"][2] == "l1"


def test_a_placement_and_its_receipts_may_share_a_block(bed):
    blocks, app, genesis = bed
    st = State(app)
    st.run([placement(st, genesis, blocks[0]), receipt(blocks[0], "s1"), receipt(blocks[0], "s2"),
            receipt(blocks[0], "h1")])
    assert st.block(1)["stored"] == (set(st.block(1)["nodes"]) >= {"s1", "s2", "h1"})


def test_placements_in_one_block_see_each_others_loads(bed):
    blocks, app, genesis = bed
    one, two = State(app), State(app)
    txs = []
    for b in blocks:
        txs.append(placement(two, genesis, b))
        two.run([txs[-1]])
    one.run(txs)
    assert one.root == two.root and [one.load(n) for n in genesis.candidates] == [2, 2, 2]


def _refused(st, txs, reason, *, trusted=False):
    with pytest.raises(InvalidBlock) as e:
        st.run(txs, trusted=trusted)
    assert e.value.reason == reason, e.value
    return e.value


def test_bad_receipts_are_refused_with_their_reasons(bed):
    blocks, app, genesis = bed
    st = State(app)
    b1, b2 = blocks[0], blocks[1]
    st.run([placement(st, genesis, b1, l1=100)])
    unplaced = next(n for n in genesis.candidates if n not in st.block(1)["nodes"])
    forged = sign_receipt(NODE_SKS["s2"], b1.header, "s1", "full")          # s2's key, s1's name
    _refused(st, [receipt_tx(forged)], "tx_bad_signature")
    _refused(st, [receipt(b1, unplaced)], "tx_not_placed")                   # not chosen for this block
    _refused(st, [receipt(b2, "s1")], "tx_not_placed")                       # block 2 is not placed yet
    _refused(st, [receipt(b1, "s1"), receipt(b1, "s1")], "tx_duplicate_receipt")
    st.run([receipt(b1, "s1")])
    _refused(st, [receipt(b1, "s1")], "tx_duplicate_receipt")                # across blocks too
    other = make_chain(1, tx_bytes=61)[0][0]                                 # another block at height 1
    _refused(st, [receipt(other, "s2")], "tx_wrong_block")
    wrong_kind = sign_receipt(NODE_SKS["s2"], b1.header, "s2", "heavy")
    _refused(st, [receipt_tx(wrong_kind)], "tx_wrong_kind")
    stranger = sign_receipt(NODE_SKS["s2"], b1.header, "x9", "full")
    _refused(st, [receipt_tx(stranger)], "tx_unknown_node")
    doc = json.loads(receipt(b1, "s2"))
    doc["receipt"]["chain"] = "area2"
    _refused(st, [canonical(doc)], "tx_wrong_chain")
    _refused(st, [receipt(b1, "s2") + b" "], "tx_not_canonical")
    _refused(st, [b'{"kind":"vote"}'], "tx_unknown_kind")


def test_bad_placements_are_refused_with_their_reasons(bed):
    blocks, app, genesis = bed
    st = State(app)
    b1 = blocks[0]
    good = json.loads(placement(st, genesis, b1))

    def variant(**change):
        return canonical({**good, **change})

    _refused(st, [variant(nodes=good["nodes"][::-1])], "tx_wrong_placement")
    _refused(st, [variant(snapshot=good["snapshot"][1:])], "tx_bad_snapshot")          # a node left out
    loaded = [dict(m, t=3) if m["node"] == "h1" else m for m in good["snapshot"]]
    _refused(st, [variant(snapshot=loaded)], "tx_snapshot_load")                       # T is not its load
    over = [dict(m, cp=1001) if m["node"] == "h1" else m for m in good["snapshot"]]
    _refused(st, [variant(snapshot=over)], "tx_bad_field")
    _refused(st, [variant(hash=blocks[1].header.hash)], "tx_bad_certificate")          # cert for another block
    _refused(st, [variant(cert=dict(good["cert"], signers=[0, 1]))], "tx_bad_certificate")   # short of quorum
    strangers = [bls.KeyGen(bytes([i + 90]) * 32) for i in range(4)]
    uncertified = make_chain(1, sks=strangers)[0][0]                                   # other validators
    _refused(st, [placement_tx(uncertified.cert, good["nodes"], [Measure(**m) for m in good["snapshot"]])],
             "tx_bad_certificate")
    st.run([canonical(good)])
    _refused(st, [canonical(good)], "tx_duplicate_placement")


def test_trusted_execution_gives_the_same_roots(bed):
    blocks, app, genesis = bed
    a, b = State(app), State(app)
    txs = [placement(a, genesis, blocks[0]), receipt(blocks[0], "s1"), receipt(blocks[0], "s2")]
    assert a.run(txs) == b.run(txs, trusted=True)


def test_genesis_round_trips_and_is_checked(tmp_path, bed):
    _, _, genesis = bed
    p = tmp_path / "pchain-genesis.toml"
    p.write_text(dump_pgenesis(genesis))
    assert load_pgenesis(p) == genesis and load_pgenesis(p).digest == genesis.digest
    assert genesis.full == ("s1", "s2") and genesis.candidates == ("h1", "h2", "l1")
    from gridledger.errors import ConfigError
    p.write_text(dump_pgenesis(genesis).replace('kind = "light"', 'kind = "tiny"'))
    with pytest.raises(ConfigError):
        load_pgenesis(p)


def test_receipt_and_certificate_fixtures_are_what_the_app_reads(bed):
    blocks, _, _ = bed
    r = sign_receipt(NODE_SKS["s1"], blocks[0].header, "s1", "full")
    assert StorageReceipt.from_dict(json.loads(receipt_tx(r))["receipt"]) == r
    assert isinstance(blocks[0].cert, Certificate)
