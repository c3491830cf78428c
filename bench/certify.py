"""Certification latency of an area-chain block of 1,000 readings: this process proposes,
real validator processes on a real Mosquitto re-check and sign, and the block is
certified at the 2f+1-th valid vote. Baseline: one validator's check of the same block
(`Replica.check`, the untrusted path, no pre-verified signatures) in this process,
with nothing else running.

Two paths, blocks taken in turn: cold (the validators never saw the block's readings)
and deployed (the block's readings were first published on the meters' reading
topics, as meters do, and every validator had checked their signatures on the
stream before the proposal: `aggregator/preverify.py`). The stream's CPU is
measured apart: the work is moved before the proposal, not removed.

The area set-up, the readings and the process plumbing here are shared with
bench/ingest.py, which imports them (bench/ holds scripts, not a package)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import math
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import aiomqtt

from aggregator.areaapp import AreaApp
from aggregator.preverify import Preverifier, PreverifyConfig, VerifiedSignatures
from aggregator.registry import MeterEntry, Registry, dump_registry
from certlog import bls
from certlog.block import ChainError
from certlog.net import Topics, decode_vote, encode_block
from certlog.proposer import Proposer
from certlog.replica import Replica
from certlog.store import ChainStore, connect
from certlog.validators import load_validator_set, proposal_message, read_secret_key
from gridledger.broker import Broker, free_port, start_mosquitto
from gridledger.loadgen import LoadMeter, RhoPool
from gridledger.meterkeys import MeterKey
from gridledger.metrics import scrape
from gridledger.paillier import PublicKey
from gridledger.testbed import chain_table, validator_process, wait_up, write_chain
from gridledger.wire import Reading, kid_of, readings_topic

from benchlib import emit, load_test_modulus, machine, median, parse_args, timed

NAME = "certify"
AREA = "area1"
METERS = 100
PER_METER = 10      # readings per meter per block: each block is a catch-up burst
WARMUP_BLOCKS = 1   # first block: empty trie, cold caches; certified but not counted
# Distinct randomness is costly (one r^n each) and the checks cost the same for any
# valid ciphertext, so readings cycle through a few.
RHOS = 16
DT = 900
UP_TIMEOUT_S = 60    # a role's start-up on a loaded 2-core machine
VOTE_TIMEOUT_S = 60
POLL_S = 0.05        # how often the validators' metrics are read while waiting (each read costs them CPU)
PUBLISH_AHEAD = 10   # stream readings in flight at once (aiomqtt warns beyond 10 pending calls)


# -- shared with bench/ingest.py ---------------------------------------------------

def meter_keys(count: int) -> list[MeterKey]:
    return [MeterKey(f"bm{i:04d}", hashlib.sha256(b"gridledger bench meter %d" % i).digest())
            for i in range(count)]


class FixedRhos:
    """A RhoPool stand-in that cycles through a few precomputed values."""

    def __init__(self, n: int, count: int = RHOS):
        pool = RhoPool(n, size=count)
        self._cycle = itertools.cycle([pool.take() for _ in range(count)])

    def take(self) -> int:
        return next(self._cycle)


def load_meters(keys: list[MeterKey], n: int, readings_per_meter: int) -> list[LoadMeter]:
    """Meters at seq 0 whose whole run of 15-minute intervals ends in the recent past,
    so neither the gateway's clock check nor the app's (block time + 300 s) refuses one."""
    start = (int(time.time()) // DT - readings_per_meter - 2) * DT
    public = PublicKey(n)
    return [LoadMeter(k, public, seed=k.meter, t=start, dt=DT) for k in keys]


def write_area(wd: Path, keys: list[MeterKey], n: int, broker: Broker, validators: int,
               block_max: int = 1000) -> list[Path]:
    """Registry, Paillier public key, validator keys and configs, and a gateway config
    proposing the chain (helpers.make_area's layout); returns the validator configs."""
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "registry.toml").write_text(dump_registry([MeterEntry(k.meter, f"acct-{k.meter}", k.public_hex)
                                                     for k in keys]))
    (wd / "paillier.pub.json").write_text(json.dumps({"n": str(n), "kid": kid_of(n)}))
    (wd / "gateway.toml").write_text(
        f'[gateway]\narea = "{AREA}"\ndatabase = "gateway.db"\nregistry = "registry.toml"\n'
        f'paillier_public = "paillier.pub.json"\n\n[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n\n'
        + chain_table(block_max))
    return write_chain(wd, area=AREA, host=broker.host, port=broker.port, validators=validators,
                       registry="registry.toml", paillier_public="paillier.pub.json")


def start_validators(configs: list[Path], logs: Path) -> list[subprocess.Popen]:
    """Launch all, then wait for all: their start-ups overlap."""
    procs = [validator_process(c, logs / f"{c.stem}.log") for c in configs]
    for c, p in zip(configs, procs):
        wait_up(logs / f"{c.stem}.log", p, UP_TIMEOUT_S)
    return procs


def stop(procs: list[subprocess.Popen], timeout: float = 10) -> None:
    """SIGTERM each (so each logs its "stop" counters), then wait; kill a straggler."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # fields 14, 15: utime, stime


def percentile(xs: list[float], q: float) -> float:
    """Nearest rank: with fewer than 100 samples, p99 is the maximum."""
    s = sorted(xs)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def log_events(log: Path, name: str) -> list[dict]:
    out = []
    for line in (log.read_text().splitlines() if log.exists() else []):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if obj.get("ev") == name:
            out.append(obj)
    return out


# -- the proposer side of one block -------------------------------------------------

class Ballot:
    """Valid votes on the header in flight, with their arrival times."""

    def __init__(self, replica: Replica):
        self.vset = replica.validators
        self.header = None
        self.at: dict[int, float] = {}
        self.votes = {}
        self.invalid = 0
        self.quorum = asyncio.Event()
        self.everyone = asyncio.Event()

    def open(self, header) -> None:
        self.header, self.at, self.votes = header, {}, {}
        self.quorum.clear()
        self.everyone.clear()

    def on_vote(self, payload: bytes) -> None:
        now = time.perf_counter()
        try:
            vote = decode_vote(payload)
        except ChainError:
            self.invalid += 1
            return
        h = self.header
        if h is None or (vote.height, vote.hash) != (h.height, h.hash) or vote.validator in self.votes:
            return  # a resend, or a vote on a block already certified
        if not self.vset.check_vote(vote):
            self.invalid += 1
            return
        self.votes[vote.validator], self.at[vote.validator] = vote, now
        if len(self.votes) >= self.vset.quorum:
            self.quorum.set()
        if len(self.votes) == self.vset.n:
            self.everyone.set()


async def wait_validators(ports: list[int], pred, what: str) -> list[dict[str, float]]:
    """Poll every validator's metrics until `pred` holds for all (a condition, not a fixed sleep)."""
    deadline = time.monotonic() + VOTE_TIMEOUT_S
    while True:
        ms = await asyncio.gather(*(asyncio.to_thread(scrape, p) for p in ports))
        if all(pred(m) for m in ms):
            return ms
        if time.monotonic() > deadline:
            raise AssertionError(f"validators not {what} within {VOTE_TIMEOUT_S} s: {ms}")
        await asyncio.sleep(POLL_S)


PREVERIFIED = 'gridledger_validator_preverify_total{outcome="verified"}'


class Run:
    """Per-block figures: seconds to the quorum-th and to the last vote, the baseline
    check, validator CPU (all of them) while proposing and while pre-verifying."""

    def __init__(self):
        self.quorum_s, self.last_s, self.verify_s = [], [], []
        self.cpu_s, self.stream_cpu_s, self.stream_wall_s = [], [], []
        self.warm: list[bool] = []


async def propose_all(broker: Broker, replica: Replica, checker: Replica, psk: int, blocks: list[list[Reading]],
                      warm: list[bool], procs: list[subprocess.Popen], ports: list[int]) -> Run:
    """Certify each block in turn; a `warm` block's readings are first published on the
    reading topics and checked on the stream by every validator."""
    topics = Topics(AREA)
    ballot = Ballot(replica)
    run = Run()
    streamed = 0

    def cpu() -> float:
        return sum(cpu_seconds(p.pid) for p in procs)

    async with aiomqtt.Client(broker.host, broker.port, identifier="bench-proposer") as client:
        async def publish(topic: str, payload: bytes) -> None:
            await client.publish(topic, payload, qos=1)
        syncer = Proposer(replica, publish, psk)  # only to serve a validator that fell behind

        async def read() -> None:
            async for msg in client.messages:
                if msg.topic.value == topics.votes:
                    ballot.on_vote(bytes(msg.payload))
                else:
                    await syncer.on_sync(bytes(msg.payload))

        await client.subscribe(topics.votes, qos=1)
        await client.subscribe(topics.sync, qos=1)
        reader = asyncio.create_task(read())
        try:
            for readings, is_warm in zip(blocks, warm):
                txs = [r.to_json() for r in readings]
                stream_cpu = stream_wall = 0.0
                if is_warm:  # as the meters would: every reading on its topic, QoS 1
                    c0, t0 = cpu(), time.perf_counter()
                    ahead = asyncio.Semaphore(PUBLISH_AHEAD)

                    async def stream(r: Reading, tx: bytes) -> None:
                        async with ahead:
                            await publish(readings_topic(AREA, r.meter), tx)
                    await asyncio.gather(*(stream(r, tx) for r, tx in zip(readings, txs)))
                    streamed += len(txs)
                    await wait_validators(ports, lambda m: m.get(PREVERIFIED, 0) >= streamed, "pre-verified")
                    stream_cpu, stream_wall = cpu() - c0, time.perf_counter() - t0
                header = replica.build(txs)
                run.verify_s.append(timed(checker.check, header, txs))  # validators are idle now
                payload = encode_block(header, txs, proposer_sig=bls.Sign(psk, proposal_message(header)))
                ballot.open(header)
                c0 = cpu()
                t0 = time.perf_counter()
                await publish(topics.proposals, payload)
                await asyncio.wait_for(ballot.quorum.wait(), VOTE_TIMEOUT_S)
                run.quorum_s.append(sorted(ballot.at.values())[replica.validators.quorum - 1] - t0)
                cert = replica.validators.aggregate(list(ballot.votes.values()))
                replica.commit(header, txs, cert)
                await publish(topics.certs, encode_block(header, cert=cert))
                checker.commit(header, txs, cert)
                # The slowest validator finishes too, and every one commits, so the next
                # block starts on idle cores and each block's CPU is its own.
                await asyncio.wait_for(ballot.everyone.wait(), VOTE_TIMEOUT_S)
                run.last_s.append(max(ballot.at.values()) - t0)
                await wait_validators(ports, lambda m: m["gridledger_validator_height"] >= header.height, "committed")
                run.cpu_s.append(cpu() - c0)
                run.stream_cpu_s.append(stream_cpu)
                run.stream_wall_s.append(stream_wall)
                run.warm.append(is_warm)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    if ballot.invalid:
        raise AssertionError(f"{ballot.invalid} votes did not verify")
    return run


def stream_costs(readings: list[Reading], registry: Registry, n: int, reps: int) -> tuple[float, float]:
    """Seconds per reading, in this process, medians of `reps` rounds taken in turn: the
    Ed25519 verifies alone, and the stream side's whole check (`Preverifier.step`:
    parse, topic, registry, verify, remember) of the same readings, without MQTT."""
    def verify_all() -> None:
        for r in readings:
            registry.verify(r.meter, r.signed_bytes, bytes.fromhex(r.sig))

    def step_all() -> None:
        pre = Preverifier(AREA, lambda: registry, kid_of(n), VerifiedSignatures(), PreverifyConfig(queue=len(msgs)))
        for topic, payload in msgs:
            pre.offer(topic, payload)
        pre.step(60.0)
        if pre.counts != {"verified": len(msgs)}:
            raise AssertionError(f"stream check: {pre.counts}")

    msgs = [(readings_topic(AREA, r.meter), r.to_json()) for r in readings]
    rounds = [(timed(verify_all), timed(step_all)) for _ in range(reps)]
    return tuple(median([r[i] for r in rounds]) / len(readings) for i in (0, 1))


def main() -> None:
    args = parse_args(__doc__)
    pairs, validators = (8 if args.quick else 30), 4
    n = load_test_modulus()
    total = 2 * pairs + WARMUP_BLOCKS
    # Cold and deployed blocks alternate, so a slow spell of the machine hits both.
    warm = [False] * WARMUP_BLOCKS + [i % 2 == 1 for i in range(2 * pairs)]

    t_setup = time.perf_counter()
    keys = meter_keys(METERS)
    meters = load_meters(keys, n, PER_METER * total)
    rhos = FixedRhos(n)
    # Within a block, one reading per meter in turn, as they would arrive.
    body = [[m.next(rhos) for _ in range(PER_METER) for m in meters] for _ in range(total)]
    setup_s = time.perf_counter() - t_setup
    registry = Registry([MeterEntry(k.meter, f"acct-{k.meter}", k.public_hex) for k in keys])
    ed25519, stream_check = stream_costs(body[0], registry, n, 3 if args.quick else 9)

    with tempfile.TemporaryDirectory(prefix="bench-certify-") as tmp:
        wd = Path(tmp)
        broker = start_mosquitto(wd / "broker")
        procs: list[subprocess.Popen] = []
        try:
            configs = write_area(wd, keys, n, broker, validators)
            ports = [free_port() for _ in configs]
            for c, port in zip(configs, ports):
                c.write_text(c.read_text() + f"\n[metrics]\nport = {port}\n")
            procs = start_validators(configs, wd)
            vset = load_validator_set(wd / "validators.toml")
            app = AreaApp(AREA, registry, PublicKey(n))  # no pre-verified signatures: the baseline
            replica = Replica(AREA, app, ChainStore(connect(wd / "proposer.db")), vset)
            checker = Replica(AREA, app, ChainStore(connect(wd / "checker.db")), vset)
            run = asyncio.run(propose_all(broker, replica, checker, read_secret_key(wd / "proposer.bls.key"),
                                          body, warm, procs, ports))
            final = [scrape(p) for p in ports]
            stop(procs)
            refused = {c.stem: e for c in configs for e in log_events(wd / f"{c.stem}.log", "refused")}
            if refused:
                raise AssertionError(f"validators refused proposals: {refused}")
        finally:
            stop(procs)
            broker.stop()

    counted = range(WARMUP_BLOCKS, total)
    pick = lambda xs, w: [xs[i] for i in counted if run.warm[i] == w]  # noqa: E731
    q, q_cold = pick(run.quorum_s, True), pick(run.quorum_s, False)
    verify = median([run.verify_s[i] for i in counted])
    p50, p50_cold = median(q), median(q_cold)
    per_block = METERS * PER_METER
    hits = sum(m.get('gridledger_validator_signature_cache_total{result="hit"}', 0) for m in final)
    misses = sum(m.get('gridledger_validator_signature_cache_total{result="miss"}', 0) for m in final)
    stream_cpu = median(pick(run.stream_cpu_s, True)) / validators
    cores = machine()["cores"]
    floor = max(1.0, vset.quorum / cores)
    emit(NAME, {
        "bench": NAME,
        "quick": args.quick,
        "blocks": len(q),
        "blocks_cold": len(q_cold),
        "warmup_blocks": WARMUP_BLOCKS,
        "readings_per_block": per_block,
        "meters": METERS,
        "validators": validators,
        "quorum": vset.quorum,
        "bls_backend": bls.BACKEND,
        "setup_s": round(setup_s, 2),
        "p50_ms": round(p50 * 1000, 1),
        "p99_ms": round(percentile(q, 99) * 1000, 1),
        "p50_cold_ms": round(p50_cold * 1000, 1),
        "p99_cold_ms": round(percentile(q_cold, 99) * 1000, 1),
        "last_vote_p50_ms": round(median(pick(run.last_s, True)) * 1000, 1),
        "last_vote_p50_cold_ms": round(median(pick(run.last_s, False)) * 1000, 1),
        "verify_ms": round(verify * 1000, 1),
        "ratio_p50_to_verify": round(p50 / verify, 3),
        "ratio_p50_cold_to_verify": round(p50_cold / verify, 3),
        "validator_cpu_ms_per_block": round(median(pick(run.cpu_s, True)) / validators * 1000, 1),
        "validator_cpu_cold_ms_per_block": round(median(pick(run.cpu_s, False)) / validators * 1000, 1),
        "stream_cpu_ms_per_block": round(stream_cpu * 1000, 1),
        "stream_cpu_us_per_reading": round(stream_cpu / per_block * 1e6, 1),
        "stream_wall_ms_per_block": round(median(pick(run.stream_wall_s, True)) * 1000, 1),
        "ed25519_verify_us": round(ed25519 * 1e6, 1),
        "stream_check_us_per_reading": round(stream_check * 1e6, 1),
        "signature_cache_hits": int(hits),
        "signature_cache_misses": int(misses),
        "floor_ratio": round(floor, 2),
        "note": (f"Deployed path (p50_ms): each block's readings were published on the meters' reading topics "
                 f"and every validator had checked their signatures on the stream before the proposal "
                 f"(aggregator/preverify.py), so the vote skips {per_block} Ed25519 verifies; every other check "
                 f"runs. The work is moved before the proposal, not removed: each validator still spends "
                 f"{stream_cpu / per_block * 1e6:.0f} us of CPU per reading on the stream "
                 f"({stream_cpu * 1000:.0f} ms per block, MQTT receipt included; the check alone is "
                 f"{stream_check * 1e6:.0f} us in process, of which one Ed25519 verify {ed25519 * 1e6:.0f} us). "
                 f"Cold path (p50_cold_ms): validators that never saw the readings, as before: {validators} "
                 f"validator processes share {cores} cores and {vset.quorum} must finish their check, at best "
                 f"{floor:.1f}x verify_ms, about {max(1.0, validators / cores):.1f}x as the kernel shares the cores "
                 f"among all {validators}. verify_ms is one check with no pre-verified signatures in both ratios"),
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
