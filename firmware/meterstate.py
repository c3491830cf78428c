# What a meter keeps across power cuts: its counters (counters.py) and the
# journal of readings and events the gateway has not acknowledged (journal.py).
# The order of writes is the crash story: a record is appended to the journal
# before the counters are written, and published only after both; on boot a
# journal record newer than the counters brings them forward, so seq, the
# chain head and the registers never go backwards, and the sensor checkpoint
# comes forward with the registers it was counted into. docs/journal.md.
import hashlib
import json
import os

import records
import wire
from counters import CounterStore, Counters
from journal import KEEP_OLDEST, Journal, exists

MAX_WH = (1 << 63) - 1


class StateError(Exception):
    # The meter refuses to start (or to act) rather than guess: `reason` is
    # machine-readable, the message says what a technician should do.
    def __init__(self, reason, msg):
        super().__init__(msg)
        self.reason = reason


def _valid_by(by):
    if not 1 <= len(by) <= 32:
        return False
    for ch in by:
        if not (ch.isalpha() or ch.isdigit() or ch in "_.@-"):
            return False
    return True


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
        self._buf = bytearray(records.READING_FIXED + nsq_bytes + 64)
        c = self.store.load()
        if c is None:
            if exists(self.store.paths[0]) or exists(self.store.paths[1]):
                # Both slots present and neither valid: starting from zero would
                # reuse published seqs (equivocation at the gateway).
                raise StateError("counters_lost", "both counter slots are damaged; the meter must be re-enrolled "
                                 "or its counters restored (docs/journal.md)")
            c = self._migrate() if exists(dirname + "/state.json") else Counters()
        else:
            self._drop_old_spool()
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
        rec = 8 + records.READING_FIXED + self.nsq_bytes
        try:
            st = os.statvfs(self.dir)
            free = st[0] * st[4]
        except (AttributeError, OSError):
            return
        fits = self.journal.live + free // rec
        if fits < self.journal.capacity:
            self.log("journal_capacity", capacity=self.journal.capacity, fits=fits, record_bytes=rec)

    def _roll_forward(self, c):
        p = self.journal.last()
        if p is None:
            return
        kind, seq, t, eseq, imp, exp, prev, ckpt = records.common(p)
        if (seq, eseq) <= (c.seq, c.eseq):
            return
        if kind == records.READING:
            prev = records.unhex(records.reading_json(p, self.meter)[1])  # this reading's hash
        c.seq, c.t, c.eseq, c.import_wh, c.export_wh, c.prev = seq, t, eseq, imp, exp, prev
        c.ckpt = ckpt
        self.log("rolled_forward", seq=seq, eseq=eseq)

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

    def commit_reading(self, seq, t, dt, prev, kid, sig, c_int, h, imp, exp, ckpt=None, tq=None):
        # Journal the signed reading (with its time quality tq, if any), then
        # the counters, both with ckpt (the sensor totals imp and exp were
        # counted up to). False when the journal did not keep it (a failed
        # write): its seq is used by the next one.
        c = self.c
        c.t = t
        c.ckpt = ckpt
        c.import_wh += imp
        c.export_wh += exp
        n = records.pack_reading(self._buf, c, seq, t, dt, prev, kid, sig, c_int, self.nsq_bytes, tq)
        kept = self.journal.append(memoryview(self._buf)[:n])
        if kept:
            c.seq = seq
            c.prev = records.unhex(h)
        self.save()
        return kept

    def acked(self, seq):
        # The gateway holds every reading up to seq. Persisted with the next
        # counters write: a power cut before it only means resending a few.
        c = self.c
        if seq > c.seq:
            return False
        if seq > c.acked:
            c.acked = seq
        self.journal.advance(seq)
        return True

    def message(self, pos):
        # (eseq, wire JSON) of the journal record at pos, eseq 0 for a reading;
        # None if damaged.
        p = self.journal.read(pos)
        if p is None:
            return None
        if records.kind(p) == records.EVENT:
            return records.common(p)[3], records.event_json(p, self.meter)
        return 0, records.reading_json(p, self.meter)[0]

    # Events ----------------------------------------------------------------

    def set_register(self, key, import_wh, export_wh, by, at):
        # Align the registers with the utility meter: a signed event, journaled
        # (and so published) before the counters move; without the record
        # nothing moves.
        if not (isinstance(import_wh, int) and isinstance(export_wh, int)
                and 0 <= import_wh <= MAX_WH and 0 <= export_wh <= MAX_WH):
            raise StateError("bad_value", "register values must be whole watt-hours >= 0")
        if not _valid_by(by):
            raise StateError("bad_value", "by: 1-32 characters from A-Z a-z 0-9 _ . @ -")
        c = self.c
        imp0, exp0 = c.import_wh, c.export_wh
        eseq = c.eseq + 1
        sb = records.event_signed_bytes(self.meter, eseq, at, records.SET_REGISTER, c.seq, wire.hexs(c.prev),
                                        imp0, exp0, import_wh, export_wh, by)
        sig = key.sign(sb)
        c.eseq, c.import_wh, c.export_wh = eseq, import_wh, export_wh
        n = records.pack_event(self._buf, c, at, imp0, exp0, by, sig)
        if not self.journal.append(memoryview(self._buf)[:n]):
            c.eseq, c.import_wh, c.export_wh = eseq - 1, imp0, exp0
            raise StateError("journal_full", "the journal cannot take the event; registers unchanged")
        self.save()
        return eseq, wire.hexs(hashlib.sha256(sb).digest())

    # Migration from the first-cut state.json + spool/ -------------------

    def _spool(self):
        d = self.dir + "/spool"
        return d, (sorted(int(n[:-5]) for n in os.listdir(d) if n.endswith(".json")) if exists(d) else [])

    def _migrate(self):
        # Once, from the first cut (state.json written by rename, one spool file
        # per unacked reading). Idempotent: a power cut before the counters are
        # written leaves state.json, and the journal is rebuilt from scratch.
        try:
            with open(self.dir + "/state.json") as f:
                st = json.load(f)
            seq, t, prev = int(st["seq"]), int(st["t"]), records.unhex(st["prev"])
            if seq < 0 or t < 0 or len(prev) != 32:
                raise ValueError("out of range")
        except Exception as e:
            raise StateError("bad_state_json", "state.json cannot be migrated (%r): restore it or re-enroll" % e)
        self.journal.clear()  # a half-done earlier migration: start over
        d, seqs = self._spool()
        c = Counters()
        c.seq, c.t, c.prev = seq, t, prev
        c.floor = c.acked = seq
        for s in seqs:
            if s > seq:
                continue  # written but never committed, so never published
            with open("%s/%d.json" % (d, s), "rb") as f:
                r = json.loads(f.read())
            n = records.pack_reading(self._buf, c, r["seq"], r["t"], r["dt"], r["prev"], r["kid"],
                                     records.unhex(r["sig"]), int(r["c"], 16), self.nsq_bytes)
            self.journal.append(memoryview(self._buf)[:n])
            c.floor = c.acked = min(c.floor, s - 1)
        self.journal.floor = c.floor
        self.c = c
        self.save()
        self.log("migrated", seq=seq, spooled=self.journal.live)
        self._drop_old_spool()
        return c

    def _drop_old_spool(self):
        d, seqs = self._spool()
        for s in seqs:
            os.remove("%s/%d.json" % (d, s))
        if exists(d):
            for n in os.listdir(d):
                os.remove(d + "/" + n)
            os.rmdir(d)
        if exists(self.dir + "/state.json"):
            os.remove(self.dir + "/state.json")
