"""A meter whose power fails just after the gateway's ack, then boots: the ack is on flash
already, so only the unacknowledged reading is sent again, and it goes out at the first loop
step, byte for byte as first published, to a real gateway through real Mosquitto. And when the
gateway refuses that resend (it lost readings: seq_gap), the meter says so: each refusal in its log with the reason, and
its health message shows the reading waiting and the last ack standing still."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from aggregator.store import GatewayStore
from gridledger.meterjournal import read_counters
from gridledger.testbed import wait_up

from conftest import MP_SCRIPTS, MicroPython, MqttProbe
from helpers import wait_until
from test_end_to_end import Area

READINGS = "gl/v1/area1/meters/r1/readings"


@pytest.fixture(params=["source", "mpy"])
def mp(request, mp_source, firmware_bundle):
    """The firmware's modules from source and as the mpy-cross bundle flashed to boards."""
    return mp_source if request.param == "source" else MicroPython([firmware_bundle])


def made_state(mp, tmp_path, area, health_s=300):
    """Readings 1-3 made by the meter's own code, the ack of 2 handled, then the power cut."""
    path = tmp_path / "r1" / "config.json"
    cfg = json.loads(path.read_text())
    t1 = (int(time.time()) // 900 - 4) * 900
    # Scale 1, the next interval 890 s away: the booted meter makes no reading.
    cfg["clock"] = {"scale": 1, "real_start": time.time(), "virtual_start": t1 + 2 * 900 + 10}
    cfg["broker"]["health_s"] = health_s
    path.write_text(json.dumps(cfg))
    made = mp.run_json(MP_SCRIPTS / "mp_meter_reboot.py", path, "make", t1)
    return path, t1, made


async def deliver(broker, *payloads, acked=2):
    """Readings published as the meter published them, until the gateway acks `acked`."""
    async with MqttProbe(broker, "gl/v1/area1/meters/r1/ack") as probe:
        for p in payloads:
            await probe.publish(READINGS, p)
        await probe.expect("gl/v1/area1/meters/r1/ack", lambda b: b.get("seq") == acked)


def test_a_boot_after_an_ack_resends_only_the_unacknowledged_reading_at_its_first_step(
        mp, tmp_path, broker, firmware_bundle):
    """Readings 1-3 made, the ack of 2 handled, power cut: the counters on flash already say 2, the
    booted meter holds only 3 and publishes it at loop step 1 (not 1 and 2 again, not after the
    pool's steps in the loop: a meter whose power failed that soon after each boot never got past
    its oldest reading, tests/test_meter_crash.py); the gateway stores 3 once and acks it."""
    area = Area(tmp_path, broker, firmware_bundle, ["r1"], intervals=3)
    try:
        path, _, made = made_state(mp, tmp_path, area)
        assert made["flash"] == {"seq": 3, "acked": 2, "floor": 2}, "the ack waited for the next counters write"

        area.start_gateway()
        wait_up(tmp_path / "gateway.log", area.gateway)
        # What the meter published before the power cut, and the gateway acked.
        asyncio.run(deliver(broker, made["sent"]["1"], made["sent"]["2"]))
        lines = [json.loads(x) for x in mp.run(MP_SCRIPTS / "mp_meter_reboot.py", path, "boot").splitlines()]
        out, log = lines[-1], lines[:-1]
        assert out["spooled_at_boot"] == 1
        assert out["sent"] and out["sent"][0] == [1, 3], out
        assert {seq for _, seq in out["sent"]} == {3}, out
        assert out["acked"] == 3 and out["floor"] == 3
        assert [e["seq"] for e in log if e.get("ev") == "acked"] == [3]
        wait_until(lambda: read_counters(tmp_path / "r1").floor == 3, 5, "the floor on flash")
    finally:
        area.cleanup()

    store = GatewayStore(tmp_path / "gateway.db")
    try:
        rs = store.readings("r1")
        rejected = store.db.execute("SELECT reason, count FROM rejections").fetchall()
    finally:
        store.close()
    assert [r.seq for r in rs] == [1, 2, 3] and rejected == []
    first = json.loads(made["sent"]["3"])
    assert (rs[2].c, rs[2].sig, rs[2].prev) == (first["c"], first["sig"], rs[1].hash)


def test_a_refused_resend_is_logged_with_its_reason_and_shows_in_health(mp, tmp_path, broker, firmware_bundle):
    """The gateway holds reading 1 only (a gateway restored from an older copy, say): each resend
    of 3 is refused as seq_gap, and the meter logs every refusal with seq and reason, keeps the
    reading (it never drops an unacknowledged one), and its health says journal_depth 1 and
    last_acked 2 every time it is published."""
    area = Area(tmp_path, broker, firmware_bundle, ["r1"], intervals=3)
    try:
        path, _, made = made_state(mp, tmp_path, area, health_s=1)
        area.start_gateway()
        wait_up(tmp_path / "gateway.log", area.gateway)
        asyncio.run(deliver(broker, made["sent"]["1"], acked=1))

        async def boot_and_watch_health():
            async with MqttProbe(broker, "gl/v1/area1/meters/r1/health") as probe:
                text = await asyncio.to_thread(mp.run, MP_SCRIPTS / "mp_meter_reboot.py", path, "boot", 200)
                return text, [json.loads(p) for _, p in probe.received]

        text, health = asyncio.run(boot_and_watch_health())
        lines = [json.loads(x) for x in text.splitlines()]
        out, log = lines[-1], lines[:-1]
    finally:
        area.cleanup()
    sends = [seq for _, seq in out["sent"]]
    assert sends[:1] == [3] and set(sends) == {3} and len(sends) >= 2, out  # sent again after resend_s
    nacks = [(e["seq"], e["reason"]) for e in log if e.get("ev") == "nack"]
    assert len(nacks) >= 2 and set(nacks) == {(3, "seq_gap")}, log
    assert out["acked"] == 2 and out["floor"] == 2
    online = [h for h in health if h.get("state") == "online"]
    assert len(online) >= 2, health
    assert all((h["journal_depth"], h["last_acked"], h["seq"]) == (1, 2, 3) for h in online), online
    assert read_counters(tmp_path / "r1").floor == 2
