# Under MicroPython: encode every serial-frame vector and decode every vector
# stream with firmware/frame.py, the stream fed whole and in 1- and 7-byte chunks.
import sys
import json
import binascii
import frame

with open(sys.argv[1]) as f:
    doc = json.load(f)
out = {"frames": [], "decoded": [], "streams": {}, "soft_crc": []}
for v in doc["frames"]:
    payload = binascii.unhexlify(v["payload"])
    wire = frame.encode(ord(v["type"]), payload)
    out["frames"].append(binascii.hexlify(wire).decode())
    got = []
    frame.Decoder(len(payload)).feed(bytes(wire), got)
    out["decoded"].append([chr(t) + binascii.hexlify(p).decode() for t, p in got])
    out["soft_crc"].append(frame.crc32_soft(payload) == binascii.crc32(payload) & 0xFFFFFFFF)


def show(items):
    res = []
    for t, p in items:
        if t is None:
            res.append({"reject": p})
        else:
            res.append({"type": chr(t), "payload": binascii.hexlify(p).decode()})
    return res


for chunk in (0, 1, 7):
    runs = []
    for s in doc["streams"]:
        wire = binascii.unhexlify(s["wire"])
        d = frame.Decoder(doc["max_payload"])
        got = []
        step = chunk or len(wire)
        for i in range(0, len(wire), step):
            d.feed(wire[i:i + step], got)
        runs.append(show(got))
    out["streams"][str(chunk)] = runs
print(json.dumps(out))
