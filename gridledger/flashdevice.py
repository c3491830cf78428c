"""A board on a serial port as flash.sh sees it: the port's checks (absent, no
permission, busy), the commands that drive it (mpremote, esptool, the UF2 copy)
run or only printed (--dry-run), boards found on USB, and the answers of the
on-device provisioning module (firmware/provision.py).
"""

from __future__ import annotations

import errno
import fcntl
import grp
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import GridledgerError

__all__ = ["FlashError", "UsageError", "NoBoard", "PortBusy", "PermissionDenied", "WrongBoard", "ImageError",
           "NotInBootsel", "DeviceError", "RegistryError", "CheckFailed", "Runner", "Board", "BOARDS", "check_port", "tool",
           "Detected", "classify", "detect", "bootsel_volumes", "EXIT_CODES"]


class FlashError(GridledgerError):
    """A failure a technician can act on: `reason` is stable, `exit_code` is flash.sh's."""
    exit_code = 1
    reason = "failed"


class CheckFailed(FlashError):
    reason, exit_code = "check_failed", 1


class UsageError(FlashError):
    reason, exit_code = "usage", 2


class NoBoard(FlashError):
    reason, exit_code = "no_board", 3


class PortBusy(FlashError):
    reason, exit_code = "port_busy", 4


class PermissionDenied(FlashError):
    reason, exit_code = "permission_denied", 5


class WrongBoard(FlashError):
    reason, exit_code = "wrong_board", 6


class ImageError(FlashError):
    reason, exit_code = "image", 7


class NotInBootsel(FlashError):
    reason, exit_code = "not_in_bootsel", 8


class DeviceError(FlashError):
    reason, exit_code = "device", 9


class RegistryError(FlashError):
    reason, exit_code = "registry", 10


EXIT_CODES = {0: "ok"} | {cls.exit_code: cls.reason for cls in (
    CheckFailed, UsageError, NoBoard, PortBusy, PermissionDenied, WrongBoard, ImageError, NotInBootsel,
    DeviceError, RegistryError)}


@dataclass(frozen=True, slots=True)
class BoardKind:
    family: str        # "esp32" | "pico" | "unix"
    platform: str      # what sys.platform says on the device
    chip: str = ""     # esptool's --chip
    offset: str = ""   # where the MicroPython image goes in flash (ESP32 family)
    image: str = ""    # the image file type: ".bin" or ".uf2"


BOARDS = {
    "esp32": BoardKind("esp32", "esp32", "esp32", "0x1000", ".bin"),       # ESP32-DevKitC (WROOM-32) and kin
    "esp32-s3": BoardKind("esp32", "esp32", "esp32s3", "0x0", ".bin"),
    "esp32-c3": BoardKind("esp32", "esp32", "esp32c3", "0x0", ".bin"),
    "pico": BoardKind("pico", "rp2", image=".uf2"),
    "pico-w": BoardKind("pico", "rp2", image=".uf2"),
    "pico2-w": BoardKind("pico", "rp2", image=".uf2"),
    "unix": BoardKind("unix", "linux"),  # the virtual board (gridledger flash virtual-board)
}


def tool(name: str, extra: str) -> str:
    """A command from the venv (beside this Python) or PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise UsageError(f"{name} not found: pip install 'gridledger[{extra}]'")
    return found


class Runner:
    """Runs external commands, or with dry_run prints each as `would run: ...`."""

    def __init__(self, *, dry_run: bool = False, out=None):
        self.dry_run = dry_run
        self.out = out or sys.stdout

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def run(self, argv: list[str], *, timeout: float = 600, capture: bool = True) -> subprocess.CompletedProcess | None:
        if self.dry_run:
            self.say("would run: " + shlex.join(argv))
            return None
        try:
            return subprocess.run(argv, capture_output=capture, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"{Path(argv[0]).name} did not finish within {timeout:.0f} s: unplug the board, "
                              "plug it in again and retry") from None


def _group_of(path: str) -> str:
    try:
        return grp.getgrgid(os.stat(path).st_gid).gr_name
    except (OSError, KeyError):
        return "dialout"


def check_port(port: str) -> None:
    """Refuse early, with what to do, a port that is absent, not ours to open, or held by another program."""
    if not os.path.exists(port):
        raise NoBoard(f"no board at {port}: plug it in with a data cable (not a charge-only one), "
                      "then `./flash.sh detect` lists what is attached")
    try:
        fd = os.open(port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except PermissionError:
        group = _group_of(port)
        raise PermissionDenied(f"permission denied on {port}: join the '{group}' group that owns it "
                               f"(sudo usermod -aG {group} $USER), then log out and back in") from None
    except OSError as exc:
        raise NoBoard(f"cannot open {port}: {exc.strerror}") from None
    try:
        # mpremote, esptool and pyserial's exclusive mode take this lock.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise PortBusy(f"{port} is busy: another program has it open (a serial monitor, Thonny, "
                           "another mpremote, a running `gridledger bridge serial`); close it and retry") from None
        raise
    finally:
        os.close(fd)


class Board:
    """A MicroPython board driven by mpremote; provisioning ops go through firmware/provision.py."""

    TAG = "GLPROV "

    def __init__(self, port: str, runner: Runner):
        self.port = port
        self.runner = runner
        self._mpremote = tool("mpremote", "firmware")

    def mpremote(self, *args: str) -> list[str]:
        # `resume`: no soft reset first (it would restart main.py on a board).
        return [self._mpremote, "connect", self.port, "resume", *args]

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess | None:
        res = self.runner.run(self.mpremote(*args), timeout=timeout)
        if res is not None and res.returncode != 0:
            raise DeviceError(f"mpremote {' '.join(args[:2])} on {self.port} failed: "
                              f"{(res.stderr or res.stdout).strip()[-400:]}")
        return res

    def identify(self, timeout: float = 30) -> dict | None:
        """What any MicroPython answers, firmware or not: platform, version, machine; None in a dry run."""
        res = self.run("exec", "import sys, json; print('GLID ' + json.dumps([sys.platform, "
                       "'.'.join(str(v) for v in sys.implementation.version[:3]), sys.implementation._machine]))",
                       timeout=timeout)
        if res is None:
            return None
        line = next((line[5:] for line in res.stdout.splitlines() if line.startswith("GLID ")), None)
        if line is None:
            raise DeviceError(f"no MicroPython REPL answered on {self.port}: {res.stdout.strip()[-200:]}")
        platform, version, machine = json.loads(line)
        return {"platform": platform, "version": version, "machine": machine}

    def call(self, op: str, timeout: float = 300, **kw) -> dict | None:
        """One provisioning op on the device; None in a dry run."""
        request = json.dumps({"op": op, **kw})
        res = self.runner.run(self.mpremote("exec", f"import provision; provision.run({request!r})"),
                              timeout=timeout)
        if res is None:
            return None
        answer = next((line[len(self.TAG):] for line in res.stdout.splitlines() if line.startswith(self.TAG)), None)
        if answer is None:
            text = (res.stderr + res.stdout).strip()
            if "no module named 'provision'" in text:
                raise DeviceError(f"no gridledger firmware on {self.port}: run ./flash.sh install --port {self.port}")
            raise DeviceError(f"{op} on {self.port}: no answer from the device: {text[-400:]}")
        try:
            out = json.loads(answer)
        except ValueError:
            raise DeviceError(f"{op} on {self.port}: a garbled answer: {answer[:200]!r}") from None
        if not out["ok"]:
            raise DeviceError(f"{op} on {self.port} refused: {out['reason']}: {out['error']}")
        return out["result"]


# -- boards on USB -------------------------------------------------------------

USB_IDS = {
    (0x10C4, 0xEA60): ("esp32", "ESP32 board (CP210x USB-UART)"),
    (0x1A86, 0x7523): ("esp32", "ESP32 board (CH340 USB-UART)"),
    (0x1A86, 0x55D4): ("esp32", "ESP32 board (CH9102 USB-UART)"),
    (0x0403, 0x6001): ("esp32", "ESP32 board (FTDI FT232R USB-UART)"),
    (0x303A, 0x1001): ("esp32", "ESP32-S3/C3 (native USB)"),
    (0x2E8A, 0x0005): ("pico", "Raspberry Pi Pico running MicroPython"),
}


@dataclass(frozen=True, slots=True)
class Detected:
    port: str
    usb: str            # "VID:PID" or "" for a BOOTSEL volume
    family: str
    guess: str
    micropython: str = ""  # version, when the board answered
    note: str = ""


def classify(vid: int | None, pid: int | None) -> tuple[str, str] | None:
    return USB_IDS.get((vid, pid)) if vid is not None else None


def _version(port: str, runner: Runner) -> tuple[str, str]:
    """(MicroPython version, note): ask the board; a busy port is skipped, not waited for."""
    try:
        if not runner.dry_run:
            check_port(port)
        found = Board(port, runner).identify(timeout=15)
    except (PortBusy, PermissionDenied, NoBoard) as exc:
        return "", f"skipped: {exc.reason.replace('_', ' ')}"
    except FlashError:
        return "", "no MicroPython REPL answered"
    if found is None:
        return "", "not asked (dry run)"
    return found["version"], f"platform {found['platform']}"


def bootsel_volumes(roots: list[Path]) -> list[tuple[Path, str]]:
    """Mounted RP2 boot drives (RPI-RP2, RP2350): folders up to three levels down holding INFO_UF2.TXT."""
    found = []
    for root in roots:
        if not root.is_dir():
            continue
        for info in [*root.glob("INFO_UF2.TXT"), *root.glob("*/INFO_UF2.TXT"), *root.glob("*/*/INFO_UF2.TXT"),
                     *root.glob("*/*/*/INFO_UF2.TXT")]:
            board = next((line.split(":", 1)[1].strip() for line in info.read_text(errors="replace").splitlines()
                          if line.startswith("Board-ID:")), "RP2")
            found.append((info.parent, board))
    return found


def detect(ports, roots: list[Path], runner: Runner, *, probe: bool = True) -> list[Detected]:
    """Serial ports with a known USB bridge or board, and RP2 boards waiting in BOOTSEL."""
    out = []
    for p in ports:
        kind = classify(p.vid, p.pid)
        if kind is None:
            continue
        family, guess = kind
        version, note = _version(p.device, runner) if probe else ("", "")
        out.append(Detected(p.device, f"{p.vid:04X}:{p.pid:04X}", family, guess, version, note))
    for path, board in bootsel_volumes(roots):
        out.append(Detected(str(path), "", "pico", f"RP2 board in BOOTSEL ({board})", "",
                            "ready for ./flash.sh firmware --board pico"))
    return out
