"""The gateway against a real Mosquitto: each kind of bad input is rejected with
its reason (nack and counter), and a good reading right after it is still accepted."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from aggregator.gateway import Gateway, load_gateway_config
from aggregator.store import GatewayStore
from gridledger.wire import ack_topic, nack_topic, readings_topic

from conftest import MqttProbe
from helpers import N, SimMeter, make_area


@pytest.fixture
async def area(broker, tmp_path):
    cfg_path, keys = make_area(tmp_path, ["m1", "m2"], host=broker.host, port=broker.port)
    gw = Gateway(load_gateway_config(cfg_path))
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    async with MqttProbe(broker, "gl/v1/area1/meters/+/ack", "gl/v1/area1/meters/+/nack") as probe:
        # the gateway is subscribed once a reading round-trips
        m1 = SimMeter(keys["m1"])
        async with asyncio.timeout(10):
            first = m1.next()
            while True:
                await probe.publish(readings_topic("area1", "m1"), first.to_json())
                try:
                    await probe.expect(ack_topic("area1", "m1"), lambda b: b["seq"] == 1, timeout=0.5)
                    break
                except TimeoutError:
                    pass
        yield gw, probe, m1, SimMeter(keys["m2"]), tmp_path
    stop.set()
    await asyncio.wait_for(task, 10)


async def send_raw(probe, meter: str, payload: bytes):
    start = len(probe.received)
    await probe.publish(readings_topic("area1", meter), payload)
    return start


async def assert_rejected_then_good_accepted(gw, probe, m1, payload: bytes, reason: str, meter: str = "m1"):
    start = await send_raw(probe, meter, payload)
    nack = await probe.expect(nack_topic("area1", meter), lambda b: True, start=start)
    assert nack["reason"] == reason
    assert gw.counters()[reason] >= 1
    good = m1.next()
    start = await send_raw(probe, "m1", good.to_json())
    await probe.expect(ack_topic("area1", "m1"), lambda b: b["seq"] == good.seq, start=start)


def mutate(reading, **changes) -> bytes:
    body = json.loads(reading.to_json())
    body.update(changes)
    return json.dumps(body).encode()


BAD_SHAPES = {
    "malformed_json": lambda r: b'{"v": 1, "meter": "m1", ',
    "not_utf8": lambda r: b"\xff\xfe\x00",
    "json_array": lambda r: b"[1, 2, 3]",
    "missing_field": lambda r: json.dumps({k: v for k, v in json.loads(r.to_json()).items() if k != "sig"}).encode(),
    "seq_as_string": lambda r: mutate(r, seq=str(r.seq)),
    "seq_as_bool": lambda r: mutate(r, seq=True),
    "c_as_int": lambda r: mutate(r, c=12345),
    "oversized": lambda r: mutate(r, pad="x" * 9000),
    "version_2": lambda r: mutate(r, v=2),
    "seq_zero": lambda r: mutate(r, seq=0),
    "uppercase_hex": lambda r: mutate(r, c=r.c.upper()),
}
EXPECTED = {"malformed_json": "malformed_json", "not_utf8": "malformed_json", "json_array": "malformed_json",
            "missing_field": "missing_field", "seq_as_string": "bad_type", "seq_as_bool": "bad_type",
            "c_as_int": "bad_type", "oversized": "oversized", "version_2": "unsupported_version",
            "seq_zero": "bad_value", "uppercase_hex": "bad_value"}


@pytest.mark.parametrize("case", sorted(BAD_SHAPES))
async def test_malformed_input_is_rejected_with_its_reason(area, case):
    """Malformed, incomplete, mistyped or oversized payloads are refused by reason; the next good one is acked."""
    gw, probe, m1, _, _ = area
    upcoming = SimMeter(m1.key, seq=m1.seq, prev=m1.prev, t=m1.t).next()
    await assert_rejected_then_good_accepted(gw, probe, m1, BAD_SHAPES[case](upcoming), EXPECTED[case])


async def test_unknown_meter_is_rejected(area, tmp_path):
    """A well-formed, well-signed reading from a meter not in the registry is refused."""
    from gridledger.meterkeys import MeterKey
    gw, probe, m1, _, _ = area
    stranger = SimMeter(MeterKey("m9", bytes([9]) * 32)).next()
    await assert_rejected_then_good_accepted(gw, probe, m1, stranger.to_json(), "unknown_meter", meter="m9")


async def test_bad_signature_is_rejected(area):
    """A reading signed by another meter's key (or with a tampered field) fails signature checks."""
    gw, probe, m1, m2, _ = area
    forged = SimMeter(m2.key, seq=m1.seq, prev=m1.prev, t=m1.t).next()
    body = json.loads(forged.to_json())
    body["meter"] = "m1"
    await assert_rejected_then_good_accepted(gw, probe, m1, json.dumps(body).encode(), "bad_signature")
    honest = SimMeter(m1.key, seq=m1.seq, prev=m1.prev, t=m1.t).next()
    await assert_rejected_then_good_accepted(gw, probe, m1, mutate(honest, t=honest.t + 1), "bad_signature")


@pytest.mark.parametrize("c", [0, N * N, N * N + 5, N], ids=["zero", "n_squared", "above", "shares_factor"])
async def test_ciphertext_out_of_range_is_rejected(area, c):
    """Ciphertexts outside Z*_{n^2} (0, n^2 and above, or sharing a factor with n) are refused;
    0 already fails the shape check, as "0" is not a canonical ciphertext spelling."""
    from gridledger.wire import make_reading
    gw, probe, m1, _, _ = area
    r = make_reading(meter="m1", seq=m1.seq + 1, t=m1.t + 900, dt=900, prev=m1.prev, kid=m1.sent[-1].kid,
                     c=c, sign=m1.key.sign)
    await assert_rejected_then_good_accepted(gw, probe, m1, r.to_json(), "bad_value" if c == 0 else "ciphertext_range")


async def test_wrong_key_id_is_rejected(area):
    """A reading encrypted under another Paillier key (kid mismatch) is refused."""
    gw, probe, m1, _, _ = area
    upcoming = SimMeter(m1.key, seq=m1.seq, prev=m1.prev, t=m1.t).next()
    await assert_rejected_then_good_accepted(gw, probe, m1, mutate(upcoming, kid="00" * 8), "unknown_key_id")


async def test_topic_mismatch_is_rejected(area):
    """m2 may not publish m1's reading on its own topic."""
    gw, probe, m1, _, _ = area
    upcoming = SimMeter(m1.key, seq=m1.seq, prev=m1.prev, t=m1.t).next()
    await assert_rejected_then_good_accepted(gw, probe, m1, upcoming.to_json(), "topic_mismatch", meter="m2")


async def test_equivocation_is_rejected_and_kept_as_evidence(area):
    """A validly signed second reading for a used seq is refused as equivocation and stored as evidence;
    the chain is unchanged."""
    gw, probe, m1, _, tmp = area
    clone = SimMeter(m1.key)  # restarts at seq 1 with different randomness
    await assert_rejected_then_good_accepted(gw, probe, m1, clone.next().to_json(), "equivocation")
    db = GatewayStore(tmp / "gateway.db")
    try:
        assert db.db.execute("SELECT reason, seq FROM evidence").fetchall() == [("equivocation", 1)]
        assert [r.hash for r in db.readings("m1")] == [r.hash for r in m1.sent]
    finally:
        db.close()


async def test_sequence_gap_and_prev_mismatch_are_rejected(area):
    """Skipping a seq, or a prev that does not chain to the last reading, is refused."""
    gw, probe, m1, _, _ = area
    ahead = SimMeter(m1.key, seq=m1.seq + 1, prev=m1.prev, t=m1.t).next()
    await assert_rejected_then_good_accepted(gw, probe, m1, ahead.to_json(), "seq_gap")
    broken = SimMeter(m1.key, seq=m1.seq, prev="ab" * 32, t=m1.t).next()
    await assert_rejected_then_good_accepted(gw, probe, m1, broken.to_json(), "prev_mismatch")


async def test_clock_skew_is_rejected_and_not_evidence(area):
    """A reading dated beyond the gateway's clock, or whose interval overlaps the last one, is refused
    as clock_skew and not kept as evidence."""
    gw, probe, m1, _, tmp = area
    future = SimMeter(m1.key, seq=m1.seq, prev=m1.prev, t=int(time.time()) + 3600).next()
    await assert_rejected_then_good_accepted(gw, probe, m1, future.to_json(), "clock_skew")
    overlapping = SimMeter(m1.key, seq=m1.seq, prev=m1.prev, t=m1.t - 900 + 1).next()  # ends 1 s after m1.t
    await assert_rejected_then_good_accepted(gw, probe, m1, overlapping.to_json(), "clock_skew")
    db = GatewayStore(tmp / "gateway.db")
    try:
        assert db.db.execute("SELECT COUNT(*) FROM evidence").fetchone()[0] == 0
    finally:
        db.close()


async def test_duplicates_are_acked_idempotently_and_stored_once(area):
    """Re-sending readings already stored re-acks them and stores nothing twice."""
    gw, probe, m1, _, tmp = area
    for _ in range(3):
        r = m1.next()
        start = await send_raw(probe, "m1", r.to_json())
        await probe.expect(ack_topic("area1", "m1"), lambda b: b["seq"] == r.seq, start=start)
    for r in m1.sent:
        start = await send_raw(probe, "m1", r.to_json())
        await probe.expect(ack_topic("area1", "m1"), lambda b: b["seq"] == m1.seq, start=start)
    assert gw.counters()["duplicate"] == len(m1.sent)
    db = GatewayStore(tmp / "gateway.db")
    try:
        assert [r.seq for r in db.readings("m1")] == [1, 2, 3, 4]
    finally:
        db.close()


async def test_rejection_counters_persist(area):
    """Rejections are counted per reason in the gateway's database, not only in memory."""
    gw, probe, m1, _, tmp = area
    await assert_rejected_then_good_accepted(gw, probe, m1, b"nonsense", "malformed_json")
    db = GatewayStore(tmp / "gateway.db")
    try:
        assert db.rejection_counts().get("malformed_json") == 1
    finally:
        db.close()


async def test_a_message_too_big_for_the_link_is_dropped_counted_and_the_next_reading_acked(area):
    """Above the link's 1 MiB packet bound a message is skipped as it streams by (never
    buffered whole), counted by reason in the gateway's metrics, and the session goes on."""
    from gridledger.mqttlink import MAX_PACKET
    gw, probe, m1, _, _ = area
    await send_raw(probe, "m1", b"x" * (MAX_PACKET + 4096))
    good = m1.next()
    start = await send_raw(probe, "m1", good.to_json())
    await probe.expect(ack_topic("area1", "m1"), lambda b: b["seq"] == good.seq, start=start)
    assert gw.readings.dropped() == {"oversized": 1, "undecodable": 0}
    snap = {s.name: s for s in gw.metrics()}["gridledger_ingest_link_dropped"]
    assert snap.values[("oversized",)] == 1


async def test_a_batch_goes_when_the_inflow_pauses_not_at_the_end_of_its_wait(tmp_path, monkeypatch):
    """Group commit: a burst is taken as soon as nothing more comes for BATCH_GAP_S;
    a steady inflow (arrivals closer than that) keeps filling the batch to BATCH_MAX."""
    import aggregator.gateway as gateway
    monkeypatch.setattr(gateway, "BATCH_WAIT_S", 30.0)
    monkeypatch.setattr(gateway, "BATCH_GAP_S", 0.2)
    monkeypatch.setattr(gateway, "BATCH_MAX", 40)
    cfg_path, _ = make_area(tmp_path, ["m1"], host="127.0.0.1", port=1)
    gw = Gateway(load_gateway_config(cfg_path))
    topic = readings_topic("area1", "m1")

    for i in range(10):  # a burst, then silence
        gw._on_reading(topic, b"%d" % i)
    t0 = time.monotonic()
    batch = await asyncio.wait_for(gw._next_batch(), 10)
    assert [p for _, p in batch] == [b"%d" % i for i in range(10)]
    assert time.monotonic() - t0 < 5  # the gap, not BATCH_WAIT_S (30 s)

    async def steady() -> None:  # one every 20 ms: ten times closer than the gap
        for i in range(60):
            gw._on_reading(topic, b"s%d" % i)
            await asyncio.sleep(0.02)

    feeder = asyncio.create_task(steady())
    batch = await asyncio.wait_for(gw._next_batch(), 10)
    assert [p for _, p in batch] == [b"s%d" % i for i in range(40)]  # full: the inflow never paused
    await feeder
    assert [p for _, p in await gw._next_batch()] == [b"s%d" % i for i in range(40, 60)]
    gw.store.close()
