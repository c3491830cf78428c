# Wire format v1 (DESIGN section 4): slot packing, signed bytes, the JSON reading.
import hashlib
import binascii

VERSION = 1
SLOT_BITS = 48
BANDS = 8
ZERO_HASH = "0" * 64
_SLOT_MAX = (1 << SLOT_BITS) - 1


def hexs(b):
    return binascii.hexlify(b).decode()


def kid_of(n):
    return hexs(hashlib.sha256(str(n).encode()).digest()[:8])


def slot(band, direction):
    return 2 * band + direction


def pack(values):
    # values: {slot: watt-hours}; slot = 2*band + direction (0 import, 1 export)
    m = 0
    for s in values:
        v = values[s]
        if not 0 <= s < 2 * BANDS or not 0 <= v <= _SLOT_MAX:
            raise ValueError("slot or value out of range")
        m |= v << (SLOT_BITS * s)
    return m


def signed_bytes(meter, seq, t, dt, prev, kid, c):
    return "\n".join(("gl-reading-v1", meter, str(seq), str(t), str(dt),
                      prev, kid, c)).encode()


def payload(meter, seq, t, dt, prev, kid, c, sig):
    # The JSON reading, fields in wire order. Built by hand, not json.dumps: a
    # reading rebuilt from the journal must come out the same every time, and
    # none of these values needs escaping (meter ids are [A-Za-z0-9_-]).
    return ('{"v": %d, "meter": "%s", "seq": %d, "t": %d, "dt": %d, "prev": "%s", "kid": "%s", '
            '"c": "%s", "sig": "%s"}' % (VERSION, meter, seq, t, dt, prev, kid, c, sig)).encode()


def sign(key, meter, seq, t, dt, prev, kid, c):
    # (signature bytes, reading hash hex); c is the ciphertext's hex.
    sb = signed_bytes(meter, seq, t, dt, prev, kid, c)
    return key.sign(sb), hexs(hashlib.sha256(sb).digest())


def reading(key, meter, seq, t, dt, prev, kid, c_int):
    # Returns (json payload bytes, reading hash hex). The hash chains readings.
    c = "%x" % c_int
    sig, h = sign(key, meter, seq, t, dt, prev, kid, c)
    return payload(meter, seq, t, dt, prev, kid, c, hexs(sig)), h
