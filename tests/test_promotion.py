"""Promotion of a heavy node on the P chain (in process, real BLS): the record's checks,
blocks moving from the dead full node, receipts as full, readmission."""

from __future__ import annotations

import pytest

from aggregator.pchainapp import Roles, promote_block, promote_tx, readmit_tx
from aggregator.receipts import sign_receipt
from aggregator.reliability import Measure
from certlog.app import InvalidBlock

from test_pchain import NODE_SKS, State, make_bed, placement, receipt, snapshot


def roles(st):
    from aggregator.pchainapp import roles_key, decode_roles_leaf
    from certlog.mpt import Trie
    return decode_roles_leaf(Trie(st.nodes, bytes.fromhex(st.root)).get(roles_key()), st.app.genesis)


def placed_and_stored():
    blocks, app, genesis = make_bed()
    st = State(app)
    for b in blocks:
        st.run([placement(st, genesis, b)])
        st.run([receipt(b, n) for n in st.block(b.header.height)["nodes"]])
    return blocks, st, genesis


def promote(st, genesis, dead="s1", new=None, *, via="last_will", r_height=0, **cp):
    snap = snapshot(st, genesis, **cp)
    snap = [m for m in snap if m.node in roles(st).candidates(genesis)]
    if new is None:
        from aggregator.pchainapp import promotion
        new = promotion(dead, [m for m in snap if roles(st).kind_of(genesis, m.node) == "heavy"])
    return promote_tx(dead, new, via=via, r_height=r_height, seen=1_700_000_000_000, snapshot=snap)


def test_the_best_heavy_node_replaces_a_dead_full_node_on_every_block_and_receipts_as_full():
    blocks, st, genesis = placed_and_stored()
    out = st.run([promote(st, genesis, h2=900)])              # h1 has the higher RV
    assert out.app["promotions"] == 1
    assert roles(st) == Roles(("h1", "s2"), ("s1",))
    for b in blocks:
        leaf = st.block(b.header.height)
        assert "s1" not in leaf["nodes"] and "s1" not in leaf["receipted"] and "h1" in leaf["nodes"]
        assert len(set(leaf["nodes"])) == 4                   # where h1 was a replica, another took its slot
    missing = [b for b in blocks if "h1" not in st.block(b.header.height)["receipted"]]
    assert missing
    st.run([receipt_as(b, "h1", "full") for b in missing])
    assert all({"h1", "s2"} <= set(st.block(b.header.height)["receipted"]) for b in blocks)   # two full again
    with pytest.raises(InvalidBlock) as exc:                  # h1 is full now: a heavy receipt is refused
        st.run([placement(st, genesis, blocks[0])])           # (block 1 is placed already)
    assert exc.value.reason == "tx_duplicate_placement"


def receipt_as(block, node, kind):
    from aggregator.pchainapp import receipt_tx
    return receipt_tx(sign_receipt(NODE_SKS[node], block.header, node, kind))


@pytest.mark.parametrize("case, reason", [
    ("dead_not_full", "tx_not_full"), ("new_is_light", "tx_not_heavy"), ("new_not_best", "tx_wrong_promotion"),
    ("new_is_full", "tx_not_heavy"), ("missing_without_r_height", "tx_bad_field"),
    ("will_with_r_height", "tx_bad_field"), ("unknown_via", "tx_bad_field"), ("wrong_load", "tx_snapshot_load")])
def test_bad_promotions_are_refused_with_their_reasons(case, reason):
    blocks, st, genesis = placed_and_stored()
    tx = {"dead_not_full": lambda: promote(st, genesis, "h1", "h2"),
          "new_is_light": lambda: promote(st, genesis, "s1", "l1"),
          "new_not_best": lambda: promote(st, genesis, "s1", "h2", h2=900),
          "new_is_full": lambda: promote(st, genesis, "s1", "s2"),
          "missing_without_r_height": lambda: promote(st, genesis, via="missing"),
          "will_with_r_height": lambda: promote(st, genesis, r_height=3),
          "unknown_via": lambda: promote(st, genesis, via="rumour"),
          "wrong_load": lambda: promote(st, genesis).replace(b'"t":', b'"t":1', 1)}[case]()
    with pytest.raises(InvalidBlock) as exc:
        st.run([tx])
    assert exc.value.reason == reason


def test_after_promotion_placements_use_the_new_full_set_and_old_kinds_are_refused():
    blocks, st, genesis = placed_and_stored()
    st.run([promote(st, genesis, h2=900)])
    with pytest.raises(InvalidBlock) as exc:                  # s1 signs as full, but it is not full now
        st.run([receipt_as(blocks[0], "s1", "full")])
    assert exc.value.reason in ("tx_wrong_kind", "tx_not_placed")
    with pytest.raises(InvalidBlock) as exc:                  # a second promotion of the same dead node
        st.run([promote(st, genesis, "s1", "h2")])
    assert exc.value.reason == "tx_not_full"
    with pytest.raises(InvalidBlock) as exc:
        st.run([readmit_tx("h2", seen=1, height=3)])
    assert exc.value.reason == "tx_not_dead"
    st.run([readmit_tx("s1", seen=1, height=3)])              # back, as a heavy candidate
    assert roles(st) == Roles(("h1", "s2"), ())
    assert roles(st).kind_of(genesis, "s1") == "heavy" and "s1" in roles(st).candidates(genesis)


def test_trusted_and_checked_promotions_give_the_same_roots():
    _, one, genesis = placed_and_stored()
    tx = promote(one, genesis)
    _, two, _ = placed_and_stored()
    assert one.run([tx]).state_root == two.run([tx], trusted=True).state_root


def test_promote_block_moves_the_dead_slot_and_refills_when_the_new_node_held_a_replica():
    snap = [Measure(n, 1000, 1000, 1000, 0) for n in ("h1", "h2", "l1")]
    assert promote_block("ab" * 32, ["s1", "s2", "h2", "l1"], ["s1", "s2"], "s1", "h1", snap) == (
        ["h1", "s2", "h2", "l1"], ["s2"], "h1")
    chosen, got, taker = promote_block("ab" * 32, ["s1", "s2", "h1", "l1"], ["s1", "h1"], "s1", "h1", snap)
    assert taker == "h2" and chosen == ["h2", "s2", "h1", "l1"] and got == ["h1"]
    assert promote_block("ab" * 32, ["s2", "h1"], ["s2"], "s1", "h1", snap) == (["s2", "h1"], ["s2"], None)
