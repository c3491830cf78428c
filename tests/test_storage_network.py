"""Storage nodes on real parts: Mosquitto, a gateway proposing area1's chain, four
validator processes certifying it, and storage node processes (full, heavy)
keeping, receipting, serving and catching up; one killed with SIGKILL under load,
one serving from a database the test corrupts."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3

from aggregator.receipts import ReceiptBatch, verify_receipts
from aggregator.storagewire import CHUNK_MIN, StorageTopics, encode_placement
from certlog.block import Header
from gridledger.wire import ack_topic, readings_topic

from chainkit import CHAIN, ChainBed, chain_bodies
from conftest import MqttProbe
from helpers import wait_until
from storagekit import StorageNodes, certified, certified_txs, flip_body_byte

STORAGE = StorageTopics(CHAIN)


class Load:
    """Readings from the bed's meters, each meter's next sent once its last is acked."""

    def __init__(self, bed: ChainBed, probe: MqttProbe):
        self.bed, self.probe = bed, probe
        self.sent = 0

    async def send(self, per_meter: int) -> None:
        for _ in range(per_meter):
            start = len(self.probe.received)
            for m, sim in self.bed.sims.items():
                await self.probe.publish(readings_topic(CHAIN, m), sim.next().to_json())
            for m, sim in self.bed.sims.items():
                await self.probe.expect(ack_topic(CHAIN, m), lambda b, s=sim.seq: b["seq"] >= s, timeout=30,
                                        start=start)
            self.sent += len(self.bed.sims)


def _settled(bed: ChainBed, readings: int) -> dict[int, str]:
    """Wait until every reading is in a certified block; the certified heights and hashes."""
    def done():
        return sum(map(len, chain_bodies(bed.db()).values())) == readings
    wait_until(done, 30, f"{readings} readings in certified blocks")
    return certified(bed)


async def until(pred, timeout: float, what: str) -> None:
    """`wait_until` that lets the event loop (the probe's messages) run meanwhile."""
    await asyncio.to_thread(wait_until, pred, timeout, what)


def _receipts(probe: MqttProbe) -> list[ReceiptBatch]:
    # A node receipts each commit (one body or several) under one signature.
    return [ReceiptBatch.from_dict(json.loads(p)) for t, p in probe.received if t == STORAGE.receipts]


def _receipted(probe: MqttProbe) -> int:
    """Blocks receipted so far."""
    return sum(len(r.blocks) for r in _receipts(probe))


def _start_chain(bed: ChainBed) -> None:
    for i in range(4):
        bed.start_validator(i)
    bed.start_gateway()


async def test_every_certified_block_reaches_both_full_nodes_with_receipts_and_a_heavy_node_its_placements(
        tmp_path, broker):
    bed = ChainBed(tmp_path, broker, ["m1", "m2", "m3"], block_max=4)
    nodes = StorageNodes(bed)
    try:
        _start_chain(bed)
        for name, kind, peers in (("s1", "full", ["s2", "h1"]), ("s2", "full", ["s1", "h1"]),
                                  ("h1", "heavy", ["s1", "s2"])):
            nodes.start(name, kind, peers, chunk_size=CHUNK_MIN)
        async with MqttProbe(broker, f"gl/v1/{CHAIN}/meters/+/ack", STORAGE.receipts) as probe:
            await Load(bed, probe).send(6)
            chain = _settled(bed, 18)
            assert len(chain) >= 5
            for s in ("s1", "s2"):
                await until(lambda s=s: nodes.held(s) == chain, 30, f"{s} to hold every certified block")
            await probe.publish(STORAGE.store("h1"), encode_placement(heights=[1, 3], by="test"))
            await until(lambda: nodes.held("h1") == {h: chain[h] for h in (1, 3)}, 20, "h1 to keep its placements")
            await until(lambda: nodes.headers("h1") == chain, 20, "h1 to keep every header")
            await until(lambda: _receipted(probe) >= 2 * len(chain) + 2, 10, "every receipt")
        truth = certified_txs(bed)
        assert nodes.txs("s1") == truth and nodes.txs("s2") == truth
        headers = {h: Header.decode(raw) for h, raw in sqlite3.connect(bed.db()).execute(
            "SELECT height, header FROM chain_blocks WHERE cert IS NOT NULL")}
        got = {}
        for r in _receipts(probe):
            assert verify_receipts(r, nodes.public_key(r.node)), r
            assert all(headers[h].hash == hh for h, hh in r.blocks), r
            got.setdefault(r.node, set()).update((h, r.kind) for h, _ in r.blocks)
        assert got == {"s1": {(h, "full") for h in chain}, "s2": {(h, "full") for h in chain},
                       "h1": {(1, "heavy"), (3, "heavy")}}
    finally:
        nodes.cleanup()
        bed.cleanup()


async def test_a_lagging_node_and_a_brand_new_node_catch_up_from_peers_to_the_same_inventory(tmp_path, broker):
    bed = ChainBed(tmp_path, broker, ["m1", "m2", "m3"], block_max=3)
    nodes = StorageNodes(bed)
    try:
        _start_chain(bed)
        nodes.start("s1", "full", ["s2"])
        nodes.start("s2", "full", ["s1"])
        # s3 and s4 take nothing from the proposer: what they lack comes from peers
        nodes.start("s3", "full", ["s1", "s2"], proposer_sync=False)
        async with MqttProbe(broker, f"gl/v1/{CHAIN}/meters/+/ack") as probe:
            load = Load(bed, probe)
            await load.send(2)
            await until(lambda: nodes.held("s3") and nodes.held("s3") == certified(bed), 30, "s3 in step")
            nodes.stop("s3")                                   # s3 lags from here
            await load.send(5)
            chain = _settled(bed, load.sent)
        for s in ("s1", "s2"):
            wait_until(lambda s=s: nodes.held(s) == chain, 30, f"{s} to hold every certified block")
        behind = len(nodes.held("s3"))
        assert behind < len(chain)
        nodes.start("s3", "full", ["s1", "s2"], proposer_sync=False)
        nodes.start("s4", "full", ["s1", "s2"], proposer_sync=False)   # brand new: an empty database
        for s in ("s3", "s4"):
            wait_until(lambda s=s: nodes.held(s) == chain, 30, f"{s} to catch up")
        inventories = {s: json.loads(nodes.inventory(s)) for s in ("s1", "s2", "s3", "s4")}
        assert len({json.dumps([i["headers"], i["bodies"]]) for i in inventories.values()}) == 1, inventories
        assert inventories["s4"]["bodies"] == [[1, len(chain)]]
        truth = certified_txs(bed)
        assert nodes.txs("s3") == truth and nodes.txs("s4") == truth
        sources = set()
        for e in nodes.events("s4", "catchup"):
            sources |= set(e["by_source"])
        assert sources == {"s1", "s2"}                     # f + 1 = 2 distinct sources
    finally:
        nodes.cleanup()
        bed.cleanup()


async def test_a_full_node_killed_under_load_catches_up_after_restart_and_holds_every_block(tmp_path, broker):
    bed = ChainBed(tmp_path, broker, ["m1", "m2", "m3", "m4"], block_max=3)
    nodes = StorageNodes(bed)
    try:
        _start_chain(bed)
        nodes.start("s1", "full", ["s2"])
        nodes.start("s2", "full", ["s1"])
        async with MqttProbe(broker, f"gl/v1/{CHAIN}/meters/+/ack") as probe:
            load = Load(bed, probe)
            sending = asyncio.create_task(load.send(25))
            await until(lambda: len(nodes.held("s1")) >= 3, 30, "s1 to hold a few blocks")
            nodes.stop("s1", signal.SIGKILL)                 # mid-transaction, perhaps
            killed_at = len(certified(bed))
            await asyncio.sleep(2.0)                          # blocks are certified without s1
            await asyncio.to_thread(nodes.start, "s1", "full", ["s2"])
            restarted_at = len(certified(bed))
            await asyncio.wait_for(sending, 60)
            await load.send(2)                                # and more after s1 is back
            chain = _settled(bed, load.sent)
        assert killed_at < restarted_at < len(chain)          # the chain moved on while s1 was down, and after
        for s in ("s1", "s2"):
            wait_until(lambda s=s: nodes.held(s) == chain, 30, f"{s} to hold every certified block")
        assert nodes.txs("s1") == certified_txs(bed)
    finally:
        nodes.cleanup()
        bed.cleanup()


async def test_a_peer_with_flipped_bytes_in_its_body_file_is_routed_around_and_heals_itself(tmp_path, broker):
    bed = ChainBed(tmp_path, broker, ["m1", "m2"], block_max=2)
    nodes = StorageNodes(bed)
    try:
        _start_chain(bed)
        nodes.start("s1", "full", ["s2"])
        nodes.start("s2", "full", ["s1"])
        async with MqttProbe(broker, f"gl/v1/{CHAIN}/meters/+/ack") as probe:
            load = Load(bed, probe)
            await load.send(4)
            chain = _settled(bed, load.sent)
        wait_until(lambda: nodes.held("s2") == chain, 30, "s2 to hold every block")
        nodes.stop("s2")
        for h in chain:                                  # one flipped byte in every body s2 holds
            flip_body_byte(nodes.db("s2"), h, tx=0)
        nodes.start("s2", "full", ["s1"])
        nodes.start("s3", "full", ["s1", "s2"], proposer_sync=False)
        wait_until(lambda: nodes.held("s3") == chain, 30, "s3 to catch up")
        assert nodes.txs("s3") == certified_txs(bed)
        # s2's store found every flipped byte it read (CRC, leaf hash) and served none of them:
        # s3 named nobody, and s2 fetched what it found corrupt again (from the proposer or s1).
        assert not [e for e in nodes.events("s3", "refused") if e.get("peer") == "s2"]
        assert not nodes.status("s3")["bad_peers"]
        wait_until(lambda: nodes.held("s2") == chain, 30, "s2 to hold every block again")
        stopped = nodes.status("s2")
        corrupt = stopped["store_corrupt"]
        assert stopped["bodies"] >= corrupt, stopped          # kept again since its restart
        back = nodes.txs("s2")     # what reads back (a flipped byte nobody asked for yet reads as missing)
        assert corrupt >= 1 and all(back[h] == certified_txs(bed)[h] for h in back), (corrupt, sorted(back))
    finally:
        nodes.cleanup()
        bed.cleanup()
