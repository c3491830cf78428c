# Under MicroPython: the pure SHA-512 over messages of many lengths (every
# padding case: 0..260 bytes, one and two final blocks) and a reading-sized one,
# each hashed whole and in uneven pieces (1, 7, 120, 128, 129 bytes in turn, so
# pieces start and end at every offset of a block; Ed25519 hashes a reading's
# signed bytes that way).
import binascii
import json
import sys

import sha512

SIZES = (1, 7, 120, 128, 129)
out = {}
for n in list(range(261)) + [1023, 1152]:
    msg = bytes((i * 7 + n) & 0xFF for i in range(n))
    parts = []
    at = k = 0
    while at < n:
        parts.append(memoryview(msg)[at:at + SIZES[k % 5]])
        at += SIZES[k % 5]
        k += 1
    out[n] = [binascii.hexlify(sha512._soft((msg,))).decode(), binascii.hexlify(sha512._soft(parts)).decode()]
json.dump(out, sys.stdout)  # streamed: 67 KB of text as one string needs a hole that size
print()
