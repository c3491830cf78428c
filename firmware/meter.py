# The meter: every interval, measure, encrypt, sign, spool, publish; drop a
# reading only when the gateway acknowledges it as durable.
import json
import os
import sys
import time

import ed25519
import paillier
import wire
from alerts import Alerts
from spool import Spool, exists

# Where log lines go instead of stdout (a serial uplink on the USB console
# sends them as frames); None: print.
_sink = None


def log(ev, **kw):
    kw["ev"] = ev
    if _sink is None:
        print(json.dumps(kw))
    else:
        _sink(json.dumps(kw))


def _load(path):
    with open(path) as f:
        return json.load(f)


def _save_atomic(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(obj))
    os.rename(tmp, path)


class Clock:
    # Wall-clock time, optionally accelerated for the testbed: virtual time
    # runs `scale` times faster from (real_start, virtual_start). Both are in
    # the config, so a restarted meter sees the same timeline.
    def __init__(self, cfg):
        self.scale = cfg.get("scale", 1)
        self.real0 = cfg.get("real_start", 0)
        self.virt0 = cfg.get("virtual_start", self.real0)

    def now(self):
        return int(self.virt0 + (time.time() - self.real0) * self.scale)

    def real_until(self, vt):
        # real seconds until virtual time vt
        return (vt - self.now()) / self.scale


def _make_uplink(cfg, meter, on_ack, status):
    # "uplink": {"kind": "serial", ...} for a wired meter (docs/serial.md);
    # MQTT, to cfg["broker"], is the default. Imported lazily: a wired board
    # need not carry umqtt.
    up = cfg.get("uplink") or {}
    kind = up.get("kind", "mqtt")
    if kind == "serial":
        from seriallink import SerialUplink
        return SerialUplink(up, cfg["area"], meter, on_ack, log, status)
    if kind == "mqtt":
        from uplink import Uplink
        return Uplink(cfg["broker"], cfg["area"], meter, on_ack, log, status)
    raise ValueError("unknown uplink kind: " + kind)


def _make_sensor(cfg):
    kind = cfg.get("type", "sim")
    if kind == "sim":
        from simsensor import SimSensor
        return SimSensor(cfg.get("seed", 1), cfg.get("solar_wp", 0), cfg.get("tz_offset_s", 0))
    raise ValueError("unknown sensor type: " + kind)


class Meter:
    def __init__(self, cfg):
        self.cfg = cfg
        self.meter = cfg["meter"]
        self.dir = cfg.get("state_dir", ".")
        self.interval = cfg.get("interval_s", 900)
        self.bands = cfg.get("bands") or [0] * 24
        self.tz = cfg.get("tz_offset_s", 0)
        with open(cfg.get("key_file", self.dir + "/ed25519.key"), "rb") as f:
            self.key = ed25519.SigningKey(f.read())
        pc = cfg["paillier"]
        self.n = int(pc["n"])
        self.kid = wire.kid_of(self.n)
        if pc.get("kid", self.kid) != self.kid:
            raise ValueError("paillier kid does not match n")
        self.pool = paillier.RhoPool(self.n, pc.get("pool", 4), pc.get("exp_bits"))
        self.sensor = _make_sensor(cfg.get("sensor", {}))
        self.clock = Clock(cfg.get("clock", {}))
        self.stop_at = cfg.get("clock", {}).get("stop_at")
        self.spool = Spool(self.dir + "/spool")
        self._state_path = self.dir + "/state.json"
        st = _load(self._state_path) if exists(self._state_path) else {}
        self.seq = st.get("seq", 0)
        self.prev = st.get("prev", wire.ZERO_HASH)
        self.spool.discard_after(self.seq)
        last_t = st.get("t")
        if last_t is None:
            # First boot: the first interval is the one under way (a testbed
            # clock may not have started yet).
            last_t = max(self.clock.now(), self.clock.virt0) // self.interval * self.interval
        self.next_end = last_t + self.interval
        self.truth_path = self.dir + "/truth.jsonl" if cfg.get("sensor", {}).get("type", "sim") == "sim" else None
        self._sent = {}
        self.uplink = _make_uplink(cfg, self.meter, self._acked, self._health)
        self.alerts = Alerts(cfg.get("alerts") or {}, self.dir, self.meter, self.key, self.sensor, log)
        self.uplink.alerts = self.alerts
        global _sink
        _sink = getattr(self.uplink, "log_sink", None)
        self._resend_ms = int(cfg.get("resend_s", 5) * 1000)

    def _acked(self, seq):
        n = self.spool.drop_through(seq)
        for s in list(self._sent):
            if s <= seq:
                del self._sent[s]
        if n:
            log("acked", seq=seq, dropped=n, spooled=len(self.spool))

    def _health(self):
        return {"seq": self.seq, "spooled": len(self.spool)}

    def _band(self, t0):
        return self.bands[((t0 + self.tz) % 86400) // 3600]

    def take_reading(self, t_end):
        t0 = t_end - self.interval
        imp, exp = self.sensor.energy(t0, t_end)
        band = self._band(t0)
        slots = {wire.slot(band, 0): imp, wire.slot(band, 1): exp}
        c = self.pool.encrypt(wire.pack(slots))
        seq = self.seq + 1
        payload, h = wire.reading(self.key, self.meter, seq, t_end, self.interval,
                                  self.prev, self.kid, c)
        if self.truth_path:
            # Written first: a crash before the spool write reuses this seq, and
            # the later line for the same seq wins.
            with open(self.truth_path, "a") as f:
                f.write(json.dumps({"seq": seq, "t": t_end, "band": band,
                                    "import_wh": imp, "export_wh": exp}) + "\n")
        self.spool.put(seq, payload)
        _save_atomic(self._state_path, {"seq": seq, "prev": h, "t": t_end})
        self.seq = seq
        self.prev = h
        log("reading", seq=seq, t=t_end, spooled=len(self.spool))
        self.alerts.evaluate(t_end, self.interval, imp, exp)

    def _send_pending(self, budget=8):
        now = time.ticks_ms()
        for seq in self.spool.seqs:
            if budget == 0:
                return
            sent = self._sent.get(seq)
            if sent is not None and time.ticks_diff(now, sent) < self._resend_ms:
                continue
            if not self.uplink.publish(self.spool.get(seq)):
                self._sent.clear()
                return
            self._sent[seq] = now
            budget -= 1

    def finished(self):
        return (self.stop_at is not None and self.next_end > self.stop_at and not len(self.spool)
                and not self.alerts.pending)

    def step(self):
        # One reading per step: a meter that has fallen behind (signing and
        # encrypting are slow on a busy CPU) still services its uplink between
        # readings, so acks drain the spool and the broker never times it out.
        if self.clock.now() >= self.next_end and (self.stop_at is None or self.next_end <= self.stop_at):
            self.take_reading(self.next_end)
            self.next_end += self.interval
        self.uplink.poll()
        self._send_pending()
        self.uplink.poll()
        # Idle work: precompute encryption randomness before the next interval.
        if not self.pool.full() and self.clock.real_until(self.next_end) > 0.3:
            self.pool.refill_one()
        else:
            time.sleep_ms(20)

    def run(self):
        log("boot", meter=self.meter, seq=self.seq, spooled=len(self.spool), kid=self.kid)
        while not self.finished():
            self.step()
        self.uplink.close()
        log("done", seq=self.seq)


def main(argv=None):
    argv = argv if argv is not None else sys.argv
    path = argv[1] if len(argv) > 1 else "config.json"
    Meter(_load(path)).run()
