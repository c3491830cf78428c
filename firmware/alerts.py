# Device-side alerts (seed 004's notification contract), judged on the meter
# where the plaintext lives: power above or below a threshold, temperature above
# its warning level. Each excursion raises one signed alert and its end one
# signed clear; they stay in alerts.json until the gateway acks them
# (docs/alerts.md has the format and the rules).
import binascii
import json
import os
import time

VERSION = 1
POWER_HIGH = "power_high"  # value and threshold in W (net import, export negative)
POWER_LOW = "power_low"    # W
TEMP_HIGH = "temp_high"    # tenths of a degree Celsius: every value on the wire is an int
RAISED = "raised"
CLEARED = "cleared"
_CLOCK_SET = 1704067200  # 2024-01-01: a clock before it has never been set


def signed_bytes(meter, seq, t, kind, value, threshold, state):
    return "\n".join(("gl-alert-v1", meter, str(seq), str(t), kind, str(value),
                      str(threshold), state)).encode()


def encode(meter, seq, t, kind, value, threshold, state, sig):
    # Canonical JSON: keys sorted, no spaces. meter and kind come from restricted
    # alphabets and sig is hex, so nothing needs escaping.
    return ('{"kind":"%s","meter":"%s","seq":%d,"sig":"%s","state":"%s","t":%d,'
            '"threshold":%d,"v":%d,"value":%d}' % (kind, meter, seq, sig, state, t, threshold,
                                                   VERSION, value)).encode()


def judge(active, value, limit, hyst, above):
    # The excursion state after seeing value: entered strictly past the limit,
    # left only once back by more than hyst, so noise at the limit cannot chatter.
    # An unavailable value (None) changes nothing.
    if value is None:
        return active
    if above:
        return value >= limit - hyst if active else value > limit
    return value <= limit + hyst if active else value < limit


def _rules(cfg):
    # (kind, limit, hysteresis, above) for every threshold the config sets
    out = []
    ph = cfg.get("power_hyst_w", 50)
    if cfg.get("power_high_w") is not None:
        out.append((POWER_HIGH, int(cfg["power_high_w"]), int(ph), True))
    if cfg.get("power_low_w") is not None:
        out.append((POWER_LOW, int(cfg["power_low_w"]), int(ph), False))
    if cfg.get("temp_high_c") is not None:
        out.append((TEMP_HIGH, round(cfg["temp_high_c"] * 10), round(cfg.get("temp_hyst_c", 2) * 10), True))
    return out


def _save_atomic(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(obj))
    os.rename(tmp, path)


def _call(sensor, name):
    # A sensor's optional reading; a missing method or a faulty read is unavailable.
    f = getattr(sensor, name, None)
    if f is None:
        return None
    try:
        return f()
    except Exception:
        return None


class Alerts:
    def __init__(self, cfg, state_dir, meter, key, sensor, log):
        self._rules = _rules(cfg)
        self._meter = meter
        self._key = key
        self._sensor = sensor
        self._log = log
        self._resend_ms = int(cfg.get("resend_s", 10) * 1000)
        self._max_pending = cfg.get("max_pending", 32)
        self._path = state_dir + "/alerts.json"
        # seq is written before its alert can leave, so it never repeats across
        # reboots; active survives a reboot so an excursion is not raised twice.
        try:
            with open(self._path) as f:
                st = json.load(f)
            seq = st["seq"]
        except OSError:
            st, seq = {}, 0  # first boot
        except Exception as e:
            # Unreadable: the old seq is lost. Continue from the clock's seconds,
            # above any count this meter can have reached (a few alerts a day),
            # so no seq repeats; the gateway accepts the gap.
            st, seq = {}, int(time.time()) if time.time() > _CLOCK_SET else 0
            log("alerts_state_lost", error=repr(e), seq=seq)
        self.seq = seq
        self.active = st.get("active", {})
        self.pending = st.get("pending", [])  # [[seq, payload str]], oldest first
        self.dropped = st.get("dropped", 0)
        self._sent = {}  # seq -> ticks_ms of the last send (RAM only: a reboot resends)

    def _save(self):
        _save_atomic(self._path, {"seq": self.seq, "active": self.active,
                                  "pending": self.pending, "dropped": self.dropped})

    def _values(self, dt, imp_wh, exp_wh):
        # A sensor without power_w (the simulator) is judged on the interval's
        # average power; one whose power_w says None has no power value now.
        if hasattr(self._sensor, "power_w"):
            p = _call(self._sensor, "power_w")
        else:
            p = (imp_wh - exp_wh) * 3600 / dt
        temp = _call(self._sensor, "temp_c")
        return (None if p is None else round(p),
                None if temp is None else round(temp * 10))

    def evaluate(self, t, dt, imp_wh, exp_wh):
        # Called once per reading, after it is safely stored. An alert that
        # cannot be made (a full flash, say) is logged: it never stops measuring.
        if not self._rules:
            return
        try:
            self._evaluate(t, dt, imp_wh, exp_wh)
        except Exception as e:
            self._log("alert_failed", error=repr(e))

    def _evaluate(self, t, dt, imp_wh, exp_wh):
        # New state in copies, written to flash, and only then taken: an alert
        # whose seq is not on flash can never be sent.
        power, temp = self._values(dt, imp_wh, exp_wh)
        seq, active, pending, dropped = self.seq, dict(self.active), list(self.pending), self.dropped
        made = []
        for kind, limit, hyst, above in self._rules:
            value = temp if kind == TEMP_HIGH else power
            was = active.get(kind, False)
            now = judge(was, value, limit, hyst, above)
            if now == was:
                continue
            if now:
                active[kind] = True
            else:
                del active[kind]
            seq += 1
            state = RAISED if now else CLEARED
            sig = binascii.hexlify(self._key.sign(signed_bytes(self._meter, seq, t, kind, value, limit,
                                                               state))).decode()
            pending.append([seq, encode(self._meter, seq, t, kind, value, limit, state, sig).decode()])
            made.append((seq, kind, state, value, limit))
        if not made:
            return
        lost = []
        while len(pending) > self._max_pending:
            lost.append(pending.pop(0)[0])
            dropped += 1
        _save_atomic(self._path, {"seq": seq, "active": active, "pending": pending, "dropped": dropped})
        self.seq, self.active, self.pending, self.dropped = seq, active, pending, dropped
        for s in lost:
            self._log("alert_dropped", seq=s, dropped=dropped)
        for s, kind, state, value, limit in made:
            self._log("alert", seq=s, kind=kind, state=state, value=value, threshold=limit)

    def due(self):
        # Pending alerts not sent within resend_s, oldest first.
        now = time.ticks_ms()
        out = []
        for seq, payload in self.pending:
            sent = self._sent.get(seq)
            if sent is None or time.ticks_diff(now, sent) >= self._resend_ms:
                out.append((seq, payload.encode()))
        return out

    def sent(self, seq):
        self._sent[seq] = time.ticks_ms()

    def unsent(self):
        # The link went down: send everything again once it is back.
        self._sent = {}

    def acked(self, seq):
        # The gateway stored every alert up to seq.
        keep = [p for p in self.pending if p[0] > seq]
        if len(keep) != len(self.pending):
            self.pending = keep
            for s in list(self._sent):
                if s <= seq:
                    del self._sent[s]
            self._save()

    def refused(self, seq, reason):
        # The gateway refused it for good (its checks are deterministic): stop resending.
        self._log("alert_nack", seq=seq, reason=reason)
        keep = [p for p in self.pending if p[0] != seq]
        if len(keep) != len(self.pending):
            self.pending = keep
            self._sent.pop(seq, None)
            self._save()
