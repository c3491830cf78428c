"""The reader's fall-back (in process): each replica's answer checked against the
certified header the P chain names; wrong data, refusals and time-outs move on to the
next replica; nothing unverified is returned."""

from __future__ import annotations

import asyncio

import pytest

from aggregator.reader import ReadError, Replicas, check_tx_answer, order_replicas, read_tx
from aggregator.reliability import Measure
from aggregator.storagewire import StorageError
from certlog import merkle

from storagekit import make_chain

BLOCKS, _, _ = make_chain(2, txs_per_block=7)
B = BLOCKS[1]


def answer(block=B, index=3, *, tx=None, path=None, header=None):
    txs = block.txs
    return {"ok": True, "index": index, "tx": (tx if tx is not None else txs[index]).hex(),
            "path": path if path is not None else merkle.path(txs, index),
            "header": (header or block.header).to_dict()}


def asker(behaviour):
    """An `ask` whose answer per node is a dict, an exception, or "hang"."""
    calls = []

    async def ask(node, op, *, timeout_s, height, index):
        calls.append(node)
        what = behaviour[node]
        if what == "hang":
            raise StorageError("peer_timeout", f"{node} did not answer")
        if isinstance(what, Exception):
            raise what
        return what, b""
    return ask, calls


def read(behaviour, nodes=("a", "b", "c"), index=3):
    ask, calls = asker(behaviour)
    reps = Replicas(B.header.height, B.header.hash, tuple(nodes))
    return asyncio.run(read_tx(ask, reps, index, area=B.header.chain, timeout_s=1.0)), calls


def test_the_best_replica_answering_right_is_the_only_one_asked():
    r, calls = read({"a": answer(), "b": answer(), "c": answer()})
    assert (r.node, r.tx, r.attempts, calls) == ("a", B.txs[3], (), ["a"])


@pytest.mark.parametrize("bad, reason", [
    (answer(tx=B.txs[3] + b" "), "read_bad_path"),                       # a flipped or added byte
    (answer(path=merkle.path(B.txs, 2)), "read_bad_path"),                # another leaf's path
    (answer(block=BLOCKS[0], index=3), "read_wrong_header"),             # another block, with its own good path
    ({"ok": True, "index": 3, "tx": "zz", "path": [], "header": B.header.to_dict()}, "read_bad_answer"),
    (answer(index=4), "read_bad_answer"),                                 # the answer to another question
    (StorageError("not_held", "gone"), "not_held"),
    ("hang", "peer_timeout"),
])
def test_a_faulty_replica_is_skipped_and_the_next_ones_verified_data_returned(bad, reason):
    r, calls = read({"a": bad, "b": answer(), "c": answer()})
    assert r.node == "b" and r.tx == B.txs[3] and r.attempts == (("a", reason),) and calls == ["a", "b"]


def test_when_no_replica_answers_right_the_read_fails_typed_and_says_why():
    with pytest.raises(ReadError) as exc:
        read({"a": answer(tx=b"forged"), "b": "hang", "c": answer(block=BLOCKS[0])})
    assert exc.value.reason == "no_verified_replica"
    assert exc.value.attempts == [("a", "read_bad_path"), ("b", "peer_timeout"), ("c", "read_wrong_header")]
    with pytest.raises(ReadError):
        read({}, nodes=())


def test_check_tx_answer_refuses_a_header_that_is_not_the_certified_one():
    with pytest.raises(StorageError) as exc:
        check_tx_answer(answer(), area="another", height=B.header.height, header_hash=B.header.hash, index=3)
    assert exc.value.reason == "read_wrong_header"
    tx, header = check_tx_answer(answer(), area=B.header.chain, height=2, header_hash=B.header.hash, index=3)
    assert tx == B.txs[3] and header.hash == B.header.hash


def test_replicas_are_ordered_by_rv_with_full_nodes_at_their_load():
    ms = {"h1": Measure("h1", 1000, 1000, 500, 0), "h2": Measure("h2", 1000, 1000, 1000, 0)}
    loads = {"s1": 99, "h1": 0, "h2": 0}
    assert order_replicas("ab" * 32, ["s1", "h1", "h2"], ms, loads) == ["h2", "h1", "s1"]
