# Journal record payloads: a reading or a signed event in binary (ciphertext,
# hashes and signature as bytes, not hex), and the exact wire JSON rebuilt from
# them. Every record also carries the counters as they stand after it, so a
# record written just before a power cut brings the counters forward on boot.
# Layouts: docs/journal.md.
import binascii
import hashlib
import struct

import wire

READING = 1
EVENT = 2
# kind, seq, t, eseq, import Wh, export Wh, prev (32 bytes)
_COMMON = ">BIIIQQ32s"
COMMON = struct.calcsize(_COMMON)
_READING = ">I8s64s"  # dt, kid, signature; the ciphertext follows
_EVENT = ">IQQ64s"  # at, import before, export before, signature; `by` follows
READING_FIXED = COMMON + struct.calcsize(_READING)
EVENT_FIXED = COMMON + struct.calcsize(_EVENT)
SET_REGISTER = "set_register"


def unhex(s):
    return binascii.unhexlify(s)


def _c_bytes(c_int, nsq_bytes):
    return c_int.to_bytes(nsq_bytes, "big")


def pack_reading(buf, c, seq, t, dt, prev, kid, sig, c_int, nsq_bytes):
    # c: the Counters after this reading (t, eseq, registers); prev: hex of
    # the previous reading's hash, kid: hex, sig: bytes. Returns the length.
    struct.pack_into(_COMMON, buf, 0, READING, seq, t, c.eseq, c.import_wh, c.export_wh, unhex(prev))
    struct.pack_into(_READING, buf, COMMON, dt, unhex(kid), sig)
    end = READING_FIXED + nsq_bytes
    buf[READING_FIXED:end] = _c_bytes(c_int, nsq_bytes)
    return end


def pack_event(buf, c, at, import_before, export_before, by, sig):
    by = by.encode()
    struct.pack_into(_COMMON, buf, 0, EVENT, c.seq, c.t, c.eseq, c.import_wh, c.export_wh, c.prev)
    struct.pack_into(_EVENT, buf, COMMON, at, import_before, export_before, sig)
    end = EVENT_FIXED + len(by)
    buf[EVENT_FIXED:end] = by
    return end


def common(p):
    # (kind, seq, t, eseq, import Wh, export Wh, prev bytes)
    return struct.unpack_from(_COMMON, p, 0)


def reading_json(p, meter):
    # The reading exactly as first published, and its hash (hex).
    _, seq, t, _, _, _, prev = common(p)
    dt, kid, sig = struct.unpack_from(_READING, p, COMMON)
    c = "%x" % int.from_bytes(bytes(p[READING_FIXED:]), "big")
    prev, kid = wire.hexs(prev), wire.hexs(kid)
    sb = wire.signed_bytes(meter, seq, t, dt, prev, kid, c)
    return wire.payload(meter, seq, t, dt, prev, kid, c, wire.hexs(sig)), wire.hexs(hashlib.sha256(sb).digest())


def event_signed_bytes(meter, eseq, at, kind, seq, prev, import_before, export_before, import_wh, export_wh, by):
    # gl-event-v1 (docs/journal.md): the event is tied to the reading chain by
    # the seq and hash of the last reading before it.
    return "\n".join(("gl-event-v1", meter, str(eseq), str(at), kind, str(seq), prev, str(import_before),
                      str(export_before), str(import_wh), str(export_wh), by)).encode()


def event_json(p, meter):
    _, seq, _, eseq, imp, exp, prev = common(p)
    at, imp0, exp0, sig = struct.unpack_from(_EVENT, p, COMMON)
    by = bytes(p[EVENT_FIXED:]).decode()
    return ('{"v": 1, "meter": "%s", "eseq": %d, "at": %d, "kind": "%s", "seq": %d, "prev": "%s", '
            '"import_before": %d, "export_before": %d, "import_wh": %d, "export_wh": %d, "by": "%s", "sig": "%s"}'
            % (meter, eseq, at, SET_REGISTER, seq, wire.hexs(prev), imp0, exp0, imp, exp, by,
               wire.hexs(sig))).encode()
