# Under MicroPython: the comb k*B against plain double-and-add for edge and
# random scalars (argv[1]: a JSON list of decimal scalars).
import json
import sys
import ed25519 as e


def slow(k):
    q, p = (0, 1, 1, 0), e._B
    while k:
        if k & 1:
            q = e._add(q, p)
        p = e._double(p)
        k >>= 1
    return q


with open(sys.argv[1]) as f:
    ks = [int(k) for k in json.load(f)]
print(json.dumps([[e._encode(e._mul_base(k)).hex(), e._encode(slow(k)).hex()] for k in ks]))
