"""A serial cable without hardware: two pseudo-terminals joined by relay threads
(the tests, the serial bench, or trying `gridledger bridge serial` on a laptop).

The meter (MicroPython Unix port) opens `meter_end`, a pty slave; the bridge opens
`gateway_end`, a symlink to the other pty's slave, the way /dev/serial/by-id/...
names a USB device, so a replug can point it at a new pty. The relay can hold the
line to a baud rate, slip bytes in between frames (after a frame's closing 0x00,
before the next frame's opening one) and unplug and replug the gateway end.
"""

from __future__ import annotations

import os
import select
import threading
import time
import tty
from collections import deque
from pathlib import Path

__all__ = ["NullModem"]


class _Pty:
    def __init__(self):
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # the relay holds the slave open: settings and the pty outlive a reader
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)

    def close(self) -> None:
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


class NullModem:
    def __init__(self, tmp: Path, baud: int | None = None):
        self.baud = baud
        self._meter = _Pty()
        self._gw: _Pty | None = _Pty()
        self._gen = 0  # bumped on every unplug and replug
        self.meter_end = self._meter.path
        self.gateway_end = tmp / "ttyGATEWAY"
        self._point(self._gw.path)
        self.inject_up: deque[bytes] = deque()    # meter -> gateway, one item per frame boundary
        self.inject_down: deque[bytes] = deque()  # gateway -> meter
        self.frames_up = 0    # closing delimiters relayed meter -> gateway
        self.frames_down = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._relay, args=(True,), daemon=True, name="null-modem-up"),
                         threading.Thread(target=self._relay, args=(False,), daemon=True, name="null-modem-down")]
        for t in self._threads:
            t.start()

    def _point(self, target: str) -> None:
        tmp = self.gateway_end.with_suffix(".new")
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, self.gateway_end)

    def unplug(self) -> None:
        """Pull the gateway end: the bridge's port hangs up and its device path disappears."""
        with self._lock:
            gw, self._gw = self._gw, None
            self._gen += 1
            self.gateway_end.unlink(missing_ok=True)
        if gw is not None:
            gw.close()

    def replug(self) -> None:
        """A new device behind the same path, as udev does after a USB replug."""
        gw = _Pty()
        with self._lock:
            self._gw = gw
            self._gen += 1
            self._point(gw.path)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2)
        self._meter.close()
        if self._gw is not None:
            self._gw.close()
        self.gateway_end.unlink(missing_ok=True)

    def _relay(self, up: bool) -> None:
        inject = self.inject_up if up else self.inject_down
        last = 0  # the previous byte relayed: a 0x00 after a non-zero byte closes a frame
        chunk = 256 if self.baud is None else max(16, self.baud // 10 // 50)
        while not self._stop.is_set():
            with self._lock:
                gen, gw = self._gen, self._gw
            if gw is None and not up:
                time.sleep(0.02)
                continue
            src = self._meter.master if up else gw.master  # unplugged, the meter still talks: into the void
            try:
                ready, _, _ = select.select([src], [], [], 0.05)
            except (OSError, ValueError):
                continue
            if not ready:
                continue
            with self._lock:
                if gen != self._gen:
                    continue
                try:
                    data = os.read(src, chunk)
                except (BlockingIOError, OSError):
                    data = b""
            if not data:
                time.sleep(0.01)
                continue
            out = bytearray()
            for b in data:
                out.append(b)
                if b == 0 and last != 0:
                    if up:
                        self.frames_up += 1
                    else:
                        self.frames_down += 1
                    if inject:
                        out += inject.popleft()
                last = b
            self._write(up, gen, bytes(out))
            if self.baud is not None:
                time.sleep(len(data) * 10 / self.baud)  # 8N1: ten bit times a byte

    def _write(self, up: bool, gen: int, data: bytes) -> None:
        """Into the far end; bytes nobody can take are lost, as on a wire."""
        deadline = time.monotonic() + 2
        while data and time.monotonic() < deadline and not self._stop.is_set():
            with self._lock:
                if gen != self._gen or self._gw is None:
                    return  # unplugged
                dst = self._gw.master if up else self._meter.master
                try:
                    n = os.write(dst, data)
                except BlockingIOError:
                    n = 0
                except OSError:
                    return
            data = data[n:]
            if data:
                time.sleep(0.005)
