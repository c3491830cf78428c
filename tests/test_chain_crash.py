"""Crash safety under load: MicroPython meters and loadgen meters through real
Mosquitto while the gateway and validators are killed with SIGKILL at random
moments, many times. Afterwards every acknowledged reading is in the certified
chain exactly once, no validator ever sent two signatures for one height, every
replica's chain verifies and all replicas agree."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from aggregator.audit import audit_from_config
from aggregator.registry import dump_registry, load_registry
from certlog.net import Topics
from gridledger.firmware_build import METER_HEAP
from gridledger.testbed import certified_height, meter_process, read_truth, write_meter_config

from chainkit import CHAIN, ChainBed, chain_bodies
from conftest import MqttProbe
from helpers import N, wait_until

INTERVAL_S = 900
SECONDS_PER_INTERVAL = 0.25


def _chain_readings(db) -> Counter:
    rows = [tx for body in chain_bodies(db).values() for tx in body]
    return Counter((o["meter"], o["seq"]) for o in map(json.loads, rows) if "alert" not in o)


def _add_loadgen_meters(tmp_path, bed: ChainBed, count: int) -> Path:
    """Generate loadgen meters and enroll them beside the firmware meters."""
    lg = tmp_path / "lg"
    out = subprocess.run([sys.executable, "-m", "gridledger", "loadgen", "run", "--generate-only", "--keys", str(lg),
                          "--meters", str(count), "--area", CHAIN, "--paillier-public",
                          str(tmp_path / "paillier.pub.json")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    entries = list(load_registry(tmp_path / "registry.toml")) + list(load_registry(lg / "registry.toml"))
    (tmp_path / "registry.toml").write_text(dump_registry(entries))
    return lg


async def test_kill_9_gateway_and_validators_under_load(tmp_path, broker, firmware_bundle):
    rng = random.Random(int(os.environ.get("GL_CRASH_SEED", "5")))
    meters, intervals = ["m1", "m2", "m3"], 48
    lg_meters, lg_readings = 12, 20
    bed = ChainBed(tmp_path, broker, meters, block_max=16)
    lg = _add_loadgen_meters(tmp_path, bed, lg_meters)
    now = time.time()
    virt = (int(now) // 86400 - 1) * 86400 + 7 * 3600
    clock = {"scale": INTERVAL_S / SECONDS_PER_INTERVAL, "real_start": now + 2, "virtual_start": virt,
             "stop_at": virt + intervals * INTERVAL_S}
    procs = {}
    topics = Topics(CHAIN)
    try:
        for i in range(4):
            bed.start_validator(i)
        bed.start_gateway()
        async with MqttProbe(broker, topics.votes) as probe:
            for i, m in enumerate(meters):
                d = tmp_path / m
                bed.keys[m].write_seed(d / "ed25519.key")
                write_meter_config(d / "config.json", meter=m, area=CHAIN, state_dir=d, key_file=d / "ed25519.key",
                                   n=N, host=broker.host, port=broker.port, interval_s=INTERVAL_S, clock=clock,
                                   seed=11 + i, solar_wp=2000 * (i % 2), resend_s=2.0)
                procs[m] = meter_process(d / "config.json", tmp_path / f"{m}.log", heap=METER_HEAP,
                                         firmware=firmware_bundle)
            loadgen = subprocess.Popen(
                [sys.executable, "-m", "gridledger", "loadgen", "run", "--host", broker.host, "--port",
                 str(broker.port), "--area", CHAIN, "--keys", str(lg), "--meters", str(lg_meters), "--readings",
                 str(lg_readings), "--window", "32", "--timeout", "150"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            kills = Counter()
            run_until = time.monotonic() + intervals * SECONDS_PER_INTERVAL + 2
            while time.monotonic() < run_until:
                await asyncio.sleep(rng.uniform(0.3, 1.2))
                victims = rng.sample(["gateway", "v0", "v1", "v2", "v3"], rng.choice([1, 1, 2]))
                for v in victims:
                    p = bed.gateway if v == "gateway" else bed.validators[int(v[1])]
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait(5)
                    kills[v] += 1
                await asyncio.sleep(rng.uniform(0.1, 1.0))
                for v in victims:
                    await asyncio.to_thread(bed.start_gateway if v == "gateway" else bed.start_validator,
                                            *([] if v == "gateway" else [int(v[1])]))
            assert sum(kills.values()) >= 8 and kills["gateway"] >= 2, kills

            await asyncio.to_thread(wait_until, lambda: all(p.poll() is not None for p in procs.values()), 120,
                                    "meters to finish (every reading acked)")
            for m, p in procs.items():
                assert p.returncode == 0, (tmp_path / f"{m}.log").read_text()[-3000:]
            lg_out, _ = await asyncio.to_thread(loadgen.communicate, timeout=180)
            lg_result = json.loads(lg_out.strip().splitlines()[-1])
            assert lg_result["complete"] and lg_result["acked"] == lg_meters * lg_readings, lg_result
            await asyncio.to_thread(wait_until, lambda: certified_height(bed.db())[1] == 0, 90,
                                    "every stored reading in a certified block")
            head = bed.heads()
            for i in range(4):
                await asyncio.to_thread(wait_until, lambda i=i: bed.heads(f"v{i}") == head, 60, f"v{i} to catch up")
            await asyncio.sleep(0.5)
            votes = [json.loads(p) for _, p in probe.received]

        # Every reading each meter produced was acked (the meter exits only with an empty spool) ...
        chained = _chain_readings(bed.db())
        for m in meters:
            # (a meter that falls behind its wall clock merges late intervals, so count what it produced)
            produced = sorted(read_truth(tmp_path / m / "truth.jsonl"))
            assert len(produced) >= intervals // 2 and produced == list(range(1, len(produced) + 1))
            assert [s for (mm, s) in sorted(chained) if mm == m] == produced, m
        lg_ids = [e.meter for e in load_registry(lg / "registry.toml")]
        for m in lg_ids:
            assert [s for (mm, s) in sorted(chained) if mm == m] == list(range(1, lg_readings + 1)), m
        # ... and is in the certified chain exactly once.
        assert set(chained.values()) == {1}
        # No validator ever sent signatures for two different headers at one height.
        signed = defaultdict(set)
        for v in votes:
            signed[(v["validator"], v["height"])].add(v["hash"])
        assert signed and all(len(hashes) == 1 for hashes in signed.values())
        # Every replica's chain verifies offline and ends at the same head.
        for who in ["gateway", "v0", "v1", "v2", "v3"]:
            cfg = bed.cfg if who == "gateway" else bed.validator_cfgs[int(who[1])]
            report = audit_from_config(cfg)
            assert report.ok and report.certified == head[0], (who, report.to_dict())
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        bed.cleanup()
