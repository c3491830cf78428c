# Under MicroPython: sign each RFC 8032 7.1 vector with the firmware's Ed25519.
import sys
import json
import binascii
import ed25519

with open(sys.argv[1]) as f:
    doc = json.load(f)
out = []
for v in doc["vectors"]:
    k = ed25519.SigningKey(binascii.unhexlify(v["secret"]))
    sig = k.sign(binascii.unhexlify(v["message"]))
    out.append({"name": v["name"], "public": binascii.hexlify(k.public).decode(),
                "signature": binascii.hexlify(sig).decode()})
print(json.dumps(out))
