"""flash.sh on real parts: a virtual board (the MicroPython Unix port behind a
pty, driven by the real mpremote), the registry chain and a gateway on a real
Mosquitto, and every friendly error provoked for real."""

from __future__ import annotations

import asyncio
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import segno
import serial
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PIL import Image

from gridledger.flashdevice import BOARDS, USB_IDS, Board, Runner, bootsel_volumes, classify
from gridledger.flashlabel import LABEL_PX, QR_BORDER, qr_payload
from gridledger.flashprovision import fingerprint
from gridledger.meterkeys import public_hex
from gridledger.testbed import (chain_height, chain_table, gateway_process, registry_chain_table, registry_process,
                                validator_process, wait_up, write_chain, write_registry_chain)
from gridledger.wire import ack_topic, kid_of

from conftest import ROOT, MqttProbe
from helpers import N, wait_until

FLASH = ROOT / "flash.sh"
AREA = "area1"
MPREMOTE = str(Path(sys.executable).parent / "mpremote")


def flash(*args: str, prefix: tuple[str, ...] = (), timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, GL_PYTHON=sys.executable, PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))
    return subprocess.run([*prefix, str(FLASH), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL)


class VBoard:
    def __init__(self, folder: Path, log: Path):
        self.folder = folder
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "gridledger", "flash", "virtual-board",
                                          "--dir", str(folder)], stdout=subprocess.PIPE, stderr=err,
                                         start_new_session=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        assert ready, f"the virtual board printed no port: {log.read_text()}"
        self.port = self.proc.stdout.readline().decode().strip()
        assert self.port.startswith("/dev/pts/"), self.port

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def vboard(tmp_path):
    vb = VBoard(tmp_path / "board", tmp_path / "vboard.log")
    yield vb
    vb.stop()


def _lines(res: subprocess.CompletedProcess) -> list[str]:
    return [line for line in res.stdout.splitlines() if line.startswith("would run: ")]


# -- --dry-run ------------------------------------------------------------------------

def test_firmware_dry_run_prints_the_exact_esptool_and_uf2_commands(tmp_path):
    """ESP32: erase, write at 0x1000, verify; Pico: copy to the BOOTSEL drive, sync; nothing runs."""
    esptool = str(Path(sys.executable).parent / "esptool")
    image = tmp_path / "ESP32_GENERIC.bin"
    image.write_bytes(b"\xe9" + bytes(63))
    res = flash("--dry-run", "firmware", "--board", "esp32", "--port", "/dev/ttyUSB7", "--image", image)
    assert res.returncode == 0, res.stderr
    base = f"{esptool} --chip esp32 --port /dev/ttyUSB7 --baud 460800"
    assert _lines(res) == [f"would run: {base} erase-flash", f"would run: {base} write-flash 0x1000 {image}",
                           f"would run: {base} verify-flash 0x1000 {image}"]
    s3 = flash("--dry-run", "firmware", "--board", "esp32-s3", "--port", "/dev/ttyACM3", "--image", image)
    assert "write-flash 0x0 " in s3.stdout and "--chip esp32s3" in s3.stdout

    uf2 = tmp_path / "RPI_PICO_W.uf2"
    uf2.write_bytes(b"UF2\n" + bytes(508))
    volume = tmp_path / "media" / "RPI-RP2"
    volume.mkdir(parents=True)
    (volume / "INFO_UF2.TXT").write_text("UF2 Bootloader v3.0\nModel: Raspberry Pi RP2\nBoard-ID: RPI-RP2\n")
    if shutil.which("picotool"):
        pytest.skip("picotool on PATH: flash.sh uses it instead of the UF2 copy")
    res = flash("--dry-run", "firmware", "--board", "pico-w", "--image", uf2, "--volume", volume)
    assert res.returncode == 0, res.stderr
    assert _lines(res) == [f"would run: cp {uf2} {volume}/", "would run: sync"]
    assert not (volume / uf2.name).exists()


def test_install_provision_verify_label_dry_runs_print_their_mpremote_commands(tmp_path):
    """Each command shows the exact mpremote lines it would run and touches no port and no file."""
    port = "/dev/ttyACM9"  # no such device: a dry run must not open it
    pre = f"would run: {MPREMOTE} connect {port} resume exec "
    res = flash("--dry-run", "install", "--port", port)
    assert res.returncode == 0, res.stderr
    lines = _lines(res)
    assert lines[0].startswith(pre + "'import sys, json;")
    assert lines[1] == f"would run: {sys.executable} -m gridledger firmware build --out {ROOT / 'build' / 'firmware'}"
    assert lines[2].startswith(pre) and "os.remove(" in lines[2] and "firmware.json" in lines[2]
    assert lines[3] == f"would run: {MPREMOTE} connect {port} resume fs cp -r {ROOT / 'build' / 'firmware'}/. :"
    assert lines[4].startswith(f"would run: {MPREMOTE} connect {port} resume fs cp ") and \
        lines[4].endswith("/firmware.json :firmware.json")

    keys = tmp_path / "keys"
    (tmp_path / "paillier.pub.json").write_text(json.dumps({"n": str(N), "kid": kid_of(N)}))
    keys.mkdir()
    (keys / "tech1.ed25519.key").write_bytes(os.urandom(32))
    res = flash("--dry-run", "provision", "--port", port, "--meter", "m01", "--account", "acct-0001", "--area", AREA,
                "--broker", "mqtt://gw.local", "--paillier", tmp_path / "paillier.pub.json", "--signer", "tech1",
                "--key", keys / "tech1.ed25519.key", "--out", tmp_path / "records", "--wifi", "HomeNet:s3cret")
    assert res.returncode == 0, res.stderr
    shown = json.loads(res.stdout.split("config.json would be: ", 1)[1].splitlines()[0])
    assert shown["meter"] == "m01" and shown["broker"]["host"] == "gw.local" and shown["paillier"]["n"] == str(N)
    assert shown["wifi"] == {"ssid": "HomeNet", "password": "***"} and "s3cret" not in res.stdout
    identify, info, config, keygen = _lines(res)
    assert identify.startswith(pre + "'import sys, json;") and info.startswith(pre) and '"op": "info"' in info
    assert config.startswith(f"would run: {MPREMOTE} connect {port} resume fs cp ") and \
        config.endswith("/config.json :config.json")
    assert keygen.startswith(pre) and '"op": "keygen"' in keygen
    assert "registry chain via gw.local:1883" in res.stdout and not (tmp_path / "records").exists()

    res = flash("--dry-run", "verify", "--port", port)
    assert res.returncode == 0, res.stderr
    assert '"op": "selftest"' in _lines(res)[-1]
    res = flash("--dry-run", "label", "--port", port, "--out", tmp_path / "labels")
    assert res.returncode == 0 and '"op": "info"' in _lines(res)[0] and not (tmp_path / "labels").exists()


# -- the device side: firmware/provision.py -------------------------------------------------

def test_device_key_is_made_once_and_signs_only_its_own_enrollment(tmp_path, mp_source):
    """keygen keeps an existing key (rotation only when asked); the host sees only the public key;
    sign_enrollment refuses other domains and other keys, and its signature verifies on the host."""
    from certlog.block import canonical
    from coordinator.registryapp import DOMAIN_METER, enroll_record
    script = tmp_path / "prov.py"
    board = tmp_path / "board"
    board.mkdir()
    script.write_text("import os, sys\nos.chdir(sys.argv[1])\nimport provision\n"
                      "for req in open(sys.argv[2]):\n    provision.run(req)\n")
    requests = tmp_path / "requests.jsonl"  # the Unix port crashes on arguments over 256 characters

    def ops(*reqs: dict) -> list[dict]:
        requests.write_text("".join(json.dumps(r) + "\n" for r in reqs))
        out = mp_source.run(script, board, requests, heap="128k")
        return [json.loads(line[7:]) for line in out.splitlines() if line.startswith("GLPROV ")]

    first, again = ops({"op": "keygen"}, {"op": "keygen"})
    seed = (board / "ed25519.key").read_bytes()
    pub = public_hex(Ed25519PrivateKey.from_private_bytes(seed).public_key())
    assert first["result"] == {"created": True, "rotated": False, "public_key": pub}
    assert again["result"] == {"created": False, "public_key": pub}
    assert (board / "ed25519.key").read_bytes() == seed

    rec = enroll_record(meter="m01", account="a1", area=AREA, public_key=pub, signer="tech1", time=1_800_000_000)
    msg = DOMAIN_METER + canonical(rec)
    other = dict(rec, public_key="11" * 32)
    good, wrong_domain, wrong_key, reading = ops(
        {"op": "sign_enrollment", "msg": msg.hex()},
        {"op": "sign_enrollment", "msg": (b"gridledger selftest v1\n" + canonical(rec)).hex()},
        {"op": "sign_enrollment", "msg": (DOMAIN_METER + canonical(other)).hex()},
        {"op": "sign_enrollment", "msg": b"gl-reading-v1\nm01\n1".hex()})
    Ed25519PrivateKey.from_private_bytes(seed).public_key().verify(bytes.fromhex(good["result"]["signature"]), msg)
    assert (wrong_domain["reason"], wrong_key["reason"], reading["reason"]) == ("bad_domain", "not_my_key",
                                                                               "bad_domain")
    rotated, = ops({"op": "keygen", "rotate": True})
    assert rotated["result"]["created"] and rotated["result"]["public_key"] != pub
    assert (board / "ed25519.key").read_bytes() != seed
    for answer in (first, again, good, rotated):
        assert seed.hex() not in json.dumps(answer)


# -- end to end on the virtual board ---------------------------------------------------------

def _with_account(cfg: Path, user: str, password: str) -> None:
    cfg.write_text(cfg.read_text().replace("[mqtt]\n", f'[mqtt]\nusername = "{user}"\npassword = "{password}"\n'))


class Registry:
    """The registry chain (its proposer and one validator) and a gateway following it, on a real Mosquitto;
    with `passwords` (account -> password: registry, v0, gw1, ops) each role logs in with its own account."""

    def __init__(self, tmp: Path, host: str, port: int, passwords: dict[str, str] | None = None):
        self.tmp = tmp
        (tmp / "paillier.pub.json").write_text(json.dumps({"n": str(N), "kid": kid_of(N)}))
        self.vcfgs = write_chain(tmp, area=AREA, host=host, port=port, validators=1,
                                 paillier_public="paillier.pub.json", registry_chain=True)
        self.setup = write_registry_chain(tmp, host=host, port=port)
        self.gateway_cfg = tmp / "gateway.toml"
        self.gateway_cfg.write_text(f'[gateway]\narea = "{AREA}"\ndatabase = "gateway.db"\n'
                                    f'paillier_public = "paillier.pub.json"\n\n[mqtt]\nhost = "{host}"\n'
                                    f'port = {port}\n\n' + chain_table(50)
                                    + registry_chain_table("gateway-registry.db"))
        self.login = ["--broker", f"{host}:{port}"]
        if passwords:
            for cfg, user in ((self.setup.config, "registry"), (self.vcfgs[0], "v0"), (self.gateway_cfg, "gw1")):
                _with_account(cfg, user, passwords[user])
            self.login = ["--mqtt", str(mqtt_file(tmp, "ops", host, port, passwords["ops"]))]
        self.procs = []

    def start(self) -> "Registry":
        """The three roles up, and technician tech1 registered by the registrar."""
        tmp = self.tmp
        for name, start in (("registry", lambda log: registry_process(self.setup.config, log)),
                            ("v0", lambda log: validator_process(self.vcfgs[0], log)),
                            ("gateway", lambda log: gateway_process(self.gateway_cfg, log))):
            log = tmp / f"{name}.log"
            self.procs.append(start(log))
            wait_up(log, self.procs[-1], timeout=60)
        res = subprocess.run([sys.executable, "-m", "gridledger", "registry", "node", "--id", "tech1", "--role",
                              "technician", "--public-key", self.setup.technician.public_hex, "--signer", "ops",
                              "--key", str(tmp / "keys" / "ops.ed25519.key"), *self.login],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        return self

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def mqtt_file(tmp: Path, user: str, host: str, port: int, password: str) -> Path:
    """A technician's [mqtt] TOML, as `registry ... --mqtt` and `flash.sh provision --registry-mqtt` take it."""
    path = tmp / f"{user}.mqtt.toml"
    path.write_text(f'[mqtt]\nhost = "{host}"\nport = {port}\nusername = "{user}"\npassword = "{password}"\n')
    return path


async def test_a_bare_virtual_board_becomes_an_enrolled_meter_whose_reading_the_gateway_accepts(
        tmp_path, broker, firmware_bundle, vboard):
    """install, provision, verify and label through flash.sh and mpremote; re-running provision changes nothing;
    the device's private key is nowhere on the host; restarted, the board's meter gets its first reading acked."""
    reg = Registry(tmp_path, broker.host, broker.port).start()
    runs = []
    try:
        res = flash("install", "--port", vboard.port, "--bundle", firmware_bundle)
        runs.append(res)
        assert res.returncode == 0, res.stdout + res.stderr
        assert (vboard.folder / "provision.mpy").exists() and (vboard.folder / "umqtt" / "simple.mpy").exists()
        assert "on MicroPython 1." in res.stdout

        records = tmp_path / "provisioned"
        provision = ["provision", "--port", vboard.port, "--meter", "m01", "--account", "acct-0001", "--area", AREA,
                     "--broker", f"mqtt://{broker.host}:{broker.port}", "--paillier", tmp_path / "paillier.pub.json",
                     "--signer", "tech1", "--key", tmp_path / "keys" / "tech1.ed25519.key", "--out", records,
                     "--interval-s", "5"]
        res = flash(*provision)
        runs.append(res)
        assert res.returncode == 0, res.stdout + res.stderr
        seed = (vboard.folder / "ed25519.key").read_bytes()
        pub = public_hex(Ed25519PrivateKey.from_private_bytes(seed).public_key())
        record = json.loads((records / "m01.json").read_text())
        assert record["public_key"] == pub and record["registry"]["status"] == "certified"
        assert record["fingerprint"] == fingerprint(pub) and record["board"] == "unix"
        assert json.loads(record["enrollment"])["meter_sig"]

        res = flash("verify", "--port", vboard.port, "--record", records / "m01.json")
        runs.append(res)
        assert res.returncode == 0, res.stdout + res.stderr
        report = [line.split()[:2] for line in res.stdout.splitlines() if line[:4] in ("PASS", "FAIL")]
        assert report == [["PASS", c] for c in ("config", "key", "encrypt", "sensor", "clock", "broker", "memory")]
        other = tmp_path / "other.json"  # a record for another board: the key check fails, and only it
        other.write_text(json.dumps(dict(record, public_key=public_hex(Ed25519PrivateKey.generate().public_key()))))
        res = flash("verify", "--port", vboard.port, "--record", other)
        runs.append(res)
        assert res.returncode == 1 and "self-test failed: key" in res.stderr
        assert [line[:4] for line in res.stdout.splitlines() if line[:4] in ("PASS", "FAIL")].count("FAIL") == 1

        res = flash("label", "--port", vboard.port, "--records", records, "--out", tmp_path / "labels")
        runs.append(res)
        assert res.returncode == 0, res.stdout + res.stderr
        assert (tmp_path / "labels" / "m01.label.png").exists()

        wait_until(lambda: chain_height(tmp_path / "gateway-registry.db") >= record["registry"]["height"], 30,
                   "the gateway to follow the registry chain")
        async with MqttProbe(broker, ack_topic(AREA, "m01")) as probe:
            # Idempotent: same key, same record, no second enrollment; --start restarts the board into main.py.
            res = flash(*provision, "--start")
            runs.append(res)
            assert res.returncode == 0, res.stdout + res.stderr
            assert "already enrolled" in res.stdout and (vboard.folder / "ed25519.key").read_bytes() == seed
            assert json.loads((records / "m01.json").read_text()) == record
            await probe.expect(ack_topic(AREA, "m01"), lambda b: b["seq"] >= 1, timeout=90)

        # The board now runs its meter; mpremote interrupts it (Ctrl-C) like a real board's.
        res = flash("verify", "--port", vboard.port, "--record", records / "m01.json")
        runs.append(res)
        assert res.returncode == 0, res.stdout + res.stderr

        # The same key cannot quietly move to another account.
        moved = flash(*provision[:provision.index("--account") + 1], "acct-0002",
                      *provision[provision.index("--account") + 2:])
        runs.append(moved)
        assert moved.returncode == 2 and "retire it" in moved.stderr

        host_files = [p for p in tmp_path.rglob("*") if p.is_file() and vboard.folder not in p.parents]
        for blob in [*(r.stdout.encode() + r.stderr.encode() for r in runs), *(p.read_bytes() for p in host_files)]:
            assert seed not in blob and seed.hex().encode() not in blob
    finally:
        reg.stop()


# -- labels ---------------------------------------------------------------------------------------

def test_label_carries_the_enrollment_as_a_qr_code(tmp_path):
    """The PNG is 62x29 mm at 300 dpi and its QR modules are exactly segno's encoding of the enrollment."""
    pub = public_hex(Ed25519PrivateKey.generate().public_key())
    record = {"meter": "m07", "account": "acct-0007", "area": AREA, "public_key": pub, "board": "pico-w",
              "signer": "tech1", "registry": {"status": "certified", "height": 4},
              "enrollment": json.dumps({"kind": "enroll", "meter": "m07", "public_key": pub, "sig": "ab" * 64})}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record))
    res = flash("label", "--record", path, "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    img = Image.open(tmp_path / "out" / "m07.label.png").convert("1")
    assert img.size == LABEL_PX
    text = (tmp_path / "out" / "m07.label.txt").read_text()
    assert f"fingerprint  {fingerprint(pub)}" in text and "account      acct-0007" in text

    matrix = [list(row) for row in segno.make(qr_payload(record), error="m", micro=False).matrix_iter(border=QR_BORDER)]
    px = img.load()
    # Find the code: the right-most square block; sample each module's centre.
    dark_x = [x for x in range(img.width) if any(px[x, y] == 0 for y in range(img.height))]
    right = max(dark_x)
    dark_y = [y for y in range(img.height) if px[right, y] == 0 or px[right - 1, y] == 0]
    modules = len(matrix) - 2 * QR_BORDER
    size = right + 1 - min(x for x in dark_x if x > img.width // 2)
    scale = size // modules
    x0, y0 = right + 1 - size - QR_BORDER * scale, min(dark_y) - QR_BORDER * scale
    got = [[px[x0 + c * scale + scale // 2, y0 + r * scale + scale // 2] == 0 for c in range(len(matrix))]
           for r in range(len(matrix))]
    assert got == [[bool(v) for v in row] for row in matrix]


# -- friendly errors ----------------------------------------------------------------------------

def test_no_board_on_the_named_port(tmp_path):
    res = flash("verify", "--port", tmp_path / "ttyUSB0")
    assert res.returncode == 3 and "no board at" in res.stderr and "data cable" in res.stderr


def test_permission_denied_says_how_to_join_dialout(vboard):
    """The port's mode denies us (root too, without CAP_DAC_OVERRIDE, as an ordinary user is)."""
    os.chmod(vboard.port, 0o000)
    drop = ("setpriv", "--bounding-set=-dac_override,-dac_read_search") if os.geteuid() == 0 else ()
    if drop and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot be denied")
    res = flash("install", "--port", vboard.port, prefix=drop)
    assert res.returncode == 5, res.stdout + res.stderr
    assert "permission denied" in res.stderr and "usermod -aG" in res.stderr and "log out" in res.stderr


def test_port_busy_when_another_program_holds_it(vboard):
    with serial.Serial(vboard.port, exclusive=True):  # what mpremote, esptool or a serial monitor does
        res = flash("verify", "--port", vboard.port)
    assert res.returncode == 4 and "is busy" in res.stderr and "close it" in res.stderr


def test_wrong_board_is_refused_before_anything_is_written(vboard):
    res = flash("install", "--port", vboard.port, "--board", "esp32")
    assert res.returncode == 6 and "wrong board" in res.stderr and "the device says linux" in res.stderr
    assert not (vboard.folder / "main.py").exists()


def test_registry_out_of_reach_is_its_own_error(vboard, firmware_bundle, tmp_path):
    """Provisioning against a broker nobody listens on: exit 10, and no record claims an enrollment."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # closed when the block ends: connections are refused
    assert flash("install", "--port", vboard.port, "--bundle", firmware_bundle).returncode == 0
    (tmp_path / "paillier.pub.json").write_text(json.dumps({"n": str(N), "kid": kid_of(N)}))
    (tmp_path / "tech1.key").write_bytes(os.urandom(32))
    res = flash("provision", "--port", vboard.port, "--meter", "m02", "--account", "a2", "--area", AREA,
                "--broker", f"mqtt://127.0.0.1:{dead}", "--paillier", tmp_path / "paillier.pub.json",
                "--signer", "tech1", "--key", tmp_path / "tech1.key", "--out", tmp_path / "records", "--timeout", "5")
    assert res.returncode == 10 and "cannot submit to the registry" in res.stderr, res.stdout + res.stderr
    assert not (tmp_path / "records").exists() and (vboard.folder / "ed25519.key").exists()


def test_verify_before_install_says_to_install(vboard):
    res = flash("verify", "--port", vboard.port)
    assert res.returncode == 9 and "run ./flash.sh install" in res.stderr


def test_image_missing_or_not_an_image(tmp_path):
    res = flash("firmware", "--board", "esp32", "--port", "/dev/ttyUSB0", "--image", tmp_path / "nope.bin")
    assert res.returncode == 7 and "image missing" in res.stderr and "micropython.org/download" in res.stderr
    uf2 = tmp_path / "x.uf2"
    uf2.write_bytes(b"UF2\n" + bytes(60))
    res = flash("firmware", "--board", "esp32", "--port", "/dev/ttyUSB0", "--image", uf2)
    assert res.returncode == 7 and "not an ESP32 firmware image" in res.stderr
    res = flash("firmware", "--board", "pico", "--image", uf2, "--sha256", "00" * 32, "--volume", tmp_path)
    assert res.returncode == 7 and "download it again" in res.stderr


def test_pico_not_in_bootsel(tmp_path):
    if shutil.which("picotool"):
        pytest.skip("picotool on PATH finds the board itself")
    uf2 = tmp_path / "RPI_PICO.uf2"
    uf2.write_bytes(b"UF2\n" + bytes(508))
    res = flash("firmware", "--board", "pico", "--image", uf2, "--volume", tmp_path)
    assert res.returncode == 8 and "not in BOOTSEL" in res.stderr and "hold its BOOTSEL" in res.stderr


def test_every_subcommand_has_help_and_usage_errors_exit_2():
    for sub in ("build", "detect", "firmware", "install", "provision", "verify", "label", "virtual-board"):
        res = flash(sub, "--help")
        assert res.returncode == 0 and "usage" in res.stdout.lower(), sub
    top = flash("--help")
    assert "exit codes" in top.stdout and "8 Pico not in BOOTSEL" in top.stdout
    assert flash("provision", "--port", "/dev/null").returncode == 2


# -- detection (pure logic) ----------------------------------------------------------------------

def test_usb_ids_and_bootsel_drives_are_recognised(tmp_path):
    assert classify(0x10C4, 0xEA60)[0] == "esp32" and classify(0x1A86, 0x7523)[0] == "esp32"
    assert classify(0x1A86, 0x55D4)[0] == "esp32" and classify(0x0403, 0x6001)[0] == "esp32"
    assert classify(0x2E8A, 0x0005)[0] == "pico" and classify(0x046D, 0xC52B) is None and classify(None, None) is None
    assert {f for f, _ in USB_IDS.values()} <= {b.family for b in BOARDS.values()}
    drive = tmp_path / "user" / "RP2350"
    drive.mkdir(parents=True)
    (drive / "INFO_UF2.TXT").write_text("UF2 Bootloader v1.0\nModel: Raspberry Pi RP2350\nBoard-ID: RP2350\n")
    (tmp_path / "USBSTICK").mkdir()
    assert bootsel_volumes([tmp_path]) == [(drive, "RP2350")]


# -- the gateway's systemd units ----------------------------------------------------------------

def test_systemd_units_are_hardened_and_run_real_commands(tmp_path):
    """Each role's unit runs as gridledger, read-only system, restarts on failure, and its ExecStart is a
    gridledger command that exists; systemd itself accepts every file when it is available here."""
    import configparser
    units = sorted((ROOT / "hardware" / "systemd").glob("*.service"))
    roles = {u.name.split("@")[0].split(".")[0].removeprefix("gridledger-") for u in units}
    assert {"gateway", "bridge", "validator", "registry", "storage", "verifier", "coordinator", "trustee",
            "backup"} <= roles
    for unit in units:
        cfg = configparser.ConfigParser(strict=False, interpolation=None)
        cfg.optionxform = str
        cfg.read(unit)
        svc = cfg["Service"]
        assert svc["User"] == "gridledger" and svc["ProtectSystem"] == "strict", unit.name
        assert svc["NoNewPrivileges"] == "yes" and svc["CapabilityBoundingSet"] == "", unit.name
        if unit.name.startswith("gridledger-backup"):
            continue
        assert svc["Restart"] == "on-failure" and svc["KillSignal"] == "SIGTERM", unit.name
        argv = svc["ExecStart"].split()
        assert argv[0] == "/opt/gridledger/.venv/bin/gridledger", unit.name
        sub = argv[1:argv.index("--config")]
        res = subprocess.run([sys.executable, "-m", "gridledger", *sub, "--help"], capture_output=True, text=True)
        assert res.returncode == 0, (unit.name, res.stderr)
        assert all(opt in res.stdout for opt in argv if opt.startswith("--")), unit.name
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    for f in (ROOT / "hardware" / "systemd").iterdir():
        # ExecStart must exist for `verify`: point it at a real binary here.
        (tmp_path / f.name).write_text(f.read_text().replace("/opt/gridledger/.venv/bin/gridledger", "/bin/true"))
    res = subprocess.run([analyze, "verify", "--man=no", *sorted(str(p) for p in tmp_path.iterdir())],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr


def test_detect_asks_a_micropython_board_its_version_and_skips_a_busy_one(vboard, tmp_path):
    """detect() on a port described as a Pico (the USB descriptor is made here; the board and the probe are
    real): the version comes from the board itself; a port held by another program is listed, not waited for."""
    from serial.tools.list_ports_common import ListPortInfo
    from gridledger.flashdevice import detect
    port = ListPortInfo(vboard.port, skip_link_detection=True)
    port.vid, port.pid = 0x2E8A, 0x0005
    serial_port = ListPortInfo("/dev/ttyS0", skip_link_detection=True)  # no USB ids: not a board
    [found] = detect([port, serial_port], [tmp_path], Runner())
    assert (found.port, found.usb, found.family) == (vboard.port, "2E8A:0005", "pico")
    assert found.micropython.startswith("1.") and found.note == "platform linux"
    with serial.Serial(vboard.port, exclusive=True):
        [busy] = detect([port], [], Runner())
    assert busy.micropython == "" and busy.note == "skipped: port busy"
    out = io.StringIO()
    [planned] = detect([port], [], Runner(dry_run=True, out=out))
    assert planned.note == "not asked (dry run)"
    assert out.getvalue().startswith(f"would run: {MPREMOTE} connect {vboard.port} resume exec ")


def test_detect_without_boards_says_what_to_check(tmp_path):
    from serial.tools import list_ports
    if any(classify(p.vid, p.pid) for p in list_ports.comports()):
        pytest.skip("a board is attached to this machine")
    res = flash("detect", "--bootsel-root", tmp_path)
    assert res.returncode == 3 and "no board found" in res.stderr and "charge-only" in res.stderr


def test_a_board_joins_its_wifi_at_boot_without_waiting(tmp_path, mp_source):
    """provision.boot() (main.py, before the meter) starts joining the configured network and returns at once;
    the self-test waits for the link. A fake `network` module stands in for the radio (pure logic)."""
    (tmp_path / "network.py").write_text(
        "STA_IF = 0\ncalls = []\nclass WLAN:\n    up = False\n    def __init__(self, i): calls.append(('WLAN', i))\n"
        "    def active(self, on): calls.append(('active', on))\n"
        "    def isconnected(self): return WLAN.up\n"
        "    def connect(self, ssid, pw): calls.append(('connect', ssid, pw))\n")
    (tmp_path / "case.py").write_text(
        "import json, os, sys\nos.chdir(sys.argv[1])\nimport network, provision\n"
        "provision.boot()\nnone = list(network.calls)\n"
        "json.dump({'meter': 'm01', 'wifi': {'ssid': 'HomeNet', 'password': 'p:w'}}, open('config.json', 'w'))\n"
        "provision.boot()\nfirst = list(network.calls)\nnetwork.calls.clear()\n"
        "try:\n    provision.wifi_up(json.load(open('config.json')), 300)\n    waited = 'joined'\n"
        "except OSError as e:\n    waited = str(e)\n"
        "network.WLAN.up = True\nnetwork.calls.clear()\nup = provision.wifi_up(json.load(open('config.json')), 300)\n"
        "print(json.dumps([none, first, waited, up, network.calls]))\n")
    mp = type(mp_source)([tmp_path, *mp_source.path])
    none, first, waited, up, again = mp.run_json(tmp_path / "case.py", tmp_path, heap="128k")
    assert none == []  # no config, no radio touched
    assert first == [["WLAN", 0], ["active", True], ["connect", "HomeNet", "p:w"]]
    assert waited == "wifi HomeNet: not connected after 300 ms"
    assert up is True and ["connect", "HomeNet", "p:w"] not in again  # already up: not asked again



async def test_a_provisioned_meter_is_accepted_through_the_generated_acl(tmp_path, firmware_bundle, vboard):
    """Mosquitto with `gridledger broker` accounts and ACLs: every role logs in with its account, the technician
    enrolls through its [mqtt] file, the meter's own account goes onto the device; once the ACL is regenerated
    from the registry chain the board's first reading is acked, and another meter's topics stay closed to it."""
    import aiomqtt
    from gridledger.broker import free_port, run_mosquitto

    def gl(*args) -> dict:
        res = subprocess.run([sys.executable, "-m", "gridledger", *map(str, args)], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout.strip().splitlines()[-1])

    local, tls, auth, certs = free_port(), free_port(), tmp_path / "broker", tmp_path / "certs"
    passwords = {who: gl("broker", "credentials", "add", "--id", who, "--role", role, "--out", auth, *extra)["password"]
                 for who, role, extra in (("registry", "registry", ()), ("v0", "validator", ()),
                                          ("gw1", "gateway", ("--area", AREA)), ("ops", "technician", ()),
                                          ("tech1", "technician", ()), ("m01", "meter", ()), ("m02", "meter", ()))}
    subprocess.run([sys.executable, "-m", "gridledger", "broker", "testbed-ca", "--out", str(certs), "--host",
                    "127.0.0.1"], check=True, capture_output=True, timeout=60)
    (auth / "acl").write_text("")  # nobody may do anything until the ACL is generated
    gl_ok = subprocess.run([sys.executable, "-m", "gridledger", "broker", "config", "--out", str(auth), "--tls-cert",
                            str(certs / "server.crt"), "--tls-key", str(certs / "server.key"), "--ca",
                            str(certs / "ca.crt"), "--tls-port", str(tls), "--tls-bind", "127.0.0.1",
                            "--local-port", str(local)], capture_output=True, text=True, timeout=60)
    assert gl_ok.returncode == 0, gl_ok.stderr
    main = tmp_path / "mosquitto-main.conf"
    main.write_text(("user root\n" if os.geteuid() == 0 else "") + f"persistence false\nlog_dest stderr\n"
                    f"include_dir {auth}\n")
    broker = run_mosquitto(main, local, tmp_path / "mosquitto.log")
    reg = None
    try:
        reg = Registry(tmp_path, "127.0.0.1", local, passwords)
        # The roles' own grants first: the registry has no meter yet (an empty `registry show`).
        empty = tmp_path / "no-meters.json"
        empty.write_text(json.dumps({"chain": "registry", "area": AREA, "meters": []}))
        gl("broker", "acl", "--registry-config", empty, "--out", auth / "acl")
        broker.proc.send_signal(signal.SIGHUP)
        reg.start()
        regen = ("broker", "acl", "--registry-config", tmp_path / "validators" / "v0.toml", "--out", auth / "acl")
        assert flash("install", "--port", vboard.port, "--bundle", firmware_bundle).returncode == 0
        (tmp_path / "m01.pass").write_text(passwords["m01"] + "\n")
        records = tmp_path / "provisioned"
        res = flash("provision", "--port", vboard.port, "--meter", "m01", "--account", "acct-0001", "--area", AREA,
                    "--broker", f"mqtt://127.0.0.1:{local}", "--user", "m01", "--password-file", tmp_path / "m01.pass",
                    "--registry-mqtt", mqtt_file(tmp_path, "tech1", "127.0.0.1", local, passwords["tech1"]),
                    "--paillier", tmp_path / "paillier.pub.json", "--signer", "tech1",
                    "--key", tmp_path / "keys" / "tech1.ed25519.key", "--out", records, "--interval-s", "5")
        assert res.returncode == 0, res.stdout + res.stderr
        height = json.loads((records / "m01.json").read_text())["registry"]["height"]
        for db in (tmp_path / "validators" / "v0-registry.db", tmp_path / "gateway-registry.db"):
            wait_until(lambda: chain_height(db) >= height, 30, f"{db.name} to hold the enrollment")
        assert gl(*regen)["meters"] == 1
        broker.proc.send_signal(signal.SIGHUP)
        config = json.loads((vboard.folder / "config.json").read_text())
        assert config["broker"]["user"] == "m01" and passwords["m01"] not in (records / "m01.json").read_text()

        async with aiomqtt.Client("127.0.0.1", local, username="gw1", password=passwords["gw1"]) as gw:
            await gw.subscribe(f"gl/v1/{AREA}/meters/+/ack", qos=1)
            await gw.subscribe(f"gl/v1/{AREA}/meters/m02/readings", qos=1)
            assert flash("verify", "--port", vboard.port, "--record", records / "m01.json").returncode == 0
            board = Board(vboard.port, Runner())
            board.run("exec", "--no-follow", "import machine; machine.soft_reset()")
            async with asyncio.timeout(90):
                async for msg in gw.messages:
                    if msg.topic.matches(ack_topic(AREA, "m01")) and json.loads(msg.payload)["seq"] >= 1:
                        break
            # With m01's account, m02's readings topic is not m01's to publish on (Mosquitto drops it silently).
            async with aiomqtt.Client("127.0.0.1", local, username="m01", password=passwords["m01"]) as m01:
                await m01.publish(f"gl/v1/{AREA}/meters/m02/readings", b"{}", qos=1)
                await m01.publish(ack_topic(AREA, "m01"), b'{"probe": 1}', qos=1)
            try:
                async with asyncio.timeout(3):
                    async for msg in gw.messages:
                        assert not msg.topic.matches(f"gl/v1/{AREA}/meters/m02/readings"), "m01 published as m02"
                        assert not (msg.topic.matches(ack_topic(AREA, "m01")) and b"probe" in msg.payload), \
                            "m01 wrote its own ack topic"
            except TimeoutError:
                pass  # the quiet window ended and nothing forbidden arrived
    finally:
        if reg:
            reg.stop()
        broker.stop()
