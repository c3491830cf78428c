# Under MicroPython: the pure SHA-512 over messages of many lengths (every
# padding case: 0..260 bytes, one and two final blocks) and a reading-sized one.
import binascii
import json
import sha512

out = {}
for n in list(range(261)) + [1023, 1152]:
    msg = bytes((i * 7 + n) & 0xFF for i in range(n))
    out[n] = binascii.hexlify(sha512._soft(msg)).decode()
print(json.dumps(out))
