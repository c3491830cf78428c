"""Shared builders for the uplink and alert tests: an area of firmware meters and a
gateway as real processes, meter configs with extra keys, a throwaway TLS CA, and
the meters' JSON log lines."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gridledger.broker import Broker, free_port, start_mosquitto
from gridledger.firmware_build import METER_HEAP
from gridledger.testbed import gateway_process, meter_process, read_truth, write_meter_config

from helpers import N, make_area, wait_until

INTERVAL_S = 900


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool, dns: str | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if dns:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_tls(folder: Path, server_name: str) -> dict[str, Path]:
    """A throwaway CA (ca.pem) and a server certificate for `server_name` signed by it
    (server.pem, server.key); also a second, unrelated CA (other-ca.pem)."""
    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    out = {}
    for name in ("ca", "other-ca"):
        k = ec.generate_private_key(ec.SECP256R1())
        c = _cert(f"{name} for tests", k, f"{name} for tests", k, ca=True)
        out[name] = folder / f"{name}.pem"
        out[name].write_bytes(c.public_bytes(pem))
        if name == "ca":
            ca_key = k
    sk = ec.generate_private_key(ec.SECP256R1())
    sc = _cert(server_name, sk, "ca for tests", ca_key, ca=False, dns=server_name)
    out["cert"] = folder / "server.pem"
    out["cert"].write_bytes(sc.public_bytes(pem))
    out["key"] = folder / "server.key"
    out["key"].write_bytes(sk.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return out


class MeterArea:
    """Firmware meters and a gateway as real processes in one folder, in accelerated
    time (`seconds_per_interval` real seconds per 15-minute interval)."""

    def __init__(self, tmp: Path, broker, firmware: Path, meters: list[str], *, intervals: int | None,
                 seconds_per_interval: float = 0.5, metrics_port: int = 0, heap: str = METER_HEAP):
        self.tmp, self.firmware, self.meters, self.heap = tmp, firmware, meters, heap
        self.cfg, self.keys = make_area(tmp, meters, host=broker.host, port=broker.port)
        if metrics_port:
            self.cfg.write_text(self.cfg.read_text() + f"\n[metrics]\nport = {metrics_port}\n")
        now = time.time()
        virt = (int(now) // 86400 - 1) * 86400 + 7 * 3600  # 07:00 yesterday: the morning peak
        self.clock = {"scale": INTERVAL_S / seconds_per_interval, "real_start": now + 1.0, "virtual_start": virt}
        if intervals is not None:
            self.clock["stop_at"] = virt + intervals * INTERVAL_S
        for i, m in enumerate(meters):
            d = tmp / m
            self.keys[m].write_seed(d / "ed25519.key")
            write_meter_config(d / "config.json", meter=m, area="area1", state_dir=d, key_file=d / "ed25519.key",
                               n=N, host=broker.host, port=broker.port, interval_s=INTERVAL_S, clock=self.clock,
                               seed=7 + i, resend_s=2.0)
        self.procs: dict[str, subprocess.Popen] = {}
        self.gateway: subprocess.Popen | None = None

    def configure(self, m: str, **sections) -> None:
        """Merge keys into sections of a meter's config.json ({"broker": {...}, "alerts": {...}})."""
        path = self.tmp / m / "config.json"
        cfg = json.loads(path.read_text())
        for name, keys in sections.items():
            cfg[name] = {**cfg.get(name, {}), **keys}
        path.write_text(json.dumps(cfg, indent=1))

    def start_meter(self, m: str) -> subprocess.Popen:
        self.procs[m] = meter_process(self.tmp / m / "config.json", self.log_path(m), heap=self.heap,
                                      firmware=self.firmware)
        return self.procs[m]

    def start_gateway(self) -> None:
        self.gateway = gateway_process(self.cfg, self.tmp / "gateway.log")

    def stop_gateway(self) -> int:
        self.gateway.send_signal(signal.SIGTERM)
        return self.gateway.wait(15)

    def log_path(self, m: str) -> Path:
        return self.tmp / f"{m}.log"

    def events(self, m: str, ev: str | None = None) -> list[dict]:
        """The meter's JSON log lines (all, or those of one event)."""
        out = []
        path = self.log_path(m)
        if path.exists():
            for line in path.read_text().splitlines():
                if line.startswith("{"):
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        continue  # a line the meter is still writing
                    if ev is None or obj.get("ev") == ev:
                        out.append(obj)
        return out

    def truth(self, m: str) -> dict[int, dict]:
        return read_truth(self.tmp / m / "truth.jsonl")

    def wait_meters_done(self, timeout: float) -> None:
        wait_until(lambda: all(p.poll() is not None for p in self.procs.values()), timeout, "meters to finish")
        for m, p in self.procs.items():
            assert p.returncode == 0, self.log_path(m).read_text()[-3000:]

    def cleanup(self) -> None:
        for p in [*self.procs.values(), self.gateway]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def write_passwd(path: Path, users: dict[str, str]) -> None:
    """A Mosquitto password file: with `mosquitto_passwd -b` when installed, else
    Mosquitto 2's own "$7$" lines (PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt)."""
    path.write_text("")
    tool = shutil.which("mosquitto_passwd")
    for user, password in users.items():
        if tool:
            subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True, timeout=30)
        else:
            salt = os.urandom(12)
            digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
            with path.open("a") as f:
                f.write(f"{user}:$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}\n")


@dataclass
class TlsBroker:
    """A real Mosquitto with a plain loopback listener (gateway, probes) and a TLS
    listener (meters) that checks passwords; restartable on the same ports."""
    workdir: Path
    tls: dict[str, Path]
    tls_port: int
    server_name: str
    broker: Broker | None = None

    def conf(self) -> str:
        t = self.tls
        # Started as root, Mosquitto would drop to its own user before reading the
        # password file, and the test's private folder is closed to that user.
        return (f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
                f"password_file {self.workdir / 'passwd'}\n"
                f"listener {self.tls_port} 127.0.0.1\n"
                f"cafile {t['ca']}\ncertfile {t['cert']}\nkeyfile {t['key']}\n")

    def start(self) -> Broker:
        self.broker = start_mosquitto(self.workdir, self.broker.port if self.broker else None, self.conf())
        return self.broker

    def stop(self) -> None:
        if self.broker is not None:
            self.broker.stop()


def start_tls_broker(workdir: Path, users: dict[str, str], server_name: str = "broker.test") -> TlsBroker:
    workdir.mkdir(parents=True, exist_ok=True)
    write_passwd(workdir / "passwd", users)
    b = TlsBroker(workdir, make_tls(workdir / "tls", server_name), free_port(), server_name)
    b.start()
    return b
