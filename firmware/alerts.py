# Device-side alerts (seed 004's notification contract), judged on the meter
# where the plaintext lives: power above or below a threshold, temperature above
# its warning level. Each excursion raises one signed alert and its end one
# signed clear; they stay in alerts.json until the gateway acks them
# (docs/alerts.md has the format and the rules).
import binascii
import json
import os
import time

from clock import CLOCK_SET  # a clock before it has never been set

# Names cost heap here: every identifier, and every string of 10 characters or
# fewer, is interned for good, and a meter with alerts was 33 names past the
# five name pools a plain meter fits in; the sixth costs 7.1 KB (docs/alerts.md,
# "Heap"). So this module defines few names of its own: it reuses names the
# meter already interns (save, _table, _file, _last, key, sensor, capacity...),
# and its short wire words are split out of longer strings, which stay plain
# str objects (a str made at run time is never interned).
VERSION = 1


def signed_bytes(meter, seq, t, kind, value, threshold, state):
    return "\n".join(("gl-alert-v1", meter, str(seq), str(t), kind, str(value),
                      str(threshold), state)).encode()


def encode(meter, seq, t, kind, value, threshold, state, sig):
    # Canonical JSON: keys sorted, no spaces. meter and kind come from restricted
    # alphabets and sig is hex, so nothing needs escaping.
    return ('{"kind":"%s","meter":"%s","seq":%d,"sig":"%s","state":"%s","t":%d,'
            '"threshold":%d,"v":%d,"value":%d}' % (kind, meter, seq, sig, state, t, threshold,
                                                   VERSION, value)).encode()


def save(path, state):
    # Atomic: after a power cut the old file or the new one, whole. Written
    # as a stream: json.dumps of a full outbox is one 8-10 KB string, a hole
    # a 128 KiB heap with pending alerts scattered in it does not have.
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.rename(tmp, path)


def _read(sensor, name):
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
        # The rules, one row per threshold the config sets: [kind, limit,
        # hysteresis, above (a high alert), temperature (else power)]. Kinds:
        # power_high and power_low in W (net import, export negative),
        # temp_high in tenths of a degree (every value on the wire is an int).
        self._table = []
        ph = int(cfg.get("power_hyst_w", 50))
        th = round(cfg.get("temp_hyst_c", 2) * 10)
        for kind, limit, hyst, above, temp in zip("power_high power_low temp_high".split(),
                                                  (cfg.get("power_high_w"), cfg.get("power_low_w"),
                                                   cfg.get("temp_high_c")),
                                                  (ph, ph, th), (1, 0, 1), (0, 0, 1)):
            if limit is not None:
                self._table.append((kind, round(limit * 10) if temp else int(limit), hyst, above, temp))
        self._meter = meter
        self.key = key
        self.sensor = sensor
        self._log = log
        self._resend_ms = int(cfg.get("resend_s", 10) * 1000)
        self.capacity = cfg.get("max_pending", 32)
        self._file = state_dir + "/alerts.json"
        # seq is written before its alert can leave, so it never repeats across
        # reboots; active survives a reboot so an excursion is not raised twice.
        try:
            with open(self._file) as f:
                st = json.load(f)
            seq = st["seq"]
        except OSError:
            st, seq = {}, 0  # first boot
        except Exception as e:
            # Unreadable: the old seq is lost. Continue from the clock's seconds,
            # above any count this meter can have reached (a few alerts a day),
            # so no seq repeats; the gateway accepts the gap.
            st, seq = {}, int(time.time()) if time.time() > CLOCK_SET else 0
            log("alerts_state_lost", error=repr(e), seq=seq)
        self.seq = seq
        self.active = st.get("active", {})
        self.pending = st.get("pending", [])  # [[seq, payload str]], oldest first
        self.dropped = st.get("dropped", 0)
        self._last = {}  # seq -> ticks_ms of the last send (RAM only: a reboot resends)

    def save(self):
        save(self._file, {"seq": self.seq, "active": self.active,
                          "pending": self.pending, "dropped": self.dropped})

    def evaluate(self, t, dt, imp, exp):
        # Called once per reading, after the interval's energy is read. An alert
        # that cannot be made (a full flash, say) is logged: it never stops
        # measuring. New state in copies, written to flash, and only then
        # taken: an alert whose seq is not on flash can never be sent.
        if not self._table:
            return
        try:
            # A sensor without power_w (the simulator) is judged on the
            # interval's average power; one whose power_w says None has no
            # power value now. None (unavailable) changes no state.
            p = _read(self.sensor, "power_w") if hasattr(self.sensor, "power_w") else (imp - exp) * 3600 / dt
            c = _read(self.sensor, "temp_c")
            p = None if p is None else round(p)
            c = None if c is None else round(c * 10)
            off, on = "cleared raised".split()
            seq, active, pending, dropped = self.seq, dict(self.active), list(self.pending), self.dropped
            made = []
            for kind, limit, hyst, above, temp in self._table:
                value = c if temp else p
                was = active.get(kind, False)
                # Entered strictly past the limit, left only once back by more
                # than hyst, so noise at the limit cannot chatter.
                if value is None:
                    now = was
                elif above:
                    now = value >= limit - hyst if was else value > limit
                else:
                    now = value <= limit + hyst if was else value < limit
                if now == was:
                    continue
                if now:
                    active[kind] = True
                else:
                    del active[kind]
                seq += 1
                state = on if now else off
                sig = binascii.hexlify(self.key.sign(signed_bytes(self._meter, seq, t, kind, value, limit,
                                                                  state))).decode()
                pending.append([seq, encode(self._meter, seq, t, kind, value, limit, state, sig).decode()])
                made.append((seq, kind, state, value, limit))
            if not made:
                return
            lost = []
            while len(pending) > self.capacity:
                lost.append(pending.pop(0)[0])
                dropped += 1
            save(self._file, {"seq": seq, "active": active, "pending": pending, "dropped": dropped})
        except Exception as e:
            self._log("alert_failed", error=repr(e))
            return
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
            sent = self._last.get(seq)
            if sent is None or time.ticks_diff(now, sent) >= self._resend_ms:
                out.append((seq, payload.encode()))
        return out

    def sent(self, seq):
        self._last[seq] = time.ticks_ms()

    def unsent(self):
        # The link went down: send everything again once it is back.
        self._last = {}

    def acked(self, seq):
        # The gateway stored every alert up to seq.
        keep = [p for p in self.pending if p[0] > seq]
        if len(keep) != len(self.pending):
            self.pending = keep
            for s in list(self._last):
                if s <= seq:
                    del self._last[s]
            self.save()

    def refused(self, seq, reason):
        # The gateway refused it for good (its checks are deterministic): stop resending.
        self._log("alert_nack", seq=seq, reason=reason)
        keep = [p for p in self.pending if p[0] != seq]
        if len(keep) != len(self.pending):
            self.pending = keep
            self._last.pop(seq, None)
            self.save()
