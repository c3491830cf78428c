# Paillier encryption with g = n + 1: c = (1 + m*n) * rho mod n^2, rho = r^n.
# Computing rho is the whole cost (a 2n-bit modulus, an n-bit exponent), so it
# is done ahead of time into a pool and the encryption itself is one multiply.
# Each rho comes from a short random seed that the journal keeps instead of the
# ciphertext, so a resend computes the same c again (docs/journal.md, "Compact
# readings").
import gc
import hashlib
import os
from micropython import const


def bits(n):
    # MicroPython ints have no bit_length()
    return len(bin(n)) - 2


def _expand(key, data, k):
    # k bytes of SHA-256(key | data | counter byte) blocks: a PRF of data.
    out = bytearray()
    i = 0
    while len(out) < k:
        out.extend(hashlib.sha256(key + data + bytes((i,))).digest())
        i += 1
    return bytes(out[:k])


def _exponent(seed, exp_bits):
    # The DJN short exponent a seed stands for: the seed expanded by SHA-256,
    # odd, exp_bits rounded up to bytes (as it was drawn before seeds).
    return int.from_bytes(_expand(b"gl-djn-a", seed, (exp_bits + 7) // 8), "big") | 1


def encrypt_with(n, nsq, m, rho):
    if not 0 <= m < n:
        raise ValueError("plaintext out of range")
    # (1 + m*n)*rho = rho + n*(m*rho mod n)  (mod n^2), since m*n*rho mod n^2
    # is n times (m*rho mod n). The same c as the textbook product, but no
    # integer along the way exceeds |m| + |n^2| bits: the product above is
    # 6.1-8.2 kbit (772-1,024 bytes of digits, and its reduction copies it
    # once more), the largest allocation on a reading's path; here it is
    # 4.1-6.1 kbit, and faster (55 against 78 us on the Unix port).
    return (rho + n * (m * rho % n)) % nsq


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
_TEETH = const(3)
_STEP_COLS = const(16)     # comb columns per refill step: a 448-bit refill is 10 steps
_STEP_WINDOWS = const(16)  # 3-bit exponent windows per boot step


class RhoPool:
    # Damgard-Jurik-Nielsen randomness: rho = (h^n)^a = (h^a)^n mod n^2 for
    # h = -x^2, x = base_root(n), and a fresh short exponent a per value, drawn
    # as a seed from os.urandom (exponent(seed)). Each rho is still an n-th
    # residue, so ciphertexts are ordinary Paillier; the cost drops from |n|
    # squarings to exp_bits. A value is handed out at most once, and a fresh
    # seed is drawn for each, so no reboot can replay one; the seed is written
    # to flash only inside the journal record of the reading that used it.
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
        # A seed holds the exponent's entropy: 128 bits up to a 512-bit
        # exponent (at least the 112/128-bit level of a 2048/3072-bit n), a
        # quarter of the exponent beyond: guessing a seed costs more than
        # attacking the modulus. The exponent is the seed expanded by
        # SHA-256 (_refill).
        self.seed_bytes = max(16, (self.exp_bits + 31) // 32)
        # The comb's table lives in one block allocated before any of the boot's
        # garbage exists: separate big integers would be scattered through the
        # heap and fragment it (the bench measures the smallest heap that works).
        self._vbytes = (2 * self._nbits + 7) // 8
        self._table = memoryview(bytearray(((1 << _TEETH) - 1) * self._vbytes))
        # The pool too is one block, a ring of `size` slots (each value, then
        # its seed): a value made in the loop would otherwise be a long-lived
        # object dropped wherever the step's garbage left room, and split the
        # free heap a little more with every refill.
        self._ring = max(size, 1)  # a pool of 0 still holds the value take() waits for
        self._slots = memoryview(bytearray(self._ring * (self._vbytes + self.seed_bytes)))
        self._head = 0  # the oldest value's slot
        self._count = 0
        self._comb = False
        # A resend's value computed again from its seed: [state (0 none, 1
        # asked for, 2 ready), the job computing it, one block of seed and
        # value]. A block, like the ring: a big integer kept across loop steps
        # would fragment the heap.
        self._re = [0, None, memoryview(bytearray(self.seed_bytes + self._vbytes))]
        # h = -x^2 mod n with x a hash of n: the same on every boot and every
        # meter of the key, nothing up the sleeve (DJN publish h^n with the
        # key; what stays secret is each value's exponent).
        nb = (self._nbits + 7) // 8 + 16
        i = 0
        while True:
            x = int.from_bytes(_expand(b"gl-djn-h", str(n).encode() + bytes((i,)), nb), "big") % n
            if x > 1:
                break
            i += 1
        self._job = self._boot(-(x * x) % n)

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

    def _refill(self, seed=None):
        # A fresh value into the ring; given a seed, an earlier value (a
        # resend's) into _re instead. (h^n)^a by the comb.
        new = seed is None
        if new:
            seed = os.urandom(self.seed_bytes)
        a = _exponent(seed, self.exp_bits)
        cols, nsq, vb = self._cols, self.nsq, self._vbytes
        # Between steps the running product waits in a block (the resend's
        # value block, or the ring slot the new value goes to: free until it
        # is written, the same slot however many values are taken meanwhile),
        # not as a big integer: one kept across steps sits wherever the step's
        # garbage left room, and with two jobs (a refill and a resend) split
        # the free heap until a reading's 1.4 KB payload found no hole.
        if new:
            if self._count == self._ring:
                # refill_one on a full pool: the oldest value goes, never
                # handed out (now, so its slot is free from the first step)
                self._head = (self._head + 1) % self._ring
                self._count -= 1
            o = (self._head + self._count) % self._ring * (vb + self.seed_bytes)
            blk = self._slots[o:o + vb]
        else:
            blk = self._re[2][self.seed_bytes:]
        acc = 1
        for c in range(cols - 1, -1, -1):
            acc = acc * acc % nsq
            j = 0
            for t in range(_TEETH):
                j |= (a >> (c + t * cols) & 1) << t
            if j:
                acc = acc * self._get(j) % nsq
            if c and c % _STEP_COLS == 0:
                blk[:] = acc.to_bytes(vb, "big")
                acc = None
                yield
                acc = int.from_bytes(blk, "big")
        blk[:] = acc.to_bytes(vb, "big")
        if not new:
            self._re[0] = 2
            return
        self._slots[o + vb:o + vb + self.seed_bytes] = seed
        self._count += 1

    def _advance(self):
        if self._job is None:
            self._job = self._refill()
        try:
            next(self._job)
        except StopIteration:
            self._job = None

    def step(self, now=False):
        # One bounded piece of the boot, of a resend's rho (before refills
        # while the pool is at least half full, so the next readings never
        # wait for a value; or now: the meter is behind, and its readings
        # wait for values anyway) or of a refill; False when there is nothing
        # to do.
        re = self._re
        # A resend's job goes ahead of a refill already under way: between
        # steps each job's running product waits in its own block (_refill),
        # so the two hold no big integer at once, and a send loop waiting on
        # a resend is not held up by a refill whose value nobody needs yet.
        if self._comb and re[0] == 1 and (re[1] is not None or now or 2 * self._count >= self.size):
            if re[1] is None:
                re[1] = self._refill(bytes(re[2][:self.seed_bytes]))
            try:
                next(re[1])
            except StopIteration:
                re[1] = None
            return True
        if self._job is None and self.full():
            return False
        self._advance()
        return True

    def encrypt_again(self, m, seed, exp_bits, now=False):
        # The ciphertext of m under an earlier value's seed (a resend): None
        # until step() has computed its rho (once the boot's comb is ready),
        # unless now: then computed at once. The value last handed out, or
        # asked for, is answered from RAM.
        re, sb, vb = self._re, self.seed_bytes, self._vbytes
        # the slot a refill under way parks its running product in (_refill)
        tail = -1 if self._job is None else (self._head + self._count) % self._ring
        for i in range(self._ring):
            # A value handed out stays in its ring slot, beside its seed, until
            # a refill starts there: a new reading's first send finds it.
            if i == tail:
                continue
            o = i * (vb + sb)
            if bytes(self._slots[o + vb:o + vb + sb]) == seed:
                return encrypt_with(self.n, self.nsq, m, int.from_bytes(self._slots[o:o + vb], "big"))
        if exp_bits != self.exp_bits or len(seed) != sb:
            # Written under another configured exponent length: the comb's
            # columns do not fit it, so one plain pow, at once and not kept
            # (rare: a config change while readings waited).
            while not self._comb and now:
                self.step()
            if not self._comb:
                return None
            return encrypt_with(self.n, self.nsq, m, pow(self._get(1), _exponent(seed, exp_bits), self.nsq))
        if not re[0] or bytes(re[2][:sb]) != seed:
            re[2][:sb] = seed
            re[0], re[1] = 1, None
        while re[0] != 2 and now:
            self.step(True)  # this value first: not after refills up to half the pool
            gc.collect()
        if re[0] != 2:
            return None
        return encrypt_with(self.n, self.nsq, m, int.from_bytes(re[2][sb:], "big"))

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
        # (rho, seed): the oldest value and the seed that computes it again.
        if not self._count:
            self.refill_one()
        vb, sb = self._vbytes, self.seed_bytes
        o = self._head * (vb + sb)
        rho = int.from_bytes(self._slots[o:o + vb], "big")
        seed = bytes(self._slots[o + vb:o + vb + sb])
        self._head = (self._head + 1) % self._ring
        self._count -= 1
        return rho, seed

    def encrypt(self, m):
        # (c, seed)
        rho, seed = self.take()
        return encrypt_with(self.n, self.nsq, m, rho), seed
