"""Receipt batches (one BLS signature over several (height, header hash)): signed and
verified, tampering refused by reason, and on the P chain and the verifier counted
exactly like single receipts (in process, real BLS, a real P-chain replica)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from aggregator.pchainapp import receipts_tx
from aggregator.receipts import (BATCH_MAX, ReceiptBatch, StorageReceipt, load_receipt, sign_receipt, sign_receipts,
                                 verify_receipts)
from certlog import bls
from certlog.block import ChainError, canonical
from certlog.net import encode_block
from certlog.validators import read_secret_key

from storagekit import make_chain
from test_pchain import NODE_SKS, NODES, State, _refused, make_bed, placement, receipt
from test_verifier import verifier

SK = bls.KeyGen(b"r" * 32)
PK = bls.SkToPk(SK)


def test_a_batch_verifies_and_any_changed_height_hash_node_or_kind_does_not():
    blocks = make_chain(3)[0]
    b = sign_receipts(SK, [x.header for x in reversed(blocks)], "s1", "full")
    assert b.blocks == tuple((x.header.height, x.header.hash) for x in blocks)   # sorted by height
    assert verify_receipts(b, PK) and verify_receipts(ReceiptBatch.from_dict(json.loads(b.encode())), PK)
    assert load_receipt(b.to_dict()) == b
    other = make_chain(1, tx_bytes=61)[0][0].header          # another block at height 1
    for changed in ({"blocks": ((9,) + b.blocks[0][1:],) + b.blocks[1:]},     # a height moved
                    {"blocks": ((1, other.hash),) + b.blocks[1:]},            # another block's hash
                    {"blocks": b.blocks[:2]},                                  # a block left out
                    {"node": "s2"}, {"kind": "heavy"}, {"chain": "area2"}):
        assert not verify_receipts(dataclasses.replace(b, **changed), PK), changed
    assert not verify_receipts(b, bls.SkToPk(bls.KeyGen(b"q" * 32)))         # another key
    # a single receipt's signature does not pass for a batch of that one block, nor back
    one = sign_receipt(SK, blocks[0].header, "s1", "full")
    assert not verify_receipts(ReceiptBatch("area1", "s1", "full", b.blocks[:1], one.signature), PK)
    assert isinstance(load_receipt(one.to_dict()), StorageReceipt)


@pytest.mark.parametrize("change", [
    lambda d: d.update(blocks=[]),                                   # empty
    lambda d: d.update(blocks=d["blocks"][::-1]),                    # not increasing
    lambda d: d.update(blocks=[d["blocks"][0], d["blocks"][0]]),     # a height twice
    lambda d: d["blocks"][0].__setitem__(1, d["blocks"][0][1].upper()),
    lambda d: d["blocks"][0].__setitem__(0, 0),
    lambda d: d["blocks"][0].__setitem__(0, True),
    lambda d: d.update(blocks=[[h, "ab" * 32] for h in range(1, BATCH_MAX + 2)]),
    lambda d: d.update(kind="archive"), lambda d: d.update(node="a/b"), lambda d: d.pop("sig"),
    lambda d: d.update(extra=1), lambda d: d.update(sig="00"),
])
def test_a_malformed_batch_is_refused_as_receipt_schema(change):
    d = sign_receipts(SK, [x.header for x in make_chain(2)[0]], "s1", "full").to_dict()
    change(d)
    with pytest.raises(ChainError) as e:
        load_receipt(d)
    assert e.value.reason == "receipt_schema"


def batch_of(blocks, node):
    return sign_receipts(NODE_SKS[node], [b.header for b in blocks], node, NODES[node])


def test_the_p_chain_counts_a_batch_exactly_like_single_receipts():
    blocks, app, genesis = make_bed()
    singles, batched = State(app), State(app)
    for st in (singles, batched):
        for b in blocks:
            st.run([placement(st, genesis, b)])
    one = singles.run([receipt(b, n) for n in ("s1", "s2") for b in blocks])
    two = batched.run([receipts_tx(batch_of(blocks, n), [1, 2, 3]) for n in ("s1", "s2")])
    assert one.app == two.app and one.app["receipts"] == 6 and singles.root == batched.root
    # part of a batch now, the rest in a later record: the same again
    h = next(n for n in batched.block(1)["nodes"] if n not in ("s1", "s2"))
    mine = [b for b in blocks if h in batched.block(b.header.height)["nodes"]]
    batch = batch_of(mine, h)
    heights = [b.header.height for b in mine]
    batched.run([receipts_tx(batch, heights[:1])])
    if heights[1:]:
        batched.run([receipts_tx(batch, heights[1:])])
    for b in mine:
        singles.run([receipt(b, h)])
    assert singles.root == batched.root and batched.block(1)["stored"]


def test_bad_batches_are_refused_on_the_p_chain_by_reason():
    blocks, app, genesis = make_bed()
    st = State(app)
    for b in blocks[:2]:
        st.run([placement(st, genesis, b)])
    good = batch_of(blocks[:2], "s1")
    tampered = dataclasses.replace(good, blocks=((1, good.blocks[0][1]), (3, blocks[2].header.hash)))
    _refused(st, [receipts_tx(tampered, [1])], "tx_bad_signature")           # a height changed after signing
    forged = dataclasses.replace(good, signature=batch_of(blocks[:2], "s2").signature)
    _refused(st, [receipts_tx(forged, [1, 2])], "tx_bad_signature")          # another node's signature
    _refused(st, [receipts_tx(batch_of(blocks, "s1"), [1, 2, 3])], "tx_not_placed")   # block 3 not placed
    other = make_chain(1, tx_bytes=61)[0][0]
    _refused(st, [receipts_tx(batch_of([other], "s1"), [1])], "tx_wrong_block")
    _refused(st, [receipts_tx(good, [1]), receipts_tx(good, [1])], "tx_duplicate_receipt")
    st.run([receipt(blocks[0], "s1")])
    _refused(st, [receipts_tx(good, [1, 2])], "tx_duplicate_receipt")      # a single receipt counted it
    wrong_kind = sign_receipts(NODE_SKS["s2"], [blocks[1].header], "s2", "heavy")
    _refused(st, [receipts_tx(wrong_kind, [2])], "tx_wrong_kind")
    doc = json.loads(receipts_tx(good, [2]))
    for heights in ([], [3], [2, 2], [2, 1], ["2"], 2):
        doc["heights"] = heights
        _refused(st, [canonical(doc)], "tx_bad_field")
    doc["heights"] = [2]
    doc["batch"]["blocks"] = []
    _refused(st, [canonical(doc)], "tx_bad_field")
    st.run([receipts_tx(good, [2])])
    assert st.block(2)["receipted"] == ["s1"]


async def test_the_verifier_queues_the_placed_part_of_a_batch_now_and_the_rest_once_placed(tmp_path):
    v = verifier(tmp_path, {"f1": "full", "f2": "full", "h1": "heavy", "l1": "light"})
    sks = [read_secret_key(tmp_path / "validators" / f"v{i}.bls.key") for i in range(4)]
    blocks, _, _ = make_chain(3, sks=sks)
    f1 = read_secret_key(tmp_path / "storage" / "f1.bls.key")
    try:
        await v.on_cert(encode_block(blocks[0].header, None, blocks[0].cert))
        batch = sign_receipts(f1, [b.header for b in blocks], "f1", "full")
        await v.on_receipt(batch.encode())
        assert v.counts["receipts"] == 1 and v.counts["receipt_early"] == 2
        for b in blocks[1:]:
            await v.on_cert(encode_block(b.header, None, b.cert))
        await v.on_receipt(batch.encode())                               # sent again: nothing new
        assert v.counts["receipts"] == 3 and v.counts["receipt_duplicate"] == 3
        records = [json.loads(tx) for (tx,) in v.conn.execute("SELECT tx FROM p_queue WHERE id LIKE 'receipt/%' "
                                                              "ORDER BY rowid")]
        assert [r["heights"] for r in records] == [[1], [2], [3]]
        assert all(ReceiptBatch.from_dict(r["batch"]) == batch for r in records)
        (got,) = v.conn.execute("SELECT receipted FROM p_placed WHERE height = 3").fetchone()
        assert json.loads(got) == ["f1"]
        forged = dataclasses.replace(batch, node="f2")
        with pytest.raises(ChainError) as e:
            await v.on_receipt(forged.encode())
        assert e.value.reason == "receipt_signature"
    finally:
        v.conn.close()
