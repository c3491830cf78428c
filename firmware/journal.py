# The meter's journal: every reading (and signed event) stays on flash until
# the gateway acknowledges it. Append-only CRC-framed records in a few segment
# files (littlefs-friendly: files are only appended to, never rewritten, and a
# segment is deleted once everything in it is acknowledged). Bounded: when
# `capacity` records wait, it says so and keeps the oldest or the newest.
# Recovery after a torn write or a corrupted byte keeps every intact record and
# no damaged one. Frame and payload formats: docs/journal.md.
import array
import binascii
import os
import struct

MAGIC = b"\xa7J"
HEAD = 4  # magic, payload length (u16)
TAIL = 4  # CRC-32 of magic, length and payload
MAX_PAYLOAD = 2048
KEEP_OLDEST = "keep_oldest"
KEEP_NEWEST = "keep_newest"
EVENT_KIND = 2


def exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def mkdirs(path):
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        p = "/".join(parts[:i])
        if p and not exists(p):
            os.mkdir(p)


def key_of(payload):
    # Records are acknowledged by seq: a reading by its own, an event by the
    # reading after it (payload starts: kind u8, whose low nibble is the kind
    # and high nibble the header version, then seq u32 of the last reading).
    seq = struct.unpack_from(">I", payload, 1)[0]
    return seq + 1 if payload[0] & 0x0F == EVENT_KIND else seq


def _crc(mv):
    return binascii.crc32(mv) & 0xFFFFFFFF


class JournalError(Exception):
    pass


class _Segment:
    def __init__(self, num):
        self.num = num
        # Offset and key of each indexed record; position i is offs[i - base]:
        # a segment drops the acknowledged front of its index (Journal.advance)
        # and keeps counting, so the RAM it takes does not grow with uptime.
        self.offs = array.array("I")
        self.keys = array.array("I")
        self.base = 0
        self.start = 0  # positions before it are acknowledged or dropped
        self.end = 0  # where the next record goes
        self.sealed = False  # damaged at recovery or a failed write: never appended to again

    def count(self):
        return self.base + len(self.keys)

    def pending(self):
        return self.start < self.base + len(self.keys)


class Journal:
    def __init__(self, path, capacity=2880, when_full=KEEP_OLDEST, per_segment=None):
        if when_full not in (KEEP_OLDEST, KEEP_NEWEST):
            raise JournalError("journal.when_full must be keep_oldest or keep_newest")
        if capacity < 1:
            raise JournalError("journal.capacity must be at least 1")
        self.path = path
        self.capacity = capacity
        self.when_full = when_full
        # Eight full segments hold the capacity: few files, each small enough
        # that a partly acknowledged one wastes little flash.
        self.per_segment = per_segment or (capacity + 7) // 8
        self.floor = 0  # every record with key <= floor is done with
        self.dropped = 0  # records dropped because the journal was full
        self.damaged = 0  # damaged frames skipped at recovery or read
        self.live = 0
        self._segs = []
        # Segment numbers only grow while the meter runs: a position held by
        # the send loop must never come to name a record in a later segment
        # that reused a deleted one's number (it would skip that record).
        self._next_num = 1
        self._buf = bytearray(HEAD + MAX_PAYLOAD + TAIL)
        self._mv = memoryview(self._buf)
        mkdirs(path)

    def _file(self, num):
        return "%s/%08d.seg" % (self.path, num)

    def full(self):
        return self.live >= self.capacity

    # Recovery -------------------------------------------------------------

    def recover(self, floor):
        # Index every intact record above floor, in append order; delete
        # segments left with nothing to send (acked just before a power cut).
        self.floor = floor
        nums = []
        for name in os.listdir(self.path):
            if name.endswith(".seg"):
                try:
                    nums.append(int(name[:-4]))
                except ValueError:
                    pass
        nums.sort()
        self._next_num = max(self._next_num, nums[-1] + 1 if nums else 1)
        self._segs = []
        self.live = 0
        for num in nums:
            seg = _Segment(num)
            damaged = self.damaged
            self._scan(seg)
            # Appended to again only when every byte of it is an intact frame:
            # never after a torn tail or garbage. Sealed after every restart,
            # a meter whose power failed often with readings waiting made a
            # file per boot (each a 4 KiB block on littlefs, of the Pico W's 4
            # to spare, and 264 bytes of heap for its index).
            seg.sealed = self.damaged != damaged
            self._segs.append(seg)
            self.live += len(seg.keys)
        self._release()

    def _scan(self, seg):
        buf, mv = self._buf, self._mv
        path = self._file(seg.num)
        size = os.stat(path)[6]
        pos = 0
        with open(path, "rb") as f:
            while pos + HEAD + TAIL <= size:
                f.seek(pos)
                n = 0
                if f.readinto(mv[:HEAD]) == HEAD and buf[0:2] == MAGIC:
                    n = struct.unpack_from(">H", buf, 2)[0]
                    end = HEAD + n + TAIL
                    if not (0 < n <= MAX_PAYLOAD and pos + end <= size and f.readinto(mv[HEAD:end]) == end - HEAD
                            and struct.unpack_from(">I", buf, HEAD + n)[0] == _crc(mv[:HEAD + n])):
                        n = 0
                if n:
                    key = key_of(mv[HEAD:HEAD + n])
                    if key > self.floor:
                        seg.offs.append(pos)
                        seg.keys.append(key)
                    pos += HEAD + n + TAIL
                    seg.end = pos
                else:
                    self.damaged += 1
                    pos = self._resync(f, pos + 1, size)
        if seg.end == pos < size:
            self.damaged += 1  # a tail too short to be a frame: a torn write

    def _resync(self, f, pos, size):
        # The next place the magic appears; its frame is then checked like any.
        while pos + HEAD + TAIL <= size:
            f.seek(pos)
            k = f.readinto(self._mv[:512])
            i = self._buf[:k].find(MAGIC)
            if i >= 0:
                return pos + i
            pos += k - 1
        return size

    # Reading --------------------------------------------------------------

    def first(self):
        # Position (segment number, index) of the oldest record still to send.
        for seg in self._segs:
            if seg.pending():
                return (seg.num, seg.start)
        return None

    def after(self, pos):
        found = False
        for seg in self._segs:
            if seg.num == pos[0]:
                found = True
                if pos[1] + 1 < seg.count():
                    return (seg.num, max(pos[1] + 1, seg.start))
            elif found and seg.pending():
                return (seg.num, seg.start)
        return None if found else self.first()

    def _seg(self, num):
        for seg in self._segs:
            if seg.num == num:
                return seg
        return None

    def key(self, pos):
        seg = self._seg(pos[0])
        return seg.keys[pos[1] - seg.base]

    def read(self, pos):
        # The payload at pos as a memoryview, valid until the next read or
        # append; None when it no longer checks (the flash changed under it).
        seg = self._seg(pos[0])
        off = seg.offs[pos[1] - seg.base]
        buf, mv = self._buf, self._mv
        with open(self._file(seg.num), "rb") as f:
            f.seek(off)
            k = f.readinto(mv[:HEAD + MAX_PAYLOAD + TAIL])
        n = struct.unpack_from(">H", buf, 2)[0] if k >= HEAD else 0
        if (buf[0:2] != MAGIC or not 0 < n <= MAX_PAYLOAD or k < HEAD + n + TAIL
                or struct.unpack_from(">I", buf, HEAD + n)[0] != _crc(mv[:HEAD + n])):
            self.damaged += 1
            return None
        return mv[HEAD:HEAD + n]

    def last(self):
        # Position of the newest record above the floor, or None.
        for i in range(len(self._segs) - 1, -1, -1):
            seg = self._segs[i]
            if seg.pending():
                return (seg.num, seg.count() - 1)
        return None

    # Writing --------------------------------------------------------------

    def append(self, payload):
        # Frame and append one record. False when it was not kept (journal
        # full under keep_oldest, or the write failed: the caller says so).
        n = len(payload)
        if not 0 < n <= MAX_PAYLOAD:
            raise JournalError("record payload of %d bytes" % n)
        if self.full():
            if self.when_full == KEEP_OLDEST:
                self.dropped += 1
                return False
            self._drop_oldest()
        seg = self._segs[-1] if self._segs else None
        if seg is None or seg.sealed or seg.count() >= self.per_segment:
            seg = _Segment(self._next_num)
            self._next_num += 1
            self._segs.append(seg)
        buf, mv = self._buf, self._mv
        buf[0:2] = MAGIC
        struct.pack_into(">H", buf, 2, n)
        mv[HEAD:HEAD + n] = payload
        struct.pack_into(">I", buf, HEAD + n, _crc(mv[:HEAD + n]))
        try:
            with open(self._file(seg.num), "ab") as f:
                f.write(mv[:HEAD + n + TAIL])
        except OSError:
            seg.sealed = True  # whatever reached the file is a torn tail
            self.dropped += 1
            self._release()
            return False
        seg.offs.append(seg.end)
        seg.keys.append(key_of(payload))
        seg.end += HEAD + n + TAIL
        self.live += 1
        return True

    def _drop_oldest(self):
        pos = self.first()
        before = self.live
        self.advance(self.key(pos))
        self.dropped += before - self.live

    def advance(self, floor):
        # Everything up to floor is acknowledged (or dropped): forget it, and
        # delete each segment with nothing left to send.
        if floor > self.floor:
            self.floor = floor
        for seg in self._segs:
            while seg.pending() and seg.keys[seg.start - seg.base] <= self.floor:
                seg.start += 1
                self.live -= 1
            k = seg.start - seg.base
            if k >= 8 or k and not seg.pending():
                # The acknowledged front goes (all of it once nothing is
                # pending): between drains the index would grow with every
                # reading, reallocated 8 entries at a time.
                seg.offs = seg.offs[k:]
                seg.keys = seg.keys[k:]
                seg.base = seg.start
        self._release()

    def clear(self):
        # Delete every segment (a migration starting over).
        for name in os.listdir(self.path):
            if name.endswith(".seg"):
                os.remove(self.path + "/" + name)
        self._segs = []
        self.live = 0
        self.floor = 0

    def _release(self):
        keep = []
        for seg in self._segs:
            if seg.pending():
                keep.append(seg)
            elif seg is self._segs[-1] and not seg.sealed and seg.count() < self.per_segment:
                keep.append(seg)  # the open segment still takes records
            else:
                try:
                    os.remove(self._file(seg.num))
                except OSError:
                    keep.append(seg)  # try again next time
        self._segs = keep
