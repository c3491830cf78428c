"""The one-machine testbed: a private Mosquitto, N meters running the real
firmware under the MicroPython Unix port in accelerated time, and the gateway as
a real process. It ends with a table of decrypted totals against the simulator's
truth and exits non-zero if any differ.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from aggregator.registry import MeterEntry, dump_registry
from aggregator.store import GatewayStore, stored_counts
from coordinator.totals import EnergyTotals, decrypt_total

from . import paillier
from .broker import Broker, start_broker
from .firmware_build import BUILD, build_firmware, micropython_command
from .meterkeys import new_meter_key
from .wire import Reading, kid_of

__all__ = ["TestbedPlan", "run_testbed", "write_meter_config", "meter_process", "gateway_process", "read_truth"]

BOOT_GRACE_S = 3.0  # real seconds between launch and the first virtual interval
DAY = 86400
# Band calendar by hour (UTC in the testbed): 0 night, 1 day, 2 evening peak.
DEFAULT_BANDS = [0] * 7 + [1] * 10 + [2] * 4 + [1] * 2 + [0]


@dataclass(frozen=True, slots=True, kw_only=True)
class TestbedPlan:
    workdir: Path
    meters: int = 5
    intervals: int = 48
    seconds_per_interval: float = 1.0
    interval_s: int = 900
    heap: str = "128k"
    start_hour: int = 6
    broker: str = "auto"  # mosquitto | amqtt | auto (amqtt only when mosquitto is missing)


def write_meter_config(path: Path, *, meter: str, area: str, state_dir: Path, key_file: Path, n: int,
                       host: str, port: int, interval_s: int, clock: dict, seed: int,
                       solar_wp: int = 0, bands: list[int] | None = None, resend_s: float = 5.0) -> None:
    cfg = {
        "meter": meter, "area": area, "state_dir": str(state_dir), "key_file": str(key_file),
        "interval_s": interval_s, "bands": bands or DEFAULT_BANDS, "tz_offset_s": 0,
        "paillier": {"n": str(n), "kid": kid_of(n), "pool": 4},
        "broker": {"host": host, "port": port, "keepalive": 30, "timeout_s": 5},
        "sensor": {"type": "sim", "seed": seed, "solar_wp": solar_wp},
        "clock": clock, "resend_s": resend_s,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1))


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)


def meter_process(config: Path, log: Path, *, heap: str = "128k", firmware: Path = BUILD / "firmware") -> subprocess.Popen:
    """A meter: the flashed bundle's main.py under the Unix port, as a real process."""
    cmd, env = micropython_command(firmware / "main.py", config, heap=heap, path=[firmware])
    return _spawn(cmd, log, env)


def gateway_process(config: Path, log: Path) -> subprocess.Popen:
    """The gateway role as a real process."""
    return _spawn([sys.executable, "-m", "gridledger", "gateway", "run", "--config", str(config)], log)


def read_truth(path: Path) -> dict[int, dict]:
    """The simulator's truth per seq; a later line for the same seq wins (reboot)."""
    out: dict[int, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out[rec["seq"]] = rec
    return out


def _wait_for_line(log: Path, needle: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and needle in log.read_text():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}); see {log}")
        time.sleep(0.1)
    raise RuntimeError(f"no {needle!r} in {log} within {timeout}s")


def _stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_testbed(plan: TestbedPlan) -> int:
    wd = plan.workdir.resolve()
    if wd.exists():
        shutil.rmtree(wd)
    (wd / "logs").mkdir(parents=True)
    area = "area1"

    _say(f"[testbed] building firmware bundle (mpy-cross) into {BUILD / 'firmware'}")
    fw = build_firmware()
    _say("[testbed] generating a 2048-bit Paillier key (TESTBED SHORTCUT: whole private key on this host)")
    pub, priv = paillier.generate(2048)
    paillier.save_keypair(wd / "keys", pub, priv)

    meters = [f"m{i:02d}" for i in range(1, plan.meters + 1)]
    entries = []
    for i, m in enumerate(meters):
        key = new_meter_key(m)
        key.write_seed(wd / "meters" / m / "ed25519.key")
        entries.append(MeterEntry(m, f"acct-{i + 1:04d}", key.public_hex))
    (wd / "registry.toml").write_text(dump_registry(entries))

    broker: Broker = start_broker(wd / "broker", plan.broker)
    if broker.kind != "mosquitto":
        _say("[testbed] WARNING: using the pure-Python amqtt broker (demo fallback; production uses Mosquitto)")
    procs: dict[str, subprocess.Popen] = {}
    gateway = None
    try:
        (wd / "gateway.toml").write_text(
            f'[gateway]\narea = "{area}"\ndatabase = "gateway.db"\nregistry = "registry.toml"\n'
            f'paillier_public = "keys/paillier.pub.json"\n\n'
            f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nclient_id = "gateway-{area}"\n')
        gw_log = wd / "logs" / "gateway.log"
        gateway = gateway_process(wd / "gateway.toml", gw_log)
        _wait_for_line(gw_log, '"mqtt_up"', gateway, 30)
        _say(f"[testbed] {broker.kind} on {broker.host}:{broker.port}; gateway up; "
             f"starting {len(meters)} meters (MicroPython Unix port, heap {plan.heap})")

        scale = plan.interval_s / plan.seconds_per_interval
        real_start = time.time() + BOOT_GRACE_S
        virt_start = (int(time.time()) // DAY - 1) * DAY + plan.start_hour * 3600
        stop_at = virt_start + plan.intervals * plan.interval_s
        clock = {"scale": scale, "real_start": real_start, "virtual_start": virt_start, "stop_at": stop_at}
        for i, m in enumerate(meters):
            mdir = wd / "meters" / m
            write_meter_config(mdir / "config.json", meter=m, area=area, state_dir=mdir,
                                     key_file=mdir / "ed25519.key", n=pub.n, host=broker.host, port=broker.port,
                                     interval_s=plan.interval_s, clock=clock, seed=1000 + i,
                                     solar_wp=3000 if i % 2 else 0)
            procs[m] = meter_process(mdir / "config.json", wd / "logs" / f"{m}.log", heap=plan.heap, firmware=fw)

        expected = len(meters) * plan.intervals
        deadline = real_start + plan.intervals * plan.seconds_per_interval * 3 + 60
        tty = sys.stdout.isatty()
        last_print = 0.0
        while True:
            stored = sum(stored_counts(wd / "gateway.db").values())
            running = sum(p.poll() is None for p in procs.values())
            vnow = virt_start + max(0.0, time.time() - real_start) * scale
            vnow = min(vnow, stop_at)
            line = (f"[testbed] virtual {time.strftime('%Y-%m-%d %H:%M', time.gmtime(vnow))} UTC | "
                    f"readings stored {stored}/{expected} | meters running {running}/{len(meters)}")
            if tty:
                print("\r" + line, end="", flush=True)
            elif time.monotonic() - last_print > 5:
                _say(line)
                last_print = time.monotonic()
            if running == 0:
                break
            if time.time() > deadline:
                _say("\n[testbed] timed out waiting for the meters; see logs/")
                break
            time.sleep(0.25)
        if tty:
            print()
        failed = {m: p.returncode for m, p in procs.items() if p.returncode not in (0, None)}
        _stop(gateway)
        gateway = None
    finally:
        for p in procs.values():
            _stop(p, 5)
        if gateway is not None:
            _stop(gateway)
        broker.stop()

    if failed:
        _say(f"[testbed] meters failed: {failed}; see {wd / 'logs'}")
    return _report(wd, meters, priv, plan.intervals) or (1 if failed else 0)


def _kwh(wh: int) -> str:
    return f"{wh / 1000:.3f}"


def _report(wd: Path, meters: list[str], priv, intervals: int) -> int:
    store = GatewayStore(wd / "gateway.db")  # the gateway has stopped
    try:
        by_meter: dict[str, list[Reading]] = {m: store.readings(m) for m in meters}
    finally:
        store.close()
    header = f"{'meter':<6} {'readings':>8}  {'import kWh':>11} {'truth':>11}  {'export kWh':>11} {'truth':>11}  ok"
    _say("")
    _say(header)
    _say("-" * len(header))
    ok_all = True
    truth_imp = truth_exp = 0
    for m in meters:
        rs = by_meter[m]
        tot: EnergyTotals = decrypt_total(priv, rs)
        truth = read_truth(wd / "meters" / m / "truth.jsonl")
        stored_seqs = {r.seq for r in rs}
        t_imp = sum(v["import_wh"] for s, v in truth.items() if s in stored_seqs)
        t_exp = sum(v["export_wh"] for s, v in truth.items() if s in stored_seqs)
        truth_imp += t_imp
        truth_exp += t_exp
        ok = (tot.import_wh, tot.export_wh) == (t_imp, t_exp) and len(rs) == intervals == len(truth)
        ok_all &= ok
        _say(f"{m:<6} {len(rs):>8}  {_kwh(tot.import_wh):>11} {_kwh(t_imp):>11}  "
             f"{_kwh(tot.export_wh):>11} {_kwh(t_exp):>11}  {'yes' if ok else 'NO'}")
    area = decrypt_total(priv, [r for rs in by_meter.values() for r in rs])
    area_ok = (area.import_wh, area.export_wh) == (truth_imp, truth_exp)
    _say("-" * len(header))
    _say(f"{'area':<6} {area.readings:>8}  {_kwh(area.import_wh):>11} {_kwh(truth_imp):>11}  "
         f"{_kwh(area.export_wh):>11} {_kwh(truth_exp):>11}  {'yes' if area_ok else 'NO'}")
    bands = ", ".join(f"band {b}: import {_kwh(area.band(b)[0])} / export {_kwh(area.band(b)[1])} kWh"
                      for b in area.bands_used())
    _say(f"\narea total by tariff band (one decryption of the product of {area.readings} ciphertexts): {bands}")
    if ok_all and area_ok:
        _say("[testbed] PASS: every decrypted total equals the simulator's truth")
        return 0
    _say("[testbed] FAIL: decrypted totals differ from the truth")
    return 1
