# Under MicroPython: a meter's state (meterstate.MeterState) driven by a JSON
# job (argv[1]) from tests/test_meter_ckpt.py. Applies job["ops"] in order:
#   {"op": "commit", "ckpt": [imp, exp] | null, "imp": Wh, "exp": Wh, "tq": time quality (optional)}
#   {"op": "skip", ...same}  (a reading a full journal cannot take)
#   {"op": "set_register", "imp": Wh, "exp": Wh}  (a signed event; no reading)
# An op with "crash": true has its counters write fail like a power cut right
# after the journal append, and is the last one. Prints one JSON line: the
# counters after the ops, every record still to send, and the log. Readings are
# real compact records (encrypted under job["n"], signed with a fixed key), and a
# boot settles a compact reading newer than the counters the way the meter does.
import binascii
import json
import sys

import ed25519
import paillier
import setreg
import wire
from meterstate import MeterState

with open(sys.argv[1]) as f:
    job = json.load(f)
events = []


def log(ev, **kw):
    kw["ev"] = ev
    events.append(kw)


def power_cut(c):
    raise OSError("power cut before the counters write")


n = int(job["n"])
kid = wire.kid_of(n)
key = ed25519.SigningKey(bytes(32))
pool = paillier.RhoPool(n, 1)


def cipher(m, seed, exp_bits):
    return pool.encrypt_again(m, seed, exp_bits, True)


st = MeterState(job["dir"], "ck1", {}, (paillier.bits(n * n) + 7) // 8, log, job.get("boot", True))
st.settle_head(kid, cipher)
for op in job.get("ops", []):
    if op.get("crash"):
        st.store.save = power_cut
    c = st.c
    t = c.t + 900 if c.t else 1795000500
    if op["op"] == "set_register":
        setreg.apply(st, key, op["imp"], op["exp"], "tech-1", t)
        continue
    ck = tuple(op["ckpt"]) if op["ckpt"] is not None else None
    if op["op"] == "skip":
        st.skip_reading(t, op["imp"], op["exp"], ck)
        continue
    seq = c.seq + 1
    prev = binascii.hexlify(c.prev).decode()
    m = wire.pack({0: op["imp"], 1: op["exp"]})
    ct, seed = pool.encrypt(m)
    sig, h = wire.sign(key, "ck1", seq, t, 900, prev, kid, "%x" % ct, op.get("tq"))
    ok = st.commit_reading(seq, t, 900, prev, sig, h, m, seed, pool.exp_bits, op["imp"], op["exp"], ck, op.get("tq"))
    assert ok
out = []
pos = st.journal.first()
while pos is not None:
    out.append(json.loads(st.message(pos, kid, cipher)[1]))
    pos = st.journal.after(pos)
c = st.c
print(json.dumps({"seq": c.seq, "t": c.t, "import_wh": c.import_wh, "export_wh": c.export_wh,
                  "ckpt": list(c.ckpt) if c.ckpt is not None else None, "records": out, "log": events}))
