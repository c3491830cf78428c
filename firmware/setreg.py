# The audited set-register command (docs/journal.md, "Set register"): a
# technician aligns the registers with the utility meter through an event
# signed with the meter's key, journaled (and so published) before the
# counters move. Loaded only for the command: a running meter carries none
# of this code (on the Unix port loaded code lives in the heap).
import hashlib
import struct

import records
import wire
from meterstate import StateError

MAX_WH = (1 << 63) - 1


def _valid_by(by):
    if not 1 <= len(by) <= 32:
        return False
    for ch in by:
        if not (ch.isalpha() or ch.isdigit() or ch in "_.@-"):
            return False
    return True


def signed_bytes(meter, eseq, at, kind, seq, prev, import_before, export_before, import_wh, export_wh, by):
    # gl-event-v1: the event is tied to the reading chain by the seq and hash
    # of the last reading before it.
    return "\n".join(("gl-event-v1", meter, str(eseq), str(at), kind, str(seq), prev, str(import_before),
                      str(export_before), str(import_wh), str(export_wh), by)).encode()


def pack(buf, c, at, import_before, export_before, by, sig):
    # The event's journal record (layout: records.py, which reads it back).
    by = by.encode()
    ci, ce = records.ckpt_fields(c.ckpt)
    struct.pack_into(records.COMMON_FMT, buf, 0, records.V2 | records.EVENT, c.seq, c.t, c.eseq, c.import_wh,
                     c.export_wh, c.prev, ci, ce)
    struct.pack_into(records.EVENT_FMT, buf, records.COMMON, at, import_before, export_before, sig)
    end = records.EVENT_FIXED + len(by)
    buf[records.EVENT_FIXED:end] = by
    return end


def apply(st, key, import_wh, export_wh, by, at):
    # Sign, journal, then move the counters of st (a MeterState); without the
    # record nothing moves. Returns (eseq, the event's hash in hex).
    if not (isinstance(import_wh, int) and isinstance(export_wh, int)
            and 0 <= import_wh <= MAX_WH and 0 <= export_wh <= MAX_WH):
        raise StateError("bad_value", "register values must be whole watt-hours >= 0")
    if not _valid_by(by):
        raise StateError("bad_value", "by: 1-32 characters from A-Z a-z 0-9 _ . @ -")
    if st.head_pos is not None:
        raise StateError("head_unsettled", "the newest reading's counters are not settled (settle_head first)")
    c = st.c
    imp0, exp0 = c.import_wh, c.export_wh
    eseq = c.eseq + 1
    sb = signed_bytes(st.meter, eseq, at, records.SET_REGISTER, c.seq, wire.hexs(c.prev),
                      imp0, exp0, import_wh, export_wh, by)
    sig = key.sign(sb)
    c.eseq, c.import_wh, c.export_wh = eseq, import_wh, export_wh
    n = pack(st.buf, c, at, imp0, exp0, by, sig)
    if not st.journal.append(memoryview(st.buf)[:n]):
        c.eseq, c.import_wh, c.export_wh = eseq - 1, imp0, exp0
        raise StateError("journal_full", "the journal cannot take the event; registers unchanged")
    st.save()
    return eseq, wire.hexs(hashlib.sha256(sb).digest())


def command(cfg, import_wh, export_wh, by):
    # With the meter's main loop stopped (main.py CONFIG set-register ...):
    # the event is published by the meter when it runs again.
    import ed25519
    import meter
    from clock import Clock
    with open(cfg.get("key_file", cfg.get("state_dir", ".") + "/ed25519.key"), "rb") as f:
        key = ed25519.SigningKey(f.read())
    n = int(cfg["paillier"]["n"])
    st = meter._open_state(cfg, n, boot=False)
    if st.head_pos is not None:
        # The last reading is newer than the counters (a power cut between the
        # two writes): its hash needs its ciphertext computed again.
        import paillier
        pool = paillier.RhoPool(n, 0, cfg["paillier"].get("exp_bits"))
        st.settle_head(wire.kid_of(n), lambda m, seed, exp_bits: pool.encrypt_again(m, seed, exp_bits, True))
    before = (st.c.import_wh, st.c.export_wh)
    eseq, h = apply(st, key, import_wh, export_wh, by, Clock(cfg.get("clock", {})).now())
    meter.log("set_register", eseq=eseq, hash=h, before=before, after=(import_wh, export_wh), by=by)
