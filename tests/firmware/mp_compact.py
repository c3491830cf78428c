# Under MicroPython: compact journal readings (records.py) through a meter's
# state (meterstate.MeterState), driven by a JSON job (argv[1]) from
# tests/test_journal_compact.py; prints JSON lines.
#   write:  job["count"] readings made as the meter makes them (pool, pack,
#           sign, commit), the last one with its counters write failing (a
#           power cut right after the journal append); prints the payloads
#           as first published
#   read:   for each case, copy job["src"] to job["dir"], cut job["file"] at
#           case["at"], boot the state there, settle the newest reading, and
#           print every record it would send, its seq and chain head
#   extend: boot job["dir"] (e.g. written by an older firmware), print every
#           record it would send, then commit job["count"] more and print again
import binascii
import gc
import json
import os
import sys

import ed25519
import paillier
import wire
from meterstate import MeterState

with open(sys.argv[1]) as f:
    job = json.load(f)
n = int(job["n"])
kid = wire.kid_of(n)
key = ed25519.SigningKey(binascii.unhexlify(job["key"]))
pool = paillier.RhoPool(n, 2, job.get("exp_bits"))
NSQ = (paillier.bits(n * n) + 7) // 8
events = []


def log(ev, **kw):
    kw["ev"] = ev
    events.append(kw)


def cipher(m, seed, exp_bits):
    return pool.encrypt_again(m, seed, exp_bits, True)


def boot(d, count_boot=True):
    st = MeterState(d, job["meter"], {}, NSQ, log, count_boot)
    st.settle_head(kid, cipher)
    return st


def commit(st, i, fail_counters=False):
    c = st.c
    seq, t = c.seq + 1, (c.t or 1795000500) + 900
    prev = wire.hexs(c.prev)
    imp, exp = 100 + 37 * i, (i * 5000) % 3
    m = wire.pack({wire.slot(i % 2, 0): imp, wire.slot(i % 2, 1): exp})  # bands 0-1: m < a small test n
    ct, seed = pool.encrypt(m)
    ch = b"%x" % ct  # the hex as the meter makes it: wire.payload joins bytes
    sig, h = wire.sign(key, job["meter"], seq, t, 900, prev, kid, ch, "host")
    if fail_counters:
        def cut(c):
            raise OSError("power cut before the counters write")
        st.store.save = cut
    assert st.commit_reading(seq, t, 900, prev, sig, h, m, seed, pool.exp_bits, imp, exp, None, "host")
    return wire.payload(job["meter"], seq, t, 900, prev, kid, ch, wire.hexs(sig), "host").decode()


def pending(st):
    out = []
    pos = st.journal.first()
    while pos is not None:
        msg = st.message(pos, kid, cipher)
        out.append(None if msg is None else msg[1].decode())
        pos = st.journal.after(pos)
    return out


def head(st):
    return {"seq": st.c.seq, "prev": wire.hexs(st.c.prev), "damaged": st.journal.damaged}


def copy(src, dst):
    for name in os.listdir(dst):
        if not os.stat(dst + "/" + name)[0] & 0x4000:
            os.remove(dst + "/" + name)
    for name in os.listdir(src):
        if os.stat(src + "/" + name)[0] & 0x4000:
            continue  # a folder: copied on its own
        with open(src + "/" + name, "rb") as f:
            data = f.read()
        with open(dst + "/" + name, "wb") as f:
            f.write(data)


mode = job["mode"]
if mode == "write":
    st = boot(job["dir"])
    sent = [commit(st, i, i == job["count"] - 1) for i in range(job["count"])]
    print(json.dumps({"sent": sent}))
elif mode == "read":
    for case in job["cases"]:
        d = job["dir"]
        for sub in ("", "/unacked"):
            try:
                os.mkdir(d + sub)
            except OSError:
                pass
            copy(job["src"] + sub, d + sub)
        path = d + "/unacked/" + job["file"]
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[:case["at"]])
        st = boot(d, False)
        r = head(st)
        r["records"] = pending(st)
        print(json.dumps(r))
        del st
        gc.collect()
elif mode == "extend":
    st = boot(job["dir"])
    before = pending(st)
    sent = [commit(st, i) for i in range(job["count"])]
    print(json.dumps({"before": before, "sent": sent, "after": pending(st), "head": head(st), "log": events}))
