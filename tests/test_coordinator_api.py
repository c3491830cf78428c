"""The coordinator on real parts: Mosquitto, the registry role, a validator, the
gateway and the coordinator as processes. It follows the chains, its HTTP API
answers with proofs that verify (across a meter replacement), `gridledger query`
verifies them and fails on a tampered answer, bad requests get 400/404 with a
reason, and SIGTERM stops it cleanly."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import aiohttp
from aiohttp import web

from certlog.validators import load_validator_set
from coordinator.ledger import verify_exact, verify_interval, verify_interval_page
from coordinator.registry import submit
from coordinator.registryapp import enroll_record, sign_record
from gridledger.config import MqttConfig
from gridledger.testbed import (certified_height, chain_height, chain_table, coordinator_process, enroll_meters,
                                gateway_process, registry_chain_table, registry_process, validator_process, wait_up,
                                write_chain, write_registry_chain)
from gridledger.wire import ack_topic, kid_of, readings_topic

from chainkit import CHAIN
from conftest import MqttProbe
from helpers import N, SimMeter, meter_keys, wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def query(*args: str) -> tuple[int, dict, str]:
    out = subprocess.run([sys.executable, "-m", "gridledger", "query", *args], capture_output=True, text=True,
                         timeout=120)
    lines = out.stdout.strip().splitlines()
    return out.returncode, json.loads(lines[-1]) if lines else {}, out.stderr


class Bed:
    def __init__(self, tmp, broker):
        self.tmp = tmp
        self.mqtt = MqttConfig(host=broker.host, port=broker.port)
        (tmp / "paillier.pub.json").write_text(json.dumps({"n": str(N), "kid": kid_of(N)}))
        self.vcfgs = write_chain(tmp, area=CHAIN, host=broker.host, port=broker.port, validators=1,
                                 paillier_public="paillier.pub.json", registry_chain=True)
        self.setup = write_registry_chain(tmp, host=broker.host, port=broker.port)
        mqtt = f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n\n'
        (tmp / "gateway.toml").write_text(
            f'[gateway]\narea = "{CHAIN}"\ndatabase = "gateway.db"\npaillier_public = "paillier.pub.json"\n\n'
            + mqtt + chain_table(50) + registry_chain_table("gateway-registry.db"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cfg = tmp / "coordinator.toml"
        self.cfg.write_text(
            '[coordinator]\nname = "coord"\ndatabase = "coordinator.db"\n\n' + mqtt
            + registry_chain_table("coordinator-registry.db")
            + f'\n[[area]]\nchain = "{CHAIN}"\nvalidators = "validators.toml"\npaillier_public = "paillier.pub.json"\n'
            + f'\n[api]\nport = {self.port}\n')
        self.keys = meter_keys(["m1", "m2", "m3"])
        self.sims = {m: SimMeter(k) for m, k in self.keys.items()}
        self.procs: dict[str, subprocess.Popen] = {}
        self.vset = load_validator_set(tmp / "validators.toml")

    def start(self, name: str, proc_fn, config, up: str = '"mqtt_up"') -> None:
        log = self.tmp / f"{name}.log"
        p = self.procs[name] = proc_fn(config, log)
        wait_up(log, p, timeout=60)
        wait_until(lambda: up in log.read_text() or p.poll() is not None, 60, f"{name}: {up}")
        assert p.poll() is None, log.read_text()[-2000:]

    def api(self, path: str) -> tuple[int, dict]:
        return get(f"{self.url}/v1/areas/{CHAIN}{path}")

    def cleanup(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


async def tampering_proxy(upstream: str, port: int) -> web.AppRunner:
    """An API in front of the real one that drops the second reading of every interval answer."""
    async def handle(request: web.Request) -> web.Response:
        async with aiohttp.ClientSession() as s:
            async with s.get(upstream + request.path_qs) as r:
                body = await r.json()
        if "readings" in body and len(body["readings"]) > 1:
            del body["readings"][1]
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def send(probe: MqttProbe, sim: SimMeter, count: int) -> None:
    for _ in range(count):
        await probe.publish(readings_topic(CHAIN, sim.key.meter), sim.next().to_json())
    await probe.expect(ack_topic(CHAIN, sim.key.meter), lambda b: b["seq"] == sim.seq, timeout=60)


async def test_the_coordinator_follows_the_chains_and_answers_with_proofs(tmp_path, broker):
    bed = Bed(tmp_path, broker)
    try:
        bed.start("registry", registry_process, bed.setup.config)
        bed.start("v0", validator_process, bed.vcfgs[0])
        bed.start("gateway", gateway_process, tmp_path / "gateway.toml")
        bed.start("coordinator", coordinator_process, bed.cfg, up='"api_up"')
        enrolled = await asyncio.to_thread(enroll_meters, bed.setup, bed.mqtt, CHAIN,
                                           {"m1": ("acct-a", bed.keys["m1"]), "m2": ("acct-b", bed.keys["m2"])})
        await asyncio.to_thread(wait_until, lambda: chain_height(tmp_path / "gateway-registry.db") >= enrolled, 30,
                                "the gateway to see the enrollments")
        m1, m2, m3 = (bed.sims[m] for m in ("m1", "m2", "m3"))
        async with MqttProbe(broker, f"gl/v1/{CHAIN}/meters/+/ack") as probe:
            await send(probe, m1, 5)
            await send(probe, m2, 3)
            # m1 is replaced by m3 on the same account: acct-a's history continues on m3.
            rec = enroll_record(meter="m3", account="acct-a", area=CHAIN, public_key=bed.keys["m3"].public_hex,
                                signer="tech1", time=m1.t, replaces="m1")
            [res] = await submit(bed.mqtt, [sign_record(rec, bed.setup.technician.private, bed.keys["m3"].private)])
            assert res["status"] == "certified", res
            await asyncio.to_thread(wait_until, lambda: chain_height(tmp_path / "gateway-registry.db") >= res["height"],
                                    30, "the gateway to see m3")
            m3.t = m1.t
            await send(probe, m3, 3)
        await asyncio.to_thread(wait_until, lambda: certified_height(tmp_path / "gateway.db")[1] == 0, 60,
                                "every reading certified")
        head = chain_height(tmp_path / "gateway.db")
        await asyncio.to_thread(wait_until, lambda: bed.api("/head")[1].get("height") == head, 60,
                                "the coordinator to index the head")

        status, ex = bed.api("/accounts/acct-a")
        got = verify_exact(ex, bed.vset, CHAIN, account="acct-a", min_height=head)
        assert status == 200 and got.reading == m3.sent[-1] and got.state.count == 8

        history = m1.sent + m3.sent
        t1, t2 = history[1].t, history[-1].t
        status, ans = bed.api(f"/accounts/acct-a/readings?from={t1}&to={t2}")
        assert status == 200 and verify_interval(ans, bed.vset, CHAIN, "acct-a", t1, t2) == history[1:]
        status, page = bed.api(f"/accounts/acct-a/readings?from={t1}&to={t2}&limit=3")
        got = verify_interval_page(page, bed.vset, CHAIN, "acct-a", t1, t2)
        assert got.readings == history[1:4] and got.next == history[3].t + 1

        # The CLI: from the API and from the coordinator's own files, verified.
        rc, out, err = await asyncio.to_thread(query, "interval", "--config", str(bed.cfg), "--area", CHAIN,
                                               "--account", "acct-a", "--from", str(t1), "--to", str(t2),
                                               "--url", bed.url)
        assert rc == 0 and out["verified"] and [r["hash"] for r in out["readings"]] == [r.hash for r in history[1:]], err
        rc, out, err = await asyncio.to_thread(query, "exact", "--config", str(bed.cfg), "--area", CHAIN,
                                               "--account", "acct-b")
        assert rc == 0 and out["state"]["count"] == 3 and out["reading"]["hash"] == m2.sent[-1].hash, err
        # ... and a tampered answer fails with the reason.
        port = free_port()
        proxy = await tampering_proxy(bed.url, port)
        try:
            rc, out, err = await asyncio.to_thread(query, "interval", "--config", str(bed.cfg), "--area", CHAIN,
                                                   "--account", "acct-a", "--from", str(t1), "--to", str(t2),
                                                   "--url", f"http://127.0.0.1:{port}")
        finally:
            await proxy.cleanup()
        assert rc == 1 and out == {"verified": False, "reason": "broken_chain", "detail": out["detail"]}, err

        # Bad requests: a reason, never a traceback, and the process goes on.
        for path, code, why in [
            ("/accounts/acct-a/readings?from=abc&to=5", 400, "bad_query"),
            ("/accounts/acct-a/readings?from=9&to=5", 400, "bad_query"),
            ("/accounts/acct-a/readings?from=1", 400, "bad_query"),
            ("/accounts/acct-a/readings?from=1&to=5&limit=0", 400, "bad_query"),
            ("/accounts/acct-a/readings?from=1&to=5&certs=some", 400, "bad_query"),
            ("/accounts/" + "x" * 65, 400, "bad_query"),
            ("/accounts/acct-a?height=99999", 404, "unknown_height"),
            ("/blocks/abc", 400, "bad_query"),
            ("/blocks/99999", 404, "unknown_height"),
            ("/accounts/acct-a/state", 400, "bad_query"),
            ("/nothing/here", 404, "not_found"),
        ]:
            assert bed.api(path) == (code, {"error": why, "detail": bed.api(path)[1]["detail"]}), path
        assert get(f"{bed.url}/v1/areas/nowhere/head")[0] == 404
        status, block = bed.api("/blocks/1")
        assert status == 200 and block["header"]["height"] == 1
        status, sp = bed.api(f"/accounts/acct-a/state?before={history[5].t}")
        assert status == 200 and sp["height"] >= 1
        assert "Traceback" not in (tmp_path / "coordinator.log").read_text()

        p = bed.procs["coordinator"]
        p.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(p.wait, 30) == 0
        assert '"stop"' in (tmp_path / "coordinator.log").read_text()
    finally:
        bed.cleanup()
