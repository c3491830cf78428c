"""CPU per reading of each stage a reading goes through, in one process, without MQTT:
the gateway's batch handling (`Gateway._process`: checks, SQLite commit, acks to a
link that only counts them), its block building (`AreaChain._prepare`: SQL, the
trusted app run, the durable proposal) and commit, and one validator's vote (the
untrusted re-run of the block, promise, BLS signature) and commit.

The real roles are built from the same files a deployment reads; blocks of 1,000
readings from 200 meters, 5 each, as in bench/ingest.py. The first block (empty
trie, cold caches) is run but not counted. What this leaves out (paho, the broker,
asyncio's socket handling) is what bench/ingest.py adds on top. Times are the
process's CPU seconds (`time.process_time`, every thread), and so is the crypto floor
beside them: on a machine shared with other work, neither counts the neighbours'."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from types import SimpleNamespace

from aggregator.gateway import BATCH_MAX, Gateway, load_gateway_config
from aggregator.validator import build_node, load_validator_config
from certlog.proposer import Proposer
from gridledger.meterkeys import verifier
from gridledger.paillier import PublicKey
from gridledger.wire import Reading

from benchlib import emit, load_test_modulus, machine, median, parse_args
from certify import AREA, FixedRhos, load_meters, meter_keys, write_area
from ingest import crypto_floor

NAME = "stages"
METERS = 200
PER_BLOCK = 5      # readings per meter per block
WARMUP_BLOCKS = 1


class CountingLink:
    """Stands in for the gateway's reading link in `Gateway._process`: acks are counted, not sent."""

    def __init__(self) -> None:
        self.published = 0

    def publish_many(self, messages) -> int:
        n = len(messages)
        self.published += n
        return n


class Timer:
    """Wraps a callable and sums the seconds spent in it."""

    def __init__(self, fn):
        self.fn, self.s = fn, 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.process_time()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.s += time.process_time() - t0


def run(wd: Path, blocks: int, n: int, keys: list) -> tuple[list[dict[str, float]], list[Reading]]:
    """Seconds per stage for each block, on fresh roles in `wd`, and the first block's readings."""
    meters = load_meters(keys, n, PER_BLOCK * blocks)
    rhos = FixedRhos(n)
    configs = write_area(wd, keys, n, SimpleNamespace(host="127.0.0.1", port=1), 4)
    gw = Gateway(load_gateway_config(wd / "gateway.toml"))
    nodes = [build_node(load_validator_config(c))[0] for c in configs]

    async def publish(topic: str, payload: bytes) -> None:
        pass

    chain = gw.chain
    chain.proposer = Proposer(chain.replica, publish, chain._sk)
    check = gw.ingest.check_batch = Timer(gw.ingest.check_batch)
    client = gw.readings = CountingLink()
    out, sample = [], []
    for _ in range(blocks):
        readings = [m.next(rhos) for _ in range(PER_BLOCK) for m in meters]
        sample = sample or readings
        msgs = [(f"gl/v1/{AREA}/meters/{r.meter}/readings", r.to_json()) for r in readings]
        check.s = 0.0
        t0 = time.process_time()
        for i in range(0, len(msgs), BATCH_MAX):
            asyncio.run(gw._process(msgs[i:i + BATCH_MAX]))
        process_s = time.process_time() - t0
        t0 = time.process_time()
        prepared = chain._prepare()
        prepare_s = time.process_time() - t0
        if prepared is None or prepared[0].txs != len(msgs):
            raise AssertionError(f"block does not hold the {len(msgs)} readings: {prepared}")
        header, txs = prepared
        votes, vote_s = [], []
        for node in nodes:
            t0 = time.process_time()
            votes.append(node.voter.vote(header, txs))
            vote_s.append(time.process_time() - t0)
        cert = chain.replica.validators.aggregate(votes)
        t0 = time.process_time()
        chain.replica.commit(header, txs, cert, stored=True)
        gw_commit_s = time.process_time() - t0
        commit_s = []
        for node in nodes:
            t0 = time.process_time()
            node.replica.commit(header, txs, cert)
            commit_s.append(time.process_time() - t0)
        out.append({"readings": len(msgs), "check": check.s, "process": process_s, "prepare": prepare_s,
                    "gateway_commit": gw_commit_s, "vote": median(vote_s), "validator_commit": median(commit_s)})
    if gw.ingest.counts["accept"] != PER_BLOCK * METERS * blocks or client.published == 0:
        raise AssertionError(f"not every reading was accepted: {dict(gw.ingest.counts)}")
    gw.store.close()
    chain.close()
    for node in nodes:
        node.replica.store.conn.close()
    return out, sample


def main() -> None:
    args = parse_args(__doc__)
    blocks = (4 if args.quick else 12) + WARMUP_BLOCKS
    n, keys = load_test_modulus(), meter_keys(METERS)
    pubs = {k.meter: verifier(k.public_hex) for k in keys}
    with tempfile.TemporaryDirectory(prefix="bench-stages-") as tmp:
        per_block, sample = run(Path(tmp), blocks, n, keys)
    per_block = per_block[WARMUP_BLOCKS:]
    verify_s, mulmod_s = crypto_floor(n, sample, pubs, 5)

    def us(key: str) -> float:
        return round(median([b[key] / b["readings"] for b in per_block]) * 1e6, 1)

    stages = {k: us(k) for k in ("check", "process", "prepare", "gateway_commit", "vote", "validator_commit")}
    gateway_us = stages["process"] + stages["prepare"] + stages["gateway_commit"]
    floor_us = (verify_s + mulmod_s) * 1e6
    emit(NAME, {
        "bench": NAME,
        "quick": args.quick,
        "blocks": len(per_block),
        "warmup_blocks": WARMUP_BLOCKS,
        "readings_per_block": METERS * PER_BLOCK,
        "meters": METERS,
        "modulus_bits": PublicKey(load_test_modulus()).bits,
        "us_per_reading": stages,
        # Gateway: _process (checks, SQLite, acks) + building and storing the block + its commit.
        "gateway_us_per_reading": round(gateway_us, 1),
        # The crypto floor of bench/ingest.py (one Ed25519 verify + one modmul), same run:
        # the share of the gateway's CPU that is the floor, i.e. its rate over the floor's.
        "floor_us_per_reading": round(floor_us, 1),
        "ed25519_verify_us": round(verify_s * 1e6, 1),
        "gateway_ratio_to_floor": round(floor_us / gateway_us, 3),
        # One validator: vote (re-run, promise, sign) + commit.
        "validator_us_per_reading": round(stages["vote"] + stages["validator_commit"], 1),
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
