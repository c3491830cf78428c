# Under MicroPython: a meter booting on a compact reading whose counters write a
# power cut prevented (the journal one reading ahead of the counters). argv[1]:
# the meter's config. Two readings go through the meter's state as the meter
# makes them (sensor checkpoints (1000, 5), then (2000, 7)), the second's
# counters write failing; then meter.Meter boots on that state. Prints the
# meter's log lines, then one JSON line: its seq, t, next interval end, and
# the second reading's t.
import json
import sys

import ed25519
import meter
import paillier
import wire

with open(sys.argv[1]) as f:
    cfg = json.load(f)
n = int(cfg["paillier"]["n"])
kid = wire.kid_of(n)
with open(cfg["key_file"], "rb") as f:
    key = ed25519.SigningKey(f.read())
pool = paillier.RhoPool(n, 2, cfg["paillier"]["exp_bits"])
st = meter._open_state(cfg, n)
t = 1795000500
for i, ck in enumerate(((1000, 5), (2000, 7))):
    seq, t = st.c.seq + 1, t + 900
    prev = wire.hexs(st.c.prev)
    m = wire.pack({0: 100 + i, 1: i})
    ct, seed = pool.encrypt(m)
    sig, h = wire.sign(key, cfg["meter"], seq, t, 900, prev, kid, "%x" % ct, "host")
    if i == 1:
        def cut(c):
            raise OSError("power cut before the counters write")
        st.store.save = cut
    assert st.commit_reading(seq, t, 900, prev, sig, h, m, seed, pool.exp_bits, 100 + i, i, ck, "host")
del st
m = meter.Meter(cfg)
print(json.dumps({"seq": m.seq, "t": m.state.c.t, "next_end": m.next_end, "t2": t}))
