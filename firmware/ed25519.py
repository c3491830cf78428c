# Ed25519 signing (RFC 8032 section 5.1), written for MicroPython's big ints.
# Points are kept in extended coordinates (X:Y:Z:T), so no inversion is needed
# until the final encoding; one fixed-base scalar multiplication per signature.
from sha512 import sha512

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


def _mul(k, p):
    q = (0, 1, 1, 0)
    while k:
        if k & 1:
            q = _add(q, p)
        p = _double(p)
        k >>= 1
    return q


def _encode(p):
    x, y, z, _ = p
    zi = pow(z, P - 2, P)
    x = x * zi % P
    y = y * zi % P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def _h_int(*parts):
    return int.from_bytes(sha512(b"".join(parts)), "little")


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
        self.public = _encode(_mul(self._a, _B))

    def sign(self, msg):
        r = _h_int(self._prefix, msg) % L
        big_r = _encode(_mul(r, _B))
        k = _h_int(big_r, self.public, msg) % L
        s = (r + k * self._a) % L
        return big_r + s.to_bytes(32, "little")
