"""The one-machine testbed: a private Mosquitto, N meters running the real
firmware under the MicroPython Unix port in accelerated time, and every role as
a real process: the registry chain, the validators, the gateway, the coordinator
and three trustees holding shares of a threshold key made by a real ceremony.
It ends as a utility's month would: `gridledger settle` bills every account and
`gridledger loadcurve` decrypts the area's load per interval; each bill, each
load-curve point and each replica is checked against the simulator's truth and
the validator keys, and the run exits non-zero if anything differs.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from aggregator.audit import audit_from_config
from aggregator.store import GatewayStore, stored_counts
from certlog.block import Header
from certlog.audit import verify_chain
from certlog import bls
from certlog.validators import (dump_validator_set, load_validator_set, info_for, new_secret_key, read_secret_key,
                               write_secret_key)
from coordinator.registry import submit
from coordinator.registryapp import Genesis, RegistryApp, load_genesis, dump_genesis, enroll_record, node_record, sign_record
from coordinator.settle import Period
from coordinator.threshold import ThresholdPublicKey

from .broker import Broker, start_broker
from .firmware_build import BUILD, METER_HEAP, build_firmware, micropython_command
from .config import MqttConfig
from .meterkeys import MeterKey, new_meter_key
from .paillier import add_ciphertexts
from .settlebed import (BAND_NAMES, THRESHOLD, TRUSTEES, SettlementBed, TestbedPolicy, check_bills, key_ceremony,
                        loadcurve, publish_key, settle, truth_slots, write_settlement)
from .wire import SLOTS, kid_of

__all__ = ["TestbedPlan", "run_testbed", "write_meter_config", "meter_process", "gateway_process", "bridge_process",
           "read_truth", "validator_process", "wait_up", "write_chain", "chain_table", "certified_height",
           "chain_height", "registry_chain_table", "write_registry_chain", "enroll_meters", "registry_process",
           "RegistrySetup", "coordinator_process", "trustee_process", "write_storage_node", "storage_process"]

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
    heap: str = METER_HEAP
    start_hour: int = 6
    validators: int = 4
    broker: str = "auto"  # mosquitto | amqtt | auto (amqtt only when mosquitto is missing)


def write_meter_config(path: Path, *, meter: str, area: str, state_dir: Path, key_file: Path, n: int,
                       host: str, port: int, interval_s: int, clock: dict, seed: int,
                       solar_wp: int = 0, bands: list[int] | None = None, resend_s: float = 5.0,
                       uplink: dict | None = None) -> None:
    """A meter's config.json; `uplink` ({"kind": "serial", ...}, docs/serial.md) replaces MQTT."""
    cfg = {
        "meter": meter, "area": area, "state_dir": str(state_dir), "key_file": str(key_file),
        "interval_s": interval_s, "bands": bands or DEFAULT_BANDS, "tz_offset_s": 0,
        "paillier": {"n": str(n), "kid": kid_of(n), "pool": 4},
        "broker": {"host": host, "port": port, "keepalive": 30, "timeout_s": 5},
        "sensor": {"type": "sim", "seed": seed, "solar_wp": solar_wp},
        "clock": clock, "resend_s": resend_s,
    }
    if uplink is not None:
        cfg["uplink"] = uplink
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1))


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)


def meter_process(config: Path, log: Path, *, heap: str = METER_HEAP, firmware: Path = BUILD / "firmware") -> subprocess.Popen:
    """A meter: the flashed bundle's main.py under the Unix port, as a real process."""
    cmd, env = micropython_command(firmware / "main.py", config, heap=heap, path=[firmware])
    return _spawn(cmd, log, env)


def gateway_process(config: Path, log: Path) -> subprocess.Popen:
    """The gateway role as a real process."""
    return _spawn([sys.executable, "-m", "gridledger", "gateway", "run", "--config", str(config)], log)


def bridge_process(config: Path, port: Path | str, log: Path, *, baud: int = 115200,
                   status_s: float = 10.0) -> subprocess.Popen:
    """The serial bridge for one wired meter as a real process."""
    return _spawn([sys.executable, "-m", "gridledger", "bridge", "serial", "--config", str(config),
                   "--port", str(port), "--baud", str(baud), "--status-s", str(status_s)], log)


def validator_process(config: Path, log: Path) -> subprocess.Popen:
    """An area-chain validator as a real process."""
    return _spawn([sys.executable, "-m", "gridledger", "validator", "run", "--config", str(config)], log)


def storage_process(config: Path, log: Path) -> subprocess.Popen:
    """A storage node (`gridledger storage run`) as a real process."""
    return _spawn([sys.executable, "-m", "gridledger", "storage", "run", "--config", str(config)], log)


def write_storage_node(wd: Path, name: str, *, kind: str, chain: str, host: str, port: int,
                       peers: list[str] = (), validators: str = "../validators.toml", **options) -> Path:
    """A storage node's key (`storage/NAME.bls.key`, made once) and config
    (`storage/NAME.toml`); `options` are further `[storage]` keys (TOML scalars)."""
    folder = wd / "storage"
    key = folder / f"{name}.bls.key"
    if not key.exists():
        write_secret_key(key, new_secret_key())
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in options.items())
    cfg = folder / f"{name}.toml"
    cfg.write_text(f'[storage]\nname = "{name}"\nkind = "{kind}"\nchain = "{chain}"\ndatabase = "{name}.db"\n'
                   f'secret_key = "{name}.bls.key"\nvalidators = "{validators}"\npeers = {json.dumps(list(peers))}\n'
                   f'{extra}\n[mqtt]\nhost = "{host}"\nport = {port}\nclient_id = "storage-{chain}-{name}"\n')
    return cfg


def verifier_process(config: Path, log: Path) -> subprocess.Popen:
    """The verifier (`gridledger verifier run`: placement, the P chain's proposer) as a real process."""
    return _spawn([sys.executable, "-m", "gridledger", "verifier", "run", "--config", str(config)], log)


def write_pchain(wd: Path, *, area: str, host: str, port: int, nodes: dict[str, str], replicas: int = 2,
                 validator_configs: list[Path] = (), r_chain: bool = False, **options) -> Path:
    """The P chain beside what `write_chain` wrote: its validator set (the same
    validators, the verifier as proposer), its genesis (the storage nodes `nodes`,
    name -> kind, with their keys under `storage/`, made here if absent), the
    verifier's config (`options`: further `[verifier]` keys) and a `[p_chain]`
    table in each validator config; with `r_chain`, the R chain too (the same
    validator set and genesis, `[r_chain]` tables, the verifier's `r_database`:
    audits on). Returns the verifier's config."""
    from aggregator.pchainapp import PGenesis, PNode, dump_pgenesis
    members = load_validator_set(wd / "validators.toml").members
    sk = new_secret_key()
    write_secret_key(wd / "verifier.bls.key", sk)
    (wd / "p-validators.toml").write_text(dump_validator_set(members, info_for("verifier", sk)))
    infos = []
    for name, kind in nodes.items():
        key = wd / "storage" / f"{name}.bls.key"
        if not key.exists():
            write_secret_key(key, new_secret_key())
        infos.append(PNode(name, kind, bls.SkToPk(read_secret_key(key))))
    (wd / "pchain-genesis.toml").write_text(dump_pgenesis(PGenesis(area, replicas, tuple(infos))))
    for cfg in validator_configs:
        name = cfg.stem
        for table, letter in (("p_chain", "p"), ("r_chain", "r"))[:1 + r_chain]:
            cfg.write_text(cfg.read_text() + f'\n[{table}]\nvalidators = "../p-validators.toml"\n'
                           f'genesis = "../pchain-genesis.toml"\ndatabase = "{name}-{letter}.db"\n')
    if r_chain:
        options = {"r_database": "verifier-r.db", **options}
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in options.items())
    cfg = wd / "verifier.toml"
    cfg.write_text(f'[verifier]\nname = "verifier"\narea = "{area}"\ndatabase = "verifier.db"\n'
                   'proposer_key = "verifier.bls.key"\nvalidators = "p-validators.toml"\n'
                   f'area_validators = "validators.toml"\ngenesis = "pchain-genesis.toml"\n{extra}\n'
                   f'[mqtt]\nhost = "{host}"\nport = {port}\nclient_id = "verifier-{area}"\n')
    return cfg


def write_chain(wd: Path, *, area: str, host: str, port: int, validators: int = 4,
                registry: str = "registry.toml", paillier_public: str = "keys/paillier.pub.json",
                registry_chain: bool = False) -> list[Path]:
    """Validator keys, the validator set and one config per validator under `wd`;
    returns the validator configs. The gateway's `[chain]` table is `chain_table()`.

    `registry_chain`: the validators read meters from the registry chain (and
    co-sign it) instead of the `registry` file; `write_registry_chain` writes the
    rest, and the gateway's table is `registry_chain_table()`."""
    infos, configs = [], []
    for i in range(validators):
        name = f"v{i}"
        sk = new_secret_key()
        write_secret_key(wd / "validators" / f"{name}.bls.key", sk)
        infos.append(info_for(name, sk))
        cfg = wd / "validators" / f"{name}.toml"
        source = "" if registry_chain else f'registry = "../{registry}"\n'
        cfg.write_text(f'[validator]\nname = "{name}"\narea = "{area}"\ndatabase = "{name}.db"\n'
                       f'secret_key = "{name}.bls.key"\nvalidators = "../validators.toml"\n'
                       f'{source}paillier_public = "../{paillier_public}"\n\n'
                       f'[mqtt]\nhost = "{host}"\nport = {port}\nclient_id = "validator-{area}-{name}"\n'
                       + (registry_chain_table(f"{name}-registry.db", "../") if registry_chain else ""))
        configs.append(cfg)
    sk = new_secret_key()
    write_secret_key(wd / "proposer.bls.key", sk)
    (wd / "validators.toml").write_text(dump_validator_set(infos, info_for(f"gateway-{area}", sk)))
    if registry_chain:
        rsk = new_secret_key()
        write_secret_key(wd / "registry.bls.key", rsk)
        (wd / "registry-validators.toml").write_text(dump_validator_set(infos, info_for("registry", rsk)))
    return configs


def registry_chain_table(database: str, up: str = "") -> str:
    """A role's `[registry_chain]` table (`up`: the path from its config to `wd`)."""
    return (f'\n[registry_chain]\nvalidators = "{up}registry-validators.toml"\n'
            f'genesis = "{up}registry-genesis.toml"\ndatabase = "{database}"\n')


@dataclass(frozen=True, slots=True)
class RegistrySetup:
    config: Path           # the registry role's TOML
    registrar: MeterKey    # genesis registrar "ops"
    technician: MeterKey   # "tech1", enrolled by ops in the first record


def write_registry_chain(wd: Path, *, host: str, port: int) -> RegistrySetup:
    """Genesis (registrar "ops"), a technician key and the registry role's config,
    beside what `write_chain(registry_chain=True)` wrote."""
    ops, tech = new_meter_key("ops"), new_meter_key("tech1")
    ops.write_seed(wd / "keys" / "ops.ed25519.key")
    tech.write_seed(wd / "keys" / "tech1.ed25519.key")
    (wd / "registry-genesis.toml").write_text(dump_genesis(Genesis({"ops": ops.public_hex})))
    cfg = wd / "registry-role.toml"
    cfg.write_text('[registry]\ndatabase = "registry.db"\nvalidators = "registry-validators.toml"\n'
                   'genesis = "registry-genesis.toml"\nproposer_key = "registry.bls.key"\n\n'
                   f'[mqtt]\nhost = "{host}"\nport = {port}\nclient_id = "registry"\n')
    return RegistrySetup(cfg, ops, tech)


def enroll_meters(setup: RegistrySetup, mqtt: MqttConfig, area: str, meters: dict[str, tuple[str, MeterKey]],
                  *, timeout_s: float = 60.0) -> int:
    """Register the technician, then enroll `meters` (id -> (account, key)) through the
    registry chain, as a technician in the field would; returns the certified height."""
    now = int(time.time())
    txs = [sign_record(node_record(ident="tech1", role="technician", public_key=setup.technician.public_hex,
                                   signer="ops", time=now), setup.registrar.private)]
    txs += [sign_record(enroll_record(meter=m, account=acct, area=area, public_key=key.public_hex, signer="tech1",
                                      time=now, firmware="gridledger-testbed"), setup.technician.private, key.private)
            for m, (acct, key) in meters.items()]
    results = asyncio.run(submit(mqtt, txs, timeout_s=timeout_s))
    refused = [r for r in results if r["status"] != "certified"]
    if refused:
        raise RuntimeError(f"registry refused records: {refused}")
    return max(r["height"] for r in results)


def coordinator_process(config: Path, log: Path) -> subprocess.Popen:
    """The coordinator (chain follower, ledger index, query API) as a real process."""
    return _spawn([sys.executable, "-m", "gridledger", "coordinator", "run", "--config", str(config)], log)


def trustee_process(config: Path, log: Path) -> subprocess.Popen:
    """A trustee (`gridledger trustee run`) as a real process."""
    return _spawn([sys.executable, "-m", "gridledger", "trustee", "run", "--config", str(config)], log)


def registry_process(config: Path, log: Path) -> subprocess.Popen:
    """The registry chain's proposer as a real process."""
    return _spawn([sys.executable, "-m", "gridledger", "registry", "run", "--config", str(config)], log)


def chain_height(db: Path) -> int:
    """Last certified height of the chain replica in `db`, read-only (0 if none yet)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT COALESCE(MAX(height), 0) FROM chain_blocks WHERE cert IS NOT NULL").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def chain_table(block_max: int = 1000) -> str:
    return (f'[chain]\nvalidators = "validators.toml"\nproposer_key = "proposer.bls.key"\n'
            f'block_max = {block_max}\n')


def certified_height(db: Path) -> tuple[int, int]:
    """(certified height, readings not yet in a certified block), read-only."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            h = conn.execute("SELECT COALESCE(MAX(height), 0) FROM chain_blocks WHERE cert IS NOT NULL").fetchone()[0]
            left = conn.execute(
                "SELECT COUNT(*) FROM readings WHERE rowid > (SELECT COALESCE(MAX(hi), 0) FROM reading_blocks "
                "WHERE height <= ?) AND rowid NOT IN (SELECT reading FROM readings_set_aside)", (h,)).fetchone()[0]
            return h, left
    except sqlite3.OperationalError:
        return 0, -1


def read_truth(path: Path) -> dict[int, dict]:
    """The simulator's truth per seq; a later line for the same seq wins (reboot)."""
    out: dict[int, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out[rec["seq"]] = rec
    return out


def wait_up(log: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    """Until a role logs "mqtt_up" (its subscriptions are in place); fail if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and '"mqtt_up"' in log.read_text():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{log.stem} exited ({proc.returncode}): {log.read_text()[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"{log.stem} not up within {timeout} s; see {log}")


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
    tkey, key_paths = key_ceremony(wd / "keys", _say)
    policy = TestbedPolicy.for_plan(plan.meters, plan.intervals)

    meters = [f"m{i:02d}" for i in range(1, plan.meters + 1)]
    enrolment: dict[str, tuple[str, MeterKey]] = {}
    for i, m in enumerate(meters):
        key = new_meter_key(m)
        key.write_seed(wd / "meters" / m / "ed25519.key")
        enrolment[m] = (f"acct-{i + 1:04d}", key)

    broker: Broker = start_broker(wd / "broker", plan.broker)
    if broker.kind != "mosquitto":
        _say("[testbed] WARNING: using the pure-Python amqtt broker (demo fallback; production uses Mosquitto)")
    procs: dict[str, subprocess.Popen] = {}
    validators: dict[str, subprocess.Popen] = {}
    services: dict[str, subprocess.Popen] = {}  # trustees and the coordinator
    gateway = registry = None
    try:
        vcfgs = write_chain(wd, area=area, host=broker.host, port=broker.port, validators=plan.validators,
                            registry_chain=True)
        setup = write_registry_chain(wd, host=broker.host, port=broker.port)
        bed = write_settlement(wd, tkey, key_paths, area=area, host=broker.host, port=broker.port, policy=policy)
        registry = registry_process(setup.config, wd / "logs" / "registry.log")
        wait_up(wd / "logs" / "registry.log", registry)
        for cfg in vcfgs:
            validators[cfg.stem] = validator_process(cfg, wd / "logs" / f"{cfg.stem}.log")
        for name, proc in validators.items():
            wait_up(wd / "logs" / f"{name}.log", proc)
        (wd / "gateway.toml").write_text(
            f'[gateway]\narea = "{area}"\ndatabase = "gateway.db"\n'
            f'paillier_public = "keys/paillier.pub.json"\n\n'
            f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nclient_id = "gateway-{area}"\n\n'
            + chain_table() + registry_chain_table("gateway-registry.db"))
        gw_log = wd / "logs" / "gateway.log"
        gateway = gateway_process(wd / "gateway.toml", gw_log)
        wait_up(gw_log, gateway)
        _say(f"[testbed] {broker.kind} on {broker.host}:{broker.port}; registry chain, {len(validators)} "
             f"validators (BLS, f={(len(validators) - 1) // 3}) and the gateway up")
        mqtt = MqttConfig(host=broker.host, port=broker.port)
        reg_height = enroll_meters(setup, mqtt, area, enrolment)
        _say(f"[testbed] technician tech1 and {len(meters)} meters enrolled through the registry chain "
             f"(signed by the technician and by each meter's key), certified at registry height {reg_height}")
        key_height = publish_key(setup.registrar, mqtt, tkey)
        for cfg in bed.trustees:
            services[cfg.stem] = trustee_process(cfg, wd / "logs" / f"{cfg.stem}.log")
        services["coordinator"] = coordinator_process(bed.coordinator, wd / "logs" / "coordinator.log")
        for name, proc in services.items():
            wait_up(wd / "logs" / f"{name}.log", proc)
        _say(f"[testbed] threshold key published on the registry chain (height {key_height}); trustees "
             f"{', '.join(TRUSTEES)} and the coordinator up (trustee policy: a bill needs "
             f">= {policy.min_readings} readings)")
        deadline = time.monotonic() + 60
        while chain_height(wd / "gateway-registry.db") < reg_height:
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not follow the registry chain; see logs/gateway.log")
            time.sleep(0.1)
        _say(f"[testbed] starting {len(meters)} meters (MicroPython Unix port, heap {plan.heap})")

        scale = plan.interval_s / plan.seconds_per_interval
        real_start = time.time() + BOOT_GRACE_S
        # Virtual time ends in the past, whole days back, so no reading lies ahead of
        # the gateway's clock (it refuses readings more than 5 minutes in the future).
        days_back = 1 + (plan.intervals * plan.interval_s + plan.start_hour * 3600) // DAY
        virt_start = (int(time.time()) // DAY - days_back) * DAY + plan.start_hour * 3600
        stop_at = virt_start + plan.intervals * plan.interval_s
        clock = {"scale": scale, "real_start": real_start, "virtual_start": virt_start, "stop_at": stop_at}
        for i, m in enumerate(meters):
            mdir = wd / "meters" / m
            write_meter_config(mdir / "config.json", meter=m, area=area, state_dir=mdir,
                                     key_file=mdir / "ed25519.key", n=tkey.n, host=broker.host, port=broker.port,
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
            height, uncertified = certified_height(wd / "gateway.db")
            vnow = virt_start + max(0.0, time.time() - real_start) * scale
            vnow = min(vnow, stop_at)
            line = (f"[testbed] virtual {time.strftime('%Y-%m-%d %H:%M', time.gmtime(vnow))} UTC | "
                    f"readings stored {stored}/{expected} | certified height {height} | "
                    f"meters running {running}/{len(meters)}")
            if tty:
                print("\r" + line, end="", flush=True)
            elif time.monotonic() - last_print > 5:
                _say(line)
                last_print = time.monotonic()
            if running == 0 and uncertified == 0:
                break
            if time.time() > deadline:
                _say("\n[testbed] timed out waiting for the meters; see logs/")
                break
            time.sleep(0.25)
        if tty:
            print()
        failed = {m: p.returncode for m, p in procs.items() if p.returncode not in (0, None)}
        _follow(wd, area, services["coordinator"])  # it syncs from the gateway: before the gateway stops
        _stop(gateway)
        gateway = None
        period = Period("testbed", virt_start, stop_at)
        settled = _settle(wd, bed, area, period)
        curve = loadcurve(bed, area=area, period=period, cwd=wd)
    finally:
        for p in procs.values():
            _stop(p, 5)
        if gateway is not None:
            _stop(gateway)
        for p in services.values():
            _stop(p, 10)
        for p in validators.values():
            _stop(p, 10)
        if registry is not None:
            _stop(registry)
        broker.stop()

    if failed:
        _say(f"[testbed] meters failed: {failed}; see {wd / 'logs'}")
    rc = _report(wd, area, period, bed, enrolment, plan.intervals, settled)
    rc = _report_curve(wd, curve, enrolment, plan.intervals, policy) or rc
    return _report_chain(wd, tkey, list(validators)) or rc or (1 if failed else 0)


def _follow(wd: Path, area: str, coordinator: subprocess.Popen) -> int:
    """Until the coordinator's replica holds the gateway's certified height; that height."""
    height, _ = certified_height(wd / "gateway.db")
    replica = wd / f"coordinator-{area}.db"
    deadline = time.monotonic() + 60
    while chain_height(replica) < height:
        if coordinator.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the coordinator did not follow {area} to height {height}; see logs/coordinator.log")
        time.sleep(0.1)
    return height


def _settle(wd: Path, bed: SettlementBed, area: str, period: Period) -> dict:
    """`gridledger settle` over the whole run, from the coordinator's replica."""
    _say(f"[testbed] coordinator holds certified height {chain_height(wd / f'coordinator-{area}.db')}; settling "
         f"{area} over the run (gridledger settle, trustees {', '.join(TRUSTEES)}, any {THRESHOLD} decrypt)")
    t0 = time.monotonic()
    summary = settle(bed, area=area, period=period, cwd=wd)
    summary["seconds"] = time.monotonic() - t0
    _say(f"[testbed] {summary['bills']} bills in {summary['seconds']:.1f} s, total {summary['total']} "
         f"{summary['currency']}, bill-id Merkle root {summary['root'][:16]}... recorded on the registry chain "
         f"({summary['recorded']}); bills in {wd / 'bills'}")
    if summary["unbilled"]:
        _say(f"[testbed] not billed: {summary['unbilled']}")
    return summary


def _kwh(wh: int) -> str:
    return f"{wh / 1000:.3f}"


def _report(wd: Path, area: str, period: Period, bed: SettlementBed, enrolment: dict[str, tuple[str, MeterKey]],
            intervals: int, settled: dict) -> int:
    """Each bill, verified from the validator keys alone, against the simulator's truth."""
    truths = {m: read_truth(wd / "meters" / m / "truth.jsonl") for m in enrolment}
    checks = {c.account: c for c in check_bills(
        wd / "settlement.db", area=area, period=period, tariff=bed.tariff,
        truth={acct: truth_slots(truths[m].values()) for m, (acct, _) in enrolment.items()},
        validators=load_validator_set(wd / "validators.toml"),
        registry_validators=load_validator_set(wd / "registry-validators.toml"))}
    currency = settled["currency"]
    header = (f"{'meter':<6} {'readings':>8}  {'import kWh':>11} {'truth':>11}  {'export kWh':>11} {'truth':>11}  "
              f"{'bill ' + currency:>10} {'truth':>10}  ok")
    _say("")
    _say(header)
    _say("-" * len(header))
    ok_all = True
    area_slots, area_truth, area_readings = [0] * SLOTS, [0] * SLOTS, 0
    for m, (acct, _) in enrolment.items():
        c = checks[acct]
        ok = c.ok and c.readings == intervals == len(truths[m])
        ok_all &= ok
        area_slots = [a + b for a, b in zip(area_slots, c.slots)]
        area_truth = [a + b for a, b in zip(area_truth, c.truth)]
        area_readings += c.readings
        _say(f"{m:<6} {c.readings:>8}  {_kwh(sum(c.slots[0::2])):>11} {_kwh(sum(c.truth[0::2])):>11}  "
             f"{_kwh(sum(c.slots[1::2])):>11} {_kwh(sum(c.truth[1::2])):>11}  {c.total:>10} {c.truth_total:>10}  "
             f"{'yes' if ok else 'NO'}")
        if c.verified:
            _say(f"       verify-bill refused {acct}'s bill: {c.verified}")
    truth_total = str(sum(Decimal(c.truth_total) for c in checks.values()))
    area_ok = area_slots == area_truth and settled["total"] == truth_total
    _say("-" * len(header))
    _say(f"{'area':<6} {area_readings:>8}  {_kwh(sum(area_slots[0::2])):>11} {_kwh(sum(area_truth[0::2])):>11}  "
         f"{_kwh(sum(area_slots[1::2])):>11} {_kwh(sum(area_truth[1::2])):>11}  {settled['total']:>10} "
         f"{truth_total:>10}  {'yes' if area_ok else 'NO'}")
    bands = ", ".join(f"{BAND_NAMES[b] if b < len(BAND_NAMES) else b}: import {_kwh(area_slots[2 * b])} / "
                      f"export {_kwh(area_slots[2 * b + 1])} kWh"
                      for b in range(SLOTS // 2) if area_slots[2 * b] or area_slots[2 * b + 1])
    _say(f"\narea by tariff band, from the bills: {bands}")
    if ok_all and area_ok:
        _say(f"[testbed] PASS: {len(checks)} bills verify from the validator keys alone, and every energy "
             "figure and amount equals the simulator's truth")
        return 0
    _say("[testbed] FAIL: a bill does not verify or differs from the truth")
    return 1


def _report_curve(wd: Path, curve: dict, meters: dict, intervals: int, policy: TestbedPolicy) -> int:
    """Each decrypted load-curve point against the sum of the meters' truth for its interval."""
    by_t: dict[int, list[dict]] = {}
    for m in meters:
        for rec in read_truth(wd / "meters" / m / "truth.jsonl").values():
            by_t.setdefault(rec["t"], []).append(rec)
    truth = {t: truth_slots(recs) for t, recs in by_t.items()}
    points = curve["points"]
    wrong = [p["t"] for p in points if p["energy_wh"] != truth.get(p["t"])]
    expected = intervals if len(meters) >= policy.min_meters else 0
    peak = max(points, key=lambda p: p["import_wh"], default=None)
    _say(f"\n[testbed] load curve (gridledger loadcurve): {len(points)} interval totals decrypted by the trustees, "
         f"each over >= {policy.min_meters} meters; {len(curve['withheld'])} withheld, "
         f"{len(curve['refused'])} refused; plot {curve['files']['svg']}")
    if peak is not None:
        _say(f"[testbed] area peak import {peak['import_wh'] * 3600 / peak['dt'] / 1000:.2f} kW in the interval "
             f"ending {time.strftime('%H:%M', time.gmtime(peak['t']))} UTC")
    if not wrong and len(points) == expected and not curve["refused"]:
        _say("[testbed] PASS: every load-curve point equals the sum of the meters' truth for its interval")
        return 0
    _say(f"[testbed] FAIL: load-curve points differ from the truth at {wrong[:5]}, or {expected - len(points)} "
         "are missing")
    return 1


def _report_chain(wd: Path, key: ThresholdPublicKey, validators: list[str]) -> int:
    """Audit every replica offline; the certified headers' encrypted area total must
    equal, as a ciphertext, the product of the stored readings and of the bills."""
    _say("")
    reg = verify_chain(wd / "registry.db", "registry", RegistryApp(load_genesis(wd / "registry-genesis.toml")),
                       load_validator_set(wd / "registry-validators.toml"))
    _say(f"[testbed] chain verify registry certified height {reg.certified:>4}, {reg.txs:>5} txs, "
         f"{reg.seconds:.2f} s: " + (f"FAULT at {reg.fault.height}: {reg.fault.reason} {reg.fault.detail}"
                                    if reg.fault else "ok"))
    reports = {"gateway": audit_from_config(wd / "gateway.toml")}
    for v in validators:
        reports[v] = audit_from_config(wd / "validators" / f"{v}.toml")
    for who, r in reports.items():
        fault = f"FAULT at {r.fault.height}: {r.fault.reason} {r.fault.detail}" if r.fault else "ok"
        _say(f"[testbed] chain verify {who:<8} certified height {r.certified:>4}, {r.txs:>5} txs, "
             f"{r.seconds:.2f} s: {fault}")
    with sqlite3.connect(f"file:{wd / 'gateway.db'}?mode=ro", uri=True) as conn:
        headers = [Header.decode(row[0]) for row in conn.execute(
            "SELECT header FROM chain_blocks WHERE cert IS NOT NULL ORDER BY height")]
    from_headers = add_ciphertexts(key.n, (int(h.app["total"], 16) for h in headers))
    readings = sum(h.app["readings"] for h in headers)
    store = GatewayStore(wd / "gateway.db")
    try:
        stored = store.readings()
    finally:
        store.close()
    bills = [json.loads(p.read_text()) for p in sorted((wd / "bills").glob("*.json"))]
    from_bills = add_ciphertexts(key.n, (int(b["proofs"]["decryption"]["ciphertexts"][
        b["proofs"]["decryption"]["position"]], 16) for b in bills))
    same = from_headers == add_ciphertexts(key.n, (r.ciphertext for r in stored)) == from_bills
    _say(f"[testbed] area total from {len(headers)} certified headers ({readings} readings) "
         + ("equals" if same else "DIFFERS FROM") + f", as a ciphertext, the product of the {len(stored)} stored "
         f"readings and of the {len(bills)} bills' ciphertexts: the bills add up to the area, checked "
         "without decrypting anything")
    heights = {r.certified for r in reports.values()}
    if not reg.ok:
        _say("[testbed] FAIL: the registry chain does not verify")
        return 1
    if not same or readings != len(stored):
        _say("[testbed] FAIL: the certified headers' total differs from the stored readings or the bills")
        return 1
    if all(r.ok for r in reports.values()) and len(heights) == 1:
        _say("[testbed] PASS: every replica holds the same certified chain and it verifies")
        return 0
    _say("[testbed] FAIL: a replica's chain does not verify or replicas disagree")
    return 1
