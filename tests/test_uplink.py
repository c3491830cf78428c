"""The meter's MQTT uplink on real parts: firmware meters under the micropython
binary, a real Mosquitto with a TLS listener that checks passwords (a throwaway CA
made here), the gateway process, real signals. TLS with login delivers readings,
a retained health message and an `offline` last will; a wrong CA or password is
refused while the meter keeps measuring and backs off; with the broker frozen or
gone, every uplink call returns within its time-out and measuring goes on."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import aiomqtt
import pytest

from aggregator.store import GatewayStore, stored_counts
from gridledger.meterjournal import pending_seqs
from gridledger.wire import ZERO_HASH

from conftest import MqttProbe
from helpers import wait_until
from uplinkkit import MeterArea, start_tls_broker

BASE = "gl/v1/area1/meters"
TIMEOUT_S = 2
HEALTH_FIELDS = {"v", "meter", "state", "fw", "up_s", "mem_free", "seq", "journal_depth", "journal_full", "dropped",
                 "last_acked", "reset_cause", "rssi", "clock", "reconnects", "alerts_pending", "alerts_dropped"}


@pytest.fixture
def tls_broker(tmp_path):
    b = start_tls_broker(tmp_path / "broker", {m: f"{m}-secret" for m in ("m1", "m2", "m3")})
    yield b
    if b.broker.proc.poll() is None:
        os.kill(b.broker.proc.pid, signal.SIGCONT)  # a test may leave it frozen
    b.stop()


@pytest.fixture
def area(tmp_path, tls_broker, firmware_bundle):
    made = []

    def make(meters: list[str], **kw) -> MeterArea:
        # METER_HEAP (MeterArea's default), as for a plain meter: the TLS context fits (docs/uplink.md, heap)
        made.append(MeterArea(tmp_path, tls_broker.broker, firmware_bundle, meters, intervals=None, **kw))
        return made[-1]

    yield make
    for a in made:
        a.cleanup()


def tls_uplink(b, m: str, **over) -> dict:
    """A meter's broker config for the TLS listener (docs/uplink.md)."""
    return {"port": b.tls_port, "ca": str(b.tls["ca"]), "server_name": b.server_name, "user": m,
            "password": f"{m}-secret", "timeout_s": TIMEOUT_S, **over}


def assert_stored_in_order(run: MeterArea, m: str, upto: int) -> None:
    """The gateway holds seq 1..upto of meter m exactly once, chained, and they are what the meter produced."""
    store = GatewayStore(run.tmp / "gateway.db")
    try:
        rs = store.readings(m)
    finally:
        store.close()
    assert [r.seq for r in rs][:upto] == list(range(1, upto + 1))
    prev = ZERO_HASH
    for r in rs:
        assert r.prev == prev
        prev = r.hash
    truth = run.truth(m)
    assert [r.t for r in rs[:upto]] == [truth[s]["t"] for s in range(1, upto + 1)]


async def retained(broker, topic: str, timeout: float = 10.0) -> dict:
    """What a subscriber arriving now is handed at once: the topic's retained message."""
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(timeout):
            async for msg in client.messages:
                if msg.retain:
                    return json.loads(msg.payload)


async def test_tls_login_readings_health_and_last_will(area, tls_broker):
    """Over TLS (CA checked, server name checked) with username and password: readings reach the gateway, the
    retained health message carries every field, and SIGKILL makes the broker publish the retained `offline`
    last will in its place."""
    run = area(["m1"])
    run.configure("m1", broker=tls_uplink(tls_broker, "m1", health_s=1))
    run.start_gateway()
    health_topic = f"{BASE}/m1/health"
    async with MqttProbe(tls_broker.broker, health_topic) as probe:
        run.start_meter("m1")
        await probe.expect(health_topic, lambda h: h["state"] == "online", timeout=30)
        wait_until(lambda: stored_counts(run.tmp / "gateway.db").get("m1", 0) >= 6, 60, "readings over TLS")
        await probe.expect(health_topic, lambda h: h["last_acked"] is not None, timeout=15)
        health = await retained(tls_broker.broker, health_topic)
        os.kill(run.procs["m1"].pid, signal.SIGKILL)
        run.procs["m1"].wait(5)
        will = await probe.expect(health_topic, lambda h: h["state"] == "offline")

    assert set(health) == HEALTH_FIELDS
    assert health["meter"] == "m1" and health["state"] == "online" and health["fw"] == "0.3.0" and health["v"] == 1
    assert health["mem_free"] > 0 and health["up_s"] >= 0 and health["reconnects"] == 1
    assert health["last_acked"] >= 1 and health["seq"] >= health["last_acked"]
    assert health["journal_depth"] >= 0 and health["journal_full"] is False and health["dropped"] == 0
    # The Unix port has neither Wi-Fi nor a reset cause, and reads the host's clock.
    assert health["rssi"] is None and health["reset_cause"] is None and health["clock"] == "host"
    assert will == {"v": 1, "meter": "m1", "state": "offline"}
    assert await retained(tls_broker.broker, health_topic) == will  # a subscriber arriving now learns it too
    assert [e["tls"] for e in run.events("m1", "uplink_up")] == [True]
    assert "u'm1'" in tls_broker.broker.log.read_text()  # logged in by name on the TLS listener
    assert_stored_in_order(run, "m1", 6)
    assert run.stop_gateway() == 0


def test_wrong_ca_or_password_is_refused_and_backs_off(area, tls_broker):
    """A meter trusting another CA, one with a wrong password and one whose CA file is missing never get a session;
    all keep measuring and spooling, and retry after waits that grow (jittered in [d/2, d], d doubling to
    backoff_max_s); with the right CA and password they deliver everything they spooled, in order."""
    run = area(["m1", "m2", "m3"])
    run.configure("m1", broker=tls_uplink(tls_broker, "m1", ca=str(tls_broker.tls["other-ca"]), backoff_max_s=4))
    run.configure("m2", broker=tls_uplink(tls_broker, "m2", password="not-it", backoff_max_s=4))
    run.configure("m3", broker=tls_uplink(tls_broker, "m3", ca=str(run.tmp / "no-such-ca.pem"), backoff_max_s=4))
    run.start_gateway()
    for m in run.meters:
        run.start_meter(m)
    wait_until(lambda: all(len(run.events(m, "uplink_down")) >= 6 for m in run.meters), 60, "six refused attempts")
    for m in run.meters:
        os.kill(run.procs[m].pid, signal.SIGKILL)
        run.procs[m].wait(5)

    for m, during, refusal in (("m1", "connect", "not correctly signed by the trusted CA"),
                               ("m2", "connect", "MQTTException(5"), ("m3", "tls_setup", "OSError(2")):
        downs = run.events(m, "uplink_down")
        assert run.events(m, "uplink_up") == []
        assert all(refusal in d["error"] and d["during"] == during for d in downs), downs[0]
        nominal = 500
        for d, nxt in zip(downs, downs[1:]):
            assert nominal // 2 <= d["retry_ms"] <= nominal, (m, downs)
            # The next attempt comes only after the wait drawn (ticks, minus a tick of rounding).
            assert nxt["at_ms"] - d["at_ms"] >= d["retry_ms"] - 1, (m, d, nxt)
            nominal = min(nominal * 2, 4000)
        waits = [d["retry_ms"] for d in downs]
        assert waits[4] > waits[0] and max(waits) <= 4000, waits
        # Measuring went on the whole time: every reading made is kept in the journal, none acked.
        # Read from the flash: the kill may fall after a reading's journal write and before its
        # log line (the log then says one less), or after its truth line and before the journal
        # write (that reading was never made, and its seq is used again).
        produced = sorted(run.truth(m))
        kept = pending_seqs(run.tmp / m)
        assert len(produced) >= 5 and produced == list(range(1, len(produced) + 1))
        assert kept in (produced, produced[:-1]), (m, kept, produced)
    assert stored_counts(run.tmp / "gateway.db") == {}

    spooled = {m: max(run.truth(m)) for m in run.meters}
    run.configure("m1", broker={"ca": str(tls_broker.tls["ca"])})
    run.configure("m2", broker={"password": "m2-secret"})
    run.configure("m3", broker={"ca": str(tls_broker.tls["ca"])})
    for m in run.meters:
        run.start_meter(m)
    wait_until(lambda: all(stored_counts(run.tmp / "gateway.db").get(m, 0) >= spooled[m] for m in run.meters),
               60, "spooled readings delivered")
    for m in run.meters:
        assert_stored_in_order(run, m, spooled[m])
    assert run.stop_gateway() == 0


def _growth(run: MeterArea, m: str, seconds: float) -> tuple[int, float]:
    """Readings the meter produced in the next `seconds`, and the longest wait between two of them (s)."""
    start = time.monotonic()
    seen, last_new, longest = len(run.truth(m)), start, 0.0
    first = seen
    while time.monotonic() - start < seconds:
        time.sleep(0.05)
        now = time.monotonic()
        n = len(run.truth(m))
        if n > seen:
            longest = max(longest, now - last_new)
            seen, last_new = n, now
    return seen - first, max(longest, time.monotonic() - last_new)


def test_frozen_or_stopped_broker_never_stops_measuring(area, tls_broker):
    """Broker frozen (SIGSTOP: TCP still accepts, nothing answers) and then gone (SIGTERM): every failed uplink call
    returns within timeout_s, the meter keeps producing readings at its usual pace, and once the broker is back
    every reading reaches the gateway exactly once, in order."""
    run = area(["m1"])
    run.configure("m1", broker=tls_uplink(tls_broker, "m1", backoff_max_s=2))
    run.start_gateway()
    run.start_meter("m1")
    wait_until(lambda: stored_counts(run.tmp / "gateway.db").get("m1", 0) >= 3, 60, "first readings")
    healthy_made, healthy_gap = _growth(run, "m1", 4.0)  # this machine's pace with the broker up

    pid = tls_broker.broker.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        frozen_made, frozen_gap = _growth(run, "m1", 8.0)
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: len(run.events("m1", "uplink_up")) >= 2, 30, "reconnect after SIGCONT")
    tls_broker.stop()
    stopped_made, stopped_gap = _growth(run, "m1", 4.0)
    tls_broker.start()
    made = max(run.truth("m1"))
    wait_until(lambda: stored_counts(run.tmp / "gateway.db").get("m1", 0) >= made, 60, "readings after restart")

    downs = run.events("m1", "uplink_down")
    assert downs, "the outages were never noticed"
    # Bounded: each failing call gave up within its deadline (plus scheduling slack on a loaded machine).
    assert max(d["took_ms"] for d in downs) <= TIMEOUT_S * 1000 + 300, downs
    # ...and the frozen broker really made calls wait that long: the deadline, not luck, ended them.
    assert max(d["took_ms"] for d in downs) >= TIMEOUT_S * 1000 - 100, downs
    # Measuring went on: a blocked call holds the loop up for at most timeout_s, and a broker that refuses
    # connections not at all (the back-off waits without sleeping). The pace itself is the machine's: a
    # reading costs CPU, and other tests share the two cores.
    gaps = {"healthy": healthy_gap, "frozen": frozen_gap, "stopped": stopped_gap,
            "made": (healthy_made, frozen_made, stopped_made)}
    assert frozen_made >= 2 and stopped_made >= 1, gaps
    assert frozen_gap <= healthy_gap + TIMEOUT_S + 1.0 and stopped_gap <= healthy_gap + 1.0, gaps
    assert_stored_in_order(run, "m1", made)
    assert run.stop_gateway() == 0
