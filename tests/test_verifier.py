"""The verifier in process, without MQTT: its queue of P-chain records across role changes
(a node dead, readmitted, promoted again), on real BLS keys and a real P-chain replica."""

from __future__ import annotations

import json

from aggregator.receipts import sign_receipt
from aggregator.storagewire import liveness
from aggregator.verifier import Verifier, load_verifier_config
from certlog.net import encode_block
from certlog.validators import read_secret_key
from gridledger.testbed import write_chain, write_pchain

from chainkit import CHAIN
from storagekit import make_chain


def verifier(tmp_path, nodes: dict[str, str]) -> Verifier:
    cfgs = write_chain(tmp_path, area=CHAIN, host="127.0.0.1", port=1)
    cfg = write_pchain(tmp_path, area=CHAIN, host="127.0.0.1", port=1, nodes=nodes, replicas=1,
                       validator_configs=cfgs)
    return Verifier(load_verifier_config(cfg))


def receipt(tmp_path, header, node: str, kind: str):
    return sign_receipt(read_secret_key(tmp_path / "storage" / f"{node}.bls.key"), header, node, kind)


async def test_a_node_chosen_again_after_its_death_has_its_new_receipt_recorded(tmp_path):
    """f2 receipts as full, dies (h1 promoted), is readmitted, is promoted again when h1
    dies: its second receipt of the same block is queued, not refused as a duplicate id."""
    v = verifier(tmp_path, {"f1": "full", "f2": "full", "h1": "heavy", "l1": "light"})
    sks = [read_secret_key(tmp_path / "validators" / f"v{i}.bls.key") for i in range(4)]
    [block], _, _ = make_chain(1, sks=sks)
    try:
        await v.on_cert(encode_block(block.header, None, block.cert))
        await v.on_receipt(receipt(tmp_path, block.header, "f2", "full").encode())
        await v.declare_dead("f2", via="last_will")                     # h1 is the only heavy node
        assert v.roles.full == ("f1", "h1")
        v.roles = v.roles.readmitted("f2")                              # f2 returns, as heavy
        await v.declare_dead("h1", via="last_will")
        assert v.roles.full == ("f1", "f2")
        await v.on_receipt(receipt(tmp_path, block.header, "f2", "full").encode())
        await v.on_receipt(receipt(tmp_path, block.header, "f2", "full").encode())   # a resent one: once
        (got,) = v.conn.execute("SELECT receipted FROM p_placed WHERE height = 1").fetchone()
        assert "f2" in got
        ids = [i for (i,) in v.conn.execute("SELECT id FROM p_queue WHERE id LIKE 'receipt/1/f2/%'")]
        assert len(ids) == 2 and v.counts["receipt_duplicate"] == 1, ids
    finally:
        v.conn.close()


class Client:
    def __init__(self):
        self.sent = []

    async def publish(self, topic, payload, qos=0, retain=False):
        self.sent.append((topic, json.loads(payload)))


async def test_a_node_saying_alive_with_a_kind_the_verifier_did_not_give_it_is_told_its_kind_again(tmp_path):
    """A verifier killed between a promotion's record and its role message: the promoted
    node's retained "alive" still says heavy, and is answered with {"role": "full"}."""
    v = verifier(tmp_path, {"f1": "full", "f2": "full", "h1": "heavy", "l1": "light"})
    try:
        await v.declare_dead("f2", via="last_will")            # no client: the role message is lost
        v._client = Client()
        await v.on_liveness("h1", liveness("h1", True, "heavy"))
        await v.on_liveness("l1", liveness("l1", True, "light"))    # right: nothing sent
        await v.on_liveness("f1", liveness("f1", True, "full"))
        assert v._client.sent == [(v.topics.store("h1"), {"by": "verifier", "role": "full"})]
    finally:
        v.conn.close()


async def test_a_certificate_lost_to_a_kill_is_placed_from_a_full_nodes_headers_and_a_forged_one_is_not(tmp_path):
    """Block 2's certificate never reached the verifier (acknowledged by paho, then the
    process killed): block 3's arrival makes it ask a full node for the headers it lacks,
    check their certificates and place block 2; a header whose certificate is another
    block's is refused and left unplaced."""
    v = verifier(tmp_path, {"f1": "full", "f2": "full", "h1": "heavy", "l1": "light"})
    sks = [read_secret_key(tmp_path / "validators" / f"v{i}.bls.key") for i in range(4)]
    blocks, _, _ = make_chain(4, sks=sks)
    asked = []

    async def ask(node, op, **args):
        asked.append((node, op, args))
        forged = {"header": blocks[2].header.to_dict(), "cert": blocks[1].cert.to_dict()}   # 3's header, 2's cert
        return {"ok": True, "headers": [{"header": blocks[1].header.to_dict(), "cert": blocks[1].cert.to_dict()},
                                        forged]}, b""

    v.requester.ask = ask
    try:
        await v.on_cert(encode_block(blocks[0].header, None, blocks[0].cert))
        assert await v.fill_gaps(1) == 0 and not asked                       # nothing below 1
        await v.on_cert(encode_block(blocks[3].header, None, blocks[3].cert))
        await v._gaps
        assert asked == [("f1", "headers", {"lo": 2, "hi": 3})]
        placed = [h for (h,) in v.conn.execute("SELECT height FROM p_placed ORDER BY height")]
        assert placed == [1, 2, 4] and v.counts["gaps_placed"] == 1           # 3: its certificate is 2's
    finally:
        v.conn.close()
