# Under MicroPython: rebuild every wire-v1 vector of one form (argv[2]: "readings", plain, or
# "readings_tq", with the time-quality line) from its inputs with the firmware code.
import sys
import json
import binascii
import hashlib
import ed25519
import paillier
import wire

with open(sys.argv[1]) as f:
    doc = json.load(f)
n = int(doc["paillier"]["n"])
nsq = n * n
key = ed25519.SigningKey(binascii.unhexlify(doc["meter_key"]["seed"]))
name = sys.argv[2]
vectors = doc[name]
doc = None  # the other form and the inputs' text need not stay in the heap
out = {"kid": wire.kid_of(n), "public": binascii.hexlify(key.public).decode(), name: []}
for v in vectors:
    slots = {}
    for s in v["slots"]:
        slots[int(s)] = v["slots"][s]
    m = wire.pack(slots)
    rho = pow(int(v["r"], 16), n, nsq)
    c = paillier.encrypt_with(n, nsq, m, rho)
    tq = v.get("tq")
    payload, h = wire.reading(key, v["meter"], v["seq"], v["t"], v["dt"], v["prev"], out["kid"], c, tq)
    # the signed bytes' pieces (a meter hashes and signs them unjoined: wire.reading), joined
    sb = b"".join(x.encode() if isinstance(x, str) else x
                  for x in wire.signed_bytes(v["meter"], v["seq"], v["t"], v["dt"], v["prev"], out["kid"], "%x" % c, tq))
    out[name].append({"m": "%x" % m, "c": "%x" % c, "signed_bytes": sb.decode(),
                      "hash": h, "hash_check": binascii.hexlify(hashlib.sha256(sb).digest()).decode(),
                      "payload": json.loads(payload)})
json.dump(out, sys.stdout)  # streamed: one long string may find no hole in a fragmented heap
print()
