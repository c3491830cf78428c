"""A board without hardware: the MicroPython Unix port's REPL behind a
pseudo-terminal, driven by `mpremote connect PORT resume ...` like a USB board.

Two ptys are bridged by relay threads: the interpreter's stdin and stdout
(the board's side) and the port a host tool opens (the USB side, whose slave the
board holds open so the device stays put between connections). The folder given
is the board's filesystem (the interpreter's working directory). What is
emulated, and why, is in docs/flash.md ("The virtual board").
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import threading
import time
import tty
from pathlib import Path

from .firmware_build import METER_HEAP, micropython

__all__ = ["VirtualBoard"]

_CHUNK = 4096


def _open_pty() -> tuple[int, int]:
    master, slave = os.openpty()
    tty.setraw(slave)  # bytes as they are: no echo, no CR/LF mapping, no signals
    os.set_blocking(master, False)
    return master, slave


def _die_with_parent() -> None:
    # In the child: a board whose host process is killed loses power too
    # (Linux: PR_SET_PDEATHSIG), instead of running on as an orphan.
    libc = ctypes.CDLL(None)
    libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _catches_sigint(pid: int) -> bool:
    # The Unix port installs its SIGINT handler only while it runs code (the
    # moment a board arms its Ctrl-C interrupt) and restores the default at
    # the prompt, where the default would kill it.
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    except OSError:
        pass
    return False


class VirtualBoard:
    """`with VirtualBoard(folder) as vb:` ... `vb.port` is the device path."""

    def __init__(self, folder: Path, *, heap: str = METER_HEAP, log=None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.heap = heap
        self.boots = 0
        self._log = log or (lambda msg: None)
        self._board_master, self._board_slave = _open_pty()
        self._usb_master, self._usb_slave = _open_pty()
        self._last_interrupt = 0.0
        self.port = os.ttyname(self._usb_slave)
        self._proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._boot()
        self._threads = [threading.Thread(target=self._relay, args=(self._usb_master, self._board_master, True),
                                          daemon=True, name="vboard-down"),
                         threading.Thread(target=self._relay, args=(self._board_master, self._usb_master, False),
                                          daemon=True, name="vboard-up"),
                         threading.Thread(target=self._supervise, daemon=True, name="vboard-power")]
        for t in self._threads:
            t.start()

    def __enter__(self) -> "VirtualBoard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _boot(self) -> None:
        # As a board does at power-up: run main.py if the filesystem has one,
        # then (when it ends or fails) the REPL.
        script = ["main.py"] if (self.folder / "main.py").exists() else []
        env = dict(os.environ, MICROPYPATH=":lib:.frozen")
        self._proc = subprocess.Popen([micropython(), "-X", f"heapsize={self.heap}", "-i", *script],
                                      stdin=self._board_slave, stdout=self._board_slave, stderr=self._board_slave,
                                      cwd=self.folder, env=env, start_new_session=True,
                                      preexec_fn=_die_with_parent)
        self.boots += 1
        self._log(f"boot {self.boots}: pid {self._proc.pid}{' main.py' if script else ''}")

    def _supervise(self) -> None:
        # An interpreter that exits (sys.exit, machine.soft_reset, a crash) is
        # a board resetting: boot again.
        while not self._stop.is_set():
            with self._lock:
                proc = self._proc
            if proc.poll() is None:
                time.sleep(0.05)
                continue
            with self._lock:
                if self._stop.is_set():
                    return
                self._log(f"reset: exit status {proc.returncode}")
                self._boot()

    def _interrupt(self, data: bytes) -> bytes:
        # A board's USB driver takes Ctrl-C out of the input and raises
        # KeyboardInterrupt in the running code; at the prompt the byte goes
        # through to the REPL. One SIGINT per burst: a second one before the
        # first is handled makes the Unix port exit.
        with self._lock:
            proc = self._proc
        if b"\x03" not in data or proc is None or not _catches_sigint(proc.pid):
            return data
        now = time.monotonic()
        if now - self._last_interrupt > 0.25:
            self._last_interrupt = now
            self._log(f"Ctrl-C: SIGINT to pid {proc.pid}")
            os.kill(proc.pid, signal.SIGINT)
        return data.replace(b"\x03", b"")

    def _relay(self, src: int, dst: int, down: bool) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([src], [], [], 0.1)
                if not ready:
                    continue
                data = os.read(src, _CHUNK)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.05)
                continue
            if down:
                self._write_all(dst, self._interrupt(data))
            else:
                try:
                    os.write(dst, data)
                except OSError:
                    pass  # nobody reading the port: output is lost, as on a USB console with no host

    def _write_all(self, dst: int, data: bytes) -> None:
        # Towards the board nothing may be lost (a file copy in raw-paste mode):
        # wait while the interpreter drains its input.
        deadline = time.monotonic() + 5
        while data and not self._stop.is_set() and time.monotonic() < deadline:
            try:
                data = data[os.write(dst, data):]
            except BlockingIOError:
                time.sleep(0.005)
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            proc = self._proc
        if proc and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for t in self._threads:
            t.join(2)
        for fd in (self._board_master, self._board_slave, self._usb_master, self._usb_slave):
            try:
                os.close(fd)
            except OSError:
                pass
