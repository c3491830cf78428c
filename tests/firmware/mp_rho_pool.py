# Under MicroPython: draw from the firmware's RhoPool with os.urandom replaced by
# a fixed byte stream, so CPython can replay the same draws. argv[1]: a JSON file
# {n, cases: [{stream: hex, exp_bits: int|null, m: [hex plaintexts]}]}.
import sys
import json
import binascii
import paillier


class Stream:
    # Stands in for the os module inside paillier: urandom reads the stream.
    def __init__(self, data):
        self.data = data
        self.at = 0

    def urandom(self, k):
        if self.at + k > len(self.data):
            raise ValueError("byte stream exhausted")
        self.at += k
        return self.data[self.at - k:self.at]


with open(sys.argv[1]) as f:
    job = json.load(f)
n = int(job["n"])
nsq = n * n
out = []
for case in job["cases"]:
    stream = Stream(binascii.unhexlify(case["stream"]))
    paillier.os = stream
    pool = paillier.RhoPool(n, len(case["m"]), case["exp_bits"])
    while not pool.full():
        pool.refill_one()
    rho, c = [], []
    for mh in case["m"]:
        r = pool.take()
        rho.append("%x" % r)
        c.append("%x" % paillier.encrypt_with(n, nsq, int(mh, 16), r))
    # The same draws again, driven only by the meter's bounded step(): the
    # values must not depend on how the work was cut up.
    paillier.os = Stream(binascii.unhexlify(case["stream"]))
    stepped = paillier.RhoPool(n, len(case["m"]), case["exp_bits"])
    boot_steps = 0
    while not stepped.ready():
        stepped.step()
        boot_steps += 1
    steps = 0
    while stepped.step():
        steps += 1
    out.append({"exp_bits": pool.exp_bits, "rho": rho, "c": c, "used": stream.at,
                "stepped": ["%x" % stepped.take() for _ in case["m"]],
                "boot_steps": boot_steps, "refill_steps": steps})
print(json.dumps(out))
