"""Wired meters end to end on real parts: the MicroPython firmware with a serial
uplink on one end of a pty cable (gridledger/ptycable.py), the real `gridledger bridge
serial` process on the other, a real Mosquitto and the real gateway process. The
bridge is killed with SIGKILL, the cable is unplugged, and bad bytes are slipped in
between frames: no reading may be lost or stored twice, and every bad frame is
counted under its reason."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
import zlib
from collections import Counter
from pathlib import Path

import pytest

from aggregator.gateway import load_gateway_config
from aggregator.serialbridge import SerialBridge
from aggregator.store import stored_counts
from gridledger.broker import start_mosquitto
from gridledger.errors import Rejected
from gridledger.firmware_build import METER_HEAP, micropython_command
from gridledger.ptycable import NullModem
from gridledger.serialframe import Decoder, Frame, FrameType as T, cobs_encode, encode
from gridledger.testbed import bridge_process, wait_up

from helpers import wait_until
from test_end_to_end import Area
from test_meter_state import run_firmware

METER = "w1"


def events(log: Path, name: str) -> list[dict]:
    out = []
    for line in log.read_text().splitlines() if log.exists() else []:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("ev") == name:
            out.append(rec)
    return out


class Wired:
    """One wired meter, its cable and its bridge, beside the usual gateway."""

    def __init__(self, tmp: Path, broker, firmware: Path, intervals: int, baud: int | None = None,
                 console: bool = False):
        self.tmp = tmp
        self.firmware = firmware
        self.modem = NullModem(tmp, baud)
        # console: the link is the meter's own stdin/stdout, as on a Pico's USB (no "device")
        uplink = {"kind": "serial", "hello_s": 0.5, "health_s": 2, "timeout_s": 5}
        if not console:
            uplink["device"] = self.modem.meter_end
        self.area = Area(tmp, broker, firmware, [METER], intervals, uplinks={METER: uplink})
        self.bridge: subprocess.Popen | None = None
        self.logs: list[Path] = []

    @property
    def meter_log(self) -> Path:
        return self.tmp / f"{METER}.log"

    def _clock_starts_now(self) -> None:
        """The meter's virtual clock starts a moment from now, not when the area was
        written: the gateway and bridge start first, and on a loaded machine that takes
        seconds, which would be intervals the meter never measures."""
        self.area.clock["real_start"] = time.time() + 1.0
        path = self.tmp / METER / "config.json"
        cfg = json.loads(path.read_text())
        cfg["clock"] = self.area.clock
        path.write_text(json.dumps(cfg, indent=1))

    def start_meter(self) -> None:
        self._clock_starts_now()
        self.area.start_meter(METER)

    def start_console_meter(self) -> None:
        """The meter with the cable on its console, its stderr (tracebacks) to its log."""
        self._clock_starts_now()
        cmd, env = micropython_command(self.firmware / "main.py", self.tmp / METER / "config.json", heap=METER_HEAP,
                                       path=[self.firmware])
        with open(self.modem.meter_end, "r+b", buffering=0) as tty, open(self.meter_log, "ab") as err:
            self.area.procs[METER] = subprocess.Popen(cmd, env=env, stdin=tty, stdout=tty, stderr=err,
                                                      start_new_session=True)

    def start_gateway(self) -> None:
        self.area.start_gateway()
        wait_up(self.tmp / "gateway.log", self.area.gateway)

    def start_bridge(self) -> None:
        log = self.tmp / f"bridge{len(self.logs)}.log"
        self.logs.append(log)
        self.bridge = bridge_process(self.area.cfg, self.modem.gateway_end, log, status_s=1)
        wait_up(log, self.bridge)

    def stop_bridge(self) -> dict:
        """SIGTERM; returns the bridge's final counters (its "stop" line)."""
        self.bridge.send_signal(signal.SIGTERM)
        assert self.bridge.wait(15) == 0, self.logs[-1].read_text()[-3000:]
        return events(self.logs[-1], "stop")[-1]

    def stored(self) -> int:
        return sum(stored_counts(self.tmp / "gateway.db").values())

    def cleanup(self) -> None:
        self.area.cleanup()
        if self.bridge is not None and self.bridge.poll() is None:
            self.bridge.kill()
            self.bridge.wait()
        self.modem.close()


@pytest.fixture
def wired(tmp_path, broker, firmware_bundle):
    made = []

    def make(intervals: int, baud: int | None = None, console: bool = False) -> Wired:
        w = Wired(tmp_path, broker, firmware_bundle, intervals, baud, console)
        made.append(w)
        return w

    yield make
    for w in made:
        w.cleanup()


def test_wired_meter_keeps_every_reading_until_the_bridge_delivers_it(wired):
    """With no bridge on the line the meter spools every reading and drops none; once the
    bridge runs, every interval is stored once, acked, chained and decrypts to the truth."""
    w = wired(intervals=12)
    w.start_gateway()
    w.start_meter()
    wait_until(lambda: len(w.area.truth(METER)) >= 3, 30, "readings to accumulate")
    produced = sorted(w.area.truth(METER))
    assert w.area.spooled(METER)[: len(produced)] == produced
    w.start_bridge()
    w.area.wait_meters_done(60)
    final = w.stop_bridge()
    assert w.area.stop_gateway() == 0
    w.area.assert_complete_and_true()
    assert final["meter"] == METER and final["published"] >= w.stored()
    assert final["acks"] >= 1 and final["hellos"] >= 1
    assert any(e["ev"] == "uplink_up" and e.get("link") == "serial"
               for e in map(json.loads, w.meter_log.read_text().splitlines()) if e.get("ev"))


def test_set_register_event_goes_up_the_line_before_the_readings_after_it(wired, firmware_bundle):
    """A technician's set-register on a wired meter: the signed event goes up the line in
    an EVENT frame, the bridge publishes it on the meter's events topic, the gateway
    verifies and stores it, and its ack comes back down the line; only then does the
    meter send the readings after it, each stored once."""
    w = wired(intervals=8)
    done = run_firmware(firmware_bundle, w.tmp / METER / "config.json", "set-register", "123456", "789", "tech-7")
    assert done.returncode == 0, done.stdout + done.stderr
    w.start_gateway()
    w.start_bridge()
    w.start_meter()
    w.area.wait_meters_done(60)
    final = w.stop_bridge()
    assert w.area.stop_gateway() == 0
    w.area.assert_complete_and_true()
    with sqlite3.connect(w.tmp / "gateway.db") as db:
        stored = db.execute("SELECT eseq, seq, import_wh, export_wh, by, received_at FROM events").fetchall()
        [(first_reading_at,)] = db.execute("SELECT MIN(received_at) FROM readings").fetchall()
    [(eseq, seq, imp, exp, by, stored_at)] = stored
    assert (eseq, seq, imp, exp, by) == (1, 0, 123456, 789, "tech-7")
    assert stored_at < first_reading_at, "the meter waits for the event's ack before its next reading"
    assert final["events"] >= 1 and final["rejected"] == {}
    trouble = {"events_not_sent", "event_unanswered", "event_refused"}
    assert not [e for e in map(json.loads, w.meter_log.read_text().splitlines()) if e.get("ev") in trouble]


def test_meter_whose_console_is_the_link(wired):
    """A Pico on USB has one channel, its console: the firmware takes it over (stdin and
    stdout here, on the Unix port), sends its log lines as LOG frames, and still
    delivers every reading once."""
    w = wired(intervals=10, console=True)
    w.start_gateway()
    w.start_bridge()
    w.start_console_meter()
    w.area.wait_meters_done(60)
    final = w.stop_bridge()
    assert w.area.stop_gateway() == 0
    w.area.assert_complete_and_true()
    lines = [e["line"] for e in events(w.logs[-1], "meter_log")]
    assert {"reading", "acked"} <= {line.get("ev") for line in lines if isinstance(line, dict)}
    assert final["meter_logs"] == len(lines) and final["rejected"] == {}


def test_bridge_killed_mid_stream_loses_and_duplicates_nothing(wired):
    """kill -9 of the bridge while readings flow, restart: every interval stored exactly
    once, and the meter's spool drains after the restart."""
    w = wired(intervals=16)
    w.start_gateway()
    w.start_bridge()
    w.start_meter()
    wait_until(lambda: w.stored() >= 4, 40, "first readings stored")
    w.bridge.send_signal(signal.SIGKILL)
    w.bridge.wait(5)
    time.sleep(1.5)  # the meter keeps measuring and spooling with nobody on the line
    assert w.area.spooled(METER), "readings made while the bridge was dead must wait in the spool"
    w.start_bridge()
    w.area.wait_meters_done(90)
    final = w.stop_bridge()
    assert w.area.stop_gateway() == 0
    w.area.assert_complete_and_true()
    assert final["published"] >= 1


def test_unplugged_and_replugged_cable_loses_nothing(wired):
    """The gateway end is pulled (the device path disappears) and plugged back as a new
    device: the bridge reopens it by itself and every reading arrives once."""
    w = wired(intervals=16)
    w.start_gateway()
    w.start_bridge()
    w.start_meter()
    wait_until(lambda: w.stored() >= 3, 40, "first readings stored")
    w.modem.unplug()
    time.sleep(2.0)
    w.modem.replug()
    w.area.wait_meters_done(90)
    final = w.stop_bridge()
    assert w.area.stop_gateway() == 0
    w.area.assert_complete_and_true()
    log = w.logs[-1]
    assert events(log, "port_lost") and len(events(log, "port_up")) >= 2
    assert final["open_failures"] >= 1


def test_bridge_rides_out_a_broker_restart(wired, broker, tmp_path):
    """The broker is gone for a while: the bridge stops welcoming the meter, which keeps
    its readings, reconnects by itself, and every reading arrives once."""
    w = wired(intervals=24)
    w.start_gateway()
    w.start_bridge()
    w.start_meter()
    wait_until(lambda: w.stored() >= 2, 40, "first readings stored")
    broker.stop()
    time.sleep(2.5)
    again = start_mosquitto(tmp_path / "broker-again", port=broker.port)
    try:
        wait_until(lambda: len(events(w.logs[-1], "mqtt_up")) >= 2, 30, "the bridge back on the broker")
        w.area.wait_meters_done(90)
        w.stop_bridge()
        assert w.area.stop_gateway() == 0
    finally:
        again.stop()
    w.area.assert_complete_and_true()
    assert any(e.get("ev") == "uplink_down" and e.get("during") == "welcome"
               for e in map(json.loads, w.meter_log.read_text().splitlines()))


# Slipped in between the meter's frames, each followed on the line by the next frame's
# opening 0x00; "why" is what the bridge must count them as.
UP_NOISE = [
    (b"line noise \xff\xfe\r\n", None),
    (b"\x00" + encode(T.READING, b'{"v":1,"meter":"w1","seq":1}')[:-9], None),  # cut off
    (b"\x00" + encode(T.HEALTH, b'{"seq":1}')[1:-1].replace(b"q", b"Q") + b"\x00", None),  # bit error
    (b"\x00\x02A", None),
    (b"A" * 9000, None),
    (b"\x00" + cobs_encode(b"Z{}" + zlib.crc32(b"Z{}").to_bytes(4, "big")) + b"\x00", None),  # type Z, good CRC
    (encode(T.HELLO, b'{"proto":1,"meter":"w1","area":"elsewhere"}'), "wrong_area"),
    (encode(T.HELLO, b'{"proto":2,"meter":"w1","area":"area1"}'), "bad_hello"),
    (encode(T.HELLO, b"hello?"), "bad_hello"),
    (encode(T.ACK, b'{"seq": 1}'), "unexpected_type"),
    (encode(T.HEALTH, b"[1, 2]"), "bad_health"),
]
# A well-framed reading the gateway refuses: the nack must come back down the line.
JUNK_READING = encode(T.READING, b'{"junk": true}')
DOWN_NOISE = [
    (b"\xff\xfe garbage\r\n", None),
    (b"\x00" + encode(T.ACK, b'{"seq": 99999}')[1:-6], None),
    (b"\x00\x02A", None),
    (b"B" * 700, None),
    (encode(T.READING, b"{}"), "unexpected_type"),
]


def expected(noise: list[tuple[bytes, str | None]], max_payload: int) -> Counter:
    """The rejections a receiver must count: its framing's verdict on each item (followed,
    as on the line, by the next frame's opening 0x00), or the reason given."""
    out: Counter = Counter()
    for item, why in noise:
        if why is not None:
            out[why] += 1
            continue
        got = Decoder(max_payload).feed(item + b"\x00")
        assert got and all(isinstance(x, Rejected) for x in got), item[:40]
        out.update(x.reason for x in got)
    return out


def test_bad_bytes_between_frames_are_counted_by_reason_and_cost_no_reading(wired):
    """Garbage, cut-off frames, bit errors, unknown types, oversized runs and bad hellos on
    the line, both ways: each is one typed rejection (bridge counters, meter log), the good
    frames around them still get through, and a reading the gateway refuses is nacked back
    down the line to the meter."""
    w = wired(intervals=16)
    w.start_gateway()
    w.start_bridge()
    w.start_meter()
    wait_until(lambda: w.stored() >= 2, 40, "first readings stored")
    w.modem.inject_up.extend([item for item, _ in UP_NOISE] + [JUNK_READING])
    w.modem.inject_down.extend(item for item, _ in DOWN_NOISE)
    wait_until(lambda: not w.modem.inject_up and not w.modem.inject_down, 30, "the noise to go out")
    w.area.wait_meters_done(90)
    final = w.stop_bridge()
    assert w.area.stop_gateway() == 0
    w.area.assert_complete_and_true()

    max_payload = load_gateway_config(w.area.cfg).gateway.max_payload
    want_up = expected(UP_NOISE, max_payload)
    assert set(want_up) >= {"bad_cobs", "bad_crc", "too_short", "oversized", "unknown_type"}
    assert final["rejected"] == dict(want_up)

    meter_events = [json.loads(line) for line in w.meter_log.read_text().splitlines() if line.startswith("{")]
    want_down = expected(DOWN_NOISE, 512)
    assert Counter(e["reason"] for e in meter_events if e["ev"] == "link_reject") == want_down
    assert any(e["ev"] == "nack" and e["reason"] == "missing_field" for e in meter_events)


def test_hello_and_frame_rejections_by_reason(tmp_path):
    """Every bridge-level refusal has its own reason; none needs a port or a broker."""
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[gateway]\narea = "area1"\ndatabase = "g.db"\nregistry = "r.toml"\npaillier_public = "p.json"\n')
    bridge = SerialBridge(load_gateway_config(cfg), "/dev/null")
    cases = [
        (T.HELLO, b"{}", "bad_hello"), (T.HELLO, b"[1]", "bad_hello"), (T.HELLO, b"\xff", "bad_hello"),
        (T.HELLO, b'{"proto":1,"meter":"no spaces","area":"area1"}', "bad_hello"),
        (T.HELLO, b'{"proto":1,"meter":7,"area":"area1"}', "bad_hello"),
        (T.HELLO, b'{"proto":1,"meter":"m1","area":"area2"}', "wrong_area"),
        (T.HEALTH, b"nope", "bad_health"), (T.HEALTH, b"[]", "bad_health"), (T.WELCOME, b"{}", "unexpected_type"),
        (T.QUERY, b"", "unexpected_type"), (T.NACK, b"{}", "unexpected_type"),
    ]
    for ftype, payload, reason in cases:
        before = bridge.rejected[reason]
        bridge._on_item(Frame(ftype, payload))
        assert bridge.rejected[reason] == before + 1, (ftype, payload)
    assert bridge.meter is None
    bridge._on_item(Frame(T.HELLO, b'{"proto":1,"meter":"m1","area":"area1"}'))
    assert bridge.meter == "m1" and bridge.counts["hellos"] == 1
    # A meter's own words never collide with the bridge's log fields.
    bridge._on_item(Frame(T.HEALTH, b'{"port": 1, "meter": 2, "level": 3, "name": 4}'))
    bridge._on_item(Frame(T.LOG, b'{"ev": "boot", "level": "x"}'))
    assert bridge.counts["health"] == 1 and bridge.health["port"] == 1 and bridge.counts["meter_logs"] == 1
