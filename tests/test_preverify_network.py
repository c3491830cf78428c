"""Pre-verification on real parts: Mosquitto, four validator processes reading the
area's reading stream, and the test playing the chain's proposer."""

from __future__ import annotations

import asyncio
import json
import os
import signal

from aggregator.registry import load_registry
from certlog import bls
from certlog.net import Topics, encode_block
from certlog.validators import load_validator_set, proposal_message, read_secret_key
from certlog.block import Vote
from gridledger.broker import free_port
from gridledger.metrics import scrape as scrape_metrics
from gridledger.wire import MAX_PAYLOAD, kid_of, make_reading, readings_topic

from chainkit import CHAIN, Area, ChainBed, replica
from conftest import MqttProbe
from helpers import N, wait_until

TOPICS = Topics(CHAIN)
VALIDATORS = 4
PRE = "gridledger_validator_preverify_total"
CACHE = "gridledger_validator_signature_cache_total"


class Bed(ChainBed):
    """Validators with metrics endpoints, no gateway: the test proposes."""

    def __init__(self, tmp, broker, meters):
        super().__init__(tmp, broker, meters)
        self.ports = [free_port() for _ in range(VALIDATORS)]
        for cfg, port in zip(self.validator_cfgs, self.ports):
            cfg.write_text(cfg.read_text() + f"\n[metrics]\nport = {port}\n")
        area = Area(self.sims, load_registry(tmp / "registry.toml"))
        self.proposer = replica(tmp / "proposer.db", area, load_validator_set(tmp / "validators.toml"))
        self.psk = read_secret_key(tmp / "proposer.bls.key")

    def start(self):
        for i in range(VALIDATORS):
            self.start_validator(i)

    def metrics(self) -> list[dict[str, float]]:
        return [scrape_metrics(p) for p in self.ports]

    async def wait_metrics(self, pred, what: str) -> list[dict[str, float]]:
        """Until every validator's metrics satisfy `pred` (polled; bounded)."""
        return await asyncio.to_thread(
            wait_until, lambda: (lambda ms: ms if all(pred(m) for m in ms) else None)(self.metrics()), 30, what)

    async def propose(self, probe: MqttProbe, txs: list[bytes]):
        """Publish the next block as the chain's proposer; returns (header, index in probe.received)."""
        header = self.proposer.build(txs)
        start = len(probe.received)
        await probe.publish(TOPICS.proposals, encode_block(header, txs, proposer_sig=bls.Sign(
            self.psk, proposal_message(header))))
        return header, start

    async def certify(self, probe: MqttProbe, txs: list[bytes]):
        """Propose, wait for every validator's vote, commit and publish the certificate."""
        header, start = await self.propose(probe, txs)
        for i in range(VALIDATORS):
            await probe.expect(TOPICS.votes, lambda v, i=i: v["validator"] == i and v["hash"] == header.hash,
                               timeout=30, start=start)
        votes = [Vote.from_dict(json.loads(p)) for t, p in probe.received[start:] if t == TOPICS.votes]
        cert = self.proposer.validators.aggregate([v for v in votes if v.hash == header.hash])
        self.proposer.commit(header, txs, cert)
        await probe.publish(TOPICS.certs, encode_block(header, cert=cert))
        return header


async def _stream(probe: MqttProbe, readings) -> None:
    for r in readings:
        await probe.publish(readings_topic(CHAIN, r.meter), r.to_json())


def _flip_sig(r) -> bytes:
    return r.to_json().replace(r.sig.encode(), (("0" if r.sig[0] != "0" else "1") + r.sig[1:]).encode())


async def test_a_block_whose_readings_were_checked_on_the_stream_certifies_on_cache_hits(tmp_path, broker):
    bed = Bed(tmp_path, broker, ["m1", "m2", "m3"])
    try:
        bed.start()
        async with MqttProbe(broker, TOPICS.votes) as probe:
            streamed = [s.next() for _ in range(3) for s in bed.sims.values()]
            await _stream(probe, streamed)
            await bed.wait_metrics(lambda m: m.get(f'{PRE}{{outcome="verified"}}') == 9, "9 readings pre-verified")
            await bed.certify(probe, [r.to_json() for r in streamed])
            ms = bed.metrics()
            assert all(m[f'{CACHE}{{result="hit"}}'] == 9 and m[f'{CACHE}{{result="miss"}}'] == 0 for m in ms), ms
            # Readings never seen on the stream: every one a miss, verified then; the block still certifies.
            unseen = [s.next() for s in bed.sims.values()]
            await bed.certify(probe, [r.to_json() for r in unseen])
            ms = await bed.wait_metrics(lambda m: m["gridledger_validator_height"] == 2, "block 2 committed")
            assert all(m[f'{CACHE}{{result="miss"}}'] == 3 and m[f'{CACHE}{{result="hit"}}'] == 9 for m in ms), ms
    finally:
        bed.cleanup()


async def test_a_forged_reading_on_the_stream_is_not_cached_and_its_block_is_refused(tmp_path, broker):
    bed = Bed(tmp_path, broker, ["m1", "m2"])
    try:
        bed.start()
        async with MqttProbe(broker, TOPICS.votes) as probe:
            r = bed.sims["m1"].next()
            # Signed by m2's key, claiming to be m1's; and m1's own reading with one signature digit changed.
            by_m2 = make_reading(meter="m1", seq=r.seq, t=r.t, dt=r.dt, prev=r.prev, kid=kid_of(N), c=int(r.c, 16),
                                 sign=bed.keys["m2"].sign)
            for payload in (by_m2.to_json(), _flip_sig(r)):
                await probe.publish(readings_topic(CHAIN, "m1"), payload)
            await bed.wait_metrics(lambda m: m.get(f'{PRE}{{outcome="bad_signature"}}') == 2,
                                   "both forgeries refused on the stream")
            assert all(m["gridledger_validator_signature_cache_entries"] == 0 for m in bed.metrics())
            header, start = await bed.propose(probe, [_flip_sig(r)])
            ms = await bed.wait_metrics(lambda m: m.get('gridledger_validator_events_total{event="tx_bad_signature"}')
                                        == 1, "every validator to refuse the block")
            assert all(m[f'{CACHE}{{result="miss"}}'] == 1 and m.get(f'{CACHE}{{result="hit"}}', 0) == 0
                       for m in ms), ms
            assert not [p for t, p in probe.received[start:] if json.loads(p)["hash"] == header.hash]
            for i in range(VALIDATORS):
                assert '"tx_bad_signature"' in bed.log(f"v{i}")
    finally:
        bed.cleanup()


async def test_garbage_on_the_reading_topic_is_counted_and_the_validators_keep_voting(tmp_path, broker):
    bed = Bed(tmp_path, broker, ["m1", "m2"])
    try:
        bed.start()
        async with MqttProbe(broker, TOPICS.votes) as probe:
            good = bed.sims["m1"].next()
            t1 = readings_topic(CHAIN, "m1")
            for topic, payload in [(t1, b""), (t1, b"{not json"), (t1, bytes(range(256))), (t1, b"[" * 5000),
                                   (t1, b"x" * (MAX_PAYLOAD + 1)), (t1, b'{"v":1,"meter":"m1"}'),
                                   (readings_topic(CHAIN, "m2"), good.to_json()),
                                   (readings_topic(CHAIN, "zz"), good.to_json().replace(b'"m1"', b'"zz"')),
                                   (t1, good.to_json())]:
                await probe.publish(topic, payload)
            ms = await bed.wait_metrics(lambda m: m.get(f'{PRE}{{outcome="verified"}}') == 1, "the good one")
            want = {"malformed_json": 4, "oversized": 1, "missing_field": 1, "topic_mismatch": 1,
                    "unknown_meter": 1, "verified": 1}
            for m in ms:
                assert {k[len(PRE) + 10:-2]: v for k, v in m.items() if k.startswith(PRE)} == want, m
            await bed.certify(probe, [good.to_json(), bed.sims["m2"].next().to_json()])
            ms = await bed.wait_metrics(lambda m: m["gridledger_validator_height"] == 1, "block 1 committed")
            assert all(m[f'{CACHE}{{result="hit"}}'] == 1 and m[f'{CACHE}{{result="miss"}}'] == 1 for m in ms), ms
    finally:
        bed.cleanup()


async def test_a_proposal_is_voted_on_before_a_backlog_of_stream_work(tmp_path, broker):
    """3,000 readings queued on the stream, then a proposal: every vote comes while
    each validator still has part of the backlog to check.

    The validators are stopped (SIGSTOP) while the flood and then the proposal are
    published, so each finds the whole backlog ahead of the proposal in its socket
    when it resumes. Left running, they check the flood as fast as it is published
    (since verification moved to libsodium, all of it before the proposal comes),
    and no backlog would be left to jump."""
    meters = [f"m{i}" for i in range(1, 31)]
    bed = Bed(tmp_path, broker, meters)
    backlog = 3000
    stopped: list[int] = []
    try:
        bed.start()
        c = int(bed.sims["m1"].next().c, 16)  # one ciphertext serves: only the signatures matter here
        flood = []
        for m in meters[1:]:
            prev, key = "0" * 64, bed.keys[m]
            for seq in range(1, backlog // (len(meters) - 1) + 2):
                r = make_reading(meter=m, seq=seq, t=1_700_000_000 + seq * 900, dt=900, prev=prev, kid=kid_of(N),
                                 c=c, sign=key.sign)
                prev = r.hash
                flood.append(r)
        flood = flood[:backlog]
        async with MqttProbe(broker, TOPICS.votes) as probe:
            for p in bed.validators.values():
                os.kill(p.pid, signal.SIGSTOP)
                stopped.append(p.pid)
            await asyncio.gather(*(probe.publish(readings_topic(CHAIN, r.meter), r.to_json()) for r in flood))
            certified = asyncio.create_task(bed.certify(probe, [bed.sims["m1"].sent[0].to_json()]))
            await asyncio.sleep(0.5)  # the proposal is out, behind the flood
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
            stopped.clear()
            header = await certified
            ms = bed.metrics()
            done = [m.get(f'{PRE}{{outcome="verified"}}', 0) for m in ms]
            # Had the proposal waited behind the stream, every validator would have checked
            # all of it before voting.
            assert all(d < backlog for d in done), done
            assert header.height == 1
            await bed.wait_metrics(lambda m: m.get(f'{PRE}{{outcome="verified"}}') == backlog, "the backlog checked")
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        bed.cleanup()
