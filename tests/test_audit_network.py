"""Audits and the R chain on real parts: Mosquitto, a gateway proposing area1's chain,
four validator processes certifying it and co-signing P-area1 and R-area1, two full,
two heavy and one light storage node and the verifier auditing them every ~0.5 s."""

from __future__ import annotations

import json
import signal
import sqlite3

from aggregator.rchainapp import decode_node_leaf, node_key
from certlog.block import Header
from certlog.mpt import Trie
from certlog.store import NodeDB
from gridledger.testbed import verifier_process, wait_up, write_pchain

from chainkit import CHAIN, ChainBed
from conftest import MqttProbe
from helpers import wait_until
from storagekit import StorageNodes, flip_body_byte
from test_pchain_network import KINDS, p_state
from test_storage_network import Load, _settled, _start_chain

AUDITS = {"probe_s": 0.5, "retry_s": 2.0, "audit_s": 0.5, "audit_deadline_s": 1.0, "audit_late_s": 1.0,
          "cre_floor": 500}


def r_state(db) -> dict[str, dict]:
    """node -> {cre, ok, wrong, late, missing} in the certified R-chain state of a replica."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute("SELECT header FROM chain_blocks WHERE cert IS NOT NULL "
                               "ORDER BY height DESC LIMIT 1").fetchone()
            if row is None:
                return {}
            trie = Trie(NodeDB(conn), bytes.fromhex(Header.decode(row[0]).state_root))
            leaves = {n: trie.get(node_key(n)) for n in KINDS}
            return {n: decode_node_leaf(raw) for n, raw in leaves.items() if raw}
    except sqlite3.OperationalError:
        return {}


class AuditBed:
    """The chain, the P and R chains, the five storage nodes and the verifier, loaded
    until every certified block is stored on the certified P chain."""

    def __init__(self, tmp_path, broker):
        self.bed = ChainBed(tmp_path, broker, ["m1", "m2"], block_max=2)
        self.cfg = write_pchain(tmp_path, area=CHAIN, host=broker.host, port=broker.port, nodes=KINDS, replicas=2,
                                validator_configs=self.bed.validator_cfgs, r_chain=True, **AUDITS)
        self.nodes = StorageNodes(self.bed)
        self.verifier = None
        self.p_db = tmp_path / "validators" / "v0-p.db"
        self.r_db = tmp_path / "validators" / "v0-r.db"

    async def start(self) -> dict[int, str]:
        _start_chain(self.bed)
        for name, kind in KINDS.items():
            self.nodes.start(name, kind, [p for p in ("s1", "s2") if p != name])
        log = self.bed.tmp / "verifier.log"
        self.verifier = verifier_process(self.cfg, log)
        wait_up(log, self.verifier)
        async with MqttProbe(self.bed.broker, f"gl/v1/{CHAIN}/meters/+/ack") as probe:
            load = Load(self.bed, probe)
            await load.send(4)
            self.chain = _settled(self.bed, load.sent)

        def every_block_stored():
            _, leaves = p_state(self.p_db, self.chain)
            return len(leaves) == len(self.chain) and all(leaf["stored"] for leaf in leaves.values())

        wait_until(every_block_stored, 30, "every certified area block stored on the P chain")
        return self.chain

    def leaves(self) -> dict[int, dict]:
        return p_state(self.p_db, self.chain)[1]

    def cleanup(self) -> None:
        if self.verifier is not None and self.verifier.poll() is None:
            self.verifier.kill()
            self.verifier.wait()
        self.nodes.cleanup()
        self.bed.cleanup()


def holder(ab: AuditBed, candidates: tuple[str, ...]) -> str:
    """The first of `candidates` that has receipted a block. Each block goes to both full
    nodes and to two of the three heavy and light nodes, ranked by their RV, so which of
    those a short run's few blocks went to varies from run to run."""
    leaves = ab.leaves().values()
    node = next((n for n in candidates if any(n in leaf["receipted"] for leaf in leaves)), None)
    assert node is not None, f"none of {candidates} holds a block"
    return node


async def test_a_node_with_a_flipped_byte_in_its_body_file_is_caught_by_audit_its_cre_drops_and_the_block_is_re_placed(
        tmp_path, broker):
    ab = AuditBed(tmp_path, broker)
    try:
        chain = await ab.start()
        nodes = ab.nodes
        hv = holder(ab, ("h1", "h2"))  # a heavy node holding a block: at least one of the two holds each
        wait_until(lambda: r_state(ab.r_db).get(hv, {}).get("ok", 0) >= 1, 20, f"a certified ok audit of {hv}")
        bad = min(h for h, leaf in ab.leaves().items() if hv in leaf["receipted"])
        nodes.stop(hv)
        flip_body_byte(nodes.db(hv), bad)                     # one flipped byte in its body file, in that body
        nodes.start(hv, "heavy", ["s1", "s2"])

        def corrupt_audit():   # its store fails the record's CRC and says so: `missing`, the block re-placed
            return [e for e in _events(ab.bed.tmp / "verifier.log", "audit")
                    if e["node"] == hv and e["height"] == bad and e["reason"] == "corrupt"]

        wait_until(corrupt_audit, 30, f"an audit of {hv}'s block {bad} answered `corrupt`")
        assert corrupt_audit()[0]["outcome"] == "missing"
        # The R chain records the result once its next block is certified: a moment after the log.
        rec = wait_until(lambda: (lambda s: s if s.get("missing", 0) >= 1 else None)(r_state(ab.r_db)[hv]), 20,
                         f"the R chain's record of {hv}'s missing answer")
        assert rec["ok"] >= 1 and rec.get("wrong", 0) == 0, rec  # it served nothing wrong

        def re_placed():
            leaf = ab.leaves()[bad]
            new = [n for n in leaf["nodes"] if n not in ("s1", "s2")]
            return hv not in leaf["nodes"] and leaf["stored"] and all(n in leaf["receipted"] for n in new) \
                and all(nodes.held(n).get(bad) == chain[bad] for n in leaf["nodes"])

        wait_until(re_placed, 30, f"block {bad} re-placed off {hv}, held and receipted by its new node")
        leaf = ab.leaves()[bad]
        assert len(leaf["nodes"]) == 4 and len(set(leaf["nodes"])) == 4 and leaf["nodes"][:2] == ["s1", "s2"]
        for other in set(KINDS) - {hv}:                         # honest nodes are never judged wrong
            assert r_state(ab.r_db).get(other, {}).get("wrong", 0) == 0, other
        assert r_state(ab.r_db)[hv]["cre"] < 1000              # missing: -100, ok audits since give back a little
        v3 = tmp_path / "validators" / "v3-r.db"
        wait_until(lambda: r_state(v3).get(hv, {}).get("missing", 0) >= 1, 20, "v3's R replica to agree")
    finally:
        ab.cleanup()


async def test_a_killed_node_gets_missing_outcomes_and_below_the_floor_its_blocks_move(tmp_path, broker):
    ab = AuditBed(tmp_path, broker)
    try:
        chain = await ab.start()
        gone = holder(ab, ("l1", "h2", "h1"))                      # the light node, when it holds a block
        held = {h for h, leaf in ab.leaves().items() if gone in leaf["receipted"]}
        ab.nodes.stop(gone, signal.SIGKILL)                          # and never restarted

        wait_until(lambda: r_state(ab.r_db).get(gone, {}).get("missing", 0) >= 2, 30,
                   f"certified `missing` audits of {gone}")
        rec = r_state(ab.r_db)[gone]
        assert rec["cre"] < 1000 and rec["wrong"] == 0, rec

        def moved():
            leaves = ab.leaves()
            return all(gone not in leaves[h]["nodes"] and leaves[h]["stored"] for h in held) and all(
                ab.nodes.held(n).get(h) == chain[h] for h in held for n in leaves[h]["nodes"])

        wait_until(moved, 40, f"{gone}'s blocks re-placed once its CRE fell below the floor, and stored")
        assert r_state(ab.r_db)[gone]["cre"] < AUDITS["cre_floor"]
    finally:
        ab.cleanup()


def _events(log, ev: str) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if f'"ev": "{ev}"' in line]
