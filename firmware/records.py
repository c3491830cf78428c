# Journal record payloads: a reading or a signed event in binary (ciphertext,
# hashes and signature as bytes, not hex), and the exact wire JSON rebuilt from
# them. Every record also carries the counters as they stand after it (sensor
# checkpoint included), so a record written just before a power cut brings the
# counters forward on boot. Layouts: docs/journal.md.
import binascii
import hashlib
import struct

import wire
from counters import ckpt_fields, ckpt_of

READING = 1
EVENT = 2
# The kind byte's high nibble is the header version: V2 headers end with the
# sensor checkpoint; a high nibble of 0 (the first format, still in journals written
# before the update) has none.
V2 = 0x10
# A flag in the same nibble: this reading's body holds its time quality, one
# byte (wire.TQS index + 1) after the signature. Only V2 headers carry it.
TQ = 0x20
# kind, seq, t, eseq, import Wh, export Wh, prev (32 bytes), checkpoint import, export
COMMON_FMT = ">BIIIQQ32sQQ"
COMMON = struct.calcsize(COMMON_FMT)
_V1_COMMON = COMMON_FMT[:-2]
V1_COMMON = struct.calcsize(_V1_COMMON)
_READING = ">I8s64s"  # dt, kid, signature; the ciphertext follows
EVENT_FMT = ">IQQ64s"  # at, import before, export before, signature; `by` follows (setreg.pack)
_READING_SIZE = struct.calcsize(_READING)
_EVENT_SIZE = struct.calcsize(EVENT_FMT)
READING_FIXED = COMMON + _READING_SIZE
EVENT_FIXED = COMMON + _EVENT_SIZE
SET_REGISTER = "set_register"


def unhex(s):
    return binascii.unhexlify(s)


def _c_bytes(c_int, nsq_bytes):
    return c_int.to_bytes(nsq_bytes, "big")


def pack_reading(buf, c, seq, t, dt, prev, kid, sig, c_int, nsq_bytes, tq=None):
    # c: the Counters after this reading (t, eseq, registers); prev: hex of
    # the previous reading's hash, kid: hex, sig: bytes; tq: the reading's
    # time quality or None (a plain v1 reading). Returns the length.
    ci, ce = ckpt_fields(c.ckpt)
    k = V2 | READING if tq is None else V2 | TQ | READING
    struct.pack_into(COMMON_FMT, buf, 0, k, seq, t, c.eseq, c.import_wh, c.export_wh, unhex(prev), ci, ce)
    struct.pack_into(_READING, buf, COMMON, dt, unhex(kid), sig)
    at = READING_FIXED
    if tq is not None:
        buf[at] = wire.TQS.index(tq) + 1
        at += 1
    buf[at:at + nsq_bytes] = _c_bytes(c_int, nsq_bytes)
    return at + nsq_bytes


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


def reading_json(p, meter):
    # The reading exactly as first published, and its hash (hex).
    _, seq, t, _, _, _, prev, _ = common(p)
    b = _body(p)
    dt, kid, sig = struct.unpack_from(_READING, p, b)
    at = b + _READING_SIZE
    tq = None
    if p[0] & TQ:
        tq = wire.TQS[p[at] - 1]
        at += 1
    c = "%x" % int.from_bytes(bytes(p[at:]), "big")
    prev, kid = wire.hexs(prev), wire.hexs(kid)
    sb = wire.signed_bytes(meter, seq, t, dt, prev, kid, c, tq)
    return wire.payload(meter, seq, t, dt, prev, kid, c, wire.hexs(sig), tq), wire.hexs(hashlib.sha256(sb).digest())


def event_json(p, meter):
    _, seq, _, eseq, imp, exp, prev, _ = common(p)
    b = _body(p)
    at, imp0, exp0, sig = struct.unpack_from(EVENT_FMT, p, b)
    by = bytes(p[b + _EVENT_SIZE:]).decode()
    return ('{"v": 1, "meter": "%s", "eseq": %d, "at": %d, "kind": "%s", "seq": %d, "prev": "%s", '
            '"import_before": %d, "export_before": %d, "import_wh": %d, "export_wh": %d, "by": "%s", "sig": "%s"}'
            % (meter, eseq, at, SET_REGISTER, seq, wire.hexs(prev), imp0, exp0, imp, exp, by,
               wire.hexs(sig))).encode()
