# Serial uplink for a meter without a network (a Pico on the gateway's USB or a
# UART): frames (frame.py, docs/serial.md) to the gateway's serial bridge, which
# publishes them to the broker exactly as an MQTT meter would and writes the
# gateway's acks back. Same interface as uplink.Uplink (connected, publish,
# poll, close). Nothing here blocks for long: reads take only what is waiting,
# a write gives up after timeout_s, and any failure closes the port; the next
# poll reopens it with back-off. The spool keeps every reading until its ack.
import json
import time

import frame

PROTO = 1


class _TtyPort:
    # Unix port: a tty device path (a pty in the tests, a USB-serial adapter on a
    # PC). Raw mode with VMIN=0 and VTIME=0 makes read() return at once with
    # whatever is waiting, so readinto never blocks; writes go in small pieces,
    # each after poll() says there is room, until the deadline.
    def __init__(self, path, baud):
        import select
        import termios
        f = open(path, "r+b")
        try:
            fd = f.fileno()
            termios.setraw(fd)
            attrs = termios.tcgetattr(fd)
            attrs[6][5] = 0  # VTIME (Linux index)
            attrs[6][6] = 0  # VMIN
            speed = getattr(termios, "B%d" % baud, None)
            if speed is not None:
                attrs[4] = attrs[5] = speed
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
        except Exception:
            f.close()
            raise
        self._f = f
        self._r = select.poll()
        self._r.register(f, select.POLLIN)
        self._w = select.poll()
        self._w.register(f, select.POLLOUT)
        self._gone = select.POLLHUP | select.POLLERR

    def readinto(self, buf):
        ev = self._r.poll(0)
        if not ev:
            return 0
        if ev[0][1] & self._gone:
            raise OSError("hangup")
        return self._f.readinto(buf) or 0

    def write(self, data, deadline):
        mv = memoryview(data)
        i = 0
        while i < len(mv):
            left = time.ticks_diff(deadline, time.ticks_ms())
            if left <= 0:
                raise OSError("write timed out")
            ev = self._w.poll(left)
            if not ev:
                continue
            if ev[0][1] & self._gone:
                raise OSError("hangup")
            k = min(64, len(mv) - i)  # POLLOUT promises little room: a small piece never stalls
            self._f.write(mv[i:i + k])
            i += k

    def close(self):
        self._f.close()


class _UartPort:
    # A board's UART (GPIO pins to a USB-serial adapter or an RS-485 transceiver).
    # timeout=0: reads return what the receive buffer holds. A UART without flow
    # control always drains, so a write ends after len/baud seconds.
    def __init__(self, cfg):
        from machine import UART, Pin
        kw = {"baudrate": cfg.get("baud", 115200), "timeout": 0, "rxbuf": cfg.get("rxbuf", 1024)}
        if "tx" in cfg:
            kw["tx"] = Pin(cfg["tx"])
            kw["rx"] = Pin(cfg["rx"])
        self._u = UART(cfg.get("uart", 0), **kw)

    def readinto(self, buf):
        return self._u.readinto(buf) or 0

    def write(self, data, deadline):
        self._u.write(data)

    def close(self):
        self._u.deinit()


class _ConsolePort:
    # The board's USB CDC console (a Pico plugged into the gateway shows up there
    # as /dev/ttyACM0). Ctrl-C handling is switched off: a 0x03 inside a frame
    # must not raise KeyboardInterrupt. Reads go byte by byte while poll() says
    # one is waiting, since a read of more would wait for all of them.
    def __init__(self):
        import micropython
        import select
        import sys
        micropython.kbd_intr(-1)
        self._in = sys.stdin.buffer
        self._out = sys.stdout.buffer
        self._p = select.poll()
        self._p.register(sys.stdin, select.POLLIN)

    def readinto(self, buf):
        n = 0
        while n < len(buf) and self._p.poll(0):
            b = self._in.read(1)
            if not b:
                break
            buf[n] = b[0]
            n += 1
        return n

    def write(self, data, deadline):
        self._out.write(data)

    def close(self):
        import micropython
        micropython.kbd_intr(3)


def _open_port(cfg):
    if "device" in cfg:
        return _TtyPort(cfg["device"], cfg.get("baud", 115200))
    if "uart" in cfg:
        return _UartPort(cfg)
    return _ConsolePort()


class SerialUplink:
    def __init__(self, cfg, area, meter, on_ack, log, status=None):
        self._cfg = cfg
        self._meter = meter
        self._on_ack = on_ack
        self._log = log
        self._status = status
        self._port = None
        self._dec = frame.Decoder(cfg.get("rx_max", 512))
        self._rx = bytearray(256)
        self._got = []
        self._hello = json.dumps({"proto": PROTO, "meter": meter, "area": area}).encode()
        self._hello_ms = int(cfg.get("hello_s", 2) * 1000)
        self._health_ms = int(cfg.get("health_s", 60) * 1000)
        self._timeout_ms = int(cfg.get("timeout_s", 5) * 1000)
        self._welcomed = None  # ticks_ms of the bridge's last welcome
        self._next_hello = 0
        self._next_health = 0
        self._next_try = 0
        self._backoff_ms = 500
        self._up_ms = 0
        self._up_tick = time.ticks_ms()
        self._last_acked = None
        self.reconnects = 0
        self._in_log = False
        self.rejected = {}  # reason -> count, reported in health frames
        self.alerts = None  # the meter's Alerts, if it has any: sent and acked here
        self.on_event = None  # the meter's answer handler for its signed events
        # With the console as the link, print() would put log lines on the wire
        # between frames: the meter sends them as LOG frames instead.
        self.log_sink = self._log_frame if not ("device" in cfg or "uart" in cfg) else None

    def connected(self):
        # The link is usable while the bridge keeps answering our hellos: it
        # welcomes only with the broker up and this meter's acks subscribed.
        w = self._welcomed
        return (self._port is not None and w is not None
                and time.ticks_diff(time.ticks_ms(), w) < 3 * self._hello_ms)

    def close(self):
        p = self._port
        self._port = None
        self._welcomed = None
        if p is not None:
            try:
                p.close()
            except Exception:
                pass

    def _fail(self, what, exc):
        self.close()
        if self.alerts is not None:
            self.alerts.unsent()
        self._next_try = time.ticks_add(time.ticks_ms(), self._backoff_ms)
        self._backoff_ms = min(self._backoff_ms * 2, 30000)
        self._log("uplink_down", during=what, error=repr(exc))

    def ensure(self):
        if self._port is not None:
            return True
        if time.ticks_diff(time.ticks_ms(), self._next_try) < 0:
            return False
        try:
            self._port = _open_port(self._cfg)
        except Exception as e:
            self._fail("open", e)
            return False
        self._backoff_ms = 500
        self._next_hello = time.ticks_ms()
        return True

    def _send(self, ftype, payload, what):
        try:
            self._port.write(frame.encode(ftype, payload), time.ticks_add(time.ticks_ms(), self._timeout_ms))
            return True
        except Exception as e:
            self._fail(what, e)
            return False

    def _log_frame(self, line):
        # Best effort and never recursive: a log line lost is not a reading lost.
        if self._port is None or self._in_log:
            return
        self._in_log = True
        try:
            self._port.write(frame.encode(frame.LOG, line.encode()), time.ticks_add(time.ticks_ms(), 200))
        except Exception:
            pass
        self._in_log = False

    def publish(self, payload):
        # True once the frame is on the line; only the gateway's ack drops the reading.
        if not self.ensure() or not self.connected():
            return False
        return self._send(frame.READING, payload, "publish")

    def publish_event(self, payload):
        # A signed meter event (a set-register, docs/journal.md): the bridge publishes it
        # on the meter's events topic; its answer comes back as an ack or nack frame.
        if not self.ensure() or not self.connected():
            return False
        return self._send(frame.EVENT, payload, "event")

    def poll(self):
        # Handle every frame already waiting, then keep the link alive; never blocks.
        now = time.ticks_ms()
        self._up_ms += time.ticks_diff(now, self._up_tick)  # summed every poll: the ticks wrap never shows
        self._up_tick = now
        if not self.ensure():
            return
        try:
            for _ in range(16):
                n = self._port.readinto(self._rx)
                if not n:
                    break
                self._dec.feed(self._rx[:n], self._got)
        except Exception as e:
            self._fail("read", e)
            return
        got = self._got
        self._got = []
        for ftype, payload in got:
            self._handle(ftype, payload)
            if self._port is None:
                return
        now = time.ticks_ms()
        if self._welcomed is not None and not self.connected():
            self._welcomed = None
            self._log("uplink_down", during="welcome", error="bridge silent")
        if time.ticks_diff(now, self._next_hello) >= 0:
            self._next_hello = time.ticks_add(now, self._hello_ms)
            if not self._send(frame.HELLO, self._hello, "hello"):
                return
        if self._status is not None and self.connected() and time.ticks_diff(now, self._next_health) >= 0:
            self._next_health = time.ticks_add(now, self._health_ms)
            import health
            st = health.report(self._meter, self._status, self._log, self._up_ms, self._last_acked,
                               self.reconnects, self.alerts)
            st["rejected"] = self.rejected
            if not self._send(frame.HEALTH, json.dumps(st).encode(), "health"):
                return
        if self.alerts is not None and self.connected():
            for seq, payload in self.alerts.due():
                if not self._send(frame.ALERT, payload, "alert"):
                    return
                self.alerts.sent(seq)

    def _handle(self, ftype, payload):
        if ftype is None:
            self.rejected[payload] = self.rejected.get(payload, 0) + 1
            self._log("link_reject", reason=payload)
        elif ftype == frame.ACK or ftype == frame.NACK:
            import answers
            seq = answers.handle(payload, ftype == frame.ACK, self._on_ack, self.alerts, self._log, self.on_event)
            if seq is not None and (self._last_acked is None or seq > self._last_acked):
                self._last_acked = seq
        elif ftype == frame.WELCOME:
            if self._welcomed is None:
                self.reconnects += 1
                self._log("uplink_up", link="serial")
            self._welcomed = time.ticks_ms()
        elif ftype == frame.QUERY:
            self._next_hello = time.ticks_ms()
        else:
            self.rejected["unexpected_type"] = self.rejected.get("unexpected_type", 0) + 1
            self._log("link_reject", reason="unexpected_type", type=chr(ftype))
