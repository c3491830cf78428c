# Device-side alerts (seed 004's notification contract), judged on the meter
# where the plaintext lives: power above or below a threshold, temperature above
# its warning level. Each excursion raises one signed alert and its end one
# signed clear; they stay in alerts.json until the gateway acks them
# (docs/alerts.md has the format and the rules).
import binascii
import gc
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


def payload(meter, seq, t, kind, value, threshold, state, sig):
    # Canonical JSON: keys sorted, no spaces. meter and kind come from restricted
    # alphabets and sig is hex, so nothing needs escaping. A str: the outbox
    # keeps it, and alerts.json holds it as a JSON string.
    return ('{"kind":"%s","meter":"%s","seq":%d,"sig":"%s","state":"%s","t":%d,'
            '"threshold":%d,"v":%d,"value":%d}' % (kind, meter, seq, sig, state, t, threshold,
                                                   VERSION, value))


def encode(meter, seq, t, kind, value, threshold, state, sig):
    return payload(meter, seq, t, kind, value, threshold, state, sig).encode()


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
        # The outbox: the seqs of the alerts not yet acked, oldest first. Their
        # payloads (about 260 bytes each) stay on flash, in alerts.json, and
        # are read when sent: 32 of them in RAM took 8-10 KB of a 128 KiB heap,
        # scattered among the loop's buffers (docs/alerts.md, "Heap").
        self.pending = [p[0] for p in st.get("pending", [])]
        self.dropped = st.get("dropped", 0)
        # Sent so far (RAM only: a reboot resends): every seq up to _sent_seq,
        # the last time at _last. Two ints, not a time per alert: a dict grown
        # in the loop is a long-lived block dropped among the loop's garbage.
        self._sent_seq = 0
        self._last = time.ticks_ms()

    def save(self, items):
        # items: the outbox's [seq, payload] pairs
        save(self._file, {"seq": self.seq, "active": self.active, "pending": items, "dropped": self.dropped})

    def _load(self, now=False):
        # The outbox's [seq, payload] pairs, oldest first, from alerts.json
        # (now: even with nothing pending in RAM any more).
        if not (self.pending or now):
            return []
        try:
            with open(self._file) as f:
                return json.load(f)["pending"]
        except Exception:
            return []  # lost with the file: those alerts cannot be sent

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
            # Judged and signed first (a signature leaves kilobytes of
            # garbage), then collected, and only then is what is kept made
            # (payloads, the new outbox and excursions): side by side at the
            # bottom of the heap, not among that garbage, whose holes would
            # split the free heap for good (docs/architecture.md, meter memory).
            seq, made = self.seq, []
            for kind, limit, hyst, above, temp in self._table:
                value = c if temp else p
                was = kind in self.active
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
                seq += 1
                state = on if now else off
                made.append((seq, kind, state, value, limit, binascii.hexlify(
                    self.key.sign(signed_bytes(self._meter, seq, t, kind, value, limit, state))).decode()))
            if not made:
                return
            gc.collect()
            active, pending, dropped = dict(self.active), self._load(), self.dropped
            for s, kind, state, value, limit, sig in made:
                if state == on:
                    active[kind] = True
                else:
                    del active[kind]
                pending.append([s, payload(self._meter, s, t, kind, value, limit, state, sig)])
            lost = []
            while len(pending) > self.capacity:
                lost.append(pending.pop(0)[0])
                dropped += 1
            save(self._file, {"seq": seq, "active": active, "pending": pending, "dropped": dropped})
        except Exception as e:
            self._log("alert_failed", error=repr(e))
            return
        # The payloads are on flash: dropped from RAM, and collected before
        # the outbox's list grows, so that it grows beside what is kept.
        pending = None
        gc.collect()
        self.seq, self.active, self.dropped = seq, active, dropped
        self.pending.extend(m[0] for m in made)
        del self.pending[:len(lost)]
        for s in lost:
            self._log("alert_dropped", seq=s, dropped=dropped)
        for s, kind, state, value, limit, sig in made:
            self._log("alert", seq=s, kind=kind, state=state, value=value, threshold=limit)

    def due(self):
        # Pending alerts to send, oldest first: those never sent, and all of
        # them once resend_s has passed since the last send without an ack.
        if not self.pending:
            return []
        if time.ticks_diff(time.ticks_ms(), self._last) >= self._resend_ms:
            self._sent_seq = 0  # no ack for resend_s: a new round from the oldest
        if self.pending[-1] <= self._sent_seq:
            return []
        items = self._load()
        if len(items) != len(self.pending):
            # alerts.json lost them (see _load): not waited for again
            self.pending = [p[0] for p in items]
        # At most 4 at a time: after an outage 32 payloads at once (their
        # bytes kept while the uplink publishes them) took 10 KB of the heap
        # just as the readings held back by the outage were being resent.
        out = [p for p in items if p[0] > self._sent_seq][:4]
        items = None
        return [(p[0], p[1].encode()) for p in out]

    def sent(self, seq):
        self._sent_seq = max(self._sent_seq, seq)
        self._last = time.ticks_ms()

    def unsent(self):
        # The link went down: send everything again once it is back.
        self._sent_seq = 0

    def acked(self, seq):
        # The gateway stored every alert up to seq. The list shrinks in place
        # (no new long-lived block) before the file is read and written.
        if self.pending and self.pending[0] <= seq:
            while self.pending and self.pending[0] <= seq:
                self.pending.pop(0)
            self.save([p for p in self._load(True) if p[0] > seq])

    def refused(self, seq, reason):
        # The gateway refused it for good (its checks are deterministic): stop resending.
        self._log("alert_nack", seq=seq, reason=reason)
        if seq in self.pending:
            self.pending.remove(seq)
            self.save([p for p in self._load(True) if p[0] != seq])
