# Ed25519 signing (RFC 8032 section 5.1), written for MicroPython's big ints.
# Points are kept in extended coordinates (X:Y:Z:T), so no inversion is needed
# until the final encoding; one fixed-base scalar multiplication per signature,
# done with a comb over a 32-point table of the base point (see _mul_base).
import gc

from sha512 import sha512
from micropython import const

P = 2 ** 255 - 19
L = 2 ** 252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, P - 2, P) % P
_D2 = 2 * _D % P
_BY = 4 * pow(5, P - 2, P) % P
_BX = 15112221349535400772501151409588531511454012693041857206046113283949847762202
_B = (_BX, _BY, 1, _BX * _BY % P)


def _add(p, q):
    # add-2008-hwcd-3 for a = -1 (RFC 8032 section 5.1.4)
    x1, y1, z1, t1 = p
    x2, y2, z2, t2 = q
    a = (y1 - x1) * (y2 - x2) % P
    b = (y1 + x1) * (y2 + x2) % P
    c = t1 * _D2 * t2 % P
    d = 2 * z1 * z2 % P
    e = b - a
    f = d - c
    g = d + c
    h = b + a
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _double(p):
    # dbl-2008-hwcd for a = -1
    x1, y1, z1, _ = p
    a = x1 * x1 % P
    b = y1 * y1 % P
    c = 2 * z1 * z1 % P
    h = a + b
    e = h - (x1 + y1) * (x1 + y1)
    g = a - b
    f = c + g
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _madd(p, q):
    # p + q for q in affine "Niels" form (y+x, y-x, 2*d*x*y): the same formula
    # as _add with z2 = 1 and t2*2d precomputed, 7 multiplications instead of 9.
    # Complete: q = (1, 1, 0), the identity, leaves p unchanged.
    x1, y1, z1, t1 = p
    ypx, ymx, xy2d = q
    a = (y1 - x1) * ymx % P
    b = (y1 + x1) * ypx % P
    c = t1 * xy2d % P
    d = 2 * z1
    e = b - a
    f = d - c
    g = d + c
    h = b + a
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _niels(p):
    x, y, z, _ = p
    zi = pow(z, P - 2, P)
    x = x * zi % P
    y = y * zi % P
    return ((y + x) % P, (y - x) % P, x * y % P * _D2 % P)


# Fixed-base comb (Lim-Lee), 5 teeth 51 apart: entry i holds sum(2^(51*j) * B)
# over the bits j set in i. A scalar below 2^255 (nonces are below L < 2^253,
# clamped secrets below 2^255) then costs 51 doublings and 51 additions instead
# of about 252 and 126, and always the same sequence of them: no step is
# skipped for a zero bit. The 32 points (3 integers each) are packed into one
# 3 KiB block: built at import amid the garbage of their own computation, 96
# separate integers would be scattered over the heap and fragment it.
_TEETH = const(5)
_COLS = const(51)


# The block is allocated before the table is computed, while the heap is still
# clean: afterwards the computation's garbage may leave no 3 KiB hole in a small
# heap (the 64 KiB test failed that way, depending on what was loaded before).
_COMB = memoryview(bytearray(96 << _TEETH))


def _put(i, point):
    for j, v in enumerate(_niels(point) if len(point) == 4 else point):
        _COMB[96 * i + 32 * j:96 * i + 32 * j + 32] = v.to_bytes(32, "little")


def _fill_comb():
    spaced = [_B]
    for _ in range(_TEETH - 1):
        q = spaced[-1]
        for _ in range(_COLS):
            q = _double(q)
        spaced.append(q)
    _put(0, (1, 1, 0))
    for i in range(1, 1 << _TEETH):
        q = (0, 1, 1, 0)
        for j in range(_TEETH):
            if i >> j & 1:
                q = _add(q, spaced[j])
        _put(i, q)


_fill_comb()
# The fill leaves some 70 KB of garbage behind; whatever is allocated next (the
# rest of this module, the meter's other modules) would land among it and stay
# scattered over the heap once it is freed.
gc.collect()


def _entry(i):
    o = i * 96
    return (int.from_bytes(_COMB[o:o + 32], "little"), int.from_bytes(_COMB[o + 32:o + 64], "little"),
            int.from_bytes(_COMB[o + 64:o + 96], "little"))


def _mul_base(k):
    # k * B for 0 <= k < 2^255; column c gathers bits c, c+51, ..., c+204.
    q = (0, 1, 1, 0)
    for c in range(_COLS - 1, -1, -1):
        q = _double(q)
        i = ((k >> c & 1) | (k >> (c + 50) & 2) | (k >> (c + 100) & 4) | (k >> (c + 150) & 8)
             | (k >> (c + 200) & 16))
        q = _madd(q, _entry(i))
    return q


def _encode(p):
    x, y, z, _ = p
    zi = pow(z, P - 2, P)
    x = x * zi % P
    y = y * zi % P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def _h_int(*parts):
    # parts: bytes, and last a tuple of the message's pieces (unpacked, not
    # joined: a reading's 1.2 KB of signed bytes are hashed where they are).
    return int.from_bytes(sha512(*(parts[:-1] + parts[-1])), "little")


def _expand(seed):
    if len(seed) != 32:
        raise ValueError("ed25519 seed must be 32 bytes")
    h = sha512(seed)
    a = int.from_bytes(h[:32], "little")
    a &= (1 << 254) - 8
    a |= 1 << 254
    return a, h[32:]


class SigningKey:
    # Holds the expanded secret so each signature costs one scalar multiplication.
    def __init__(self, seed):
        self._a, self._prefix = _expand(seed)
        self.public = _encode(_mul_base(self._a))

    def sign(self, msg):
        # msg: bytes, or a tuple of pieces signed as their concatenation
        # (wire.signed_bytes: the ciphertext's hex is one, as a str).
        if not isinstance(msg, tuple):
            msg = (msg,)
        r = _h_int(self._prefix, msg) % L
        big_r = _encode(_mul_base(r))
        k = _h_int(big_r, self.public, msg) % L
        s = (r + k * self._a) % L
        return big_r + s.to_bytes(32, "little")
