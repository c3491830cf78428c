"""Under MicroPython (run by bench/meter.py with a chosen -X heapsize): boot as
the meter does (key, pool of `pool` values), then `cycles` readings, each
taking a pool value, encrypting, signing, encoding and refilling. Exits non-zero
on MemoryError, so the driver can find the smallest heap that holds it.
argv[1] is a JSON job file."""
import sys
import gc
import json
import binascii
import ed25519
import paillier
import wire

with open(sys.argv[1]) as f:
    job = json.load(f)
n = int(job["n"])
key = ed25519.SigningKey(binascii.unhexlify(job["seed"]))
kid = wire.kid_of(n)
pool = paillier.RhoPool(n, job["pool"])
while not pool.full():
    pool.refill_one()
prev = wire.ZERO_HASH
for seq in range(1, job["cycles"] + 1):
    c = pool.encrypt(wire.pack({0: 800 + seq, 1: seq}))[0]
    payload, prev = wire.reading(key, "bench-meter", seq, 1795160700 + 900 * seq, 900, prev, kid, c)
    pool.refill_one()
    gc.collect()
print(json.dumps({"cycles": job["cycles"], "last": payload.decode()}))
