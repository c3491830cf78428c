"""The registry chain on real parts: Mosquitto, the registry role, four validator
processes co-signing both chains, the gateway following the registry, and the
`gridledger registry` CLI a technician uses."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

from certlog.audit import verify_chain
from certlog.validators import load_validator_set
from coordinator.registry import submit
from coordinator.registryapp import RegistryApp, enroll_record, load_genesis, sign_record
from gridledger.config import MqttConfig
from gridledger.meterkeys import MeterKey
from gridledger.testbed import (chain_height, chain_table, certified_height, gateway_process, registry_chain_table,
                                registry_process, validator_process, wait_up, write_chain, write_registry_chain)
from gridledger.wire import ack_topic, kid_of, nack_topic, readings_topic

from chainkit import CHAIN
from conftest import MqttProbe
from helpers import N, SimMeter, meter_keys, wait_until


class RegistryBed:
    def __init__(self, tmp, broker, meters: list[str]):
        self.tmp, self.broker = tmp, broker
        self.mqtt = MqttConfig(host=broker.host, port=broker.port)
        (tmp / "paillier.pub.json").write_text(json.dumps({"n": str(N), "kid": kid_of(N)}))
        self.vcfgs = write_chain(tmp, area=CHAIN, host=broker.host, port=broker.port, validators=4,
                                 paillier_public="paillier.pub.json", registry_chain=True)
        self.setup = write_registry_chain(tmp, host=broker.host, port=broker.port)
        self.cfg = tmp / "gateway.toml"
        self.cfg.write_text(f'[gateway]\narea = "{CHAIN}"\ndatabase = "gateway.db"\n'
                            f'paillier_public = "paillier.pub.json"\n\n[mqtt]\nhost = "{broker.host}"\n'
                            f'port = {broker.port}\n\n' + chain_table(50) + registry_chain_table("gateway-registry.db"))
        self.keys = meter_keys(meters)
        for m, k in self.keys.items():
            k.write_seed(tmp / "keys" / f"{m}.ed25519.key")
        self.sims = {m: SimMeter(k) for m, k in self.keys.items()}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str) -> None:
        log = self.tmp / f"{name}.log"
        if name == "registry":
            p = registry_process(self.setup.config, log)
        elif name == "gateway":
            p = gateway_process(self.cfg, log)
        else:
            p = validator_process(self.vcfgs[int(name[1:])], log)
        self.procs[name] = p
        wait_up(log, p, timeout=60)

    def start_all(self) -> None:
        for name in ["registry", "v0", "v1", "v2", "v3", "gateway"]:
            self.start(name)

    def cli(self, *args: str) -> tuple[int, dict]:
        out = subprocess.run([sys.executable, "-m", "gridledger", "registry", *args,
                              "--broker", f"{self.broker.host}:{self.broker.port}"],
                             capture_output=True, text=True, timeout=120)
        return out.returncode, json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {
            "stderr": out.stderr}

    def as_technician(self) -> list[str]:
        return ["--signer", "tech1", "--key", str(self.tmp / "keys" / "tech1.ed25519.key")]

    def enroll(self, meter: str, account: str | None = None) -> tuple[int, dict]:
        return self.cli("enroll", "--meter", meter, "--account", account or f"acct-{meter}", "--area", CHAIN,
                        "--meter-key", str(self.tmp / "keys" / f"{meter}.ed25519.key"), *self.as_technician())

    def register_technician(self) -> None:
        rc, result = self.cli("node", "--id", "tech1", "--role", "technician",
                              "--public-key", self.setup.technician.public_hex,
                              "--signer", "ops", "--key", str(self.tmp / "keys" / "ops.ed25519.key"))
        assert rc == 0 and result["status"] == "certified", result

    def registry_txs(self) -> list[bytes]:
        with sqlite3.connect(f"file:{self.tmp / 'registry.db'}?mode=ro", uri=True) as conn:
            return [r[0] for r in conn.execute(
                "SELECT data FROM chain_txs JOIN chain_blocks USING (height) WHERE cert IS NOT NULL")]

    def verify_registry(self, database=None):
        return verify_chain(database or self.tmp / "registry.db", "registry",
                            RegistryApp(load_genesis(self.tmp / "registry-genesis.toml")),
                            load_validator_set(self.tmp / "registry-validators.toml"))

    def cleanup(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


async def test_a_technician_enrolls_meters_and_the_area_chain_follows(tmp_path, broker):
    bed = RegistryBed(tmp_path, broker, ["m1", "m2"])
    try:
        bed.start_all()
        bed.register_technician()
        rc, result = bed.enroll("m1")
        assert rc == 0 and result["status"] == "certified", result
        async with MqttProbe(broker, f"gl/v1/{CHAIN}/meters/+/ack", f"gl/v1/{CHAIN}/meters/+/nack") as probe:
            wait_until(lambda: chain_height(tmp_path / "gateway-registry.db") >= result["height"], 30,
                       "the gateway to follow the registry chain")
            m1, m2 = bed.sims["m1"], bed.sims["m2"]
            await probe.publish(readings_topic(CHAIN, "m1"), m1.next().to_json())
            await probe.expect(ack_topic(CHAIN, "m1"), lambda b: b["seq"] == 1, timeout=30)
            # m2 is not enrolled yet: refused with the reason, and accepted once it is.
            early = m2.next().to_json()
            await probe.publish(readings_topic(CHAIN, "m2"), early)
            await probe.expect(nack_topic(CHAIN, "m2"), lambda b: b["reason"] == "unknown_meter", timeout=30)
            rc, result = bed.enroll("m2")
            assert rc == 0, result
            wait_until(lambda: chain_height(tmp_path / "gateway-registry.db") >= result["height"], 30,
                       "the gateway to see m2's enrollment")
            await probe.publish(readings_topic(CHAIN, "m2"), early)
            await probe.expect(ack_topic(CHAIN, "m2"), lambda b: b["seq"] == 1, timeout=30)
            for _ in range(3):
                for m, sim in bed.sims.items():
                    await probe.publish(readings_topic(CHAIN, m), sim.next().to_json())
            await probe.expect(ack_topic(CHAIN, "m2"), lambda b: b["seq"] == 4, timeout=30)
            await probe.expect(ack_topic(CHAIN, "m1"), lambda b: b["seq"] == 4, timeout=30)

            # Enrolling m1 again, or m2's key under a new id, is refused with the reason.
            rc, dup = bed.enroll("m1", account="someone-else")
            assert rc == 1 and dup["status"] == "refused" and dup["reason"] == "tx_duplicate_meter", dup

            # Retired: m1's next reading is refused at the gateway.
            wait_until(lambda: certified_height(tmp_path / "gateway.db")[1] == 0, 60, "m1's readings certified")
            rc, retired = bed.cli("retire", "--meter", "m1", "--reason", "removed", *bed.as_technician())
            assert rc == 0 and retired["status"] == "certified", retired
            wait_until(lambda: chain_height(tmp_path / "gateway-registry.db") >= retired["height"], 30,
                       "the gateway to see the retirement")
            await probe.publish(readings_topic(CHAIN, "m1"), m1.next().to_json())
            await probe.expect(nack_topic(CHAIN, "m1"), lambda b: b["reason"] == "unknown_meter" and b["seq"] == 5,
                               timeout=30)

        wait_until(lambda: certified_height(tmp_path / "gateway.db")[1] == 0, 60, "every reading certified")
        out = subprocess.run([sys.executable, "-m", "gridledger", "chain", "verify", "--config", str(bed.cfg)],
                             capture_output=True, text=True, timeout=120)
        report = json.loads(out.stdout)
        # 8 readings, plus one registry transaction per block that moved the registry height.
        assert out.returncode == 0 and report["ok"] and 8 < report["txs"] <= 11, (report, out.stderr)
        for i in range(4):
            out = subprocess.run([sys.executable, "-m", "gridledger", "chain", "verify", "--config",
                                  str(bed.vcfgs[i])], capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stdout
        show = subprocess.run([sys.executable, "-m", "gridledger", "registry", "show", "--config", str(bed.cfg)],
                              capture_output=True, text=True, timeout=60)
        assert [m["meter"] for m in json.loads(show.stdout)["meters"]] == ["m2"]
        assert bed.verify_registry().ok
    finally:
        bed.cleanup()


async def test_kill_9_of_the_registry_role_loses_and_repeats_no_record(tmp_path, broker):
    bed = RegistryBed(tmp_path, broker, [])
    keys = [MeterKey(f"k{i:02d}", bytes([0x80 + i]) * 32) for i in range(24)]
    try:
        for name in ["registry", "v0", "v1", "v2", "v3"]:
            bed.start(name)
        bed.register_technician()
        now = int(time.time())
        txs = [sign_record(enroll_record(meter=k.meter, account=f"acct-{k.meter}", area=CHAIN,
                                         public_key=k.public_hex, signer="tech1", time=now),
                           bed.setup.technician.private, k.private) for k in keys]
        bad = [b"\x00garbage", txs[0].replace(b'"acct-k00"', b'"acct-evil"')]  # the signature no longer holds
        rng = random.Random(5)
        for round_ in range(3):
            async def fire():
                async with MqttProbe(broker, "gl/v1/chains/registry/results/#") as probe:
                    for tx in txs[round_ * 8:(round_ + 1) * 8] + bad:
                        await probe.publish("gl/v1/chains/registry/submit", tx)
                    await asyncio.sleep(rng.uniform(0.05, 0.6))
            await fire()
            os.kill(bed.procs["registry"].pid, signal.SIGKILL)
            bed.procs["registry"].wait()
            bed.start("registry")
        # Submitting everything again is idempotent: each record is certified once.
        results = await submit(bed.mqtt, txs, timeout_s=90)
        assert {r["status"] for r in results} == {"certified"}, results
        [garbage, forged] = await submit(bed.mqtt, bad, timeout_s=30)
        assert garbage["reason"] == "tx_malformed" and forged["reason"] == "tx_bad_signature"
        chained = bed.registry_txs()
        assert sorted(chained[1:]) == sorted(txs) and len(chained) == 1 + len(txs)
        assert bed.verify_registry().ok
        height = chain_height(tmp_path / "registry.db")
        for i in range(4):
            wait_until(lambda: chain_height(tmp_path / "validators" / f"v{i}-registry.db") == height, 60,
                       f"v{i}'s registry replica to reach {height}")
            assert bed.verify_registry(tmp_path / "validators" / f"v{i}-registry.db").ok
    finally:
        bed.cleanup()
