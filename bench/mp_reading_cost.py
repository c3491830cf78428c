"""Under MicroPython (run by bench/meter.py): time each part of making one reading.
argv[1] is a JSON job file, since the Unix port crashes on arguments of 256+ characters."""
import sys
import gc
import json
import os
import time
import binascii
import ed25519
import paillier
import wire


def sample(fn):
    # Milliseconds for one call. Collecting first gives each call the same heap
    # to start from; a collection the call itself triggers still counts.
    gc.collect()
    t0 = time.ticks_us()
    fn()
    return time.ticks_diff(time.ticks_us(), t0) / 1000


with open(sys.argv[1]) as f:
    job = json.load(f)
n = int(job["n"])
nsq = n * n
reps = job["reps"]
key = ed25519.SigningKey(binascii.unhexlify(job["seed"]))
kid = wire.kid_of(n)
meter, seq, t, prev = job["meter"], job["seq"], job["t"], job["prev"]
r = int.from_bytes(os.urandom(256), "big") % n
pool = paillier.RhoPool(n, 1)
t0 = time.ticks_us()
steps = []  # the duration of each bounded step of the boot and a first refill
while not pool.full():
    s0 = time.ticks_us()
    pool.step()
    steps.append(time.ticks_diff(time.ticks_us(), s0) / 1000)
boot_ms = time.ticks_diff(time.ticks_us(), t0) / 1000
m = wire.pack({0: 812, 1: 0})
rho = pool.take()[0]
a_bytes = (pool.exp_bits + 7) // 8
c = paillier.encrypt_with(n, nsq, m, rho)
sb = wire.signed_bytes(meter, seq, t, 900, prev, kid, "%x" % c)
last = []  # the payload of the last timed reading, for the driver to verify


def whole_reading():
    last[:] = [wire.reading(key, meter, seq, t, 900, prev, kid, c)]


ops = (
    ("full_pow", lambda: pow(r, n, nsq)),
    ("djn_refill", pool.refill_one),
    ("djn_pow", lambda: pow(pool._get(1), int.from_bytes(os.urandom(a_bytes), "big") | 1, nsq)),
    ("encrypt", lambda: paillier.encrypt_with(n, nsq, m, rho)),
    ("sign", lambda: key.sign(sb)),
    ("reading", whole_reading),
)
ms = {}
for name, _ in ops:
    ms[name] = []
# One sample of each op in turn, so a slow spell of the machine is shared among them;
# round -1 is a warm-up whose samples are dropped (the first calls run slow).
for i in range(-1, max(reps.values())):
    for name, fn in ops:
        if i < reps[name]:
            took = sample(fn)
            if i >= 0:
                ms[name].append(took)
            # refill_one appends whatever the pool's size: empty it, untimed, so
            # 512-byte values do not pile up in a 128k heap.
            while len(pool):
                pool.take()
print(json.dumps({
    "impl": "%s %s" % (sys.implementation.name, ".".join(str(x) for x in sys.implementation.version)),
    "signed_bytes_len": sum(len(x) for x in sb),  # its pieces (wire.signed_bytes)
    "boot_ms": boot_ms,
    "boot_steps": len(steps),
    "step_max_ms": max(steps),
    "ms": ms,
    "payload": last[0][0].decode(),
}))
