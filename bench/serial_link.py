"""Readings per second from one wired meter through the serial bridge: the real
firmware (MicroPython Unix port, serial uplink) drains a spool of N readings over a
pty cable (gridledger/ptycable.py) held to 115200 baud 8N1, then unthrottled, into
the real bridge, Mosquitto and gateway processes. The spool is filled beforehand
with valid readings made in CPython, so the figure is the link's, not the meter's
encryption. Against the line's ceiling: 11520 bytes/s over one framed reading."""

from __future__ import annotations

import json
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from aggregator.registry import MeterEntry, dump_registry
from aggregator.store import stored_counts
from gridledger.broker import start_mosquitto
from gridledger.firmware_build import BUILD, build_firmware
from gridledger.meterkeys import MeterKey
from gridledger.paillier import encrypt_raw
from gridledger.ptycable import NullModem
from gridledger.serialframe import FrameType, encode
from gridledger.testbed import bridge_process, gateway_process, meter_process, wait_up, write_meter_config
from gridledger.wire import ZERO_HASH, kid_of, make_reading, pack_slots

from benchlib import emit, load_test_modulus, machine, parse_args

NAME = "serial_link"
BAUD = 115200
INTERVAL_S = 900
METER = "wired1"
DRAIN_TIMEOUT_S = 300


def fill_spool(d: Path, n: int, readings: int, key: MeterKey) -> int:
    """N chained readings in the meter's spool and its state, ending in the past; returns the last t."""
    t = (int(time.time()) // INTERVAL_S - readings - 8) * INTERVAL_S
    prev = ZERO_HASH
    (d / "spool").mkdir(parents=True)
    for seq in range(1, readings + 1):
        t += INTERVAL_S
        c = encrypt_raw(n, pack_slots({0: 100 + seq, 1: seq % 7}))
        r = make_reading(meter=METER, seq=seq, t=t, dt=INTERVAL_S, prev=prev, kid=kid_of(n), c=c, sign=key.sign)
        (d / "spool" / f"{seq}.json").write_bytes(r.to_json())
        prev = r.hash
    (d / "state.json").write_text(json.dumps({"seq": readings, "prev": prev, "t": t}))
    return t


def drain(tmp: Path, n: int, firmware: Path, readings: int, baud: int | None) -> dict:
    """One pass: broker, gateway, cable, bridge, then the meter; seconds from the first
    reading stored to the last."""
    key = MeterKey(METER, bytes([7]) * 32)
    (tmp / "registry.toml").write_text(dump_registry([MeterEntry(METER, "acct-1", key.public_hex)]))
    (tmp / "paillier.pub.json").write_text(json.dumps({"n": str(n), "kid": kid_of(n)}))
    broker = start_mosquitto(tmp / "broker")
    procs: list[subprocess.Popen] = []
    modem = NullModem(tmp, baud)
    try:
        cfg = tmp / "gateway.toml"
        cfg.write_text(f'[gateway]\narea = "area1"\ndatabase = "gateway.db"\nregistry = "registry.toml"\n'
                       f'paillier_public = "paillier.pub.json"\n\n[mqtt]\nhost = "{broker.host}"\n'
                       f'port = {broker.port}\n')
        procs.append(gateway_process(cfg, tmp / "gateway.log"))
        wait_up(tmp / "gateway.log", procs[-1])
        procs.append(bridge_process(cfg, modem.gateway_end, tmp / "bridge.log", baud=BAUD, status_s=5))
        wait_up(tmp / "bridge.log", procs[-1])
        d = tmp / METER
        last_t = fill_spool(d, n, readings, key)
        key.write_seed(d / "ed25519.key")
        now = time.time()
        # resend_s above the pty's own buffering (~64 KiB, 5.7 s at 115200): a real UART
        # has no such buffer, and resends would only measure the pty.
        write_meter_config(d / "config.json", meter=METER, area="area1", state_dir=d, key_file=d / "ed25519.key",
                           n=n, host=broker.host, port=broker.port, interval_s=INTERVAL_S,
                           clock={"scale": 1, "real_start": now, "virtual_start": now, "stop_at": last_t},
                           seed=1, resend_s=30,
                           uplink={"kind": "serial", "device": modem.meter_end, "baud": BAUD, "hello_s": 1})
        t0 = time.monotonic()
        meter = meter_process(d / "config.json", tmp / "meter.log", firmware=firmware)
        procs.append(meter)
        first = done = None
        while time.monotonic() - t0 < DRAIN_TIMEOUT_S:
            count = sum(stored_counts(tmp / "gateway.db").values())
            if count and first is None:
                first = time.monotonic()
            if count >= readings:
                done = time.monotonic()
                break
            time.sleep(0.02)
        if done is None:
            raise RuntimeError(f"only {count} of {readings} readings stored in {DRAIN_TIMEOUT_S} s; see {tmp}")
        meter.wait(30)
        bridge = procs[1]
        bridge.send_signal(signal.SIGTERM)
        bridge.wait(15)
        final = [json.loads(x) for x in (tmp / "bridge.log").read_text().splitlines() if '"stop"' in x][-1]
        return {"readings": readings, "first_to_last_s": round(done - first, 3),
                "readings_per_s": round((readings - 1) / (done - first), 2),
                "start_to_last_s": round(done - t0, 3), "frames_from_meter": final["frames"],
                "readings_published": final["published"], "rejected": final["rejected"]}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        modem.close()
        broker.stop()


def main() -> None:
    args = parse_args(__doc__)
    readings = 40 if args.quick else 200
    n = load_test_modulus()
    firmware = build_firmware(BUILD / "bench-firmware")
    sample = make_reading(meter=METER, seq=1234, t=1795160700, dt=INTERVAL_S, prev=ZERO_HASH, kid=kid_of(n),
                          c=encrypt_raw(n, 1), sign=MeterKey(METER, bytes(32)).sign).to_json()
    frame_bytes = len(encode(FrameType.READING, sample))
    result = {"bench": NAME, "machine": machine(), "quick": args.quick, "baud": BAUD,
              "framed_reading_bytes": frame_bytes, "line_ceiling_readings_per_s": round(BAUD / 10 / frame_bytes, 2)}
    for label, baud in (("baud_115200", BAUD), ("pty_unthrottled", None)):
        with tempfile.TemporaryDirectory(prefix="gl-serial-") as tmp:
            result[label] = drain(Path(tmp), n, firmware, readings, baud)
            print(label, result[label], flush=True)
    emit(NAME, result)


if __name__ == "__main__":
    main()
