# Wire format v1 (DESIGN section 4): slot packing, signed bytes, the JSON reading,
# and its time-quality extension `tq` (docs/architecture.md, "Wire format v1").
import hashlib
import binascii

VERSION = 1
SLOT_BITS = 48
BANDS = 8
ZERO_HASH = "0" * 64
_SLOT_MAX = (1 << SLOT_BITS) - 1
# How a reading's time was obtained (firmware/clock.py); journal records store
# the index + 1 (records.py).
TQS = ("ntp", "rtc", "host", "unsynced")


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


def signed_bytes(meter, seq, t, dt, prev, kid, c, tq=None):
    # The signed bytes as three pieces, c (the ciphertext's hex, bytes or
    # str: MicroPython hashes a str's bytes as they are) whole in between. A
    # meter hashes the pieces and never joins them: joined, they were a
    # 1.2 KB block, and Ed25519 joined them twice more, the allocations that
    # failed in a fragmented 128 KiB heap (docs/alerts.md, "Heap"). With a
    # time quality, one more line "tq=<value>": a v1 reading's bytes are
    # unchanged, and no v1 reading has nine lines.
    return (("gl-reading-v1\n%s\n%d\n%d\n%d\n%s\n%s\n" % (meter, seq, t, dt, prev, kid)).encode(),
            c, b"" if tq is None else ("\ntq=" + tq).encode())


def digest(msg):
    # SHA-256 of the signed bytes' pieces: the reading's hash.
    h = hashlib.sha256()
    for p in msg:
        h.update(p)
    return h.digest()


def payload(meter, seq, t, dt, prev, kid, c, sig, tq=None):
    # The JSON reading, fields in wire order (tq, when present, before sig).
    # Built by hand, not json.dumps: a reading rebuilt from the journal must
    # come out the same every time, and none of these values needs escaping
    # (meter ids are [A-Za-z0-9_-]). c: the ciphertext's hex as bytes.
    # Joined, not %-formatted around c: a join sizes its result first and
    # allocates it once, where formatting grew the 1.2-1.4 KB buffer a step
    # at a time, two such blocks alive at once (docs/alerts.md, "Heap").
    q = "" if tq is None else '"tq": "%s", ' % tq
    return b"".join((b'{"v": %d, "meter": "%s", "seq": %d, "t": %d, "dt": %d, "prev": "%s", "kid": "%s", '
                     b'"c": "' % (VERSION, meter, seq, t, dt, prev, kid), c,
                     b'", %s"sig": "%s"}' % (q, sig)))


def sign(key, meter, seq, t, dt, prev, kid, c, tq=None):
    # (signature bytes, reading hash hex); c is the ciphertext's hex (bytes).
    msg = signed_bytes(meter, seq, t, dt, prev, kid, c, tq)
    return key.sign(msg), hexs(digest(msg))


def reading(key, meter, seq, t, dt, prev, kid, c_int, tq=None):
    # Returns (json payload bytes, reading hash hex). The hash chains readings.
    c = b"%x" % c_int
    sig, h = sign(key, meter, seq, t, dt, prev, kid, c, tq)
    return payload(meter, seq, t, dt, prev, kid, c, hexs(sig), tq), h
