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
        r = pool.take()[0]
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
    # A resend's value computed again while a refill is under way, their steps
    # alternating (each job's running product waits in its own block between
    # steps): the first draw's seed, whose ring slot the refill has taken.
    # The stream backwards: its seeds all differ (case one opens with zeros).
    paillier.os = Stream(bytes(reversed(binascii.unhexlify(case["stream"]))))
    mixed = paillier.RhoPool(n, len(case["m"]), case["exp_bits"])
    while not mixed.full():
        mixed.refill_one()
    seed0 = mixed.take()[1]
    mixed.step()  # the refill starts, in the slot draw 0 left
    m0 = int(case["m"][0], 16)
    under_way, turns = mixed._job is not None, 0
    again = mixed.encrypt_again(m0, seed0, mixed.exp_bits)
    while again is None:
        mixed.step()  # the resend's step, ahead of the refill
        if mixed._job is not None:
            mixed._advance()  # and one of the refill's
        turns += 1
        again = mixed.encrypt_again(m0, seed0, mixed.exp_bits)
    while not mixed.full():
        mixed.step()
    for _ in case["m"]:
        last = mixed.take()  # the refilled value comes out last
    out.append({"exp_bits": pool.exp_bits, "rho": rho, "c": c, "used": stream.at,
                "stepped": ["%x" % stepped.take()[0] for _ in case["m"]],
                "boot_steps": boot_steps, "refill_steps": steps,
                "mixed": {"under_way": under_way, "turns": turns, "resend_c": "%x" % again,
                          "resend_seed": binascii.hexlify(seed0).decode(),
                          "refill_rho": "%x" % last[0], "refill_seed": binascii.hexlify(last[1]).decode()}})
print(json.dumps(out))
