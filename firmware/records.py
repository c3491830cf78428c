# Journal record payloads: a reading or a signed event in binary (hashes and
# signature as bytes, not hex), and the exact wire JSON rebuilt from them. A
# reading keeps its plaintext and randomness seed instead of its ciphertext
# (_COMPACT: 181 bytes instead of 674 at 2048 bits), and its ciphertext is
# computed again to send it; records of the earlier format (and migrated
# first-cut readings, firstcut.py) hold the ciphertext itself. Every record also
# carries the counters as they stand after it (sensor checkpoint included), so a
# record written just before a power cut brings the counters forward on boot.
# Layouts: docs/journal.md.
import binascii
import struct

import wire
from counters import ckpt_fields, ckpt_of
from micropython import const

READING = 1
EVENT = 2
# The kind byte's high nibble is the header version: V2 headers end with the
# sensor checkpoint; a high nibble of 0 (the first format, still in journals written
# before the update) has none.
V2 = 0x10
# A flag in the same nibble: this reading's body holds its time quality, one
# byte (wire.TQS index + 1) after the signature. Only V2 headers carry it.
TQ = 0x20
# A third flag: this reading is compact. After the signature (and time
# quality): 4 bytes of the reading's hash (the check that the ciphertext came
# out the same), the DJN exponent's length in bytes, a u16 mask of the plaintext
# slots present, each one's value as a LEB128 varint, and the seed (the rest).
# The kid is not kept: a compact reading is only ever rebuilt under the key it
# was made with, and the check refuses any other.
_COMPACT = const(0x40)
# kind, seq, t, eseq, import Wh, export Wh, prev (32 bytes), checkpoint import, export
COMMON_FMT = ">BIIIQQ32sQQ"
COMMON = struct.calcsize(COMMON_FMT)
_V1_COMMON = COMMON_FMT[:-2]
V1_COMMON = struct.calcsize(_V1_COMMON)
_READING = ">I8s64s"  # dt, kid, signature; the ciphertext follows
# A compact reading's body: dt (u32), signature; time quality, check, exponent
# length, slots, seed follow.
_DT_SIG = const(68)
EVENT_FMT = ">IQQ64s"  # at, import before, export before, signature; `by` follows (setreg.pack)
_READING_SIZE = struct.calcsize(_READING)
_SLOT_BITS = const(48)
_SLOTS = const(16)
_EVENT_SIZE = struct.calcsize(EVENT_FMT)
READING_FIXED = COMMON + _READING_SIZE
EVENT_FIXED = COMMON + _EVENT_SIZE
SET_REGISTER = "set_register"


def unhex(s):
    return binascii.unhexlify(s)


def pack_reading(buf, c, seq, t, dt, prev, sig, h, m, seed, exp_bits, tq=None):
    # A reading as its plaintext m (wire.pack) and the seed of its randomness
    # (paillier.RhoPool.take); h: hex of its hash. Returns the length.
    ci, ce = ckpt_fields(c.ckpt)
    k = V2 | _COMPACT | READING if tq is None else V2 | _COMPACT | TQ | READING
    struct.pack_into(COMMON_FMT, buf, 0, k, seq, t, c.eseq, c.import_wh, c.export_wh, unhex(prev), ci, ce)
    struct.pack_into(">I", buf, COMMON, dt)
    buf[COMMON + 4:COMMON + _DT_SIG] = sig
    at = COMMON + _DT_SIG
    if tq is not None:
        buf[at] = wire.TQS.index(tq) + 1
        at += 1
    buf[at:at + 4] = unhex(h[:8])
    buf[at + 4] = (exp_bits + 7) // 8
    mask, mat = 0, at + 5
    at += 7
    for s in range(_SLOTS):
        v = m >> (_SLOT_BITS * s) & 0xFFFFFFFFFFFF  # wire.pack's 48-bit slots
        if v:
            mask |= 1 << s
            while v > 0x7F:
                buf[at] = v & 0x7F | 0x80
                v >>= 7
                at += 1
            buf[at] = v
            at += 1
    struct.pack_into(">H", buf, mat, mask)
    buf[at:at + len(seed)] = seed
    return at + len(seed)


def kind(p):
    return p[0] & 0x0F


def _body(p):
    # where the kind-specific fields start: after a V2 or a first-format header
    return COMMON if p[0] & V2 else V1_COMMON


def common(p):
    # (kind, seq, t, eseq, import Wh, export Wh, prev bytes, sensor checkpoint
    # or None), from a header of either version
    if p[0] & V2:
        k, seq, t, eseq, imp, exp, prev, ci, ce = struct.unpack_from(COMMON_FMT, p, 0)
        return k & 0x0F, seq, t, eseq, imp, exp, prev, ckpt_of(ci, ce)
    k, seq, t, eseq, imp, exp, prev = struct.unpack_from(_V1_COMMON, p, 0)
    return k & 0x0F, seq, t, eseq, imp, exp, prev, None


def reading_json(p, meter, kid=None, fn=None):
    # The reading exactly as first published, and its hash (hex). A compact
    # one needs the meter's kid (hex) and fn(m, seed, exp_bits): its
    # ciphertext, or None while that is still being computed; without fn,
    # or while it gives None, this returns None. ValueError when the rebuilt
    # reading fails its check.
    _, seq, t, _, _, _, prev, _ = common(p)
    if p[0] & _COMPACT:
        if fn is None:
            return None
        dt = struct.unpack_from(">I", p, COMMON)[0]
        sig = bytes(p[COMMON + 4:COMMON + _DT_SIG])
        at = COMMON + _DT_SIG
        tq = None
        if p[0] & TQ:
            tq = wire.TQS[p[at] - 1]
            at += 1
        check = bytes(p[at:at + 4])
        ebits = 8 * p[at + 4]
        mask = struct.unpack_from(">H", p, at + 5)[0]
        at += 7
        m = 0
        for s in range(_SLOTS):
            if mask >> s & 1:
                v, sh = 0, 0
                while True:
                    b = p[at]
                    at += 1
                    v |= (b & 0x7F) << sh
                    sh += 7
                    if b < 0x80:
                        break
                m |= v << (_SLOT_BITS * s)
        c_int = fn(m, bytes(p[at:]), ebits)
        if c_int is None:
            return None
    else:
        b = _body(p)
        dt, kid, sig = struct.unpack_from(_READING, p, b)
        kid = wire.hexs(kid)
        at = b + _READING_SIZE
        tq = None
        if p[0] & TQ:
            tq = wire.TQS[p[at] - 1]
            at += 1
        c_int = int.from_bytes(bytes(p[at:]), "big")
    c = b"%x" % c_int
    c_int = None  # not kept while the signed bytes are hashed and the payload built
    prev = wire.hexs(prev)
    h = wire.digest(wire.signed_bytes(meter, seq, t, dt, prev, kid, c, tq))
    if p[0] & _COMPACT and h[:4] != check:
        raise ValueError("rebuild_mismatch")
    return wire.payload(meter, seq, t, dt, prev, kid, c, wire.hexs(sig), tq), wire.hexs(h)


def event_json(p, meter):
    _, seq, _, eseq, imp, exp, prev, _ = common(p)
    b = _body(p)
    at, imp0, exp0, sig = struct.unpack_from(EVENT_FMT, p, b)
    by = bytes(p[b + _EVENT_SIZE:]).decode()
    return ('{"v": 1, "meter": "%s", "eseq": %d, "at": %d, "kind": "%s", "seq": %d, "prev": "%s", '
            '"import_before": %d, "export_before": %d, "import_wh": %d, "export_wh": %d, "by": "%s", "sig": "%s"}'
            % (meter, eseq, at, SET_REGISTER, seq, wire.hexs(prev), imp0, exp0, imp, exp, by,
               wire.hexs(sig))).encode()
