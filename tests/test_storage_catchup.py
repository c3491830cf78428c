"""Catch-up between storage nodes in one process: real `StorageNode`s (store,
admission, server, requester) wired by an in-memory fabric instead of a broker,
so lost messages and corrupt peers are played exactly."""

from __future__ import annotations

import asyncio
import json

import pytest

from aggregator.admission import admit_body
from aggregator.receipts import BATCH_MAX, ReceiptBatch, load_receipt, verify_receipts
from aggregator.storage import StorageNode, load_storage_config
from aggregator.storagewire import CHUNK_MIN, encode_placement
from certlog import bls
from certlog.block import ChainError, Header
from certlog.net import encode_block
from certlog.validators import dump_validator_set, info_for, read_secret_key
from gridledger.testbed import write_storage_node

from storagekit import flip_body_byte, make_chain


class Client:
    """Stands in for aiomqtt.Client: routes a node's publishes to the other nodes."""

    def __init__(self, fabric: "Fabric", name: str):
        self.fabric, self.name = fabric, name

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.fabric.route(topic, bytes(payload))


class Fabric:
    def __init__(self):
        self.nodes: dict[str, StorageNode] = {}
        self.receipts: list[ReceiptBatch] = []   # a node receipts each commit under one signature
        self.outside: list[tuple[str, bytes]] = []   # sent to topics of no node here
        self.drop_every = 0       # lose every n-th response (a flaky link)
        self._responses = 0

    def add(self, node: StorageNode) -> StorageNode:
        node._client = Client(self, node.name)
        self.nodes[node.name] = node
        return node

    def route(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        loop = asyncio.get_running_loop()
        if parts[-1] == "receipts":
            self.receipts.append(load_receipt(json.loads(payload)))
        elif parts[-1] == "req" and parts[-2] in self.nodes:
            loop.call_soon(self.nodes[parts[-2]]._answer_soon, payload)
        elif parts[-1] == "resp" and parts[-2] in self.nodes:
            self._responses += 1
            if self.drop_every and self._responses % self.drop_every == 0:
                return
            loop.call_soon(self.nodes[parts[-2]].requester.on_response, payload)
        else:
            self.outside.append((topic, payload))


@pytest.fixture
def bed(tmp_path):
    blocks, vset, sks = make_chain(6, 40, tx_bytes=100)   # ~6 KB bodies: several 1 KiB chunks each
    (tmp_path / "validators.toml").write_text(dump_validator_set([info_for(f"v{i}", sk) for i, sk in enumerate(sks)]))
    fabric = Fabric()

    def node(name: str, kind: str = "full", peers=(), **opts) -> StorageNode:
        cfg = write_storage_node(tmp_path, name, kind=kind, chain="area1", host="127.0.0.1", port=1, peers=list(peers),
                                 chunk_size=CHUNK_MIN, timeout_s=0.3, **opts)
        return fabric.add(StorageNode(load_storage_config(cfg)))

    yield blocks, fabric, node, tmp_path
    for n in fabric.nodes.values():
        n.close()


async def _fill(node: StorageNode, blocks) -> None:
    for b in blocks:
        await node.keep_header(b.header, b.cert, "test")
        await node.keep_body(b.header, b.txs, "test")


async def test_batches_kept_meanwhile_share_one_commit_and_one_receipt_and_a_wrong_one_is_refused_alone(bed):
    blocks, fabric, node, _ = bed
    s1 = node("s1")
    for b in blocks:
        await s1.keep_header(b.header, b.cert, "test")
    bodies = [admit_body(b.header, b.txs) for b in blocks]
    other = make_chain(1, tx_bytes=61)[0][0]          # another block at height 1: not the header held
    fabric.receipts.clear()
    got = await asyncio.gather(s1.keep_bodies(bodies[:2], "p1"), s1.keep_bodies(bodies[2:4], "p2"),
                               s1.keep_bodies([admit_body(other.header, other.txs)], "p3"),
                               s1.keep_bodies(bodies[4:], "p4"), return_exceptions=True)
    assert got[0] == [1, 2] and got[1] == [3, 4] and got[3] == [5, 6], got
    assert isinstance(got[2], ChainError) and got[2].reason == "unknown_header"
    assert s1.stages.calls["commit"] == 2          # the first alone, the three queued behind it together
    assert [sorted(r.receipts()) for r in fabric.receipts] == [[1, 2], [3, 4, 5, 6]]
    assert s1.store.body_heights() == [1, 2, 3, 4, 5, 6] and s1.store.body(1) == blocks[0].txs


async def test_more_receipts_than_one_batch_holds_go_out_in_several_signed_batches(bed):
    _, fabric, node, tmp = bed
    s1 = node("s1")
    headers = [Header(chain="area1", height=h, prev="0" * 64, time=h, tx_root="0" * 64, state_root="0" * 64, txs=0,
                      app={}) for h in range(1, BATCH_MAX + 2)]    # e.g. a placement re-sent for many held blocks
    fabric.receipts.clear()
    await s1._send_receipts(headers)
    assert [len(r.blocks) for r in fabric.receipts] == [BATCH_MAX, 1]
    assert all(verify_receipts(r, _pk(tmp, "s1")) for r in fabric.receipts)


def _pk(tmp_path, name: str) -> bytes:
    return bls.SkToPk(read_secret_key(tmp_path / "storage" / f"{name}.bls.key"))


async def test_a_new_full_node_catches_up_from_two_peers_and_signs_a_receipt_per_body(bed):
    blocks, fabric, node, tmp = bed
    s1, s2 = node("s1"), node("s2")
    await _fill(s1, blocks)
    await _fill(s2, blocks)
    s3 = node("s3", peers=["s1", "s2"])
    fabric.receipts.clear()
    summary = await asyncio.wait_for(s3.catchup.round(), 30)
    assert summary["headers"] == 6 and summary["fetched"] == 6
    assert set(summary["by_source"]) == {"s1", "s2"}   # f + 1 = 2 distinct sources
    assert s3.store.body_heights() == [1, 2, 3, 4, 5, 6]
    assert all(s3.store.body(b.header.height) == b.txs for b in blocks)
    assert sorted(h for r in fabric.receipts for h in r.receipts()) == [1, 2, 3, 4, 5, 6]
    assert all(r.node == "s3" and verify_receipts(r, _pk(tmp, "s3")) for r in fabric.receipts)
    assert all(hh == blocks[h - 1].header.hash for r in fabric.receipts for h, hh in r.blocks)


async def test_a_peer_serving_a_corrupt_body_is_named_and_the_body_fetched_elsewhere(bed):
    blocks, fabric, node, tmp = bed
    s1, s2 = node("s1"), node("s2")
    await _fill(s1, blocks)
    await _fill(s2, blocks)
    read = s2.server.store.body_bytes   # s2 serves a flipped byte in every body (its CRC cannot see it)
    s2.server.store.body_bytes = lambda h: (b := bytearray(read(h)), b.__setitem__(-7, b[-7] ^ 1), bytes(b))[2]
    s3 = node("s3", peers=["s1", "s2"])
    summary = await asyncio.wait_for(s3.catchup.round(), 30)
    assert summary["fetched"] == 6 and summary["by_source"] == {"s1": 6}
    assert s3.catchup.bad_peers == {"s2": 3}              # s2 was first choice for every other height
    assert s3.catchup.counts["tx_root_mismatch"] == 3
    assert all(s3.store.body(b.header.height) == b.txs for b in blocks)


async def test_a_flipped_byte_in_a_peers_body_file_reads_as_missing_there_and_it_heals_itself(bed):
    blocks, fabric, node, tmp = bed
    s1, s2 = node("s1"), node("s2", peers=["s1"])
    await _fill(s1, blocks)
    await _fill(s2, blocks)
    for h in (2, 4):                                      # s2 is the first choice for 2, 4 and 6
        flip_body_byte(tmp / "storage" / "s2.db", h)
    s3 = node("s3", peers=["s1", "s2"])
    summary = await asyncio.wait_for(s3.catchup.round(), 30)
    assert summary["fetched"] == 6 and summary["by_source"] == {"s1": 5, "s2": 1}, summary
    assert not s3.catchup.bad_peers and all(s3.store.body(b.header.height) == b.txs for b in blocks)
    assert s2.server.store.counts["corrupt"] == 2 and s2.status()["store_corrupt"] == 2
    assert s2.store.body_heights() == [1, 3, 5, 6]       # not held any more: wanted again
    await asyncio.wait_for(s2.catchup.round(), 30)
    assert all(s2.store.body(b.header.height) == b.txs for b in blocks)


async def test_a_light_node_keeps_every_header_and_only_the_bodies_placed_on_it(bed):
    blocks, fabric, node, tmp = bed
    s1 = node("s1")
    await _fill(s1, blocks)
    light = node("l1", kind="light", peers=["s1"])
    await light._on_placement(encode_placement(heights=[2, 5], by="verifier"))
    await asyncio.wait_for(light.catchup.round(), 30)
    assert light.store.header_height() == 6 and light.store.missing_headers(6) == []
    assert light.store.body_heights() == [2, 5]
    assert await light.wanted() == []


async def test_a_block_carried_in_a_placement_is_checked_then_kept(bed):
    blocks, fabric, node, tmp = bed
    heavy = node("h1", kind="heavy")
    b = blocks[0]
    await heavy._on_placement(encode_placement(block=encode_block(b.header, b.txs, b.cert), by="verifier"))
    assert heavy.store.body(1) == b.txs and fabric.receipts[-1].kind == "heavy"
    bad = list(blocks[1].txs)
    bad[0] = b"tampered"
    with pytest.raises(ChainError) as exc:
        await heavy._on_placement(encode_placement(block=encode_block(blocks[1].header, bad, blocks[1].cert)))
    assert exc.value.reason == "tx_root_mismatch" and not heavy.store.has_body(2)


async def test_lost_responses_are_retried_and_the_transfer_completes(bed):
    blocks, fabric, node, tmp = bed
    s1 = node("s1")
    await _fill(s1, blocks)
    s3 = node("s3", peers=["s1"])
    fabric.drop_every = 4
    fetched = 0
    for _ in range(5):  # a request unlucky three times in a row waits for the next round, as in the node's loop
        fetched += (await asyncio.wait_for(s3.catchup.round(), 30))["fetched"]
        if not await s3.wanted():
            break
    assert fetched == 6 and s3.requester.counts["retried"] >= 10
    assert all(s3.store.body(b.header.height) == b.txs for b in blocks)


async def test_malformed_requests_get_typed_error_responses_and_the_node_keeps_serving(bed):
    blocks, fabric, node, tmp = bed
    s1 = node("s1")
    await _fill(s1, blocks[:1])
    for payload in (b"\xff\xfe", b"[]", b'{"id":"1","from":"x9","op":"rm"}',
                    b'{"id":"2","from":"x9","op":"tx","height":-1,"index":0}',
                    b'{"id":"3","from":"x9","op":"body","height":1,"hash":"' + b"ab" * 32 + b'","chunk":0,'
                    b'"chunk_size":4096}', b'{"id":"4","from":"x9","op":"inventory"}'):
        s1._answer_soon(payload)
    await asyncio.sleep(0.2)
    answers = {json.loads(p.split(b"\n")[0])["id"]: json.loads(p.split(b"\n")[0]) for t, p in fabric.outside
               if t.endswith("/x9/resp")}
    assert {k: v.get("error") for k, v in answers.items()} == {"1": "unknown_op", "2": "bad_request",
                                                                "3": "not_held", "4": None}
    assert answers["4"]["bodies"] == [[1, 1]]
    assert s1.counts["request_bad_request"] == 3 and s1.counts["request_unknown_op"] == 1


async def test_small_bodies_come_several_to_a_response_from_both_peers_even_over_a_flaky_link(bed):
    _, fabric, node, tmp = bed
    blocks = make_chain(30, 3, tx_bytes=20)[0]   # ~250-byte bodies: about four to a 1 KiB response
    s1, s2 = node("s1"), node("s2")
    await _fill(s1, blocks)
    await _fill(s2, blocks)
    s3 = node("s3", peers=["s1", "s2"])
    fabric.drop_every = 5
    by_source = {}
    for _ in range(5):
        summary = await asyncio.wait_for(s3.catchup.round(), 30)
        by_source.update(summary["by_source"])
        if not await s3.wanted():
            break
    assert s3.store.body_heights() == list(range(1, 31)) and set(by_source) == {"s1", "s2"}
    assert all(s3.store.body(b.header.height) == b.txs for b in blocks)
    served = s1.server.counts["served_bodies"] + s2.server.counts["served_bodies"]
    assert 6 <= served < 30 and not s3.catchup.bad_peers   # several to a response; a lost one is no fault
    # ... and receipted a response at a time: one signature per commit, covering each block once
    mine = [r for r in fabric.receipts if r.node == "s3"]
    assert sorted(h for r in mine for h in r.receipts()) == list(range(1, 31)) and len(mine) <= served


async def test_a_promoted_node_fills_from_peers_and_asks_the_proposer_only_for_what_no_peer_has(bed):
    """Both full nodes may be promoted ones: then no peer has the newest bodies, and a
    promoted node must ask the proposer's sync service itself, without a restart; but
    what its peers hold it copies from them (DRS), not from the proposer."""
    blocks, fabric, node, _ = bed
    h1 = node("h1", "heavy")
    for b in blocks[:2]:
        await h1.keep_header(b.header, b.cert, "certs")
    await h1._on_placement(encode_placement(role="full", by="verifier"))
    await h1.keep_header(blocks[2].header, blocks[2].cert, "certs")     # a new certificate while filling
    await h1._after_round({"wanted": 3, "fetched": 2})                 # peers are giving: no proposer
    assert h1.kind == "full" and not [t for t, _ in fabric.outside if t.endswith("/sync")], fabric.outside
    await h1._after_round({"wanted": 3, "fetched": 0})                 # peers hold none of what is left
    asks = [json.loads(p) for t, p in fabric.outside if t == "gl/v1/chains/area1/sync"]
    assert asks == [{"validator": "storage-h1", "from": 1}], fabric.outside
