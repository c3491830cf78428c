"""A meter whose power fails just after the gateway's ack, then boots: the ack is on flash
already, so only the unacknowledged reading is sent again, and it goes out at the first loop
step, byte for byte as first published, to a real gateway through real Mosquitto."""

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


@pytest.fixture(params=["source", "mpy"])
def mp(request, mp_source, firmware_bundle):
    """The firmware's modules from source and as the mpy-cross bundle flashed to boards."""
    return mp_source if request.param == "source" else MicroPython([firmware_bundle])


def test_a_boot_after_an_ack_resends_only_the_unacknowledged_reading_at_its_first_step(
        mp, tmp_path, broker, firmware_bundle):
    """Readings 1-3 made, the ack of 2 handled, power cut: the counters on flash already say 2, the
    booted meter holds only 3 and publishes it at loop step 1 (not 1 and 2 again, not after the
    pool's steps in the loop: a meter whose power failed that soon after each boot never got past
    its oldest reading, tests/test_meter_crash.py); the gateway stores 3 once and acks it."""
    area = Area(tmp_path, broker, firmware_bundle, ["r1"], intervals=3)
    try:
        path = tmp_path / "r1" / "config.json"
        cfg = json.loads(path.read_text())
        t1 = (int(time.time()) // 900 - 4) * 900
        # Scale 1, the next interval 890 s away: the booted meter makes no reading.
        cfg["clock"] = {"scale": 1, "real_start": time.time(), "virtual_start": t1 + 2 * 900 + 10}
        path.write_text(json.dumps(cfg))
        made = mp.run_json(MP_SCRIPTS / "mp_meter_reboot.py", path, "make", t1)
        assert made["flash"] == {"seq": 3, "acked": 2, "floor": 2}, "the ack waited for the next counters write"

        area.start_gateway()
        wait_up(tmp_path / "gateway.log", area.gateway)

        async def deliver_1_and_2():
            # What the meter published before the power cut, and the gateway acked.
            async with MqttProbe(broker, "gl/v1/area1/meters/r1/ack") as probe:
                for seq in ("1", "2"):
                    await probe.publish("gl/v1/area1/meters/r1/readings", made["sent"][seq])
                await probe.expect("gl/v1/area1/meters/r1/ack", lambda b: b.get("seq") == 2)

        asyncio.run(deliver_1_and_2())
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
