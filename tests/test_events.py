"""Signed meter events (set-register) at the gateway: the checks and their reasons as pure
logic, and end to end under the real `micropython` binary against Mosquitto and the gateway
process: an event reaches the gateway, verifies with the meter's registered key, is stored
once although the meter sent it three times, is acked before the meter sends what follows
it, and forged, gapped, conflicting and malformed events are refused by reason and counted."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request

import pytest

from aggregator.events import EVENT_REASONS, EventCheck, make_event, parse_event
from aggregator.registry import MeterEntry, Registry
from gridledger.broker import free_port
from gridledger.errors import Rejected
from gridledger.meterkeys import MeterKey
from gridledger.testbed import gateway_process, meter_process, wait_up, write_meter_config
from gridledger.wire import nack_topic

from conftest import MqttProbe
from helpers import N, log_events, make_area, wait_until
from test_meter_state import run_firmware

METER = "ev1"
KEY = MeterKey("m1", bytes([7]) * 32)
PREV = "ab" * 32


def event(key: MeterKey, eseq: int, import_wh: int = 5000, **kw):
    fields = dict(meter=key.meter, eseq=eseq, at=1795000000 + eseq, seq=3, prev=PREV, import_before=10,
                  export_before=0, import_wh=import_wh, export_wh=0, by="tech-7") | kw
    return make_event(**fields, sign=key.sign)


def test_event_json_round_trips_and_signs_the_documented_bytes():
    """parse_event(to_json()) gives the event back; the signed bytes are gl-event-v1's twelve lines."""
    e = event(KEY, 1)
    assert parse_event(e.to_json()) == e
    assert e.signed_bytes.split(b"\n") == [b"gl-event-v1", b"m1", b"1", b"1795000001", b"set_register", b"3",
                                           PREV.encode(), b"10", b"0", b"5000", b"0", b"tech-7"]


@pytest.mark.parametrize("change,reason", [
    ({"v": 2}, "unsupported_version"), ({"eseq": "1"}, "bad_type"), ({"eseq": 0}, "bad_value"),
    ({"kind": "reboot"}, "bad_value"), ({"by": "two words"}, "bad_value"), ({"by": "x" * 33}, "bad_value"),
    ({"import_wh": -1}, "bad_value"), ({"export_wh": 1 << 63}, "bad_value"), ({"prev": "AB" * 32}, "bad_value"),
    ({"sig": "00"}, "bad_value"), ({"extra": 1}, "bad_value"), ({"at": True}, "bad_type"),
    ({"meter": "bad id!"}, "bad_value"), ({"by": None}, "bad_type"),
])
def test_malformed_events_are_refused_by_reason(change, reason):
    body = json.loads(event(KEY, 1).to_json()) | change
    with pytest.raises(Rejected) as exc:
        parse_event(json.dumps(body).encode())
    assert exc.value.reason == reason


@pytest.mark.parametrize("payload,reason", [
    (b"x" * 1025, "oversized"), (b"not json", "malformed_json"), (b"[1]", "malformed_json"),
    (b'{"v": 1}', "missing_field"),
])
def test_unparseable_events_are_refused_by_reason(payload, reason):
    with pytest.raises(Rejected) as exc:
        parse_event(payload)
    assert exc.value.reason == reason


def test_event_check_order_and_eseq_rules():
    """Signature by the registered key, then eseq: the next one accepted, a resend (in the
    same batch or after it is stored) a duplicate, a different event at a used eseq an
    equivocation kept as evidence, one no longer held a replay, a skipped eseq a gap."""
    other = MeterKey("m1", bytes([8]) * 32)
    stored: dict[tuple[str, int], bytes] = {}
    check = EventCheck(Registry([MeterEntry("m1", "acct-1", KEY.public_hex)]), {}, lambda m, s: stored.get((m, s)))
    e1 = event(KEY, 1)
    assert check.check("m1", e1.to_json()).kind == "accept"
    assert check.check("m1", e1.to_json()).kind == "duplicate"  # resent before the batch was stored
    check.committed()
    stored[("m1", 1)] = e1.to_json()
    assert check.check("m1", e1.to_json()).kind == "duplicate"
    v = check.check("m1", event(KEY, 1, import_wh=6000).to_json())
    assert (v.kind, v.reason, v.evidence, v.seq) == ("reject", "equivocation", True, 1)
    assert check.check("m1", event(KEY, 3).to_json()).reason == "eseq_gap"
    assert check.check("m2", event(KEY, 2).to_json()).reason == "topic_mismatch"
    assert check.check("m9", event(MeterKey("m9", bytes(32)), 2).to_json()).reason == "unknown_meter"
    assert check.check("m1", event(other, 2).to_json()).reason == "bad_signature"
    forged = json.loads(event(KEY, 2).to_json()) | {"import_wh": 1}
    assert check.check("m1", json.dumps(forged).encode()).reason == "bad_signature"
    assert check.check("m1", event(KEY, 2).to_json()).kind == "accept"
    del stored[("m1", 1)]  # the store lost it: nothing to compare with
    assert check.check("m1", event(KEY, 1, import_wh=7).to_json()).reason == "replayed_eseq"
    assert check.last == {"m1": 2}
    assert check.counts == {"accept": 2, "duplicate": 2, "equivocation": 1, "eseq_gap": 1, "topic_mismatch": 1,
                            "unknown_meter": 1, "bad_signature": 2, "replayed_eseq": 1}
    assert set(check.counts) <= set(EVENT_REASONS) | {"accept", "duplicate"}


# End to end ------------------------------------------------------------------

def _metric(port: int, name: str, result: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(f'{name}_total{{result="{result}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"{name} {result} not in metrics")


def _events_list(cfg) -> list[dict]:
    res = subprocess.run([sys.executable, "-m", "gridledger", "events", "list", "--config", str(cfg), "--json"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


def _db(tmp, sql: str, *args) -> list[tuple]:
    with sqlite3.connect(f"file:{tmp / 'gateway.db'}?mode=ro", uri=True, timeout=5) as conn:
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError:
            return []  # the gateway has not made its tables yet


def test_set_register_events_reach_the_gateway_once_and_forgeries_are_refused(tmp_path, broker,
                                                                               firmware_bundle):
    """1. A meter with a journaled set-register event starts beside a running gateway: the event
    is verified, stored and acked, and only then does the meter send the readings after it.
    2. A second event made while the gateway is down is sent three times (no answer), then the
    meter goes on; the gateway, back, stores it once and acks the other two copies as
    duplicates. 3. Forged, gapped, conflicting and malformed events are nacked with their
    reasons, counted, the conflicting one kept as evidence; `gridledger events list` shows two."""
    cfg, keys = make_area(tmp_path, [METER], host=broker.host, port=broker.port)
    port = free_port()
    cfg.write_text(cfg.read_text() + f"\n[metrics]\nport = {port}\n")
    d = tmp_path / METER
    keys[METER].write_seed(d / "ed25519.key")
    now = time.time()
    config = d / "config.json"
    write_meter_config(config, meter=METER, area="area1", state_dir=d, key_file=d / "ed25519.key", n=N,
                       host=broker.host, port=broker.port, interval_s=900, seed=3, resend_s=1.0,
                       clock={"scale": 1800, "real_start": now, "virtual_start": (int(now) // 900 - 400) * 900})
    procs: list[subprocess.Popen] = []
    gw_log, log = tmp_path / "gateway.log", tmp_path / "meter.log"

    def start_gateway() -> subprocess.Popen:
        procs.append(gateway_process(cfg, gw_log))
        wait_up(gw_log, procs[-1])
        return procs[-1]

    def events() -> list[tuple]:
        return _db(tmp_path, "SELECT eseq, seq, import_wh, export_wh, by, received_at FROM events ORDER BY eseq")

    try:
        # 1 -----------------------------------------------------------------
        assert run_firmware(firmware_bundle, config, "set-register", "123456", "789", "tech-7").returncode == 0
        gateway = start_gateway()
        procs.append(meter := meter_process(config, log, firmware=firmware_bundle))
        wait_until(lambda: len(_db(tmp_path, "SELECT seq FROM readings")) >= 3, 60, "readings after the event")
        [(eseq, seq, imp, exp, by, stored_at)] = events()
        assert (eseq, seq, imp, exp, by) == (1, 0, 123456, 789, "tech-7")
        [(first_reading_at,)] = _db(tmp_path, "SELECT MIN(received_at) FROM readings")
        assert stored_at < first_reading_at, "the meter waits for the event's ack before its next reading"
        assert not [e for e in log_events(log) if e["ev"] in ("event_unanswered", "event_refused")]

        # 2 -----------------------------------------------------------------
        meter.kill()
        meter.wait(10)
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(15) == 0
        assert run_firmware(firmware_bundle, config, "set-register", "200000", "0", "tech-8").returncode == 0
        topics = [f"gl/v1/area1/meters/{METER}/{t}" for t in ("events", "readings")]

        def after(received: list, seq: int) -> bool:
            return any(t == topics[1] and json.loads(p)["seq"] > seq for t, p in received)

        async def watch() -> list[tuple[str, bytes]]:
            async with MqttProbe(broker, *topics) as probe:
                procs.append(meter_process(config, log, firmware=firmware_bundle))
                e = await probe.expect(topics[0], lambda b: b["eseq"] == 2, timeout=60)
                await asyncio.to_thread(wait_until, lambda: after(probe.received, e["seq"]), 60,
                                        "a reading made after the event to be sent")
                return list(probe.received)

        sent = asyncio.run(watch())
        meter = procs[-1]
        unanswered = [e for e in log_events(log) if e["ev"] == "event_unanswered"]
        assert unanswered == [{"ev": "event_unanswered", "eseq": 2, "sends": 3}]
        copies = [i for i, (t, p) in enumerate(sent) if t == topics[0]]
        e_seq = json.loads(sent[copies[0]][1])["seq"]
        later = [i for i, (t, p) in enumerate(sent) if t == topics[1] and json.loads(p)["seq"] > e_seq]
        assert len(copies) == 3 and len({sent[i][1] for i in copies}) == 1, "three byte-identical sends"
        assert later and min(later) > copies[-1], "nothing after the event is sent while it waits for an answer"
        start_gateway()
        wait_until(lambda: len(events()) == 2, 30, "the resent event to be stored")
        wait_until(lambda: _metric(port, "gridledger_events", "duplicate") == 2, 30, "two duplicates acked")
        (e1, e2_row) = events()
        assert e1[:5] == (1, 0, 123456, 789, "tech-7")
        assert (e2_row[0], e2_row[2:5]) == (2, (200000, 0, "tech-8"))
        assert e2_row[1] >= 3  # tied to the last reading made before it

        # 3 -----------------------------------------------------------------
        key = keys[METER]
        e2 = json.loads(_db(tmp_path, "SELECT payload FROM events WHERE eseq = 2")[0][0])
        base = dict(meter=METER, at=1795000000, seq=e2["seq"], prev=e2["prev"], import_before=200000,
                    export_before=0, import_wh=1, export_wh=0, by="tech-9")
        forged = json.loads(make_event(eseq=3, **base, sign=key.sign).to_json()) | {"import_wh": 999999}
        bad = [
            json.dumps(forged),                                                    # bad_signature
            make_event(eseq=3, **base, sign=MeterKey(METER, bytes(32)).sign).to_json().decode(),  # bad_signature
            make_event(eseq=5, **base, sign=key.sign).to_json().decode(),          # eseq_gap
            make_event(eseq=1, **base, sign=key.sign).to_json().decode(),          # equivocation
            json.dumps({k: v for k, v in e2.items() if k != "by"}),                # missing_field
        ]

        async def send() -> list[dict]:
            # The nack topic also carries the readings' nacks ({"seq", ...}): only events' count here.
            async with MqttProbe(broker, nack_topic("area1", METER)) as probe:
                for body in bad:
                    await probe.publish(f"gl/v1/area1/meters/{METER}/events", body)
                async with asyncio.timeout(20):
                    while True:
                        got = [b for b in (json.loads(p) for _, p in probe.received) if "eseq" in b]
                        if len(got) >= len(bad):
                            return got
                        await asyncio.sleep(0.05)

        nacks = asyncio.run(send())
        assert sorted((n["eseq"], n["reason"]) for n in nacks) == [
            (1, "equivocation"), (2, "missing_field"), (3, "bad_signature"), (3, "bad_signature"), (5, "eseq_gap")]
        assert dict(_db(tmp_path, "SELECT reason, count FROM event_rejections")) == {
            "bad_signature": 2, "eseq_gap": 1, "equivocation": 1, "missing_field": 1}
        assert _db(tmp_path, "SELECT meter, eseq, reason FROM event_evidence") == [(METER, 1, "equivocation")]
        assert len(events()) == 2
        listed = _events_list(cfg)
        assert [(e["eseq"], e["import_wh"], e["by"]) for e in listed] == [(1, 123456, "tech-7"), (2, 200000, "tech-8")]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
