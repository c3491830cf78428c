# What a meter keeps across power cuts: its counters (counters.py) and the
# journal of readings and events the gateway has not acknowledged (journal.py).
# The order of writes is the crash story: a record is appended to the journal
# before the counters are written, and published only after both; on boot a
# journal record newer than the counters brings them forward, so seq, the
# chain head and the registers never go backwards, and the sensor checkpoint
# comes forward with the registers it was counted into. A compact reading
# (records.py) names its own hash only once its ciphertext is computed again:
# rolling forward from one waits for that (settle_head). docs/journal.md.
import os
import sys

import records
from counters import CounterStore, Counters
from journal import KEEP_OLDEST, Journal, exists


class StateError(Exception):
    # The meter refuses to start (or to act) rather than guess: `reason` is
    # machine-readable, the message says what a technician should do.
    def __init__(self, reason, msg):
        super().__init__(msg)
        self.reason = reason


class MeterState:
    def __init__(self, dirname, meter, jcfg, nsq_bytes, log, boot=True):
        self.meter = meter
        self.dir = dirname
        self.nsq_bytes = nsq_bytes
        self.log = log
        self.store = CounterStore(dirname + "/counters")
        # Not "journal/": on a board the state folder is the filesystem's root,
        # where a folder named like a module hides the module from import.
        self.journal = Journal(dirname + "/unacked", jcfg.get("capacity", 2880),
                               jcfg.get("when_full", KEEP_OLDEST), jcfg.get("per_segment"))
        # The record buffer: a compact reading (297 bytes at most: 16 slots of
        # 7 bytes, a 32-byte seed) or an event (193); a full-format record,
        # which only the first cut's migration writes, gets its own there.
        self.buf = bytearray(320)
        # The newest record's position when it is a compact reading newer
        # than the counters: they move to it in settle_head.
        self.head_pos = None
        c = self.store.load()
        if c is None:
            if exists(self.store.paths[0]) or exists(self.store.paths[1]):
                # Both slots present and neither valid: starting from zero would
                # reuse published seqs (equivocation at the gateway).
                raise StateError("counters_lost", "both counter slots are damaged; the meter must be re-enrolled "
                                 "or its counters restored (docs/journal.md)")
            if exists(dirname + "/state.json"):
                import firstcut  # once in a meter's life: dropped again below
                c = firstcut.migrate(self)
            else:
                c = Counters()
        elif exists(dirname + "/state.json") or exists(dirname + "/spool"):
            import firstcut  # a migration cut short after the counters were written
            firstcut.drop_old_spool(self)
        sys.modules.pop("firstcut", None)  # loaded code is RAM
        self.journal.recover(c.floor)
        self.journal.dropped = c.dropped
        self._roll_forward(c)
        if boot:
            c.boot += 1
        self.c = c
        self.save()
        self._check_room()

    def _check_room(self):
        # A capacity the filesystem cannot hold fails only when the network has
        # been down for days: say so at boot instead (docs/journal.md, budget).
        # A compact reading: frame 8, header, dt and signature, time quality,
        # check, exponent length, mask, two slot values of 4 bytes, the seed.
        rec = 8 + records.COMMON + 68 + 1 + 4 + 1 + 2 + 8 + 16
        try:
            st = os.statvfs(self.dir)
            free = st[0] * st[4]
        except (AttributeError, OSError):
            return
        fits = self.journal.live + free // rec
        if fits < self.journal.capacity:
            self.log("journal_capacity", capacity=self.journal.capacity, fits=fits, record_bytes=rec)

    def _roll_forward(self, c, h=None):
        # At boot (h None) and from settle_head (h: the compact reading's hash).
        pos = self.journal.last()
        p = None if pos is None else self.journal.read(pos)
        if p is None:
            return
        kind, seq, t, eseq, imp, exp, prev, ckpt = records.common(p)
        if (seq, eseq) <= (c.seq, c.eseq):
            return
        if kind == records.READING:
            if h is None:
                r = records.reading_json(p, self.meter)
                if r is None:
                    # A compact reading: its hash needs its ciphertext, and that
                    # the pool. Until then the counters stay as written (a power
                    # cut meanwhile finds the same case again), the meter makes
                    # no reading and sends nothing.
                    self.head_pos = pos
                    return
                h = r[1]
            prev = records.unhex(h)  # this reading's hash
        c.seq, c.t, c.eseq, c.import_wh, c.export_wh, c.prev = seq, t, eseq, imp, exp, prev
        c.ckpt = ckpt
        self.log("rolled_forward", seq=seq, eseq=eseq)

    def settle_head(self, kid, fn):
        # Roll the counters forward to the compact reading at head_pos once
        # fn (records.reading_json) gives its ciphertext: True when done
        # (or nothing to do), False while it is being computed.
        if self.head_pos is None:
            return True
        p = self.journal.read(self.head_pos)
        if p is None:
            raise StateError("journal_damaged", "the newest journal record changed on flash since boot")
        r = records.reading_json(p, self.meter, kid, fn)
        if r is None:
            return False
        self.head_pos = None
        self._roll_forward(self.c, r[1])
        self.save()
        return True

    def save(self):
        c = self.c
        c.floor = self.journal.floor
        c.dropped = self.journal.dropped
        try:
            self.store.save(c)
        except OSError as e:
            # The journal still holds the newest record: the next boot rolls
            # the counters forward from it.
            self.log("counters_write_failed", error=repr(e))

    # Readings --------------------------------------------------------------

    def room(self):
        # False: the journal is full and keeps its oldest records.
        return not (self.journal.full() and self.journal.when_full == KEEP_OLDEST)

    def skip_reading(self, t, imp, exp, ckpt=None):
        # A reading the full journal cannot take: never made, so no seq is used
        # and the chain stays whole; the registers still count its energy, and
        # ckpt (sensor.checkpoint()) says up to which sensor totals.
        c = self.c
        c.t = t
        c.ckpt = ckpt
        c.import_wh += imp
        c.export_wh += exp
        self.journal.dropped += 1
        self.save()

    def commit_reading(self, seq, t, dt, prev, sig, h, m, seed, exp_bits, imp, exp, ckpt=None, tq=None):
        # Journal the signed reading as a compact record (its plaintext m and
        # the seed of its randomness; its time quality tq, if any), then the
        # counters, both with ckpt (the sensor totals imp and exp were counted
        # up to). h: the reading's hash (hex). False when the journal did not
        # keep it (a failed write): its seq is used by the next one.
        c = self.c
        c.t = t
        c.ckpt = ckpt
        c.import_wh += imp
        c.export_wh += exp
        n = records.pack_reading(self.buf, c, seq, t, dt, prev, sig, h, m, seed, exp_bits, tq)
        kept = self.journal.append(memoryview(self.buf)[:n])
        if kept:
            c.seq = seq
            c.prev = records.unhex(h)
        self.save()
        return kept

    def acked(self, seq):
        # The gateway holds every reading up to seq. Persisted at once when it
        # moves the floor: an acknowledged compact reading left above the
        # floor on flash must be computed again (the pool's boot, then an
        # exponentiation) and resent before anything after it at the next
        # boot, and a meter whose boots were shorter than that never got past
        # it (tests/test_meter_crash.py; docs/journal.md).
        c = self.c
        if seq > c.seq:
            return False
        if seq > c.acked:
            c.acked = seq
        floor = self.journal.floor
        self.journal.advance(seq)
        if self.journal.floor != floor:
            self.save()
        return True

    def message(self, pos, kid=None, fn=None):
        # (eseq, wire JSON) of the journal record at pos, eseq 0 for a reading;
        # None if damaged (or a compact reading that does not rebuild to what
        # was signed); False while a compact reading's ciphertext is being
        # computed (kid, fn: records.reading_json).
        p = self.journal.read(pos)
        if p is None:
            return None
        if records.kind(p) == records.EVENT:
            return records.common(p)[3], records.event_json(p, self.meter)
        try:
            r = records.reading_json(p, self.meter, kid, fn)
        except ValueError:
            return None  # rebuilt, it is not what was signed: as damaged
        return False if r is None else (0, r[0])
