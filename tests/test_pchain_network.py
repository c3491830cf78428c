"""Placement and the P chain on real parts: Mosquitto, a gateway proposing area1's
chain, four validator processes certifying it and co-signing P-area1, two full,
two heavy and one light storage node and the verifier, all real processes."""

from __future__ import annotations

import sqlite3

from aggregator.pchainapp import block_key, decode_block_leaf
from certlog.block import Header
from certlog.mpt import Trie
from certlog.store import NodeDB
from gridledger.testbed import verifier_process, wait_up, write_pchain

from chainkit import CHAIN, ChainBed
from conftest import MqttProbe
from helpers import wait_until
from storagekit import StorageNodes
from test_storage_network import Load, _settled, _start_chain

KINDS = {"s1": "full", "s2": "full", "h1": "heavy", "h2": "heavy", "l1": "light"}


def p_state(db, heights) -> tuple[int, dict[int, dict]]:
    """(certified P-chain height, area height -> its placement leaf) from a P replica, read-only."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute("SELECT height, header FROM chain_blocks WHERE cert IS NOT NULL "
                               "ORDER BY height DESC LIMIT 1").fetchone()
            if row is None:
                return 0, {}
            trie = Trie(NodeDB(conn), bytes.fromhex(Header.decode(row[1]).state_root))
            leaves = {h: trie.get(block_key(h)) for h in heights}
            return row[0], {h: decode_block_leaf(raw) for h, raw in leaves.items() if raw}
    except sqlite3.OperationalError:
        return 0, {}


async def test_every_certified_block_is_placed_by_rv_receipted_and_stored_on_the_certified_p_chain(
        tmp_path, broker):
    bed = ChainBed(tmp_path, broker, ["m1", "m2", "m3"], block_max=3)
    verifier_cfg = write_pchain(tmp_path, area=CHAIN, host=broker.host, port=broker.port, nodes=KINDS, replicas=2,
                                validator_configs=bed.validator_cfgs, probe_s=0.5, retry_s=2.0)
    nodes = StorageNodes(bed)
    verifier = None
    try:
        _start_chain(bed)
        for name, kind in KINDS.items():
            peers = [p for p in ("s1", "s2") if p != name]
            nodes.start(name, kind, peers)
        verifier = verifier_process(verifier_cfg, tmp_path / "verifier.log")
        wait_up(tmp_path / "verifier.log", verifier)
        async with MqttProbe(broker, f"gl/v1/{CHAIN}/meters/+/ack") as probe:
            await Load(bed, probe).send(5)
            chain = _settled(bed, 15)
        assert len(chain) >= 5

        def every_block_stored():
            _, leaves = p_state(bed.tmp / "validators" / "v0-p.db", chain)
            return len(leaves) == len(chain) and all(leaf["stored"] for leaf in leaves.values())

        wait_until(every_block_stored, 30, "every certified area block stored on v0's P replica")
        p_height, leaves = p_state(bed.tmp / "validators" / "v0-p.db", chain)
        assert p_height >= 1
        for h, leaf in leaves.items():
            assert leaf["hash"] == chain[h]
            assert leaf["nodes"][:2] == ["s1", "s2"] and len(leaf["nodes"]) == 4      # both full + 2 replicas
            assert len(set(leaf["nodes"])) == 4 and len(leaf["receipted"]) >= 3       # > 2/3 of 4

        def chosen_hold_their_blocks():
            return all(nodes.held(n).get(h) == chain[h] for h, leaf in leaves.items() for n in leaf["nodes"])

        wait_until(chosen_hold_their_blocks, 30, "every chosen node to hold its blocks")
        for n in ("h1", "h2", "l1"):                     # heavy and light nodes keep only what was placed on them
            assert set(nodes.held(n)) == {h for h, leaf in leaves.items() if n in leaf["nodes"]}, n
        loads = {n: sum(n in leaf["nodes"] for leaf in leaves.values()) for n in ("h1", "h2", "l1")}
        assert max(loads.values()) - min(loads.values()) <= 1, loads    # T spreads the replicas
        wait_until(lambda: p_state(bed.tmp / "validators" / "v3-p.db", chain)[1] == p_state(
            bed.tmp / "validators" / "v0-p.db", chain)[1], 20, "v3's P replica to agree")
        wait_until(lambda: all(len(leaf["receipted"]) == 4 for leaf in p_state(
            bed.tmp / "validators" / "v0-p.db", chain)[1].values()), 30, "every chosen node's receipt certified")
    finally:
        if verifier is not None and verifier.poll() is None:
            verifier.kill()
            verifier.wait()
        nodes.cleanup()
        bed.cleanup()
