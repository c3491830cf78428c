# MQTT uplink over umqtt.simple that never blocks for long: every call into it
# (publish, poll) has one deadline of at most timeout_s for all the socket work
# it does, umqtt's own blocking reads included; any failure only closes the
# link, and the next call after a jittered, growing back-off reconnects. The
# spool keeps the readings meanwhile. TLS, login, last will, health and alert
# sending are described in docs/uplink.md.
import binascii
import json
import os
import socket
import time
from umqtt import simple

# Loaded with the uplink, not at the first connect: code loaded in the loop
# lands in whatever hole the free heap has, and splits it for good.
import answers
import health
from micropython import const


# The RP2040 watchdog cannot wait more than 8.3 s; a call that returns within
# 5 s leaves the main loop time to feed it whatever the network does.
_MAX_TIMEOUT_S = const(5)
# Back-off before reconnecting: doubles from _BACKOFF_MIN_MS after every failure
# up to backoff_max_s (config), and the wait is drawn in [d/2, d] ("equal
# jitter") so that meters cut off together do not come back together.
_BACKOFF_MIN_MS = const(500)
_BACKOFF_MAX_S = const(60)
_HEALTH_S = const(300)
ETIMEDOUT = 110


class _TimedSocket:
    # What umqtt sees as its socket. umqtt switches between blocking and
    # non-blocking; "blocking" here means "until the current call's deadline".
    # With TLS, reads and writes go through the TLS layer while the time-outs
    # stay on the TCP socket below it.
    def __init__(self, link):
        self._link = link
        self._raw = socket.socket()
        self._io = self._raw
        self._blocking = True

    def _arm(self):
        if not self._blocking:
            self._raw.settimeout(0)
            return
        left = time.ticks_diff(self._link.deadline, time.ticks_ms())
        if left <= 0:
            raise OSError(ETIMEDOUT)
        self._raw.settimeout(left / 1000)

    def connect(self, addr):
        self._arm()
        self._raw.connect(addr)
        ctx = self._link.tls
        if ctx is not None:
            # The handshake's reads each wait at most what is left of the deadline.
            self._arm()
            self._io = ctx.wrap_socket(self._raw, server_hostname=self._link.server_name)

    def setblocking(self, flag):
        self._blocking = flag

    def read(self, n):
        self._arm()
        return self._io.read(n)

    def write(self, buf, n=None):
        self._arm()
        if n is not None:
            buf = memoryview(buf)[:n]
        return self._io.write(buf)

    def close(self):
        try:
            self._io.close()
        finally:
            if self._io is not self._raw:
                self._raw.close()


class _SocketModule:
    # Stands in for umqtt's socket module: its sockets are _TimedSockets.
    def __init__(self, link):
        self._link = link

    def socket(self):
        return _TimedSocket(self._link)

    def getaddrinfo(self, host, port):
        # Not bounded by the deadline (a DNS lookup cannot be): configure an IP
        # address where a slow resolver could hold the loop up.
        return socket.getaddrinfo(host, port)


def _der(data):
    # MicroPython's TLS takes a DER certificate; accept PEM as well.
    if data.startswith(b"-----BEGIN"):
        body = b"".join(l for l in data.split(b"\n") if l and not l.startswith(b"-----"))
        return binascii.a2b_base64(body)
    return data


def _tls_context(cfg):
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_REQUIRED
    with open(cfg["ca"], "rb") as f:
        ctx.load_verify_locations(cadata=_der(f.read()))
    return ctx


def _jitter(delay_ms):
    half = delay_ms // 2
    r = int.from_bytes(os.urandom(2), "big")
    return half + (delay_ms - half) * r // 65535


class Uplink:
    def __init__(self, cfg, area, meter, on_ack, log, status=None):
        self._sockets = _SocketModule(self)
        self._cfg = cfg
        self._base = "gl/v1/%s/meters/%s/" % (area, meter)
        self.readings_topic = self._base + "readings"
        self._meter = meter
        self._on_ack = on_ack
        self._log = log
        self._status = status
        self.alerts = None  # the meter's Alerts, if it has any: sent and acked here
        self.on_event = None  # the meter's answer handler for its signed events
        self._timeout_ms = int(min(cfg.get("timeout_s", _MAX_TIMEOUT_S), _MAX_TIMEOUT_S) * 1000)
        self._max_backoff_ms = int(cfg.get("backoff_max_s", _BACKOFF_MAX_S) * 1000)
        self._health_ms = int(cfg.get("health_s", _HEALTH_S) * 1000)
        self._keepalive_ms = cfg.get("keepalive", 60) * 1000
        # The TLS context is made at the first connect, not at boot (the heap's
        # tightest moment), and kept.
        self.tls = None
        self.server_name = cfg.get("server_name", cfg["host"])
        self._port = cfg.get("port", 8883 if cfg.get("ca") else 1883)
        self.deadline = 0
        self._client = None
        self._next_try = 0
        self._delay_ms = _BACKOFF_MIN_MS
        self._last_io = 0
        self._next_health = 0
        self._got = 0
        self._last_acked = None
        self._up_ms = 0
        self._up_tick = time.ticks_ms()
        self.reconnects = 0
        self._offline = json.dumps({"v": 1, "meter": meter, "state": "offline"})

    def connected(self):
        return self._client is not None

    def _start(self):
        # One deadline for all the socket work of this call.
        self.deadline = time.ticks_add(time.ticks_ms(), self._timeout_ms)

    def _cb(self, topic, msg):
        self._got += 1
        seq = answers.handle(msg, topic.endswith(b"/ack"), self._on_ack, self.alerts, self._log, self.on_event)
        if seq is not None and (self._last_acked is None or seq > self._last_acked):
            self._last_acked = seq

    def close(self):
        c = self._client
        self._client = None
        if c is not None:
            try:
                c.sock.close()
            except Exception:
                pass

    def _fail(self, what, exc):
        now = time.ticks_ms()
        took = time.ticks_diff(now, self.deadline) + self._timeout_ms
        wait = _jitter(self._delay_ms)
        self._next_try = time.ticks_add(now, wait)
        self._delay_ms = min(self._delay_ms * 2, self._max_backoff_ms)
        self.close()
        if self.alerts is not None:
            self.alerts.unsent()
        self._log("uplink_down", during=what, error=repr(exc), took_ms=took, retry_ms=wait, at_ms=now)

    def ensure(self):
        if self._client is not None:
            return True
        if time.ticks_diff(time.ticks_ms(), self._next_try) < 0:
            return False  # backing off: the meter keeps measuring meanwhile
        cfg = self._cfg
        if cfg.get("ca") and self.tls is None:
            # A CA that cannot be loaded (a missing or corrupt file) must not stop
            # the meter measuring: this connect fails instead, and TLS is never
            # silently dropped.
            try:
                self.tls = _tls_context(cfg)
            except Exception as e:
                self._fail("tls_setup", e)
                return False
        c = simple.MQTTClient(self._meter, cfg["host"], port=self._port,
                              user=cfg.get("user"), password=cfg.get("password"),
                              keepalive=cfg.get("keepalive", 60))
        c.set_callback(self._cb)
        # The will replaces the retained health message, so whoever subscribes
        # later still learns the meter is gone; the health sent right after the
        # connect replaces the will of an earlier death.
        c.set_last_will(self._base + "health", self._offline, retain=True, qos=1)
        # umqtt makes its socket in connect() from its module's `socket`: ours
        # for that call only. Left in place, umqtt's module would hold this
        # uplink, and through it the whole meter, after the meter is stopped
        # (mpremote's Ctrl-C on a board, before provision's self-test).
        simple.socket = self._sockets
        try:
            c.connect()
            c.subscribe(self._base + "ack", qos=1)
            c.subscribe(self._base + "nack", qos=1)
        except Exception as e:
            self._client = c
            self._fail("connect", e)
            return False
        finally:
            simple.socket = socket
        self._client = c
        self._delay_ms = _BACKOFF_MIN_MS
        self._last_io = time.ticks_ms()
        self._next_health = self._last_io  # health goes out at once
        self.reconnects += 1
        self._log("uplink_up", broker=cfg["host"], port=self._port, tls=self.tls is not None)
        return True

    def publish(self, payload, topic=None):
        # QoS 1: returns once the broker has the message (PUBACK), or False.
        self._start()
        if not self.ensure():
            return False
        try:
            self._client.publish(topic or self.readings_topic, payload, qos=1)
        except Exception as e:
            self._fail("publish", e)
            return False
        self._last_io = time.ticks_ms()
        return True

    def publish_event(self, payload):
        # A signed meter event (docs/journal.md), QoS 1 like a reading.
        return self.publish(payload, self._base + "events")

    def poll(self):
        # Deliver every message already waiting (acks), send what is due
        # (health, alerts), keep the connection alive; never blocks for long.
        self._tick()
        self._start()
        if not self.ensure():
            return
        try:
            while True:
                before = self._got
                self._client.check_msg()
                if self._got == before:
                    break
            now = time.ticks_ms()
            if time.ticks_diff(now, self._next_health) >= 0:
                self._client.publish(self._base + "health", self._health_message(), retain=True, qos=1)
                self._next_health = time.ticks_add(now, self._health_ms)
                self._last_io = now
            if self.alerts is not None:
                for seq, payload in self.alerts.due():
                    self._client.publish(self._base + "alerts", payload, qos=1)
                    self.alerts.sent(seq)
                    self._last_io = time.ticks_ms()
            idle = time.ticks_diff(time.ticks_ms(), self._last_io)
            if idle > self._keepalive_ms // 2:
                self._client.ping()
                self._last_io = time.ticks_ms()
        except Exception as e:
            self._fail("poll", e)

    def _tick(self):
        # Uptime from tick differences summed every poll, so the ticks wrap
        # (2^30 ms on boards, 12 days) never shows.
        now = time.ticks_ms()
        self._up_ms += time.ticks_diff(now, self._up_tick)
        self._up_tick = now

    def _health_message(self):
        return json.dumps(health.report(self._meter, self._status, self._log, self._up_ms,
                                        self._last_acked, self.reconnects, self.alerts))
