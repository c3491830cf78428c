# Paillier encryption with g = n + 1: c = (1 + m*n) * rho mod n^2, rho = r^n.
# Computing rho is the whole cost (a 2n-bit modulus, an n-bit exponent), so it
# is done ahead of time into a pool and the encryption itself is one multiply.
import gc
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


# The pool's work is cut into steps so that no single call runs long: a board's
# watchdog (8.3 s at most on the RP2040) and the meter's intervals never wait for
# a whole exponentiation. On the Unix port a step is a few milliseconds to a few
# tens; on a board 10-100 times that.
# Three teeth: 7 table values of n^2 size, 3.5 KiB at 2048 bits. Four would
# cut a refill's work by a further quarter but need 7.5 KiB, and the smallest
# heap that runs the meter's crypto grows from 50 to 65 KiB (bench/meter.py).
_TEETH = 3
_STEP_COLS = 16     # comb columns per refill step: a 448-bit refill is 10 steps
_STEP_WINDOWS = 16  # 3-bit exponent windows per boot step


class RhoPool:
    # Damgard-Jurik-Nielsen randomness: rho = (h^n)^a = (h^a)^n mod n^2 for a
    # random h in Z*_n fixed at start and a fresh short exponent a per value.
    # Each rho is still an n-th residue, so ciphertexts are ordinary Paillier;
    # the cost drops from |n| squarings to exp_bits. Values are handed out at
    # most once and never written to flash, so a reboot cannot replay one.
    #
    # h^n is fixed, so each refill raises a fixed base: a Lim-Lee comb of
    # _TEETH teeth over precomputed powers of h^n costs exp_bits/_TEETH
    # squarings and as many multiplications at most, against exp_bits and
    # exp_bits/2 for pow()'s square-and-multiply. The boot computes h^n
    # (_TEETH-bit windows) and the comb's table, also in steps.
    def __init__(self, n, size=4, exp_bits=None):
        self.n = n
        self.nsq = n * n
        self.size = size
        self._nbits = bits(n)  # bin() makes a |n|-character string: once, here
        self.exp_bits = exp_bits or default_exp_bits(self._nbits)
        self._ebytes = (self.exp_bits + 7) // 8
        self._cols = -(-8 * self._ebytes // _TEETH)
        y = _rand_below(n)
        # The comb's table lives in one block allocated before any of the boot's
        # garbage exists: separate big integers would be scattered through the
        # heap and fragment it (the bench measures the smallest heap that works).
        self._vbytes = (2 * self._nbits + 7) // 8
        self._table = memoryview(bytearray(((1 << _TEETH) - 1) * self._vbytes))
        # The pool too is one block, a ring of `size` slots: a value made in
        # the loop would otherwise be a long-lived object dropped wherever the
        # step's garbage left room, and split the free heap a little more
        # with every refill.
        self._ring = max(size, 1)  # a pool of 0 still holds the value take() waits for
        self._slots = memoryview(bytearray(self._ring * self._vbytes))
        self._head = 0  # the oldest value's slot
        self._count = 0
        self._comb = False
        self._job = self._boot(-(y * y) % n)

    def __len__(self):
        return self._count

    def full(self):
        return self._count >= self.size

    def ready(self):
        return self._comb

    def _put(self, j, v):
        o = (j - 1) * self._vbytes
        self._table[o:o + self._vbytes] = v.to_bytes(self._vbytes, "big")

    def _get(self, j):
        o = (j - 1) * self._vbytes
        return int.from_bytes(self._table[o:o + self._vbytes], "big")

    def _boot(self, x):
        # h^n by _TEETH-bit windows, left to right; x^1..x^(2^_TEETH - 1)
        # borrow the comb's table, which is filled only once h^n is known.
        nsq = self.nsq
        w, top = _TEETH, (1 << _TEETH) - 1
        acc = x
        self._put(1, x)
        for d in range(2, top + 1):
            acc = acc * x % nsq
            self._put(d, acc)
        yield
        e = self.n
        acc = 1
        for i in range((self._nbits + w - 1) // w - 1, -1, -1):
            acc = pow(acc, top + 1, nsq)
            d = e >> (w * i) & top
            if d:
                acc = acc * self._get(d) % nsq
            if i % _STEP_WINDOWS == 0:
                yield
        # Entry j is the product of h^n raised to 2^(cols * t) over the bits t of j.
        self._put(1, acc)
        for t in range(1, _TEETH):
            acc = pow(acc, 1 << self._cols, nsq)
            self._put(1 << t, acc)
            for low in range(1, 1 << t):
                self._put((1 << t) | low, acc * self._get(low) % nsq)
            yield
        self._comb = True

    def _refill(self):
        a = int.from_bytes(os.urandom(self._ebytes), "big") | 1
        cols, nsq = self._cols, self.nsq
        acc = 1
        for c in range(cols - 1, -1, -1):
            acc = acc * acc % nsq
            j = 0
            for t in range(_TEETH):
                j |= (a >> (c + t * cols) & 1) << t
            if j:
                acc = acc * self._get(j) % nsq
            if c and c % _STEP_COLS == 0:
                yield
        if self._count == self._ring:
            # refill_one on a full pool: the oldest value goes, never handed out
            self._head = (self._head + 1) % self._ring
            self._count -= 1
        o = (self._head + self._count) % self._ring * self._vbytes
        self._slots[o:o + self._vbytes] = acc.to_bytes(self._vbytes, "big")
        self._count += 1

    def _advance(self):
        if self._job is None:
            self._job = self._refill()
        try:
            next(self._job)
        except StopIteration:
            self._job = None

    def step(self):
        # One bounded piece of the boot or of a refill; False when there is
        # nothing to do (booted and full).
        if self._job is None and self.full():
            return False
        self._advance()
        return True

    def refill_one(self):
        # One more value now (finishing the boot first if it is still due).
        # Collecting between steps, as the meter's loop does when it runs them
        # one at a time, keeps the steps' big-integer garbage from fragmenting
        # a small heap when a reading has to wait for a value.
        have = self._count
        while self._count == have:
            self._advance()
            gc.collect()

    def take(self):
        if not self._count:
            self.refill_one()
        o = self._head * self._vbytes
        rho = int.from_bytes(self._slots[o:o + self._vbytes], "big")
        self._head = (self._head + 1) % self._ring
        self._count -= 1
        return rho

    def encrypt(self, m):
        return encrypt_with(self.n, self.nsq, m, self.take())
