"""A resend is the first send, byte for byte: a real meter (the mpy-cross bundle under
`micropython`, compact journal records) publishes readings that nobody acknowledges, goes
back and publishes them again (rebuilt from their plaintext and seed), loses its broker, and
after the broker is back resends everything still unacknowledged to a real gateway, which
stores each reading exactly once and never sees two contents for one seq."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict

from aggregator.store import GatewayStore, stored_counts
from gridledger.broker import start_mosquitto
from gridledger.testbed import wait_up
from gridledger.wire import parse_reading, readings_topic

from conftest import MqttProbe
from test_end_to_end import Area
from test_meter_crash import recent_past

METER = "rs1"


async def until(pred, timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.1)


def test_resends_after_a_broker_outage_are_byte_identical_and_stored_once(tmp_path, broker, firmware_bundle):
    """With no gateway, readings are published and, unacknowledged, published again
    (go-back-N); the broker is stopped and restarted on its port and the gateway started:
    every copy of a seq is the same bytes, including the first readings sent again after the
    outage, many intervals later (their ciphertext computed again from the journal); every
    reading stored once, chained, decrypting to the truth; no equivocation, no gap."""
    area = Area(tmp_path, broker, firmware_bundle, [METER], intervals=60)
    recent_past(area, METER)
    topic = readings_topic("area1", METER)
    seen: dict[int, list[bytes]] = defaultdict(list)
    again = None

    def note(probe: MqttProbe, start: int) -> int:
        for _, p in probe.received[start:]:
            seen[parse_reading(p).seq].append(p)
        return len(probe.received)

    async def scenario():
        nonlocal again
        async with MqttProbe(broker, topic) as probe:
            area.start_meter(METER)
            # First sends. Unacknowledged for resend_s (2 s), the meter goes back to the oldest,
            # whose ciphertext it computes again in its idle steps: on this 1,800x clock there
            # are few until the last interval, so the copies mostly come after the outage.
            await until(lambda: len({parse_reading(p).seq for _, p in probe.received}) >= 4, 60,
                        "first readings published with no gateway")
            note(probe, 0)
        first_phase = max(seen)
        broker.stop()
        made = max(area.truth(METER))
        await until(lambda: max(area.truth(METER)) >= made + 6, 30, "readings made with the broker down")
        again = start_mosquitto(tmp_path / "broker-again", port=broker.port)
        async with MqttProbe(again, topic) as probe:
            area.start_gateway()
            wait_up(tmp_path / "gateway.log", area.gateway)
            await until(lambda: area.procs[METER].poll() is not None, 240, "the meter to finish")
            note(probe, 0)
        return first_phase, made

    try:
        first_phase, made = asyncio.run(scenario())
        area.wait_meters_done(5)
        assert area.stop_gateway() == 0
        area.assert_complete_and_true()
    finally:
        area.cleanup()
        if again is not None:
            again.stop()

    # Every copy of a seq is the same bytes: the signature verifies unchanged, never a fork.
    assert all(len(set(copies)) == 1 for copies in seen.values()), {s: len(set(c)) for s, c in seen.items()}
    repeated = sorted(s for s, copies in seen.items() if len(copies) >= 2)
    # Readings of the first phase sent again after the outage, when the meter had made at least
    # six newer ones: far older than anything its pool's ring (4 values) still held, so rebuilt.
    assert set(range(1, 5)) <= set(repeated), repeated
    assert made >= first_phase
    store = GatewayStore(tmp_path / "gateway.db")
    try:
        rows = store.readings(METER)
        rejected = dict(store.db.execute("SELECT reason, count FROM rejections").fetchall())
    finally:
        store.close()
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1)) and stored_counts(tmp_path / "gateway.db") == {METER: len(rows)}
    assert not {"equivocation", "prev_mismatch", "bad_signature", "replayed_seq"} & set(rejected), rejected
    # What the gateway stored is what was published, byte for byte in its signed content.
    for r in rows:
        if r.seq in seen:
            assert parse_reading(seen[r.seq][0]).signed_bytes == r.signed_bytes and parse_reading(seen[r.seq][0]).sig == r.sig
    print("resend:", json.dumps({"readings": len(rows), "published": sum(map(len, seen.values())),
                                 "repeated": len(repeated), "rejected": rejected}))
