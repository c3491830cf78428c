# Under MicroPython: produce a chain of readings the way the meter does (DJN
# randomness pool, packing, signing). argv[1]: a JSON file {seed, n, slots}
# (the Unix port cannot take arguments of 256 characters or more).
import sys
import json
import binascii
import ed25519
import paillier
import wire

with open(sys.argv[1]) as f:
    job = json.load(f)
key = ed25519.SigningKey(binascii.unhexlify(job["seed"]))
n = int(job["n"])
pool = paillier.RhoPool(n, 2)
prev = wire.ZERO_HASH
out = []
for i, slots in enumerate(job["slots"]):
    s = {}
    for k in slots:
        s[int(k)] = slots[k]
    c = pool.encrypt(wire.pack(s))[0]
    payload, prev = wire.reading(key, "mp-meter", i + 1, 1795160700 + 900 * i, 900, prev, wire.kid_of(n), c)
    out.append(payload.decode())
print(json.dumps(out))
