# Counters that never go backwards (seq, chain head, registers, boot count,
# the sensor checkpoint), kept in two alternating fixed-size slot files. Each
# write goes to the slot not holding the newest valid record, so a power cut
# mid-write can only tear that one; a slot whose magic, size or CRC-32 is wrong
# is ignored, and the valid slot with the highest generation wins. Format:
# docs/journal.md.
import binascii
import struct

MAGIC = b"GLC2"
# magic, generation, seq, t (last interval end), eseq (last event), boot count,
# acked (gateway's ack mark), floor (acked or dropped through), dropped count,
# import Wh, export Wh, prev (last reading hash, 32 bytes), the sensor
# checkpoint (import, export totals; NO_CKPT: none yet); then CRC-32.
_FMT = ">4sIIIIIIIIQQ32sQQ"
_BODY = struct.calcsize(_FMT)
SIZE = _BODY + 4
# The first format (GLC1) is GLC2 without the checkpoint: still read, as "no
# checkpoint", so a meter updated in the field boots; the next write is GLC2.
V1_MAGIC = b"GLC1"
_V1_FMT = _FMT[:-2]
_V1_BODY = struct.calcsize(_V1_FMT)
V1_SIZE = _V1_BODY + 4
ZERO_PREV = b"\x00" * 32
NO_CKPT = 0xFFFFFFFFFFFFFFFF


def ckpt_fields(ck):
    # A sensor checkpoint as the two u64 stored: None (or anything a u64
    # cannot hold) is NO_CKPT twice, so the next boot takes a fresh baseline.
    if ck is None or not (0 <= ck[0] < NO_CKPT and 0 <= ck[1] < NO_CKPT):
        return NO_CKPT, NO_CKPT
    return ck[0], ck[1]


def ckpt_of(imp, exp):
    return None if imp == NO_CKPT or exp == NO_CKPT else (imp, exp)


class Counters:
    def __init__(self):
        self.gen = 0
        self.seq = 0
        self.t = 0
        self.eseq = 0
        self.boot = 0
        self.acked = 0
        self.floor = 0
        self.dropped = 0
        self.import_wh = 0
        self.export_wh = 0
        self.prev = ZERO_PREV
        self.ckpt = None  # sensor totals the registers have counted up to

    def pack_into(self, buf):
        ci, ce = ckpt_fields(self.ckpt)
        struct.pack_into(_FMT, buf, 0, MAGIC, self.gen, self.seq, self.t, self.eseq, self.boot,
                         self.acked, self.floor, self.dropped, self.import_wh, self.export_wh, self.prev, ci, ce)
        struct.pack_into(">I", buf, _BODY, binascii.crc32(memoryview(buf)[:_BODY]) & 0xFFFFFFFF)


def unpack(data):
    # A Counters from one slot's bytes (either format), or None when torn or
    # corrupted.
    if data is None:
        return None
    if len(data) == SIZE:
        magic, fmt, body = MAGIC, _FMT, _BODY
    elif len(data) == V1_SIZE:
        magic, fmt, body = V1_MAGIC, _V1_FMT, _V1_BODY
    else:
        return None
    if struct.unpack_from(">I", data, body)[0] != binascii.crc32(memoryview(data)[:body]) & 0xFFFFFFFF:
        return None
    f = struct.unpack_from(fmt, data, 0)
    if f[0] != magic:
        return None
    c = Counters()
    (_, c.gen, c.seq, c.t, c.eseq, c.boot, c.acked, c.floor, c.dropped,
     c.import_wh, c.export_wh, c.prev) = f[:12]
    if len(f) > 12:
        c.ckpt = ckpt_of(f[12], f[13])
    return c


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read(SIZE + 1)  # one byte more: an oversized slot is not valid
    except OSError:
        return None


class CounterStore:
    def __init__(self, base):
        self.paths = (base + ".0", base + ".1")
        self._buf = bytearray(SIZE)
        self.slot = -1  # slot holding the newest valid record; -1: none

    def load(self):
        # The newest valid slot, or None when neither slot is valid (first boot,
        # or both destroyed: the caller decides what that means).
        best = None
        for i in (0, 1):
            c = unpack(_read(self.paths[i]))
            if c is not None and (best is None or c.gen > best.gen):
                best = c
                self.slot = i
        return best

    def save(self, c):
        # Bump the generation and write the other slot; the newest stays intact
        # until this one is whole. Raises OSError when the write fails.
        c.gen += 1
        c.pack_into(self._buf)
        slot = 0 if self.slot != 0 else 1
        with open(self.paths[slot], "wb") as f:
            f.write(self._buf)
        self.slot = slot
