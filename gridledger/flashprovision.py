"""Provisioning and verifying a meter over its serial port (flash.sh provision,
flash.sh verify): the device config written, the Ed25519 key made on the device
and its public key read back, the enrollment signed by the device (proof of
possession) and by the technician and certified by the registry chain, and the
on-device self-test judged on the host. No private meter key ever reaches the
host: the device only hands out its public key and domain-separated signatures.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from coordinator.registryapp import enroll_record, enrollment_message, meter_signature_ok, record_id, sign_record

from .config import MqttConfig, mqtt_section, read_toml
from .errors import ConfigError
from .flashdevice import BOARDS, Board, CheckFailed, DeviceError, RegistryError, UsageError, WrongBoard
from .meterkeys import MeterKey, verifier
from .paillier import load_public
from .wire import METER_ID_RE, kid_of, pack_slots, slot_index

__all__ = ["BrokerUrl", "parse_broker", "board_check", "meter_config", "fingerprint", "enroll_on_registry",
           "Provisioning", "provision", "verify", "load_record", "Check", "SELFTEST_DOMAIN"]

MAX_SKEW_S = 300    # the gateway refuses readings more than 5 minutes ahead (clock_skew)
MIN_FREE = 8 * 1024  # heap a meter must still have free after its self-test
SELFTEST_DOMAIN = b"gridledger selftest v1\n"  # firmware/provision.py DOMAIN_SELFTEST
# The self-test's known plaintext: band 3 import 1234 Wh and export 56 Wh, band 7 import 2**47 (a full slot's top bit).
SELFTEST_SLOTS = {slot_index(3, 0): 1234, slot_index(3, 1): 56, slot_index(7, 0): 2 ** 47}


def fingerprint(public_key_hex: str) -> str:
    """What a label shows: the first 80 bits of SHA-256 of the raw public key, in groups of four."""
    h = hashlib.sha256(bytes.fromhex(public_key_hex)).hexdigest()[:20]
    return " ".join(h[i:i + 4] for i in range(0, 20, 4))


@dataclass(frozen=True, slots=True)
class BrokerUrl:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker(url: str) -> BrokerUrl:
    """mqtt://HOST[:1883], mqtts://HOST[:8883] or HOST[:PORT]."""
    parts = urlsplit(url if "://" in url else "mqtt://" + url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise UsageError(f"--broker {url!r}: give mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    try:
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    except ValueError:
        raise UsageError(f"--broker {url!r}: bad port") from None
    return BrokerUrl(parts.hostname, port, parts.scheme == "mqtts")


def meter_config(*, meter: str, account: str, area: str, broker: BrokerUrl, n: int, interval_s: int = 900,
                 wifi: tuple[str, str] | None = None, ca: bool = False, user: str | None = None,
                 password: str | None = None, sensor: dict | None = None) -> dict:
    """The device's config.json (firmware/meter.py reads it; key and state live beside it)."""
    b = {"host": broker.host, "port": broker.port, "keepalive": 30, "timeout_s": 5}
    if ca:
        b["ca"] = "ca.pem"  # the uplink speaks TLS, checking the server against it, when a CA is configured
    if user:
        b["user"], b["password"] = user, password
    cfg = {"meter": meter, "account": account, "area": area, "interval_s": interval_s,
           "paillier": {"n": str(n), "kid": kid_of(n), "pool": 4}, "broker": b,
           "sensor": sensor or {"type": "sim", "seed": int(hashlib.sha256(meter.encode()).hexdigest()[:8], 16)}}
    if wifi:
        cfg["wifi"] = {"ssid": wifi[0], "password": wifi[1]}
    return cfg


def _ident(value: str, what: str) -> str:
    if not METER_ID_RE.match(value):
        raise UsageError(f"--{what} {value!r}: use letters, digits, _ and - (1 to 32)")
    return value


def _readable(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--{what} {path}: no such file")
    return p


def board_check(board: Board, wanted: str | None) -> dict:
    """The device's own account of itself; refuse a board other than the one named."""
    info = board.identify()
    if info is not None and wanted and info["platform"] != BOARDS[wanted].platform:
        raise WrongBoard(f"wrong board on {board.port}: you named {wanted} (sys.platform "
                         f"{BOARDS[wanted].platform}), the device says {info['platform']} ({info['machine']})")
    return info


# -- enrollment ----------------------------------------------------------------------

def enroll_on_registry(record: dict, meter_sig: str, *, technician: MeterKey, mqtt: MqttConfig,
                       timeout_s: float = 60.0) -> dict:
    """Sign the enrollment as the technician beside the device's own signature, submit it to the
    registry chain and wait for its fate (the registry's result, with the transaction as `tx`)."""
    from aiomqtt import MqttError
    from coordinator.registry import submit
    tx = sign_record(record, technician.private, meter_sig=meter_sig)
    where = f"{mqtt.host}:{mqtt.port}"
    try:
        [result] = asyncio.run(submit(mqtt, [tx], timeout_s=timeout_s))
    except TimeoutError:
        raise RegistryError(f"no answer from the registry through {where} within {timeout_s:.0f} s: is "
                            "`gridledger registry run` up?") from None
    except (MqttError, OSError) as exc:
        raise RegistryError(f"cannot submit to the registry through {where}: {exc}") from None
    return {"tx": tx.decode(), "id": record_id(tx), **result}


def _verify_sig(public_key: str, sig_hex: str, msg: bytes) -> bool:
    try:
        return verifier(public_key)(msg, bytes.fromhex(sig_hex))
    except (ConfigError, ValueError):
        return False


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def load_record(path: Path) -> dict:
    """A provisioning record written by `provision` (what `verify` and `label` read)."""
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read the provisioning record ({exc})") from None
    if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in ("meter", "public_key")):
        raise UsageError(f"{path}: not a provisioning record (no meter or public_key)")
    return rec


def _firmware_name(info: dict | None) -> str:
    fw = (info or {}).get("firmware") or {}
    return f"gridledger-{fw.get('gridledger', '?')}+{fw.get('bundle', '?')[:12]}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Provisioning:
    """Everything `provision` needs, checked before the board is touched."""
    meter: str
    account: str
    area: str
    broker: BrokerUrl
    registry: MqttConfig = field(repr=False)
    n: int
    technician: MeterKey = field(repr=False)
    out: Path
    wifi: tuple[str, str] | None = None
    ca: Path | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    interval_s: int = 900
    board: str | None = None
    rotate: bool = False
    timeout_s: float = 60.0

    @classmethod
    def from_options(cls, *, meter: str, account: str, area: str, broker: str, paillier: str, signer: str, key: str,
                     out: str, registry: str | None = None, registry_mqtt: str | None = None, wifi: str | None = None,
                     ca: str | None = None, user: str | None = None, password_file: str | None = None,
                     **rest) -> "Provisioning":
        """From the command line's strings and file names; UsageError names the option at fault.
        The registry is reached through `registry_mqtt` (an [mqtt] TOML: account, TLS, as
        `gridledger registry enroll --mqtt` takes), else `registry`'s URL, else the meter's broker."""
        for value, what in ((meter, "meter"), (area, "area"), (signer, "signer")):
            _ident(value, what)
        if not account or len(account) > 64:
            raise UsageError("--account: 1 to 64 characters")
        url = parse_broker(broker)
        try:
            n = load_public(_readable(paillier, "paillier")).n
            technician = MeterKey.read_seed(signer, _readable(key, "key"))
            if registry_mqtt:
                reg = mqtt_section(read_toml(_readable(registry_mqtt, "registry-mqtt")), Path(registry_mqtt))
            else:
                reg_url = parse_broker(registry) if registry else url
                reg = MqttConfig(host=reg_url.host, port=reg_url.port)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
        ssid_pass = None
        if wifi is not None:
            ssid, sep, pw = wifi.partition(":")
            if not sep or not ssid:
                raise UsageError("--wifi: give SSID:PASSWORD")
            ssid_pass = (ssid, pw)
        password = _readable(password_file, "password-file").read_text().strip() if password_file else None
        if user and password is None:
            raise UsageError("--user needs --password-file")
        ca_path = _readable(ca, "ca") if ca else None
        if url.tls and ca_path is None:
            raise UsageError("--broker mqtts://...: give --ca, the CA that signed the broker's certificate")
        return cls(meter=meter, account=account, area=area, broker=url, registry=reg, n=n, technician=technician,
                   out=Path(out), wifi=ssid_pass, ca=ca_path, user=user, password=password, **rest)

    @property
    def record_path(self) -> Path:
        return self.out / f"{self.meter}.json"


def _already_enrolled(p: Provisioning, public_key: str) -> dict | None:
    """The saved record if this key is already certified for this meter, account and area."""
    old = load_record(p.record_path) if p.record_path.exists() else None
    if not old or old["public_key"] != public_key or old.get("registry", {}).get("status") != "certified":
        return None
    if (old.get("account"), old.get("area")) != (p.account, p.area):
        raise UsageError(f"{p.meter} is enrolled with this key for {old.get('account')} in {old.get('area')}: "
                         "retire it (gridledger registry retire) and provision again with --rotate-key")
    return old


def provision(board: Board, p: Provisioning, say=print) -> dict:
    """Config on the device, key made on the device, enrollment certified; returns the saved record."""
    say(f"checking the board on {board.port}")
    board_check(board, p.board)
    info = board.call("info")
    if info is not None and not info.get("firmware"):
        raise DeviceError(f"no gridledger firmware on {board.port}: run ./flash.sh install --port {board.port}")
    kind = p.board or next((k for k, b in BOARDS.items() if info and b.platform == info["platform"]), "unix")

    say("writing the device config")
    cfg = meter_config(meter=p.meter, account=p.account, area=p.area, broker=p.broker, n=p.n,
                       interval_s=p.interval_s, wifi=p.wifi, ca=p.ca is not None, user=p.user, password=p.password)
    if board.runner.dry_run:
        shown = json.loads(json.dumps(cfg))
        for secret in (shown["broker"], shown.get("wifi", {})):
            if "password" in secret:
                secret["password"] = "***"
        say("config.json would be: " + json.dumps(shown))
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "config.json"
        local.write_text(json.dumps(cfg, indent=1))
        board.run("fs", "cp", str(local), ":config.json")
    if p.ca:
        board.run("fs", "cp", str(p.ca), ":ca.pem")

    say("generating the meter key on the device" + (" (rotating the old one)" if p.rotate else ""))
    made = board.call("keygen", rotate=p.rotate)
    if made is None:
        say(f"then: the device signs the enrollment, it is submitted to the registry chain via "
            f"{p.registry.host}:{p.registry.port} and the record written to {p.record_path}")
        return {}
    public_key = made["public_key"]
    say(f"public key {public_key} ({'new' if made['created'] else 'kept: the device already had one'})")
    old = _already_enrolled(p, public_key)
    if old:
        say(f"already enrolled at registry height {old['registry'].get('height')}: record {p.record_path} kept")
        return old

    record = enroll_record(meter=p.meter, account=p.account, area=p.area, public_key=public_key,
                           signer=p.technician.meter, time=int(time.time()), board=kind, firmware=_firmware_name(info))
    signed = board.call("sign_enrollment", msg=enrollment_message(record).hex())
    if signed["public_key"] != public_key or not meter_signature_ok(record, signed["signature"]):
        raise DeviceError("the device's enrollment signature does not verify against its public key")
    say(f"enrolling {p.meter} for {p.account} in {p.area} on the registry chain "
        f"({p.registry.host}:{p.registry.port})")
    result = enroll_on_registry(record, signed["signature"], technician=p.technician, mqtt=p.registry,
                                timeout_s=p.timeout_s)
    tx = result.pop("tx")
    if result.get("status") != "certified":
        raise CheckFailed(f"the registry refused the enrollment: {result.get('reason')}: {result.get('detail', '')}")
    saved = {"meter": p.meter, "account": p.account, "area": p.area, "board": kind, "firmware": record["firmware"],
             "public_key": public_key, "fingerprint": fingerprint(public_key), "signer": p.technician.meter,
             "time": record["time"], "broker": str(p.broker), "port": board.port, "enrollment": tx,
             "registry": result}
    _write_json(p.record_path, saved)
    say(f"enrolled at registry height {result.get('height')}; record {p.record_path}")
    return saved


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


def verify(board: Board, *, record: dict | None = None, board_kind: str | None = None,
           max_skew_s: float = MAX_SKEW_S, timeout_s: float = 3.0) -> list[Check]:
    """Run the self-test on the device and judge it here; [] in a dry run."""
    from phe import paillier as phe_paillier
    board_check(board, board_kind)
    nonce = secrets.token_bytes(16)
    pub, priv = phe_paillier.generate_paillier_keypair(n_length=2048)  # thrown away after this run
    m = pack_slots(SELFTEST_SLOTS)
    res = board.call("selftest", nonce=nonce.hex(), n=str(pub.n), m=m, timeout_s=timeout_s)
    host_now = time.time()
    if res is None:
        return []
    checks = []

    def add(name: str, ok: bool, detail: str) -> None:
        checks.append(Check(name, bool(ok), detail))

    cfg = res["config"]
    if cfg["ok"] and record and cfg["meter"] != record["meter"]:
        add("config", False, f"the device is configured as {cfg['meter']}, the record is for {record['meter']}")
    else:
        add("config", cfg["ok"], f"meter {cfg['meter']} area {cfg['area']} key id {cfg['kid']}" if cfg["ok"]
            else cfg.get("error", ""))
    sig = res["sign"]
    if not sig["ok"]:
        add("key", False, sig["error"])
    else:
        expected = record["public_key"] if record else sig["public_key"]
        if sig["public_key"] != expected:
            add("key", False, f"the device's key {sig['public_key'][:16]}... is not the enrolled {expected[:16]}...")
        else:
            add("key", _verify_sig(expected, sig["signature"], SELFTEST_DOMAIN + nonce),
                f"Ed25519 signature over a fresh nonce checked against {fingerprint(expected)}")
    enc = res["encrypt"]
    if not enc["ok"]:
        add("encrypt", False, enc["error"])
    else:
        c = int(enc["c"], 16)
        good = 0 < c < pub.nsquare and priv.raw_decrypt(c) == m
        add("encrypt", good, f"Paillier ciphertext of the known vector decrypts {'to it' if good else 'WRONG'} "
            f"({enc['ms']} ms)")
    sen = res["sensor"]
    add("sensor", sen["ok"], f"{sen['type']} read: import {sen['import_wh']} Wh, export {sen['export_wh']} Wh "
        f"({sen['span']})" if sen["ok"] else sen["error"])
    skew = res["clock"]["time"] - host_now
    add("clock", abs(skew) <= max_skew_s, f"device clock {skew:+.1f} s from this machine's (limit {max_skew_s:.0f} s)")
    br = res["broker"]
    add("broker", br["ok"], f"TCP connect to {br['host']}:{br['port']} in {br['ms']} ms" if br["ok"] else br["error"])
    free = res["memory"]["free"]
    add("memory", free >= MIN_FREE, f"{free} bytes of heap free (need {MIN_FREE})")
    return checks
