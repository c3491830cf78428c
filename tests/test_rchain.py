"""Audits in process (real BLS): the CRE rule, audit outcomes judged from signed answers,
the R chain's app (forged answers claimed ok and correct answers claimed wrong
refused, duplicates, state recomputed from outcomes) and the P chain's `replace`."""

from __future__ import annotations

import json
import math
import os

import pytest

from aggregator.auditor import Question, ask_question, judge, next_gap
from aggregator.pchainapp import placement_tx, replace_tx, replacement
from aggregator.rchainapp import RChainApp, audit_tx, decode_node_leaf, node_key
from aggregator.receipts import AuditAnswer, answer_audit, audit_outcome
from aggregator.reliability import CRE_DROP, Credibility, Measure, cre_after, place
from certlog import bls
from certlog.app import InvalidBlock
from certlog.block import ChainError, canonical
from certlog.mpt import Trie

from storagekit import make_chain
from test_pchain import NODE_SKS, State, make_bed, receipt, snapshot


@pytest.fixture
def bed():
    return make_bed()


# -- the CRE rule ------------------------------------------------------------------

def test_cre_rule_small_gain_toward_1000_and_drops_by_outcome_bounded():
    assert cre_after(1000, "ok") == 1000 and cre_after(600, "ok") == 640 and cre_after(995, "ok") == 996
    assert cre_after(1000, "wrong") == 600 and cre_after(1000, "missing") == 900 and cre_after(1000, "late") == 950
    assert cre_after(300, "wrong") == 0 and cre_after(0, "ok") == 100                 # bounded [0, 1000]
    assert CRE_DROP["wrong"] > CRE_DROP["missing"] > CRE_DROP["late"] > 0
    cre = Credibility(1000)
    assert cre.record("h1", "wrong") == 600 and cre.record("h1", "ok") == 640 and cre["h2"] == 1000
    with pytest.raises(KeyError):
        cre_after(1000, "maybe")


# -- outcomes from answers ---------------------------------------------------------------

@pytest.fixture
def block():
    blocks, vset, _ = make_chain(2, txs_per_block=6)
    return blocks[0], vset


def _answer(b, node="h1", index=3, nonce=None, txs=None):
    nonce = nonce or os.urandom(16).hex()
    return answer_audit(NODE_SKS[node], node, b.header, txs or b.txs, index, nonce), nonce


def test_audit_outcome_is_ok_for_a_right_answer_and_wrong_only_for_the_nodes_own_signed_bad_data(block):
    b, _ = block
    pk = bls.SkToPk(NODE_SKS["h1"])
    a, nonce = _answer(b)
    assert audit_outcome(a, b.header, nonce=nonce, index=3, node="h1", public_key=pk) == "ok"
    corrupt = list(b.txs)
    corrupt[3] = corrupt[3].replace(b'"i":3', b'"i":4')                   # the node's store holds a flipped byte
    bad, nonce = _answer(b, txs=corrupt)
    assert audit_outcome(bad, b.header, nonce=nonce, index=3, node="h1", public_key=pk) == "wrong"
    # an altered path under the node's real signature: no longer its answer, so proof of nothing
    tampered = AuditAnswer.from_dict(dict(a.to_dict(), path=list(reversed(a.path))))
    with pytest.raises(ChainError) as e:
        audit_outcome(tampered, b.header, nonce=a.nonce, index=3, node="h1", public_key=pk)
    assert e.value.reason == "audit_bad_path"
    other, _ = _answer(b, node="h2", txs=corrupt)                         # another node's bad data
    with pytest.raises(ChainError):
        audit_outcome(other, b.header, nonce=other.nonce, index=3, node="h1", public_key=pk)


# -- the R chain's app ------------------------------------------------------------------

@pytest.fixture
def rbed(bed):
    blocks, papp, genesis = bed
    return blocks, State(RChainApp(genesis, papp.area_validators)), genesis


def record(b, node, outcome, cre, *, answer=None, nonce=None, index=3, asked=1000, at=1200):
    nonce = nonce or (answer.nonce if answer else os.urandom(16).hex())
    return audit_tx(node=node, header=b.header, cert=b.cert, index=index, nonce=nonce, outcome=outcome,
                    answer=answer, asked=asked, at=at, cre=cre)


def r_node(st, node):
    raw = Trie(st.nodes, bytes.fromhex(st.root)).get(node_key(node))
    return decode_node_leaf(raw) if raw else None


def _refused(st, txs, reason, *, trusted=False):
    with pytest.raises(InvalidBlock) as e:
        st.run(txs, trusted=trusted)
    assert e.value.reason == reason, e.value


def test_the_r_chain_recomputes_cre_from_outcomes_and_counts_them(rbed):
    blocks, st, genesis = rbed
    b = blocks[0]
    ok, _ = _answer(b)
    corrupt = [t + b" " for t in b.txs]
    bad, _ = _answer(b, txs=corrupt)
    out = st.run([record(b, "h1", "ok", 1000, answer=ok), record(b, "h1", "wrong", 600, answer=bad),
                  record(b, "h2", "missing", 900), record(b, "h1", "late", 550, at=9000)])
    assert out.app == {"genesis": genesis.digest, "ok": 1, "wrong": 1, "late": 1, "missing": 1}
    assert r_node(st, "h1") == {"cre": 550, "ok": 1, "wrong": 1, "late": 1, "missing": 0}
    assert r_node(st, "h2") == {"cre": 900, "ok": 0, "wrong": 0, "late": 0, "missing": 1}
    assert r_node(st, "l1") is None
    _refused(st, [record(b, "h1", "ok", 1000, answer=_answer(b)[0])], "tx_wrong_cre")    # 550 -> 595, not 1000
    st.run([record(b, "h1", "ok", 595, answer=_answer(b)[0])])
    assert r_node(st, "h1")["cre"] == 595


def test_forged_or_misjudged_answers_are_refused(rbed):
    blocks, st, _ = rbed
    b = blocks[0]
    good, _ = _answer(b)
    bad, _ = _answer(b, txs=[t + b" " for t in b.txs])
    _refused(st, [record(b, "h1", "wrong", 600, answer=good)], "tx_wrong_outcome")   # a right answer called wrong
    _refused(st, [record(b, "h1", "ok", 1000, answer=bad)], "tx_wrong_outcome")      # bad data called ok
    forged, _ = _answer(b, node="h2")                                                 # h2's key, h1's name
    forged = AuditAnswer.from_dict(dict(forged.to_dict(), node="h1"))
    _refused(st, [record(b, "h1", "ok", 1000, answer=forged)], "tx_bad_answer")
    _refused(st, [record(b, "h1", "wrong", 600, answer=forged)], "tx_bad_answer")
    _refused(st, [record(b, "h1", "ok", 1000, answer=good, nonce=os.urandom(16).hex())], "tx_bad_answer")
    _refused(st, [record(b, "h1", "ok", 1000, answer=good, index=2)], "tx_bad_answer")  # another question
    _refused(st, [record(b, "h1", "missing", 900, answer=good)], "tx_bad_field")       # missing with an answer
    _refused(st, [record(b, "h1", "ok", 1000)], "tx_bad_field")                       # ok without one
    _refused(st, [record(b, "h1", "missing", 900, asked=2000, at=1000)], "tx_bad_field")
    _refused(st, [record(b, "h1", "missing", 900, index=6)], "tx_bad_field")          # beyond the block
    _refused(st, [record(b, "x9", "missing", 900)], "tx_unknown_node")
    other = make_chain(1, tx_bytes=61)[0][0]
    doc = json.loads(record(b, "h1", "missing", 900))
    doc["cert"] = other.cert.to_dict()                                                # another block's certificate
    _refused(st, [canonical(doc)], "tx_bad_certificate")
    _refused(st, [record(b, "h1", "missing", 900) + b" "], "tx_not_canonical")


def test_a_nonce_is_recorded_once_within_and_across_blocks(rbed):
    blocks, st, _ = rbed
    b = blocks[0]
    a, _ = _answer(b)
    _refused(st, [record(b, "h1", "ok", 1000, answer=a), record(b, "h1", "ok", 1000, answer=a)],
             "tx_duplicate_audit")
    st.run([record(b, "h1", "ok", 1000, answer=a)])
    _refused(st, [record(b, "h1", "ok", 1000, answer=a)], "tx_duplicate_audit")


def test_trusted_and_checked_execution_agree(rbed):
    blocks, st, genesis = rbed
    b = blocks[0]
    txs = [record(b, "h1", "ok", 1000, answer=_answer(b)[0]), record(b, "l1", "missing", 900)]
    other = State(st.app)
    assert st.run(txs) == other.run(txs, trusted=True)


# -- the P chain's replace ---------------------------------------------------------------

def test_replace_moves_a_replica_to_the_best_free_node_and_recomputes_stored(bed):
    blocks, app, genesis = bed
    st = State(app)
    b = blocks[0]
    snap = snapshot(st, genesis)
    chosen = place(b.header.hash, genesis.full, snap, genesis.replicas)
    st.run([placement_tx(b.cert, chosen, snap)] + [receipt(b, n) for n in chosen[:3]])
    assert st.block(1)["stored"]
    old = chosen[2]
    if old not in st.block(1)["receipted"]:
        old = chosen[3]
    snap = snapshot(st, genesis)
    new = replacement(b.header.hash, chosen, snap)
    assert new not in chosen and new in genesis.candidates
    out = st.run([replace_tx(1, b.header.hash, old, new, 7, snap)])
    leaf = st.block(1)
    assert old not in leaf["nodes"] and new in leaf["nodes"] and len(leaf["nodes"]) == 4
    assert old not in leaf["receipted"] and not leaf["stored"]               # 2 of 4 receipts count now
    assert out.app["replacements"] == 1 and st.load(old) == 0 and st.load(new) == 1
    out = st.run([receipt(b, new)])
    assert st.block(1)["stored"] and out.app["stored"] == 1
    _refused_p(st, [receipt(b, old)], "tx_not_placed")                       # the old node's receipt: no longer


def _refused_p(st, txs, reason):
    with pytest.raises(InvalidBlock) as e:
        st.run(txs)
    assert e.value.reason == reason, e.value


def test_bad_replacements_are_refused(bed):
    blocks, app, genesis = bed
    st = State(app)
    b = blocks[0]
    snap = snapshot(st, genesis)
    chosen = place(b.header.hash, genesis.full, snap, genesis.replicas)
    st.run([placement_tx(b.cert, chosen, snap)])
    snap = snapshot(st, genesis)
    free = replacement(b.header.hash, chosen, snap)
    _refused_p(st, [replace_tx(1, b.header.hash, free, chosen[2], 1, snap)], "tx_not_chosen")
    _refused_p(st, [replace_tx(1, b.header.hash, chosen[2], chosen[3], 1, snap)], "tx_wrong_placement")
    _refused_p(st, [replace_tx(2, blocks[1].header.hash, chosen[2], free, 1, snap)], "tx_not_placed")
    _refused_p(st, [replace_tx(1, blocks[1].header.hash, chosen[2], free, 1, snap)], "tx_wrong_block")
    stale = [Measure(m.node, m.cp, m.np, m.cre, 0) for m in snap]
    _refused_p(st, [replace_tx(1, b.header.hash, chosen[2], free, 1, stale)], "tx_snapshot_load")
    _refused_p(st, [replace_tx(1, b.header.hash, chosen[2], free, 0, snap)], "tx_bad_field")
    st.run([replace_tx(1, b.header.hash, chosen[2], free, 1, snap)])
    _refused_p(st, [replace_tx(1, b.header.hash, chosen[2], free, 1, snapshot(st, genesis))], "tx_not_chosen")


# -- the verifier's side: when to ask, and how an answer is judged ------------------------

def test_audit_gaps_are_exponential_with_the_configured_mean():
    assert next_gap(2.0, 0.0) == 0.0 and abs(next_gap(2.0, 1 - math.exp(-1)) - 2.0) < 1e-9
    gaps = [next_gap(1.0) for _ in range(4000)]
    assert min(gaps) >= 0 and 0.9 < sum(gaps) / len(gaps) < 1.1


def test_judge_gives_ok_late_wrong_and_missing(block):
    b, _ = block
    pk = bls.SkToPk(NODE_SKS["h1"])
    good, nonce = _answer(b)
    q = Question("h1", b.header, b.cert, 3, nonce)
    assert judge(q, {"answer": good.to_dict()}, 0.5, 1.0, pk)[:2] == ("ok", good)
    assert judge(q, {"answer": good.to_dict()}, 1.5, 1.0, pk)[:2] == ("late", None)       # right, but late
    bad, nonce = _answer(b, txs=[t + b" " for t in b.txs])
    q_bad = Question("h1", b.header, b.cert, 3, nonce)
    assert judge(q_bad, {"answer": bad.to_dict()}, 1.5, 1.0, pk)[0] == "wrong"            # wrong however late
    assert judge(q, None, 3.0, 1.0, pk)[:2] == ("missing", None)
    assert judge(q, {"answer": "junk"}, 0.1, 1.0, pk)[0] == "missing"
    replayed = Question("h1", b.header, b.cert, 3, os.urandom(16).hex())                  # an old answer, new nonce
    assert judge(replayed, {"answer": good.to_dict()}, 0.1, 1.0, pk) == ("missing", None, "audit_nonce")


def test_questions_are_random_over_the_held_blocks_and_their_transactions():
    blocks, _, _ = make_chain(3, txs_per_block=4)
    held = [(b.header, b.cert) for b in blocks]
    qs = [ask_question("h1", held) for _ in range(200)]
    assert {q.header.height for q in qs} == {1, 2, 3} and {q.index for q in qs} == {0, 1, 2, 3}
    assert len({q.nonce for q in qs}) == 200 and all(len(q.nonce) == 32 for q in qs)
    assert ask_question("h1", []) is None
