# Serial framing v1 (docs/serial.md): each frame is 0x00, COBS(type, payload,
# CRC-32), 0x00. COBS leaves no zero byte inside a frame, so any 0x00 on the
# line is a frame boundary and a receiver resynchronises on the next one after
# garbage, a cut cable or a reboot mid-frame; the leading 0x00 ends whatever
# garbage came before, so it cannot spoil the frame that follows. The CRC-32
# catches what COBS cannot (bit errors inside a frame).
# CPython twin: gridledger/serialframe.py; tests/vectors/serial_frames_v1.json
# pins both to the same bytes.
import binascii

HELLO = 0x48    # H meter -> bridge: {"proto", "meter", "area"}; repeated as keepalive
READING = 0x52  # R meter -> bridge: a wire-v1 reading, the exact MQTT payload
HEALTH = 0x53   # S meter -> bridge: {"seq", "spooled", ...}
LOG = 0x4C      # L meter -> bridge: one JSON log line (when the log has no other way out)
WELCOME = 0x57  # W bridge -> meter: broker up and acks subscribed; the link is usable
ACK = 0x41      # A bridge -> meter: the gateway's ack body, verbatim
NACK = 0x4E     # N bridge -> meter: the gateway's nack body, verbatim
QUERY = 0x51    # Q bridge -> meter: say hello now (the bridge restarted)
ALERT = 0x45    # E meter -> bridge: a signed alert (docs/alerts.md), the exact MQTT payload
EVENT = 0x56    # V meter -> bridge: a signed meter event (docs/journal.md), the exact MQTT payload
TYPES = b"HRSLWANQEV"

REASONS = ("oversized", "bad_cobs", "too_short", "bad_crc", "unknown_type")

_table = None


def crc32_soft(data):
    # zlib's CRC-32 in Python, for a port built without binascii.crc32; the
    # 256-entry table is made on first use.
    global _table
    if _table is None:
        _table = []
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
            _table.append(c)
    t = _table
    c = 0xFFFFFFFF
    for b in data:
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


crc32 = getattr(binascii, "crc32", None) or crc32_soft


def limit(max_payload):
    # Most bytes between two delimiters for a payload of max_payload bytes:
    # type + payload + CRC, plus one COBS code byte per started 254 bytes.
    body = 1 + max_payload + 4
    return body + body // 254 + 1


def cobs_encode(data):
    out = bytearray()
    n = len(data)
    i = 0
    while True:
        j = data.find(b"\x00", i)
        end = n if j < 0 else j
        full = False
        while end - i >= 254:
            out.append(255)
            out += data[i:i + 254]
            i += 254
            full = True
        # A 255 code implies no zero after its block, so data that ends right
        # after one needs no final code (the canonical encoding).
        if not (j < 0 and full and i == end):
            out.append(end - i + 1)
            out += data[i:end]
        if j < 0:
            return out
        i = j + 1


def cobs_decode(data):
    # data holds no zero byte; returns None if a code runs past the end.
    out = bytearray()
    n = len(data)
    i = 0
    while i < n:
        c = data[i]
        j = i + c
        if j > n:
            return None
        out += data[i + 1:j]
        i = j
        if c < 255 and i < n:
            out.append(0)
    return out


def encode(ftype, payload):
    body = bytearray((ftype,))
    body += payload
    body += (crc32(body) & 0xFFFFFFFF).to_bytes(4, "big")
    out = bytearray(b"\x00")
    out += cobs_encode(body)
    out.append(0)
    return out


def decode(raw):
    # One frame's bytes between delimiters -> (type, payload) or (None, reason).
    body = cobs_decode(raw)
    if body is None:
        return None, "bad_cobs"
    if len(body) < 5:
        return None, "too_short"
    crc = crc32(memoryview(body)[:-4]) & 0xFFFFFFFF
    if crc != int.from_bytes(body[-4:], "big"):
        return None, "bad_crc"
    if body[0] not in TYPES:
        return None, "unknown_type"
    return body[0], bytes(body[1:-4])


class Decoder:
    # Bytes in, frames out, in any chunking. Memory is fixed: one buffer of
    # limit(max_payload) bytes, allocated once (a growing buffer fragments a
    # small heap); a run longer than that is dropped as it arrives and reported
    # once, at its closing delimiter.
    def __init__(self, max_payload=1024):
        self.limit = limit(max_payload)
        self._buf = bytearray(self.limit)
        self._mv = memoryview(self._buf)
        self._n = 0
        self._over = False

    def feed(self, data, out):
        # Appends (type, payload) per good frame and (None, reason) per bad one.
        n = len(data)
        i = 0
        while i < n:
            j = data.find(b"\x00", i)
            end = n if j < 0 else j
            if not self._over:
                k = self._n + end - i
                if k > self.limit:
                    self._over = True
                    self._n = 0
                elif end > i:
                    self._mv[self._n:k] = data[i:end]
                    self._n = k
            if j < 0:
                return
            if self._over:
                self._over = False
                out.append((None, "oversized"))
            elif self._n:
                raw = bytes(self._mv[:self._n])
                self._n = 0
                out.append(decode(raw))
            i = j + 1
