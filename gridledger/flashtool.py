"""The technician's commands behind flash.sh (`gridledger flash ...`): detect
boards, write MicroPython, install the firmware bundle, provision a meter (its
key made on the device, enrolled on the registry chain), verify it with the
on-device self-test, print its label, and run a virtual board. Each command
turns a FlashError into one line saying what to do and flash.sh's exit code
(docs/flash.md lists them).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import asdict
from pathlib import Path

from . import __version__
from .firmware_build import BUILD, METER_HEAP
from .flashdevice import (BOARDS, EXIT_CODES, Board, CheckFailed, FlashError, ImageError, NoBoard, NotInBootsel,
                          Runner, UsageError, WrongBoard, bootsel_volumes, check_port, classify, detect, tool)

__all__ = ["EXAMPLES", "add_commands", "firmware_version", "firmware_commands"]

RECORDS = "provisioned"  # provisioning records, one JSON per meter, on the technician's machine
BOOTSEL_ROOTS = [Path("/media"), Path("/run/media"), Path("/mnt")]
UF2_MAGIC = b"UF2\n"     # the first word of every UF2 block
ESP_IMAGE_MAGIC = 0xE9   # the first byte of an ESP32 application/bootloader image

EXAMPLES = {
    "flash detect": "gridledger flash detect",
    "flash firmware": "gridledger flash firmware --board esp32 --port /dev/ttyUSB0 "
                      "--image ESP32_GENERIC-20250415-v1.25.0.bin",
    "flash install": "gridledger flash install --port /dev/ttyACM0",
    "flash provision": "gridledger flash provision --port /dev/ttyACM0 --meter m01 --account acct-0001 "
                       "--area area1 --broker mqtt://gateway.local:1883 --paillier keys/paillier.pub.json "
                       "--signer tech1 --key keys/tech1.ed25519.key",
    "flash verify": "gridledger flash verify --port /dev/ttyACM0 --record provisioned/m01.json",
    "flash label": "gridledger flash label --record provisioned/m01.json --out labels/",
    "flash virtual-board": "gridledger flash virtual-board --dir vboard/",
}


def _paint(code: str, text: str) -> str:
    return f"\033[{code}m{text}\033[0m" if sys.stdout.isatty() else text


def step(msg: str) -> None:
    print(_paint("1", "==> ") + msg, flush=True)


def firmware_version(bundle: Path) -> dict:
    """The bundle's identity: SHA-256 over every file's relative path and bytes, in order."""
    h = hashlib.sha256()
    for f in sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != "firmware.json"):
        h.update(f.relative_to(bundle).as_posix().encode() + b"\0" + f.read_bytes())
    return {"gridledger": __version__, "bundle": h.hexdigest()}


def _board(args, runner: Runner) -> Board:
    if not runner.dry_run:
        check_port(args.port)
    return Board(args.port, runner)


# -- detect ----------------------------------------------------------------------

def _cmd_detect(args, runner: Runner) -> int:
    from serial.tools import list_ports
    roots = [Path(r) for r in args.bootsel_root] if args.bootsel_root else BOOTSEL_ROOTS
    found = detect(list_ports.comports(), roots, runner, probe=not args.no_probe)
    if args.json:
        print(json.dumps([asdict(d) for d in found]))
    if not found:
        raise NoBoard("no board found: plug it in with a data cable (not a charge-only one); a Pico to be "
                      "flashed goes in holding BOOTSEL; `dmesg | tail` shows whether the USB device appeared")
    if not args.json:
        print(f"{'port':<28} {'usb':<10} {'board':<44} {'micropython':<12} note")
        for d in found:
            print(f"{d.port:<28} {d.usb:<10} {d.guess:<44} {d.micropython or '-':<12} {d.note}")
    return 0


# -- firmware ----------------------------------------------------------------------

def _check_image(path: Path, suffix: str, sha256: str | None) -> None:
    if not path.is_file():
        raise ImageError(f"image missing: {path} does not exist; download the MicroPython image for your board "
                         "from micropython.org/download (see docs/flash.md) and give its path")
    head = path.read_bytes()[:4]
    if suffix == ".uf2" and head != UF2_MAGIC:
        raise ImageError(f"{path} is not a UF2 image (a Pico needs the .uf2 file)")
    if suffix == ".bin" and (not head or head[0] != ESP_IMAGE_MAGIC):
        raise ImageError(f"{path} is not an ESP32 firmware image (the .bin from the board's download page)")
    if sha256:
        got = hashlib.sha256(path.read_bytes()).hexdigest()
        if got != sha256.lower():
            raise ImageError(f"{path}: SHA-256 {got} is not the {sha256} you gave: download it again")


def _usb_family(port: str) -> str | None:
    from serial.tools import list_ports
    for p in list_ports.comports():
        if p.device == port or os.path.realpath(port) == p.device:
            kind = classify(p.vid, p.pid)
            return kind[0] if kind else None
    return None


def _bootsel_volume(args) -> Path:
    """The one RP2 boot drive to copy the UF2 image to."""
    vols = bootsel_volumes([Path(args.volume)] if args.volume else BOOTSEL_ROOTS)
    if not vols:
        hint = ""
        if args.port and _usb_family(args.port) == "pico":
            hint = f" (the Pico on {args.port} runs MicroPython: `mpremote connect {args.port} bootloader`)"
        raise NotInBootsel("board not in BOOTSEL: unplug the Pico, hold its BOOTSEL button, plug it in and "
                           "release; an RPI-RP2 drive appears" + hint)
    if len(vols) > 1:
        raise UsageError(f"{len(vols)} boards in BOOTSEL ({', '.join(str(v) for v, _ in vols)}): give --volume")
    return vols[0][0]


def firmware_commands(board: str, image: Path, *, port: str | None, volume: Path | None,
                      baud: int = 460800) -> list[list[str]]:
    """The exact commands that write MicroPython to a board."""
    kind = BOARDS[board]
    if kind.family == "esp32":
        esptool = tool("esptool", "flash")
        base = [esptool, "--chip", kind.chip, "--port", port, "--baud", str(baud)]
        return [base + ["erase-flash"], base + ["write-flash", kind.offset, str(image)],
                base + ["verify-flash", kind.offset, str(image)]]
    picotool = shutil.which("picotool")
    if picotool:
        return [[picotool, "load", "--verify", "--execute", str(image)]]
    return [["cp", str(image), str(volume) + "/"], ["sync"]]


def _cmd_firmware(args, runner: Runner) -> int:
    kind = BOARDS[args.board]
    if kind.family == "unix":
        raise UsageError("the virtual board runs the Unix port: there is no image to write")
    image = Path(args.image)
    _check_image(image, kind.image, args.sha256)
    volume = None
    if kind.family == "esp32":
        if not args.port:
            raise UsageError("--port is needed for an ESP32 (./flash.sh detect lists ports)")
        if not runner.dry_run:
            check_port(args.port)
        family = _usb_family(args.port)
        if family is not None and family != "esp32":
            raise WrongBoard(f"wrong board: {args.port} is a {family}, not an ESP32; give --board pico")
    elif not shutil.which("picotool"):
        volume = _bootsel_volume(args)
    step(f"writing {image.name} to the {args.board}")
    for cmd in firmware_commands(args.board, image, port=args.port, volume=volume, baud=args.baud):
        res = runner.run(cmd, capture=False, timeout=900)
        if res is not None and res.returncode != 0:
            raise FlashError(f"{Path(cmd[0]).name} failed (exit {res.returncode})")
    if not runner.dry_run:
        step("done: the board restarts into MicroPython; next: ./flash.sh install --port PORT")
    return 0


# -- install -------------------------------------------------------------------------

def _cmd_install(args, runner: Runner) -> int:
    from .flashprovision import board_check
    board = _board(args, runner)
    board_check(board, args.board)
    bundle = Path(args.bundle) if args.bundle else BUILD / "firmware"
    if not args.bundle:
        step("building the firmware bundle (mpy-cross, umqtt.simple)")
        res = runner.run([sys.executable, "-m", "gridledger", "firmware", "build", "--out", str(bundle)])
        if res is not None and res.returncode != 0:
            raise FlashError(f"firmware build failed: {res.stderr.strip()[-400:]}")
    elif not (bundle / "main.py").is_file():
        raise UsageError(f"--bundle {bundle}: no main.py there (./flash.sh build makes one)")
    step(f"copying {bundle} to the board on {args.port} (unchanged files are skipped)")
    # firmware.json goes first and comes back last: a board whose copy was cut
    # short has none, and provision says to install again.
    board.run("exec", "import os; 'firmware.json' in os.listdir() and os.remove('firmware.json')")
    board.run("fs", "cp", "-r", f"{bundle}/.", ":", timeout=900)
    with tempfile.TemporaryDirectory() as tmp:
        stamp = Path(tmp) / "firmware.json"
        if not runner.dry_run:
            stamp.write_text(json.dumps(firmware_version(bundle)))
        board.run("fs", "cp", str(stamp), ":firmware.json")
    if not runner.dry_run:
        info = board.call("info")
        print(f"installed gridledger {info['firmware']['gridledger']} bundle {info['firmware']['bundle'][:12]} "
              f"on MicroPython {info['version']} ({info['platform']})")
    return 0


# -- provision, verify ---------------------------------------------------------------

def _cmd_provision(args, runner: Runner) -> int:
    from .flashprovision import Provisioning, provision
    plan = Provisioning.from_options(
        meter=args.meter, account=args.account, area=args.area, broker=args.broker, paillier=args.paillier,
        signer=args.signer, key=args.key, out=args.out, registry=args.registry, wifi=args.wifi, ca=args.ca,
        user=args.user, password_file=args.password_file, registry_mqtt=args.registry_mqtt,
        interval_s=args.interval_s, board=args.board,
        rotate=args.rotate_key, timeout_s=args.timeout)
    board = _board(args, runner)
    rec = provision(board, plan, say=step)
    if rec and args.start:
        step("restarting the board: the meter starts")
        board.run("exec", "--no-follow", "import machine; machine.soft_reset()")
    return 0


def _cmd_verify(args, runner: Runner) -> int:
    from .flashprovision import load_record, verify
    record = load_record(Path(args.record)) if args.record else None
    board = _board(args, runner)
    step(f"self-test on {args.port}" + (f" against {args.record}" if record else ""))
    checks = verify(board, record=record, board_kind=args.board, max_skew_s=args.max_skew)
    for c in checks:
        print(f"{_paint('1;32', 'PASS') if c.ok else _paint('1;31', 'FAIL')} {c.name:<8} {c.detail}")
    failed = [c.name for c in checks if not c.ok]
    if failed:
        raise CheckFailed(f"self-test failed: {', '.join(failed)}")
    if checks:
        print(f"all {len(checks)} checks passed")
    return 0


# -- label -------------------------------------------------------------------------------

def _cmd_label(args, runner: Runner) -> int:
    from .flashlabel import write_label
    from .flashprovision import load_record
    if args.record:
        record = load_record(Path(args.record))
    else:
        found = _board(args, runner).call("info")
        if found is None:
            return 0
        if not (found["meter"] and found["public_key"]):
            raise UsageError(f"the board on {args.port} is not provisioned yet: ./flash.sh provision first")
        record = load_record(Path(args.records) / f"{found['meter']}.json")
        if record["public_key"] != found["public_key"]:
            raise WrongBoard(f"the board on {args.port} holds key {found['public_key'][:16]}..., not the "
                             f"{record['public_key'][:16]}... enrolled for {found['meter']}: wrong board for "
                             "this label")
    if runner.dry_run:
        print(f"would write: {Path(args.out) / (record['meter'] + '.label.png')} and .label.txt")
        return 0
    png, txt = write_label(record, Path(args.out))
    print(f"label {png}\ntext  {txt}")
    return 0


# -- virtual board ---------------------------------------------------------------------------

def _cmd_virtual_board(args, runner: Runner) -> int:
    from .virtualboard import VirtualBoard
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with VirtualBoard(Path(args.dir), heap=args.heap,
                      log=lambda msg: print(f"virtual-board: {msg}", file=sys.stderr, flush=True)) as vb:
        if args.link:
            link = Path(args.link)
            link.unlink(missing_ok=True)
            link.symlink_to(vb.port)
        print(vb.port, flush=True)
        stop.wait()
    if args.link:
        Path(args.link).unlink(missing_ok=True)
    return 0


# -- wiring -------------------------------------------------------------------------------------

def _wrap(fn):
    def run(args) -> int:
        runner = Runner(dry_run=args.dry_run)
        try:
            return fn(args, runner)
        except FlashError as exc:
            print(f"{_paint('1;31', 'error:')} {exc}", file=sys.stderr, flush=True)
            return exc.exit_code
    return run


def add_commands(roles, action) -> None:
    """`gridledger flash ...` on the CLI's parser (`action` is the CLI's subcommand helper)."""
    codes = ", ".join(f"{c} {r}" for c, r in sorted(EXIT_CODES.items()))
    fl = roles.add_parser("flash", help="flash.sh's commands: boards, MicroPython, provisioning, labels",
                          description=f"exit codes: {codes}").add_subparsers(dest="action", required=True)

    def cmd(name: str, helptext: str, fn, port: bool = True):
        sp = action(fl, "flash", name, helptext, _wrap(fn))
        sp.description = f"{helptext}. Exit codes: {codes}."
        sp.add_argument("--dry-run", action="store_true", help="print the commands that would run, change nothing")
        if port:
            sp.add_argument("--port", required=name != "label", help="the board's serial port (./flash.sh detect)")
            sp.add_argument("--board", choices=sorted(BOARDS), help="refuse any other kind of board")
        return sp

    sp = cmd("detect", "list boards on USB (ESP32 bridges, Picos with MicroPython or in BOOTSEL)", _cmd_detect,
             port=False)
    sp.add_argument("--json", action="store_true", help="one JSON list instead of the table")
    sp.add_argument("--no-probe", action="store_true", help="do not ask the boards for their MicroPython version")
    sp.add_argument("--bootsel-root", action="append", help="where drives are mounted (default /media, /run/media, "
                    "/mnt); repeat for several")

    helptext = "write a MicroPython image: esptool for ESP32, the UF2 copy (or picotool) for a Pico"
    sp = action(fl, "flash", "firmware", helptext, _wrap(_cmd_firmware))
    sp.description = f"{helptext}. Exit codes: {codes}."
    sp.add_argument("--dry-run", action="store_true", help="print the commands that would run, change nothing")
    sp.add_argument("--board", required=True, choices=sorted(b for b in BOARDS if b != "unix"))
    sp.add_argument("--port", help="serial port (ESP32)")
    sp.add_argument("--image", required=True, help="the MicroPython image you downloaded (.bin ESP32, .uf2 Pico)")
    sp.add_argument("--sha256", help="the image's published SHA-256: refuse a file that differs")
    sp.add_argument("--volume", help="the Pico's RPI-RP2 drive (default: found under /media, /run/media, /mnt)")
    sp.add_argument("--baud", type=int, default=460800, help="esptool's line speed")

    sp = cmd("install", "copy the firmware bundle (built with mpy-cross, umqtt.simple included) to the board",
             _cmd_install)
    sp.add_argument("--bundle", help="an already built bundle (default: build into build/firmware first)")

    sp = cmd("provision", "write the meter's config, have the device make its Ed25519 key, enroll it on the "
             "registry chain and save the provisioning record", _cmd_provision)
    for name, helptext in (("meter", "meter id, [A-Za-z0-9_-]{1,32}"), ("account", "account it bills to"),
                           ("area", "area id (the gateway's)"), ("broker", "mqtt://HOST[:PORT] or mqtts://..."),
                           ("paillier", "the area's paillier.pub.json"), ("signer", "your technician id"),
                           ("key", "your technician Ed25519 key file")):
        sp.add_argument(f"--{name}", required=True, help=helptext)
    sp.add_argument("--wifi", help="SSID:PASSWORD (boards with Wi-Fi)")
    sp.add_argument("--ca", help="CA certificate (PEM) for a TLS broker, copied to the device")
    sp.add_argument("--user", help="the meter's broker user name")
    sp.add_argument("--password-file", help="file holding the meter's broker password")
    sp.add_argument("--registry", help="broker URL of the registry chain (default: --broker)")
    sp.add_argument("--registry-mqtt", help="TOML with your [mqtt] account for the registry (host, port, "
                    "username, password, tls_ca), as `gridledger registry enroll --mqtt` takes; replaces --registry")
    sp.add_argument("--interval-s", type=int, default=900, help="reading interval (default 900: 15 minutes)")
    sp.add_argument("--rotate-key", action="store_true", help="replace a key the device already has "
                    "(the old enrollment must be retired first)")
    sp.add_argument("--out", default=RECORDS, help=f"folder for provisioning records (default {RECORDS}/)")
    sp.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the registry's certificate")
    sp.add_argument("--start", action="store_true", help="restart the board afterwards so the meter runs")

    sp = cmd("verify", "run the on-device self-test (signature, encryption, sensor, clock, broker, memory) and "
             "report each check", _cmd_verify)
    sp.add_argument("--record", help="provisioning record: the key and meter the device must have")
    sp.add_argument("--max-skew", type=float, default=300.0, help="largest clock difference accepted, seconds")

    sp = cmd("label", "print a label (PNG and text): meter, account, area, key fingerprint, QR of the enrollment",
             _cmd_label)
    sp.add_argument("--record", help="provisioning record (instead of --port)")
    sp.add_argument("--records", default=RECORDS, help="where --port looks for the record")
    sp.add_argument("--out", required=True, help="folder for METER.label.png and METER.label.txt")

    sp = action(fl, "flash", "virtual-board", "run the MicroPython Unix port behind a pseudo-terminal that mpremote "
                "drives like a board; prints the port", _wrap(_cmd_virtual_board))
    sp.add_argument("--dir", required=True, help="the board's filesystem")
    sp.add_argument("--heap", default=METER_HEAP, help=f"MicroPython heap (default {METER_HEAP}; docs/architecture.md, meter memory)")
    sp.add_argument("--link", help="also name the port with this symlink (like /dev/serial/by-id/...)")
    sp.set_defaults(dry_run=False)
