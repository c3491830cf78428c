"""Device-side alerts: the firmware's threshold and hysteresis rules under the real
micropython binary, the signed format shared by both runtimes, and end to end on
real parts (a sim meter -> Mosquitto -> the gateway process -> SQLite -> ack),
with forged, unknown and replayed alerts refused by reason and counted."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest

from aggregator.alerts import (ALERT_REASONS, AlertCheck, Alert, make_alert, parse_alert)
from aggregator.registry import MeterEntry, Registry
from gridledger.broker import free_port
from gridledger.errors import Rejected
from gridledger.firmware_build import METER_HEAP
from gridledger.meterkeys import MeterKey, verifier
from gridledger.testbed import meter_process

from conftest import MP_SCRIPTS, VECTORS, MqttProbe
from test_serial_bridge import METER, Wired
from test_uplink import HEALTH_FIELDS, retained
from uplinkkit import INTERVAL_S, MeterArea

VEC = json.loads((VECTORS / "alerts_v1.json").read_text())
RULES = [("power_high", 400, 50, True), ("power_low", 200, 50, False)]
# A meter with alerts runs in the plain meter's 128 KiB: its names fit the five
# name pools the plain meter uses (docs/alerts.md, "Heap").
ALERTS_HEAP = METER_HEAP


def judge(active: bool, value: int, limit: int, hyst: int, above: bool) -> bool:
    """The documented rule (docs/alerts.md), written again independently of the firmware."""
    if above:
        return value >= limit - hyst if active else value > limit
    return value <= limit + hyst if active else value < limit


def expected_alerts(points: list[tuple[int, int]], rules) -> list[tuple[int, str, int, int, str]]:
    active: dict[str, bool] = {}
    out = []
    for t, value in points:
        for kind, limit, hyst, above in rules:
            was = active.get(kind, False)
            now = judge(was, value, limit, hyst, above)
            if now != was:
                out.append((t, kind, value, limit, "raised" if now else "cleared"))
                active[kind] = now
    return out


def test_alert_vectors_agree_between_firmware_and_cpython(mp_source, tmp_path):
    """The firmware signs and encodes each known-answer alert byte for byte as CPython does, and CPython parses and verifies them."""
    got = mp_source.run_json(MP_SCRIPTS / "mp_alerts.py", VECTORS / "alerts_v1.json", tmp_path)
    assert got["public"] == VEC["meter_key"]["public"]
    verify = verifier(VEC["meter_key"]["public"])
    for g, v in zip(got["vectors"], VEC["alerts"], strict=True):
        assert g == {"signed_bytes": v["signed_bytes"], "payload": v["payload"]}
        a = parse_alert(v["payload"].encode())
        assert a.to_json().decode() == v["payload"]
        assert verify(a.signed_bytes, bytes.fromhex(a.sig))
        assert not verify(a.signed_bytes.replace(b"\n", b" ", 1), bytes.fromhex(a.sig))


def test_thresholds_hysteresis_and_persistence_in_micropython(mp_source, tmp_path):
    """One alert per excursion and one clear when it ends (no chatter inside the hysteresis band, None changes
    nothing), average power from energy for a sensor without power_w, seq and excursions survive a reboot,
    a bounded outbox that counts what it drops, resend timing, cumulative acks and nacks, an alert that cannot
    be written to flash is not taken (its seq would not survive a reboot), and a corrupt state file costs no
    crash and no repeated seq; the gateway's answers on ack and nack reach readings or alerts by their key."""
    got = mp_source.run_json(MP_SCRIPTS / "mp_alerts.py", VECTORS / "alerts_v1.json", tmp_path)
    # power: high 3000 W, low 100 W, hysteresis 100 W
    assert got["power"] == [["power_high", "raised", 3001], ["power_high", "cleared", 2899],
                            ["power_high", "raised", 3050], ["power_high", "cleared", 2000],
                            ["power_low", "raised", 99], ["power_low", "cleared", 201],
                            ["power_low", "raised", 50]]
    # temperature: warning 70 C, hysteresis 2 C, values in tenths of a degree
    assert got["temp"] == [["temp_high", "raised", 701], ["temp_high", "cleared", 679], ["temp_high", "raised", 752]]
    assert got["active_before_reboot"] == ["power_low", "temp_high"]
    assert got["after_reboot"]["seq"] == got["seq_before_reboot"] == 10
    assert got["after_reboot"]["active"] == ["power_low", "temp_high"]
    assert got["after_reboot"]["pending"] == list(range(1, 11))
    # 1000 Wh imported in 900 s is 4000 W; 500 Wh exported is -2000 W; 10 Wh is 40 W (still low)
    assert got["energy"] == [["power_high", "raised", 4000], ["power_low", "cleared", 4000],
                             ["power_high", "cleared", -2000], ["power_low", "raised", -2000]]
    assert got["dropped"] == 2 and got["dropped_logged"] == [1, 2]  # 14 alerts, at most 12 kept
    key = MeterKey("m1", bytes.fromhex(VEC["meter_key"]["seed"]))
    for p in got["pending"]:
        a = parse_alert(p.encode())
        assert a.meter == "m1" and key.private.public_key().verify(bytes.fromhex(a.sig), a.signed_bytes) is None
    pending = list(range(3, 15))
    assert got["due"] == [pending, [], pending, pending]
    assert got["batch_most"] == 4  # a burst of pending alerts is handed to the uplink a few at a time
    after = got["after_ack"]
    assert after["acked_to"] == 5 and after["refused"] == 14
    assert after["pending"] == list(range(6, 14)) and after["seq"] == 14
    assert got["flash_full"] == {"before": [14, 8], "after": [14, 8, ["power_low", "temp_high"]], "logged": ["alert_failed"]}
    corrupt = got["corrupt"]
    assert corrupt["logged"] == "alerts_state_lost" and corrupt["pending"] == 0
    assert 0 <= corrupt["now"] - corrupt["seq"] <= 5 and corrupt["seq"] > 14
    ans = got["answers"]  # reading ack, reading nack, alert ack, alert nack, garbage
    assert ans["returned"] == [41, None, None, None, None] and ans["reading_acks"] == [41]
    assert len(ans["pending_before"]) == 3 and ans["pending_after"] == ans["pending_before"][1:2]
    assert ans["file_after"] == ans["pending_after"]  # the outbox's payloads on flash, its seqs in RAM
    assert ans["logged"] == ["nack", "alert_nack", "bad_ack"]
    assert got["tmp_left"] == []


def _entry(key: MeterKey) -> MeterEntry:
    return MeterEntry(key.meter, f"acct-{key.meter}", key.public_hex)


@pytest.mark.parametrize("payload, reason", [
    (b"x" * 1025, "oversized"),
    (b"{not json", "malformed_json"),
    (b"[1]", "malformed_json"),
    (b'{"v":1}', "missing_field"),
    (b'{"kind":"power_high","meter":"m1","seq":"1","sig":"00","state":"raised","t":1,"threshold":1,"v":1,'
     b'"value":1}', "bad_type"),
    (b'{"kind":"power_high","meter":"m1","seq":1,"sig":"00","state":"raised","t":1,"threshold":1,"v":2,'
     b'"value":1}', "unsupported_version"),
    (b'{"kind":"smoke","meter":"m1","seq":1,"sig":"00","state":"raised","t":1,"threshold":1,"v":1,'
     b'"value":1}', "bad_value"),
    (b'{"kind":"power_high","meter":"m1","seq":0,"sig":"00","state":"raised","t":1,"threshold":1,"v":1,'
     b'"value":1}', "bad_value"),
    (b'{"kind":"power_high","meter":"m1","seq":1,"sig":"00","state":"raised","t":1,"threshold":1,"v":1,'
     b'"value":1}', "bad_value"),
])
def test_malformed_alerts_are_refused_by_reason(payload, reason):
    """Each shape fault is a typed rejection with its reason, never an exception or an accept."""
    with pytest.raises(Rejected) as exc:
        parse_alert(payload)
    assert exc.value.reason == reason
    check = AlertCheck(Registry([]), {}, lambda m, s: None)
    assert check.check("m1", payload).reason == reason
    assert reason in ALERT_REASONS


def test_alert_check_order_and_seq_rules():
    """Topic, registry, signature, then seq: new seqs accepted (gaps allowed), the same alert again is a duplicate,
    a different alert at a used seq is replayed_seq."""
    key, other = MeterKey("m1", b"\x01" * 32), MeterKey("m9", b"\x09" * 32)
    stored: dict[tuple[str, int], bytes] = {}
    check = AlertCheck(Registry([_entry(key)]), {}, lambda m, s: stored.get((m, s)))

    def alert(k: MeterKey, seq: int, value: int = 500) -> Alert:
        return make_alert(meter=k.meter, seq=seq, t=1767225600 + seq, kind="power_high", value=value,
                          threshold=400, state="raised", sign=k.sign)

    a1 = alert(key, 1)
    assert check.check("m1", a1.to_json()).kind == "accept"
    stored[("m1", 1)] = a1.to_json()
    assert check.check("m1", a1.to_json()).kind == "duplicate"
    assert check.check("m1", alert(key, 1, 999).to_json()).reason == "replayed_seq"
    assert check.check("m2", alert(key, 2).to_json()).reason == "topic_mismatch"
    assert check.check("m9", alert(other, 2).to_json()).reason == "unknown_meter"
    forged = json.loads(alert(key, 2).to_json())
    forged["value"] = 50
    assert check.check("m1", json.dumps(forged).encode()).reason == "bad_signature"
    assert check.check("m1", alert(key, 5).to_json()).kind == "accept"  # a gap: the meter dropped some
    assert check.check("m1", alert(key, 4).to_json()).reason == "replayed_seq"
    assert check.last == {"m1": 5}
    assert check.counts == {"accept": 2, "duplicate": 1, "replayed_seq": 2, "topic_mismatch": 1,
                            "unknown_meter": 1, "bad_signature": 1}


def _metric(port: int, name: str, result: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(f'{name}_total{{result="{result}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"{name} {result} not in metrics")


def _alerts_list(cfg) -> list[dict]:
    res = subprocess.run([sys.executable, "-m", "gridledger", "alerts", "list", "--config", str(cfg), "--json"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


def _truth_points(truth: dict[int, dict]) -> list[tuple[int, int]]:
    """(interval end, average net power in W) of each reading the simulator made."""
    return [(truth[s]["t"], (truth[s]["import_wh"] - truth[s]["export_wh"]) * 3600 // INTERVAL_S)
            for s in sorted(truth)]


@pytest.fixture
def area(tmp_path, broker, firmware_bundle):
    made = []

    def make(*args, **kw) -> MeterArea:
        made.append(MeterArea(tmp_path, broker, firmware_bundle, *args, heap=ALERTS_HEAP, **kw))
        return made[-1]

    yield make
    for a in made:
        a.cleanup()


async def test_signed_alerts_reach_the_gateway_and_forgeries_are_refused(area, broker):
    """A sim meter with low power thresholds raises and clears signed alerts exactly as its truth dictates; the
    gateway verifies, stores and acks them; a tampered alert, an unknown meter, a replayed seq, an oversized and
    a malformed alert are refused by reason, nacked and counted; a valid alert after them is still accepted."""
    port = free_port()
    run = area(["m1"], intervals=16, metrics_port=port)
    run.configure("m1", alerts={"power_high_w": 400, "power_low_w": 200, "power_hyst_w": 50, "resend_s": 1})
    run.start_gateway()
    run.start_meter("m1")
    run.wait_meters_done(90)  # a meter finishes only once its readings and alerts are acked

    points = _truth_points(run.truth("m1"))
    want = expected_alerts(points, RULES)
    assert {w[4] for w in want} == {"raised", "cleared"}, "the profile should cross the thresholds both ways"
    stored = _alerts_list(run.cfg)
    assert [(a["t"], a["kind"], a["value"], a["threshold"], a["state"]) for a in stored] == want
    assert [a["seq"] for a in stored] == list(range(1, len(want) + 1))
    assert json.loads((run.tmp / "m1" / "alerts.json").read_text())["pending"] == []
    assert len(run.events("m1", "alert")) == len(want)

    last = len(want)
    key = run.keys["m1"]
    first = make_alert(meter="m1", seq=1, t=want[0][0], kind=want[0][1], value=want[0][2], threshold=want[0][3],
                       state=want[0][4], sign=key.sign)
    tampered = json.loads(first.to_json())
    tampered["value"] += 1000
    stranger = MeterKey("mX", b"\x77" * 32)
    replay = make_alert(meter="m1", seq=1, t=want[0][0], kind="power_low", value=10, threshold=200,
                        state="raised", sign=key.sign)
    fresh = make_alert(meter="m1", seq=last + 1, t=points[-1][0], kind="power_high", value=4000, threshold=400,
                       state="raised", sign=key.sign)
    base = "gl/v1/area1/meters"
    async with MqttProbe(broker, f"{base}/+/ack", f"{base}/+/nack") as probe:
        await probe.publish(f"{base}/m1/alerts", json.dumps(tampered))
        await probe.expect(f"{base}/m1/nack", lambda b: b == {"alert_seq": 1, "reason": "bad_signature"})
        await probe.publish(f"{base}/mX/alerts", make_alert(meter="mX", seq=1, t=1, kind="temp_high", value=800,
                                                            threshold=700, state="raised",
                                                            sign=stranger.sign).to_json())
        await probe.expect(f"{base}/mX/nack", lambda b: b == {"alert_seq": 1, "reason": "unknown_meter"})
        await probe.publish(f"{base}/m1/alerts", replay.to_json())
        await probe.expect(f"{base}/m1/nack", lambda b: b == {"alert_seq": 1, "reason": "replayed_seq"})
        await probe.publish(f"{base}/m1/alerts", b"x" * 2000)
        await probe.expect(f"{base}/m1/nack", lambda b: b == {"alert_seq": None, "reason": "oversized"})
        await probe.publish(f"{base}/m1/alerts", b'{"v": 1, "meter": ')
        await probe.expect(f"{base}/m1/nack", lambda b: b == {"alert_seq": None, "reason": "malformed_json"})
        await probe.publish(f"{base}/m1/alerts", first.to_json())  # the meter's own alert again: acked, kept once
        await probe.expect(f"{base}/m1/ack", lambda b: b == {"alert_seq": last})
        await probe.publish(f"{base}/m1/alerts", fresh.to_json())
        await probe.expect(f"{base}/m1/ack", lambda b: b == {"alert_seq": last + 1})
        # Alert answers share the reading ack/nack topics; a reading ack never carries alert_seq.
        assert all(("alert_seq" in json.loads(p)) != ("seq" in json.loads(p)) for _, p in probe.received)

    stored = _alerts_list(run.cfg)
    assert [a["seq"] for a in stored] == list(range(1, last + 2))
    assert stored[-1]["value"] == 4000 and stored[0]["value"] == want[0][2]
    for reason in ("bad_signature", "unknown_meter", "replayed_seq", "oversized", "malformed_json"):
        assert _metric(port, "gridledger_alerts", reason) == 1.0, reason
    assert _metric(port, "gridledger_alerts", "accept") == last + 1
    assert _metric(port, "gridledger_alerts", "duplicate") >= 1
    assert run.stop_gateway() == 0
    # Restarted, the gateway still knows every meter's highest alert seq (from SQLite): the replay stays refused.
    run.start_gateway()
    async with MqttProbe(broker, f"{base}/m1/nack") as probe:
        await probe.publish(f"{base}/m1/alerts", replay.to_json())
        await probe.expect(f"{base}/m1/nack", lambda b: b == {"alert_seq": 1, "reason": "replayed_seq"}, timeout=30)
    assert run.stop_gateway() == 0
    text = subprocess.run([sys.executable, "-m", "gridledger", "alerts", "list", "--config", str(run.cfg)],
                          capture_output=True, text=True, timeout=30).stdout
    assert f"{last + 1} alerts; refused:" in text and '"bad_signature": 1' in text and '"replayed_seq": 2' in text


async def test_wired_meter_alerts_and_health_travel_the_serial_link(tmp_path, broker, firmware_bundle):
    """A wired meter's alerts go up the serial link as E frames, the bridge publishes them, the gateway stores
    exactly those the truth dictates, and its answers come back down as ACK frames: the meter's outbox empties.
    Its health frames carry the same fields as an MQTT meter's and end up retained on its health topic."""
    w = Wired(tmp_path, broker, firmware_bundle, intervals=16)
    try:
        cfg_path = tmp_path / METER / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["alerts"] = {"power_high_w": 400, "power_low_w": 200, "power_hyst_w": 50, "resend_s": 1}
        cfg_path.write_text(json.dumps(cfg))
        w.start_gateway()
        w.start_bridge()
        w._clock_starts_now()
        w.area.procs[METER] = meter_process(cfg_path, w.meter_log, heap=ALERTS_HEAP, firmware=firmware_bundle)
        w.area.wait_meters_done(90)  # only once readings and alerts are all acked
        want = expected_alerts(_truth_points(w.area.truth(METER)), RULES)
        assert want, "the profile should cross a threshold"
        stored = _alerts_list(w.area.cfg)
        assert [(a["t"], a["kind"], a["value"], a["threshold"], a["state"]) for a in stored] == want
        assert [a["seq"] for a in stored] == list(range(1, len(want) + 1))
        assert json.loads((tmp_path / METER / "alerts.json").read_text())["pending"] == []
        health = await retained(broker, f"gl/v1/area1/meters/{METER}/health")
        assert set(health) == HEALTH_FIELDS | {"rejected"}
        assert health["meter"] == METER and health["state"] == "online" and health["reconnects"] >= 1
        assert health["rssi"] is None and health["mem_free"] > 0
        final = w.stop_bridge()
        assert final["alerts"] >= len(want) and final["meter_spooled"] is not None
        assert w.area.stop_gateway() == 0
    finally:
        w.cleanup()
