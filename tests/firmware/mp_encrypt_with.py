# Under MicroPython: paillier.encrypt_with for (n, [[m, rho], ...]) in
# argv[1] (hex), each ciphertext as hex.
import json
import sys
import paillier

with open(sys.argv[1]) as f:
    job = json.load(f)
n = int(job["n"], 16)
nsq = n * n
print(json.dumps(["%x" % paillier.encrypt_with(n, nsq, int(m, 16), int(r, 16)) for m, r in job["cases"]]))
