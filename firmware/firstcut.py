# Migration from the first cut's state (state.json written by rename, one
# spool/N.json file per unacknowledged reading) to the counters and journal
# (docs/journal.md, "Migration from the first cut"). MeterState loads this
# only when those files are there, and drops it again.
import json
import os
import struct

import records
from counters import Counters
from journal import exists
from meterstate import StateError


def _spool(st):
    d = st.dir + "/spool"
    return d, (sorted(int(n[:-5]) for n in os.listdir(d) if n.endswith(".json")) if exists(d) else [])


def migrate(st):
    # Once. Idempotent: a power cut before the counters are written leaves
    # state.json, and the journal is rebuilt from scratch.
    try:
        with open(st.dir + "/state.json") as f:
            old = json.load(f)
        seq, t, prev = int(old["seq"]), int(old["t"]), records.unhex(old["prev"])
        if seq < 0 or t < 0 or len(prev) != 32:
            raise ValueError("out of range")
    except Exception as e:
        raise StateError("bad_state_json", "state.json cannot be migrated (%r): restore it or re-enroll" % e)
    st.journal.clear()  # a half-done earlier migration: start over
    d, seqs = _spool(st)
    c = Counters()
    c.seq, c.t, c.prev = seq, t, prev
    c.floor = c.acked = seq
    buf = bytearray(records.READING_FIXED + st.nsq_bytes)  # a full record: the meter's own buffer is smaller
    for s in seqs:
        if s > seq:
            continue  # written but never committed, so never published
        with open("%s/%d.json" % (d, s), "rb") as f:
            r = json.loads(f.read())
        n = _pack_full(buf, c, r["seq"], r["t"], r["dt"], r["prev"], r["kid"],
                       records.unhex(r["sig"]), int(r["c"], 16), st.nsq_bytes)
        st.journal.append(memoryview(buf)[:n])
        c.floor = c.acked = min(c.floor, s - 1)
    st.journal.floor = c.floor
    st.c = c
    st.save()
    st.log("migrated", seq=seq, spooled=st.journal.live)
    drop_old_spool(st)
    return c


def _pack_full(buf, c, seq, t, dt, prev, kid, sig, c_int, nsq_bytes):
    # A first-cut reading as a full-format record (kind 0x11: header, dt, kid,
    # signature, the ciphertext; records.py reads it): it has no seed, so it
    # keeps its ciphertext. Returns the length.
    ci, ce = records.ckpt_fields(c.ckpt)
    struct.pack_into(records.COMMON_FMT, buf, 0, records.V2 | records.READING, seq, t, c.eseq, c.import_wh,
                     c.export_wh, records.unhex(prev), ci, ce)
    struct.pack_into(">I8s64s", buf, records.COMMON, dt, records.unhex(kid), sig)
    at = records.READING_FIXED
    buf[at:at + nsq_bytes] = c_int.to_bytes(nsq_bytes, "big")
    return at + nsq_bytes


def drop_old_spool(st):
    d, seqs = _spool(st)
    for s in seqs:
        os.remove("%s/%d.json" % (d, s))
    if exists(d):
        for n in os.listdir(d):
            os.remove(d + "/" + n)
        os.rmdir(d)
    if exists(st.dir + "/state.json"):
        os.remove(st.dir + "/state.json")
