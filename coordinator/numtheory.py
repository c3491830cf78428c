"""The number theory under threshold Paillier, on gmpy2: safe primes p = 2p' + 1
(a window sieve, then Fermat, then Miller-Rabin, on `secrets` randomness) and
products of many short powers (the batch proofs' random linear combinations)."""

from __future__ import annotations

import secrets
from typing import Callable

import gmpy2

__all__ = ["safe_prime", "is_safe_prime", "multiexp", "MIN_BITS"]

MIN_BITS = 64          # below this the sieve primes reach the candidates themselves
SIEVE_BOUND = 1 << 16  # odd primes below this strike candidates before any powmod
MR_ROUNDS = 40


def _small_primes(bound: int) -> list[tuple[int, int, int]]:
    """(l, 1/2 mod l, 1/4 mod l) for the odd primes l < bound."""
    flags = bytearray([1]) * bound
    flags[:2] = b"\0\0"
    for i in range(2, int(bound ** 0.5) + 1):
        if flags[i]:
            flags[i * i::i] = bytes(len(range(i * i, bound, i)))
    out = []
    for p in range(3, bound):
        if flags[p]:
            half = (p + 1) // 2
            out.append((p, half, half * half % p))
    return out


_PRIMES = _small_primes(SIEVE_BOUND)


def _window(bits: int) -> int:
    # Safe primes thin out as 1/bits^2: this window holds about one at every size.
    return max(4096, bits * bits // 16)


def safe_prime(bits: int, progress: Callable[[int], None] | None = None) -> int:
    """A random safe prime of exactly `bits` bits whose top two bits are set, so
    that the product of two has exactly 2*bits bits. `progress(tried)` is called
    after each candidate that survived the sieve (the costly ones)."""
    if not isinstance(bits, int) or bits < MIN_BITS:
        raise ValueError(f"safe primes here have at least {MIN_BITS} bits, not {bits!r}")
    qbits = bits - 1
    width = _window(bits)
    tried = 0
    while True:
        # q' odd with its top two bits set: p = 2q'+1 then has both top bits set too.
        base = gmpy2.mpz(secrets.randbits(qbits) | (3 << (qbits - 2)) | 1)
        # sieve[k] stands for q' = base + 2k; strike k where l divides q' or 2q'+1.
        sieve = bytearray([1]) * width
        for p, half, quarter in _PRIMES:
            r = int(base % p)
            for k0 in ((p - r) * half % p, (p - 2 * r - 1) * quarter % p):
                if k0 < width:
                    sieve[k0::p] = bytes((width - 1 - k0) // p + 1)
        k = sieve.find(1)
        while k >= 0:
            q = base + 2 * k
            p = 2 * q + 1
            tried += 1
            found = (q.bit_length() == qbits and gmpy2.powmod(2, q - 1, q) == 1
                     and gmpy2.powmod(2, p - 1, p) == 1
                     and gmpy2.is_prime(q, MR_ROUNDS) and gmpy2.is_prime(p, MR_ROUNDS))
            if progress:
                progress(tried)
            if found:
                return int(p)
            k = sieve.find(1, k + 1)


def is_safe_prime(p: int) -> bool:
    return p > 4 and p % 2 == 1 and bool(gmpy2.is_prime(p, MR_ROUNDS)) and bool(gmpy2.is_prime((p - 1) // 2, MR_ROUNDS))


def multiexp(bases, exps, mod, bits: int):
    """prod b_j^e_j mod `mod` for 0 <= e_j < 2^bits. Pippenger's buckets: about
    bits/c * (N + 2^(c+1)) multiplications for N bases, against N * bits for one
    powmod each (4x fewer at N = 64 and 128-bit exponents, 15x at N = 1000)."""
    n = len(bases)
    acc = gmpy2.mpz(1)
    c = min(range(1, 12), key=lambda c: -(-bits // c) * (n + (2 << c)))
    if -(-bits // c) * (n + (2 << c)) >= n * bits:  # few bases: powmod's C loop wins
        for b, e in zip(bases, exps):
            acc = acc * gmpy2.powmod(b, e, mod) % mod
        return acc
    mask = (1 << c) - 1
    for shift in range((-(-bits // c) - 1) * c, -1, -c):
        for _ in range(c):
            acc = acc * acc % mod
        buckets = [None] * (mask + 1)
        for b, e in zip(bases, exps):
            d = (e >> shift) & mask
            if d:
                cur = buckets[d]
                buckets[d] = b if cur is None else cur * b % mod
        # sum over d of d * bucket[d], in the exponent: running products from the top
        running = total = gmpy2.mpz(1)
        for d in range(mask, 0, -1):
            if buckets[d] is not None:
                running = running * buckets[d] % mod
            total = total * running % mod
        acc = acc * total % mod
    return acc
