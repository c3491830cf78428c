# The meter: every interval, measure, encrypt, sign, journal, publish; drop a
# reading only when the gateway acknowledges it as durable.
import gc
import json
import sys
import time

import ed25519
import paillier
import wire
from clock import Clock
from meterstate import MeterState, StateError
from watchdog import Watchdog
from micropython import const

# Readings published and not yet acknowledged at most: the gateway acks in
# batches, and a window keeps a backlog from flooding a slow link.
WINDOW = 16
# A published event holds back the records after it until the gateway acks
# or refuses it, so the reading ack that drops it from the journal comes only
# once the gateway has stored it; unanswered, it is sent again every resend_s,
# and after this many sends the meter goes on (a gateway without events).
_EVENT_SENDS = const(3)

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


def _make_sensor(cfg, board):
    # The config's "sensor" object picks the driver; pins default to the board
    # profile's wiring (docs/sensors.md, hardware/wiring.md).
    import sensors
    return sensors.make(cfg.get("sensor", {}), board, log)


def _make_alerts(cfg, m):
    # Device alerts (docs/alerts.md) only where the config asks for them:
    # imported lazily, their code costs a meter without them no heap.
    if not cfg.get("alerts"):
        return None
    from alerts import Alerts
    return Alerts(cfg["alerts"], m.dir, m.meter, m.key, m.sensor, log)


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
        # The boot's steps (expanding the key, parsing the Paillier key,
        # recovering the journal, checking the board profile) leave garbage:
        # collected after each, what the next step keeps goes beside what is
        # already kept rather than among that garbage, whose holes would split
        # the free heap for good (docs/architecture.md, meter memory).
        gc.collect()
        pc = cfg["paillier"]
        self.n = int(pc["n"])
        self.kid = wire.kid_of(self.n)
        if pc.get("kid", self.kid) != self.kid:
            raise ValueError("paillier kid does not match n")
        self.pool = paillier.RhoPool(self.n, pc.get("pool", 4), pc.get("exp_bits"))
        gc.collect()
        self._pool_step_s = 0.0
        self.clock = Clock(cfg.get("clock", {}))
        self.stop_at = cfg.get("clock", {}).get("stop_at")
        self.state = _open_state(cfg, self.n)
        gc.collect()
        if self.state.head_pos is not None:
            # A power cut came between the newest reading's journal write and
            # its counters write, and that reading is compact: the counters
            # roll forward to it once its ciphertext is computed again (the
            # pool's boot and one exponentiation: about a second here, 7-70 s
            # on a board, before the watchdog starts). Here, at boot, because
            # what follows counts from them: the next interval (_align) and
            # the sensor's checkpoint (resume). Settled later, the next reading
            # repeated the unsettled one's interval (the gateway refused it as
            # clock_skew, and every reading after it as seq_gap) and counted
            # its energy twice. Found by tests/test_meter_crash.py.
            self.state.settle_head(self.kid, lambda m, seed, exp_bits: self.pool.encrypt_again(m, seed, exp_bits, True))
            gc.collect()
        pos = self.state.journal.first()
        if pos is not None:
            # The oldest unacknowledged record goes first, and a compact
            # reading's ciphertext needs the pool's boot and an exponentiation:
            # done here (the pool keeps the value), so the first loop step sends
            # it. Left to the loop, it came 0.6-1 s after the boot's first
            # reading here (the pool's steps shared with the readings a boot
            # is behind by), and a meter whose power failed sooner than that
            # after each boot never sent anything again: every reading after
            # the oldest waits for it (tests/test_meter_crash.py).
            self.state.message(pos, self.kid, lambda m, seed, exp_bits: self.pool.encrypt_again(m, seed, exp_bits, True))
            gc.collect()
        # next_end None: the clock has never been set, so no interval can be
        # named yet; the sensor counts on, and the first sync makes one reading
        # of it all (_first_sync). _since: that reading's start.
        self.next_end = None
        self._since = None
        if self.clock.synced():
            self._align()
        self.truth_path = self.dir + "/truth.jsonl" if cfg.get("sensor", {}).get("type", "sim") == "sim" else None
        self.uplink = _make_uplink(cfg, self.meter, self._acked, self._health)
        global _sink
        _sink = getattr(self.uplink, "log_sink", None)
        # After the uplink: a sensor or watchdog line at boot goes where logs go.
        import boards
        self.board = boards.select(cfg)
        # ~10 KiB of profile checks, needed once: loaded code lives in RAM.
        del sys.modules["boards"]
        gc.collect()
        self.sensor = _make_sensor(cfg, self.board)
        ck = self.state.c.ckpt
        if ck is not None:
            # Count on from the totals the last reading counted up to: the
            # energy used while the meter was down goes into the next reading.
            self.sensor.resume(ck[0], ck[1])
            log("sensor_resumed", import_wh=ck[0], export_wh=ck[1])
        self.watchdog = Watchdog(self.board, cfg.get("watchdog_ms"), log)
        self.alerts = _make_alerts(cfg, self)
        self.uplink.alerts = self.alerts
        self._resend_ms = int(cfg.get("resend_s", 5) * 1000)
        # Go-back-N: records are sent in journal order from a cursor; when no
        # ack moves the floor for resend_s (or a publish fails), the cursor goes
        # back to the oldest unacknowledged record. The gateway stores a resent
        # reading once (same seq, same signed bytes) and acks it again.
        self._cursor = None
        self._sent_seq = 0  # highest reading seq sent since the last rewind
        self._progress_ms = time.ticks_ms()
        self._events_warned = False
        self._eseq_done = 0  # highest event eseq the gateway acked or refused
        self._held = 0  # eseq of the event the send loop waits on
        self._held_ms = 0
        self._held_sends = 0
        self.uplink.on_event = self._event_answer
        # Collect once a quarter of the free heap has been allocated since the
        # last collection, not only when an allocation fails: garbage then
        # never fills every small hole, so what the loop keeps (a socket after
        # a reconnect, the journal's index) goes into those and not into the
        # one free run the 1-1.4 KB blocks of each reading need (docs/alerts.md,
        # "Heap"). The amount counts from the last collection: the recipe of
        # MicroPython's gc docs (mem_free() // 4 + mem_alloc(), set in run()
        # until now) was more than the free heap, so never reached. Set here,
        # not in run(): a loop that steps a Meter of its own (the tests) runs
        # with it too.
        gc.collect()
        gc.threshold(gc.mem_free() // 4)

    @property
    def seq(self):
        return self.state.c.seq

    def _acked(self, seq):
        j = self.state.journal
        before = j.live
        if not self.state.acked(seq):
            log("bad_ack", seq=seq, our_seq=self.seq)
            return
        self._progress_ms = time.ticks_ms()
        if j.live != before:
            log("acked", seq=seq, dropped=before - j.live, spooled=j.live)

    def _event_answer(self, eseq, reason):
        # The gateway's ack (reason None: it holds every event up to eseq) or
        # refusal of the event the send loop waits on: either way that one is
        # done with, never sent again. A refusal of another eseq (not ours to
        # send now) changes nothing.
        if reason is not None:
            log("event_refused", eseq=eseq, reason=reason)
            if eseq != self._held:
                return
        if eseq > self._eseq_done:
            self._eseq_done = eseq

    def _health(self):
        c, j = self.state.c, self.state.journal
        return {"seq": c.seq, "spooled": j.live, "journal_depth": j.live, "journal_full": j.full(),
                "dropped": j.dropped, "last_acked": c.acked, "boot": c.boot,
                "import_wh": c.import_wh, "export_wh": c.export_wh, "clock": self.clock.quality}

    def _align(self):
        # The clock is set: the next reading ends one interval after the last
        # (first boot: after the boundary before now; a testbed clock may not
        # have started yet).
        last_t = self.state.c.t
        if not last_t:
            last_t = max(self.clock.now(), self.clock.virt0) // self.interval * self.interval
        self.next_end = last_t + self.interval

    def _first_sync(self):
        # The clock has just been set for the first time since boot. Everything
        # the sensor counted meanwhile goes into one reading, tq "unsynced",
        # from the last reading's end (first boot: the boot, estimated from
        # ticks) to the first boundary after now; then aligned as usual.
        now = self.clock.now()
        boot = now - self.clock.since_boot()
        since = self.state.c.t or boot
        end = now // self.interval * self.interval + self.interval
        if since >= end:  # the clock now reads before the last reading: wait for it
            self._align()
        else:
            self._since, self.next_end = since, end
        log("clock_synced", quality=self.clock.quality, t=now, boot=boot, since=since, next_end=self.next_end)

    def _band(self, t0):
        return self.bands[((t0 + self.tz) % 86400) // 3600]

    def take_reading(self, t_end):
        # The interval ending at t_end; or, after an unsynced boot, the span
        # since _since, of no better-known time.
        st = self.state
        t0, tq = t_end - self.interval, self.clock.quality
        if self._since is not None:
            t0, tq, self._since = self._since, "unsynced", None
        dt = t_end - t0
        imp, exp = self.sensor.energy(t0, t_end)
        if self.alerts is not None:
            self.alerts.evaluate(t_end, dt, imp, exp)
        band = self._band(t0)
        slots = {wire.slot(band, 0): imp, wire.slot(band, 1): exp}
        if not st.room():
            # Full, keeping the oldest: loudly, and the registers still count.
            st.skip_reading(t_end, imp, exp, self.sensor.checkpoint())
            log("journal_full", t=t_end, dropped=st.journal.dropped, spooled=st.journal.live)
            return
        m = wire.pack(slots)
        c, seed = self.pool.encrypt(m)
        seq = st.c.seq + 1
        prev = wire.hexs(st.c.prev)
        ch = b"%x" % c
        c = None  # its 512 bytes, and the pool's garbage, are not needed to sign
        gc.collect()
        sig, h = wire.sign(self.key, self.meter, seq, t_end, dt, prev, self.kid, ch, tq)
        if self.truth_path:
            # Written first: a crash before the journal write reuses this seq,
            # and the later line for the same seq wins.
            with open(self.truth_path, "a") as f:
                f.write(json.dumps({"seq": seq, "t": t_end, "dt": dt, "band": band,
                                    "import_wh": imp, "export_wh": exp}) + "\n")
        dropped = st.journal.dropped
        if not st.commit_reading(seq, t_end, dt, prev, sig, h, m, seed, self.pool.exp_bits, imp, exp,
                                 self.sensor.checkpoint(), tq):
            log("journal_write_failed", seq=seq, t=t_end, dropped=st.journal.dropped)
            return
        if st.journal.dropped != dropped:
            log("journal_full", seq=seq, dropped=st.journal.dropped, kept="newest")
        log("reading", seq=seq, t=t_end, dt=dt, tq=tq, spooled=st.journal.live)

    def _rewind(self):
        self._cursor = None
        self._sent_seq = 0

    def _send_pending(self, budget=8):
        st = self.state
        j = st.journal
        now = time.ticks_ms()
        if self._held and not self._hold(now):
            return
        if self._sent_seq > j.floor and time.ticks_diff(now, self._progress_ms) >= self._resend_ms:
            self._rewind()  # no ack for resend_s: the readings or their acks were lost
        if not self.uplink.connected():
            # Not rebuilt only to fail: each resend's payload is 1-1.4 KB
            # blocks, which the outage's every cycle allocated and dropped.
            # poll() reconnects; from there the send goes on in order.
            self._rewind()
            return
        while budget:
            pos = j.first() if self._cursor is None else j.after(self._cursor)
            if pos is None:
                return
            key = j.key(pos)  # before publishing: an ack may delete its segment meanwhile
            if key > j.floor + WINDOW:
                return
            # A compact reading's ciphertext: the newest one's from RAM, any
            # other computed again from its seed in the pool's bounded steps
            # (step's idle work); meanwhile the send loop waits, in order.
            msg = st.message(pos, self.kid, self.pool.encrypt_again)
            if msg is False:
                if self._sent_seq > j.floor:
                    # The resend clock stops meanwhile: a window that takes
                    # longer than resend_s to compute must not be rewound
                    # before it has all been sent.
                    self._progress_ms = now
                return
            if msg is None:
                log("journal_damaged", key=key)
            elif msg[0]:
                eseq = msg[0]
                if eseq <= self._eseq_done:
                    pass  # the gateway has it (or refused it): not again
                elif hasattr(self.uplink, "publish_event"):
                    if not self.uplink.publish_event(msg[1]):
                        self._rewind()
                        return
                    if eseq != self._held:
                        self._held, self._held_sends = eseq, 0
                    self._held_sends += 1
                    self._held_ms = now
                    self._cursor = pos
                    return  # what follows waits for its answer (_hold)
                elif not self._events_warned:
                    self._events_warned = True
                    log("events_not_sent", why="uplink has no event channel")
            else:
                if not self.uplink.publish(msg[1]):
                    self._rewind()
                    return
                if self._sent_seq <= j.floor:
                    self._progress_ms = now  # the resend clock starts with the first unacked send
                self._sent_seq = key
            self._cursor = pos
            budget -= 1

    def _hold(self, now):
        # True when the send loop may go on past the event it waits on.
        if self._eseq_done >= self._held:
            self._held = 0
            return True
        if self._held_ms is None:
            return True  # sending again up to it, over as many steps as that takes
        if time.ticks_diff(now, self._held_ms) < self._resend_ms:
            return False
        if self._held_sends < _EVENT_SENDS:
            # Sent again, with anything unacknowledged before it: until it is
            # published again (held_ms), no new wait and no new rewind.
            self._rewind()
            self._held_ms = None
            return True
        log("event_unanswered", eseq=self._held, sends=self._held_sends)
        self._eseq_done, self._held = self._held, 0
        return True

    def finished(self):
        return (self.stop_at is not None and self.next_end is not None and self.next_end > self.stop_at
                and not self.state.journal.live and not (self.alerts is not None and self.alerts.pending))

    def step(self):
        # One reading per step: a meter that has fallen behind (signing and
        # encrypting are slow on a busy CPU) still services its uplink between
        # readings, so acks drain the journal and the broker never times it out.
        self.sensor.poll()
        self.clock.sync(log)
        if self.next_end is None:
            if self.clock.synced():
                self._first_sync()
        elif self.clock.now() >= self.next_end and (self.stop_at is None or self.next_end <= self.stop_at):
            self.take_reading(self.next_end)
            self.next_end += self.interval
        self.uplink.poll()
        self._send_pending()
        self.uplink.poll()
        self.watchdog.feed()  # a completed loop; the idle work below is bounded
        gc.collect()
        # Idle work: precompute encryption randomness (or a resend's ciphertext),
        # one bounded step of the pool at a time, and only while the next
        # interval is further away than twice a recent long step and a little
        # more (or no reading is due any more), so the pool never makes a
        # reading late; or when the meter is behind (readings overdue, one per
        # step): then steps between readings, the resend's first, keep resends
        # going while it catches up (one step a reading, as before, took ten
        # readings for one resend here: after a boot the meter is behind by
        # however long the boot took, and a short-lived boot sent nothing).
        # The margin never exceeds half the interval: one slow step
        # (a loaded host, a flash stall) must not stop the idle work, and with
        # it every resend, for good; and on an accelerated test clock (0.5 s
        # intervals) the fixed part shrinks with the interval, or a resend
        # backlog, each resend a refill's work, could never drain.
        # Steps run back to back for up to 50 ms, each only while the margin
        # still holds (or the meter is behind): on a loaded host the loop's polls and collection cost
        # more than a step, and one step per loop left resends (each a refill's
        # work) starved behind the refills (a board's step alone takes longer).
        ne = self.next_end
        wait = None if ne is None else self.clock.real_until(ne)
        behind = wait is not None and wait < 0
        iv = self.interval / self.clock.scale  # the interval in real seconds
        margin = min(2 * self._pool_step_s + min(0.3, iv / 10), iv / 2)
        if wait is None or (self.stop_at is not None and ne > self.stop_at) or behind or wait > margin:
            t0 = t = time.ticks_ms()
            while self.pool.step(behind):
                t1 = time.ticks_ms()
                # the longest recent step: one slow step's weight fades
                self._pool_step_s = max(0.9 * self._pool_step_s, time.ticks_diff(t1, t) / 1000)
                t, el = t1, time.ticks_diff(t1, t0)
                if el >= 50 or (not behind and wait is not None and wait - el / 1000 <= margin):
                    return
            if t != t0:
                return
        time.sleep_ms(20)

    def run(self):
        c = self.state.c
        log("boot", meter=self.meter, seq=c.seq, spooled=self.state.journal.live, kid=self.kid, boot=c.boot,
            import_wh=c.import_wh, export_wh=c.export_wh, acked=c.acked, dropped=self.state.journal.dropped,
            clock=self.clock.quality)
        while not self.finished():
            self.step()
        self.state.save()  # the ack mark, so a restart resends nothing acknowledged
        self.uplink.close()
        log("done", seq=self.seq)


def _open_state(cfg, n, boot=True):
    nsq_bytes = (paillier.bits(n * n) + 7) // 8
    return MeterState(cfg.get("state_dir", "."), cfg["meter"], cfg.get("journal") or {}, nsq_bytes, log, boot)


def main(argv=None):
    argv = argv if argv is not None else sys.argv
    path = argv[1] if len(argv) > 1 else "config.json"
    try:
        if len(argv) > 2 and argv[2] == "set-register":
            if len(argv) != 6:
                raise StateError("usage", "usage: main.py CONFIG set-register IMPORT_WH EXPORT_WH BY")
            # The technician's command (docs/journal.md): its code is loaded only for it.
            import setreg
            setreg.command(_load(path), int(argv[3]), int(argv[4]), argv[5])
            return
        Meter(_load(path)).run()
    except (StateError, ValueError) as e:
        log("refused", reason=getattr(e, "reason", "bad_value"), error="%s: %s" % (type(e).__name__, e))
        sys.exit(2)
