"""kill -9 of a storage node in the middle of a fill, on real parts (Mosquitto, node
processes): nothing a receipt acknowledged is lost (a receipt leaves only after the
fdatasync of the bodies and the commit of their index), and the node, restarted,
finishes the fill."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sqlite3

import aiomqtt

from aggregator.receipts import load_receipt, verify_receipts
from aggregator.storagestore import StorageStore
from aggregator.storagewire import StorageTopics, encode_placement
from certlog import bls
from certlog.validators import dump_validator_set, info_for, read_secret_key
from gridledger.testbed import storage_process, wait_up, write_storage_node

from chainkit import CHAIN
from helpers import wait_until
from storagekit import make_chain

BLOCKS, TXS, TX_BYTES = 240, 8, 400        # ~3.3 KB bodies: four 1 KiB chunks each, so the fill takes a while


def test_kill_9_during_a_fill_loses_no_receipted_body_and_the_restart_finishes_it(tmp_path, broker):
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    blocks, _, sks = make_chain(BLOCKS, TXS, tx_bytes=TX_BYTES)
    (tmp_path / "validators.toml").write_text(dump_validator_set([info_for(f"v{i}", sk) for i, sk in enumerate(sks)]))
    nodes = {"f1": ("full", ["f2", "h1"]), "f2": ("full", ["f1", "h1"]), "h1": ("heavy", ["f1", "f2"])}
    cfgs = {n: write_storage_node(tmp_path, n, kind=k, chain=CHAIN, host=broker.host, port=broker.port, peers=p,
                                  proposer_sync=False, catchup_s=0.5, timeout_s=2.0,
                                  chunk_size=1024, window=2)
            for n, (k, p) in nodes.items()}
    for n in nodes:   # the full nodes hold every block, h1 every header and no body
        store = StorageStore(tmp_path / "storage" / f"{n}.db")
        for b in blocks:
            store.put_header(b.header, b.cert)
        if n != "h1":
            store.put_bodies([(b.header, b.txs) for b in blocks])
        store.close()
    h1_pk = bls.SkToPk(read_secret_key(tmp_path / "storage" / "h1.bls.key"))
    logs = {n: tmp_path / f"storage-{n}.log" for n in nodes}
    procs = {n: storage_process(cfgs[n], logs[n]) for n in nodes}
    try:
        for n in nodes:
            wait_up(logs[n], procs[n])
        receipted = asyncio.run(_promote_and_kill(broker, procs["h1"], rng, h1_pk))
        assert receipted and len(receipted) < BLOCKS, len(receipted)    # killed mid-fill, after some receipts
        store = StorageStore(tmp_path / "storage" / "h1.db")             # what survived the kill
        for h, header_hash in receipted.items():
            assert store.header(h)[0].hash == header_hash and store.body(h) == blocks[h - 1].txs, h
        held = len(store.body_heights())
        store.close()
        assert held >= len(receipted)
        procs["h1"] = storage_process(cfgs["h1"], logs["h1"])            # restarted: still full, fills the rest
        wait_up(logs["h1"], procs["h1"])
        wait_until(lambda: len(_held(tmp_path / "storage" / "h1.db")) == BLOCKS, 60, "h1 to finish its fill")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    store = StorageStore(tmp_path / "storage" / "h1.db")
    try:
        assert store.kind() == "full" and store.wanted("full") == []
        assert all(store.body(b.header.height) == b.txs for b in blocks)
    finally:
        store.close()


async def _promote_and_kill(broker, proc, rng: random.Random, public_key: bytes) -> dict[int, str]:
    """Promote h1, kill -9 it a random moment (0-0.3 s) after its first receipt batch;
    every (height, hash) its receipts acknowledged, each batch's signature checked."""
    topics = StorageTopics(CHAIN)
    receipted: dict[int, str] = {}
    first = asyncio.Event()
    async with aiomqtt.Client(broker.host, broker.port, identifier="test-crash") as c:
        await c.subscribe(topics.receipts, qos=1)

        async def collect() -> None:
            async for msg in c.messages:
                r = load_receipt(json.loads(msg.payload))
                if r.node == "h1" and r.kind == "full":
                    assert verify_receipts(r, public_key)
                    receipted.update(r.receipts())
                    first.set()

        collecting = asyncio.create_task(collect())
        await c.publish(topics.store("h1"), encode_placement(role="full", by="test"), qos=1)
        async with asyncio.timeout(60):
            await first.wait()
        await asyncio.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
        await asyncio.sleep(1.0)   # receipts already on their way when it died count too
        collecting.cancel()
        await asyncio.gather(collecting, return_exceptions=True)
    return receipted


def _held(db) -> list[int]:
    store = StorageStore(conn=sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5))
    try:
        return store.body_heights()
    finally:
        store.close()
