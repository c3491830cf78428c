# Wire format v1 (DESIGN section 4): slot packing, signed bytes, the JSON reading.
import json
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


def reading(key, meter, seq, t, dt, prev, kid, c_int):
    # Returns (json payload bytes, reading hash hex). The hash chains readings.
    c = "%x" % c_int
    sb = signed_bytes(meter, seq, t, dt, prev, kid, c)
    sig = hexs(key.sign(sb))
    payload = json.dumps({"v": VERSION, "meter": meter, "seq": seq, "t": t,
                          "dt": dt, "prev": prev, "kid": kid, "c": c,
                          "sig": sig})
    return payload.encode(), hexs(hashlib.sha256(sb).digest())
