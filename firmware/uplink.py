# MQTT uplink over umqtt.simple that never blocks forever: every socket has a
# time-out (umqtt's own blocking reads included), and any failure only closes
# the link; the spool keeps the readings and the next service() reconnects.
import json
import socket
import time
from umqtt import simple


class _TimedSocket:
    # umqtt switches between blocking and non-blocking; "blocking" here means
    # "blocking for at most timeout_s".
    def __init__(self, timeout_s):
        self._s = socket.socket()
        self._t = timeout_s
        self._s.settimeout(timeout_s)

    def connect(self, addr):
        self._s.connect(addr)

    def setblocking(self, flag):
        self._s.settimeout(self._t if flag else 0)

    def read(self, n):
        return self._s.read(n)

    def write(self, *args):
        return self._s.write(*args)

    def close(self):
        self._s.close()


class _SocketModule:
    def __init__(self, timeout_s):
        self._t = timeout_s

    def socket(self):
        return _TimedSocket(self._t)

    def getaddrinfo(self, host, port):
        return socket.getaddrinfo(host, port)


class Uplink:
    def __init__(self, cfg, area, meter, on_ack, log):
        simple.socket = _SocketModule(cfg.get("timeout_s", 5))
        self._cfg = cfg
        self._base = "gl/v1/%s/meters/%s/" % (area, meter)
        self.readings_topic = self._base + "readings"
        self._meter = meter
        self._on_ack = on_ack
        self._log = log
        self._client = None
        self._next_try = 0
        self._backoff_ms = 500
        self._last_io = 0
        self._got = 0

    def connected(self):
        return self._client is not None

    def _cb(self, topic, msg):
        self._got += 1
        try:
            body = json.loads(msg)
            seq = body["seq"]
        except Exception:
            self._log("bad_ack", topic=topic)
            return
        if topic.endswith(b"/ack"):
            self._on_ack(seq)
        else:
            self._log("nack", seq=seq, reason=body.get("reason"))

    def close(self):
        c = self._client
        self._client = None
        if c is not None:
            try:
                c.sock.close()
            except Exception:
                pass

    def _fail(self, what, exc):
        self._log("uplink_down", during=what, error=repr(exc))
        self.close()
        self._next_try = time.ticks_add(time.ticks_ms(), self._backoff_ms)
        self._backoff_ms = min(self._backoff_ms * 2, 30000)

    def ensure(self):
        if self._client is not None:
            return True
        if time.ticks_diff(time.ticks_ms(), self._next_try) < 0:
            return False
        cfg = self._cfg
        c = simple.MQTTClient(self._meter, cfg["host"], port=cfg.get("port", 1883),
                              user=cfg.get("user"), password=cfg.get("password"),
                              keepalive=cfg.get("keepalive", 60))
        c.set_callback(self._cb)
        try:
            c.connect()
            c.subscribe(self._base + "ack", qos=1)
            c.subscribe(self._base + "nack", qos=1)
        except Exception as e:
            self._client = c
            self._fail("connect", e)
            return False
        self._client = c
        self._backoff_ms = 500
        self._last_io = time.ticks_ms()
        self._log("uplink_up", broker=cfg["host"], port=cfg.get("port", 1883))
        return True

    def publish(self, payload, topic=None):
        # QoS 1: returns once the broker has the message (PUBACK), or False.
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
        # Deliver every message already waiting (acks), without blocking.
        if not self.ensure():
            return
        try:
            while True:
                before = self._got
                self._client.check_msg()
                if self._got == before:
                    break
            idle = time.ticks_diff(time.ticks_ms(), self._last_io)
            if idle > self._cfg.get("keepalive", 60) * 500:
                self._client.ping()
                self._last_io = time.ticks_ms()
        except Exception as e:
            self._fail("poll", e)
