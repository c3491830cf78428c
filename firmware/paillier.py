# Paillier encryption with g = n + 1: c = (1 + m*n) * rho mod n^2, rho = r^n.
# Computing rho is the whole cost (a 2n-bit modulus, an n-bit exponent), so it
# is done ahead of time into a pool and the encryption itself is one multiply.
import os


def bits(n):
    # MicroPython ints have no bit_length()
    return len(bin(n)) - 2


def _rand_below(n):
    nbytes = (bits(n) + 7) // 8
    while True:
        r = int.from_bytes(os.urandom(nbytes), "big") % n
        if r > 1:
            return r


def encrypt_with(n, nsq, m, rho):
    if not 0 <= m < n:
        raise ValueError("plaintext out of range")
    return (1 + m * n) * rho % nsq


def default_exp_bits(nbits):
    # The DJN exponent length: 4x the security level of an nbits modulus
    # (NIST SP 800-57 part 1: 2048 -> 112, 3072 -> 128, 7680 -> 192 bits).
    # The short exponent is hidden in a group of unknown order; the generic
    # attack on it costs 2^(exp_bits/2), which leaves twice the modulus's own
    # security level. DJN's |n|/2 rests on the same assumption with a wider
    # margin at 2.3x the cost (docs/performance.md, "DJN exponent").
    # gridledger/loadgen.py holds the same rule; tests/test_loadgen.py checks it.
    if nbits <= 2048:
        return 448
    if nbits <= 3072:
        return 512
    if nbits <= 7680:
        return 768
    return 1024


class RhoPool:
    # Damgard-Jurik-Nielsen randomness: rho = (h^n)^a = (h^a)^n mod n^2 for a
    # random h in Z*_n fixed at start and a fresh short exponent a per value.
    # Each rho is still an n-th residue, so ciphertexts are ordinary Paillier;
    # the cost drops from |n| squarings to exp_bits. Values are handed out at
    # most once and never written to flash, so a reboot cannot replay one.
    def __init__(self, n, size=4, exp_bits=None):
        self.n = n
        self.nsq = n * n
        self.size = size
        self.exp_bits = exp_bits or default_exp_bits(bits(n))
        y = _rand_below(n)
        self._hn = pow(-(y * y) % n, n, self.nsq)
        self._pool = []

    def __len__(self):
        return len(self._pool)

    def full(self):
        return len(self._pool) >= self.size

    def refill_one(self):
        a = int.from_bytes(os.urandom((self.exp_bits + 7) // 8), "big")
        self._pool.append(pow(self._hn, a | 1, self.nsq))

    def take(self):
        if not self._pool:
            self.refill_one()
        return self._pool.pop(0)

    def encrypt(self, m):
        return encrypt_with(self.n, self.nsq, m, self.take())
