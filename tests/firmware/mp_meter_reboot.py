# Under MicroPython: a meter whose power fails soon after the gateway's ack.
# argv[1]: the meter's config; argv[2]: "make" or "boot".
# make (argv[3]: the first interval's end): readings 1-3 go through the meter's
#   state as the meter makes them, then the gateway's ack of 2 arrives through
#   the meter's ack handler, then the power fails (nothing else is written).
#   Prints one JSON line: each reading as first published, and the counters
#   slot on flash after the ack.
# boot (argv[3]: most steps, 400 if absent): meter.Meter boots on that state
#   with its real uplink and runs loop steps until the gateway has acknowledged
#   reading 3. Prints the meter's log lines, then one JSON line: what it
#   published at which step.
import json
import sys

import ed25519
import meter
import paillier
import wire
from counters import CounterStore

with open(sys.argv[1]) as f:
    cfg = json.load(f)
n = int(cfg["paillier"]["n"])

if sys.argv[2] == "make":
    kid = wire.kid_of(n)
    with open(cfg["key_file"], "rb") as f:
        key = ed25519.SigningKey(f.read())
    pool = paillier.RhoPool(n, 4, cfg["paillier"].get("exp_bits"))
    st = meter._open_state(cfg, n)
    t = int(sys.argv[3]) - 900
    sent = {}
    for i in range(3):
        seq, t = st.c.seq + 1, t + 900
        prev = wire.hexs(st.c.prev)
        m = wire.pack({0: 100 + i, 1: i})
        ct, seed = pool.encrypt(m)
        c = b"%x" % ct  # the ciphertext's hex as the meter makes it (wire.payload joins bytes)
        sig, h = wire.sign(key, cfg["meter"], seq, t, 900, prev, kid, c, "host")
        assert st.commit_reading(seq, t, 900, prev, sig, h, m, seed, pool.exp_bits, 100 + i, i,
                                 (1000 * (i + 1), i), "host")
        sent[seq] = wire.payload(cfg["meter"], seq, t, 900, prev, kid, c, wire.hexs(sig), "host").decode()
    st.acked(2)  # the gateway's {"seq": 2}; then the power fails
    c = CounterStore(st.dir + "/counters").load()
    print(json.dumps({"sent": sent, "flash": {"seq": c.seq, "acked": c.acked, "floor": c.floor}}))
else:
    m = meter.Meter(cfg)
    spooled = m.state.journal.live
    sent, step = [], [0]
    publish = m.uplink.publish

    def counted(payload, topic=None):
        sent.append([step[0], json.loads(payload)["seq"]])
        return publish(payload, topic)

    m.uplink.publish = counted
    most = int(sys.argv[3]) if len(sys.argv) > 3 else 400
    while m.state.c.acked < 3 and step[0] < most:
        step[0] += 1
        m.step()
    m.state.save()
    m.uplink.close()
    print(json.dumps({"spooled_at_boot": spooled, "sent": sent, "acked": m.state.c.acked,
                      "floor": m.state.journal.floor, "steps": step[0]}))
