"""Certification latency of an area-chain block of 1,000 readings: this process proposes,
real validator processes on a real Mosquitto re-check and sign, and the block is
certified at the 2f+1-th valid vote. Baseline: one validator's check of the same block
(`Replica.check`, the untrusted path) in this process, with nothing else running.

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
from aggregator.registry import MeterEntry, Registry, dump_registry
from certlog import bls
from certlog.block import ChainError
from certlog.net import Topics, decode_vote, encode_block
from certlog.proposer import Proposer
from certlog.replica import Replica
from certlog.store import ChainStore, connect
from certlog.validators import load_validator_set, proposal_message, read_secret_key
from gridledger.broker import Broker, start_mosquitto
from gridledger.loadgen import LoadMeter, RhoPool
from gridledger.meterkeys import MeterKey
from gridledger.paillier import PublicKey
from gridledger.testbed import chain_table, validator_process, wait_up, write_chain
from gridledger.wire import kid_of

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


async def propose_all(broker: Broker, replica: Replica, checker: Replica, psk: int,
                      blocks: list[list[bytes]]) -> tuple[list[float], list[float], list[float]]:
    """Certify each block in turn; per block: seconds from publishing the proposal to the
    quorum-th valid vote, to the last vote, and the baseline check on `checker`."""
    topics = Topics(AREA)
    ballot = Ballot(replica)
    quorum_s, last_s, verify_s = [], [], []
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
            for txs in blocks:
                header = replica.build(txs)
                verify_s.append(timed(checker.check, header, txs))  # validators are idle now
                payload = encode_block(header, txs, proposer_sig=bls.Sign(psk, proposal_message(header)))
                ballot.open(header)
                t0 = time.perf_counter()
                await publish(topics.proposals, payload)
                await asyncio.wait_for(ballot.quorum.wait(), VOTE_TIMEOUT_S)
                quorum_s.append(sorted(ballot.at.values())[replica.validators.quorum - 1] - t0)
                cert = replica.validators.aggregate(list(ballot.votes.values()))
                replica.commit(header, txs, cert)
                await publish(topics.certs, encode_block(header, cert=cert))
                checker.commit(header, txs, cert)
                # The slowest validator finishes too, so the next block starts on idle cores.
                await asyncio.wait_for(ballot.everyone.wait(), VOTE_TIMEOUT_S)
                last_s.append(max(ballot.at.values()) - t0)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    if ballot.invalid:
        raise AssertionError(f"{ballot.invalid} votes did not verify")
    return quorum_s, last_s, verify_s


def main() -> None:
    args = parse_args(__doc__)
    blocks, validators = (8 if args.quick else 30), 4
    n = load_test_modulus()
    total = blocks + WARMUP_BLOCKS

    t_setup = time.perf_counter()
    keys = meter_keys(METERS)
    meters = load_meters(keys, n, PER_METER * total)
    rhos = FixedRhos(n)
    # Within a block, one reading per meter in turn, as they would arrive.
    body = [[m.next(rhos).to_json() for _ in range(PER_METER) for m in meters] for _ in range(total)]
    setup_s = time.perf_counter() - t_setup

    with tempfile.TemporaryDirectory(prefix="bench-certify-") as tmp:
        wd = Path(tmp)
        broker = start_mosquitto(wd / "broker")
        procs: list[subprocess.Popen] = []
        try:
            configs = write_area(wd, keys, n, broker, validators)
            procs = start_validators(configs, wd)
            vset = load_validator_set(wd / "validators.toml")
            app = AreaApp(AREA, Registry([MeterEntry(k.meter, f"acct-{k.meter}", k.public_hex) for k in keys]),
                          PublicKey(n))
            replica = Replica(AREA, app, ChainStore(connect(wd / "proposer.db")), vset)
            checker = Replica(AREA, app, ChainStore(connect(wd / "checker.db")), vset)
            cpu0 = sum(cpu_seconds(p.pid) for p in procs)
            quorum_s, last_s, verify_s = asyncio.run(
                propose_all(broker, replica, checker, read_secret_key(wd / "proposer.bls.key"), body))
            # Everything a validator does per block: decode, check, promise, sign, then commit.
            validator_cpu = (sum(cpu_seconds(p.pid) for p in procs) - cpu0) / (validators * total)
            stop(procs)
            refused = {c.stem: e for c in configs for e in log_events(wd / f"{c.stem}.log", "refused")}
            if refused:
                raise AssertionError(f"validators refused proposals: {refused}")
        finally:
            stop(procs)
            broker.stop()

    q, last, ver = (xs[WARMUP_BLOCKS:] for xs in (quorum_s, last_s, verify_s))
    p50, verify = median(q), median(ver)
    cores = machine()["cores"]
    emit(NAME, {
        "bench": NAME,
        "quick": args.quick,
        "blocks": len(q),
        "warmup_blocks": WARMUP_BLOCKS,
        "readings_per_block": METERS * PER_METER,
        "meters": METERS,
        "validators": validators,
        "quorum": vset.quorum,
        "bls_backend": bls.BACKEND,
        "setup_s": round(setup_s, 2),
        "p50_ms": round(p50 * 1000, 1),
        "p99_ms": round(percentile(q, 99) * 1000, 1),
        "last_vote_p50_ms": round(median(last) * 1000, 1),
        "verify_ms": round(verify * 1000, 1),
        "validator_cpu_ms_per_block": round(validator_cpu * 1000, 1),
        "ratio_p50_to_verify": round(p50 / verify, 3),
        "floor_ratio": round(max(1.0, vset.quorum / cores), 2),
        "note": (f"{validators} validator processes share {cores} cores here and {vset.quorum} must finish "
                 f"their check: at best {max(1.0, vset.quorum / cores):.1f}x verify_ms ({vset.quorum} checks on "
                 f"{cores} cores); the kernel shares the cores among all {validators}, so about "
                 f"{max(1.0, validators / cores):.1f}x is expected. A cost of this machine, not of the protocol"),
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
