"""Certified area chains on real parts: Mosquitto, a gateway process proposing,
validator processes voting, and Byzantine validators played by the test."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys

import pytest

from aggregator.registry import MeterEntry, dump_registry, load_registry
from certlog import bls
from certlog.block import Header, canonical, cert_message
from certlog.net import Topics, decode_block, encode_block
from certlog.validators import load_validator_set, proposal_message, read_secret_key
from gridledger.testbed import certified_height
from gridledger.wire import ack_topic, readings_topic

from chainkit import CHAIN, Area, ChainBed, chain_bodies, replica
from conftest import MqttProbe
from helpers import wait_until

TOPICS = Topics(CHAIN)


async def _publish_readings(probe: MqttProbe, bed: ChainBed, per_meter: int) -> None:
    for _ in range(per_meter):
        for m, sim in bed.sims.items():
            await probe.publish(readings_topic(CHAIN, m), sim.next().to_json())
    for m in bed.sims:
        await probe.expect(ack_topic(CHAIN, m), lambda b: b["seq"] == per_meter, timeout=30)


def _chain_verify(bed: ChainBed, database=None) -> dict:
    cmd = [sys.executable, "-m", "gridledger", "chain", "verify", "--config", str(bed.cfg)]
    if database:
        cmd += ["--database", str(database)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert (out.returncode == 0) == report["ok"], out.stderr
    return report


def _all_in_certified_blocks(bed: ChainBed, readings: int) -> None:
    wait_until(lambda: certified_height(bed.db())[1] == 0 and certified_height(bed.db())[0] > 0, 60,
               "every reading in a certified block")
    report = _chain_verify(bed)
    assert report["ok"] and report["txs"] == readings, report


async def test_readings_become_certified_blocks_every_replica_agrees(tmp_path, broker):
    bed = ChainBed(tmp_path, broker, ["m1", "m2", "m3", "m4"], block_max=7)
    try:
        for i in range(4):
            bed.start_validator(i)
        bed.start_gateway()
        async with MqttProbe(broker, f"gl/v1/{CHAIN}/meters/+/ack", TOPICS.certs) as probe:
            await _publish_readings(probe, bed, 6)
            _all_in_certified_blocks(bed, 24)
        head = bed.heads()
        assert head[0] >= 4  # block_max 7: 24 readings need at least 4 blocks
        for i in range(4):
            wait_until(lambda: bed.heads(f"v{i}") == head, 30, f"v{i} to reach the gateway's head")
            assert _chain_verify(bed, bed.db(f"v{i}"))["certified_height"] == head[0]
    finally:
        bed.cleanup()


class Byzantine:
    """Validator 3 under the test's control."""

    def __init__(self, bed: ChainBed, mode: str):
        self.sk = read_secret_key(bed.tmp / "validators" / "v3.bls.key")
        self.mode = mode
        self.sent = 0

    def vote_for(self, header: Header) -> bytes:
        if self.mode == "garbage":  # a well-formed signature over the wrong message
            sig = bls.Sign(self.sk, b"garbage" + header.hash.encode())
            h = header.hash
        else:  # "conflict": a valid signature on a different header at the same height
            other = Header(**{**header.to_dict(), "time": header.time + 1})
            sig, h = bls.Sign(self.sk, cert_message(other.chain, other.height, other.hash)), other.hash
        return canonical({"chain": header.chain, "height": header.height, "hash": h, "validator": 3,
                          "sig": sig.hex()})

    async def run(self, probe: MqttProbe) -> None:
        seen = 0
        while True:
            await asyncio.sleep(0.05)
            for topic, payload in probe.received[seen:]:
                seen += 1
                if topic == TOPICS.proposals:
                    await probe.publish(TOPICS.votes, self.vote_for(decode_block(payload).header))
                    self.sent += 1


@pytest.mark.parametrize("mode", ["silent", "garbage", "conflict"])
async def test_blocks_certify_with_three_honest_of_four(tmp_path, broker, mode):
    bed = ChainBed(tmp_path, broker, ["m1", "m2", "m3"], block_max=5)
    try:
        for i in range(3):
            bed.start_validator(i)
        bed.start_gateway()
        async with MqttProbe(broker, f"gl/v1/{CHAIN}/meters/+/ack", TOPICS.proposals, TOPICS.certs) as probe:
            byz = Byzantine(bed, mode)
            task = asyncio.create_task(byz.run(probe)) if mode != "silent" else None
            try:
                await _publish_readings(probe, bed, 5)
                _all_in_certified_blocks(bed, 15)
            finally:
                if task:
                    task.cancel()
        certs = bed.certificates()
        assert certs and all(c.signers == (0, 1, 2) for c in certs)
        bed.gateway.terminate()
        assert bed.gateway.wait(20) == 0
        stop = [json.loads(line) for line in bed.log("gateway").splitlines() if '"ev": "stop"' in line][-1]
        assert stop["height"] == len(certs)
        if mode != "silent":  # every Byzantine vote was seen, refused and counted
            assert byz.sent >= 1
            # (a vote arriving after its block moved on is "stale": refused all the same)
            counted = stop.get("vote_bad_signature" if mode == "garbage" else "vote_conflicting_header", 0)
            assert counted + stop.get("vote_stale", 0) >= 1, stop
    finally:
        bed.cleanup()


async def test_an_equivocating_proposer_never_gets_two_certificates(tmp_path, broker):
    """The proposer's key signs two different valid headers at height 1: honest
    validators sign only the first they see, so the second never reaches 2f+1."""
    bed = ChainBed(tmp_path, broker, ["m1"])
    try:
        for i in range(4):
            bed.start_validator(i)
        area = Area({"m1": bed.sims["m1"]}, load_registry(tmp_path / "registry.toml"))
        vset = load_validator_set(tmp_path / "validators.toml")
        rep = replica(tmp_path / "equivocator.db", area, vset)
        txs = [bed.sims["m1"].next().to_json()]
        a = rep.build(txs)
        b = Header(**{**a.to_dict(), "time": a.time + 1})
        psk = read_secret_key(tmp_path / "proposer.bls.key")
        async with MqttProbe(broker, TOPICS.votes, f"{TOPICS.proposals}") as probe:
            await asyncio.sleep(1.0)  # validators subscribed (they are up when the probe sees their sync)
            # a forged proposal (not the proposer's key) is ignored outright
            forged = Header(**{**a.to_dict(), "time": a.time + 2})
            await probe.publish(TOPICS.proposals, encode_block(forged, txs, proposer_sig=bls.Sign(
                read_secret_key(tmp_path / "validators" / "v0.bls.key"), proposal_message(forged))))
            for h in (a, b):
                await probe.publish(TOPICS.proposals, encode_block(h, txs, proposer_sig=bls.Sign(psk, proposal_message(h))))
            await probe.expect(TOPICS.votes, lambda v: v["validator"] == 3 and v["hash"] == a.hash, timeout=30)
            for i in range(3):
                await probe.expect(TOPICS.votes, lambda v, i=i: v["validator"] == i and v["hash"] == a.hash, timeout=30)
            await asyncio.sleep(1.0)
            votes = [json.loads(p) for t, p in probe.received if t == TOPICS.votes]
        assert {v["hash"] for v in votes} == {a.hash}
        for i in range(4):
            log = bed.log(f"v{i}")
            assert '"conflicting_header"' in log and '"not_from_proposer"' in log, log
    finally:
        bed.cleanup()


async def test_a_reading_the_chain_refuses_is_set_aside_not_retried_for_ever(tmp_path, broker):
    """Two meters enrolled on one account interleave (ingest accepts each, the
    account chain cannot): the chain sets the reading aside, logs it, and goes on."""
    bed = ChainBed(tmp_path, broker, ["m1", "m2"])
    reg = tmp_path / "registry.toml"
    reg.write_text(dump_registry([MeterEntry(e.meter, "acct-shared", e.public_key) for e in load_registry(reg)]))
    try:
        for i in range(4):
            bed.start_validator(i)
        bed.start_gateway()
        m1, m2 = bed.sims["m1"], bed.sims["m2"]
        m2.t += 900 * 10  # the replacement's readings come after the old meter's
        async with MqttProbe(broker, f"gl/v1/{CHAIN}/meters/+/ack") as probe:
            for sim, seq in ((m1, 1), (m2, 1), (m1, 2), (m2, 2)):
                await probe.publish(readings_topic(CHAIN, sim.key.meter), sim.next().to_json())
                await probe.expect(ack_topic(CHAIN, sim.key.meter), lambda b, s=seq: b["seq"] == s, timeout=30)
        wait_until(lambda: certified_height(bed.db()) == (certified_height(bed.db())[0], 0)
                   and certified_height(bed.db())[0] > 0, 30, "the chain to settle")
        assert bed.gateway.poll() is None
        assert '"unchainable"' in bed.log("gateway") and "tx_meter_switch" in bed.log("gateway")
        report = _chain_verify(bed)
        assert report["ok"] and report["txs"] == 3, report  # m1#2 set aside; m2 took the account over
    finally:
        bed.cleanup()


class _Lean:
    """The reading link as the proposer sees it: up (it writes) or down (it writes nothing)."""

    def __init__(self, up: bool):
        self.up, self.sent = up, []

    def publish_many(self, messages) -> int:
        messages = list(messages)
        if not self.up:
            return 0
        self.sent += messages
        return len(messages)


class _Paho:
    def __init__(self):
        self.sent = []

    async def publish(self, topic, payload, qos=0):
        self.sent.append((topic, payload, qos))


@pytest.mark.parametrize("lean_up", [True, False, None], ids=["lean-up", "lean-down", "no-lean"])
async def test_proposals_go_on_the_reading_link_while_it_is_up_else_at_qos_1(lean_up):
    from aggregator.chain import AreaChain
    lean, paho = (None if lean_up is None else _Lean(lean_up)), _Paho()
    publish = AreaChain.publisher(paho, lean)
    await publish(TOPICS.proposals, b"block")
    if lean_up:
        assert lean.sent == [(TOPICS.proposals, b"block")] and paho.sent == []
    else:
        assert paho.sent == [(TOPICS.proposals, b"block", 1)]
        assert lean is None or lean.sent == []


async def test_the_gateway_keeps_each_reading_once_and_chain_verify_checks_the_rows(tmp_path, broker):
    """A block's readings are the gateway's `readings` rows, not a second copy in
    `chain_txs`; sync and `chain verify` rebuild them, and a changed row is a fault."""
    bed = ChainBed(tmp_path, broker, ["m1", "m2", "m3"], block_max=4)
    try:
        for i in range(4):
            bed.start_validator(i)
        bed.start_gateway()
        async with MqttProbe(broker, f"gl/v1/{CHAIN}/meters/+/ack") as probe:
            await _publish_readings(probe, bed, 4)
            _all_in_certified_blocks(bed, 12)
        head = bed.heads()
        for i in range(4):  # the validators got every body whole, by proposal or sync
            wait_until(lambda: bed.heads(f"v{i}") == head, 30, f"v{i} to reach the gateway's head")
        gateway, v0 = chain_bodies(bed.db()), chain_bodies(bed.db("v0"))
        assert gateway == v0 and sum(map(len, gateway.values())) == 12
        with sqlite3.connect(bed.db()) as conn:
            assert conn.execute("SELECT COUNT(*) FROM chain_txs").fetchone()[0] == 0  # no reading twice
        bed.gateway.send_signal(signal.SIGTERM)
        bed.gateway.wait(10)
        with sqlite3.connect(bed.db()) as conn:  # one reading's time, in block 2
            rowid = conn.execute("SELECT hi FROM reading_blocks WHERE height = 2").fetchone()[0]
            conn.execute("UPDATE readings SET t = t + 1 WHERE rowid = ?", (rowid,))
        report = _chain_verify(bed)
        assert not report["ok"] and report["fault"]["height"] == 2, report
        assert report["fault"]["reason"] == "tx_root_mismatch" and report["certified_height"] == 1
    finally:
        bed.cleanup()
