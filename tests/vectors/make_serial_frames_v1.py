"""Regenerate serial_frames_v1.json: serial framing v1 known answers shared by the
firmware (MicroPython, firmware/frame.py) and CPython (gridledger/serialframe.py).

"frames": one frame each, type + payload -> the exact bytes on the line.
"streams": a byte stream as a receiver sees it (garbage, cuts, bad CRCs, ...) and
what it must make of it: good frames and rejections with their reasons, in order.
Deterministic; run `python tests/vectors/make_serial_frames_v1.py` only when the
format changes (tests/test_serial_frame.py checks the file against the codec).
"""

import json
import zlib
from pathlib import Path

from aggregator.events import make_event
from gridledger.errors import Rejected
from gridledger.meterkeys import MeterKey
from gridledger.serialframe import Decoder, FrameType as T, cobs_encode, encode

HERE = Path(__file__).parent
MAX_PAYLOAD = 1024  # the firmware decoder's default; streams use it too


def reading_payload() -> bytes:
    doc = json.loads((HERE / "readings_v1.json").read_text())
    return json.dumps(doc["readings"][0]["payload"], separators=(",", ":")).encode()


def alert_payload() -> bytes:
    return json.loads((HERE / "alerts_v1.json").read_text())["alerts"][0]["payload"].encode()


def event_payload() -> bytes:
    """A set-register event signed by a fixed key (Ed25519 is deterministic)."""
    key = MeterKey("m01", bytes(range(32)))
    return make_event(meter="m01", eseq=1, at=1795000000, seq=12, prev="ab" * 32, import_before=1000,
                      export_before=0, import_wh=123456, export_wh=789, by="tech-7", sign=key.sign).to_json()


def raw_frame(body: bytes, crc: int | None = None) -> bytes:
    """A frame around any body, with its true CRC unless `crc` says otherwise."""
    crc = zlib.crc32(body) if crc is None else crc
    return b"\x00" + cobs_encode(body + crc.to_bytes(4, "big")) + b"\x00"


def frames() -> list[dict]:
    cases = [
        (T.QUERY, b"", "empty payload"),
        (T.ACK, b'{"seq": 42}', "an ack as the gateway sends it"),
        (T.NACK, b'{"seq": 7, "reason": "seq_gap"}', "a nack"),
        (T.HELLO, b'{"proto":1,"meter":"m01","area":"area1"}', "hello"),
        (T.WELCOME, b'{"meter":"m01","area":"area1"}', "welcome"),
        (T.HEALTH, b'{"seq":12,"spooled":3}', "health"),
        (T.LOG, b'{"ev":"boot"}', "log line"),
        (T.READING, bytes(range(256)), "every byte value, zeros included"),
        (T.READING, b"\x00" * 5, "zeros only"),
        (T.READING, b"x" * 248, "body of 253 bytes: one COBS block below the limit"),
        (T.READING, b"x" * 249, "body of 254 bytes: one full 255-coded block, no final code"),
        (T.READING, b"x" * 250, "body of 255 bytes: a full block and a one-byte block"),
        (T.READING, b"x" * 500 + b"\x00" + b"y" * 300, "a zero after two full blocks"),
        (T.READING, reading_payload(), "wire-v1 vector reading 1 (readings_v1.json)"),
        (T.ALERT, alert_payload(), "alert vector 1 (alerts_v1.json)"),
        (T.ACK, b'{"alert_seq": 3}', "an alert's ack: on the ack topic, verbatim like every ack"),
        (T.EVENT, event_payload(), "a signed set-register event (docs/journal.md)"),
        (T.ACK, b'{"eseq": 1}', "an event's ack: on the ack topic, verbatim like every ack"),
    ]
    return [{"about": about, "type": chr(t), "payload": p.hex(), "wire": encode(t, p).hex()}
            for t, p, about in cases]


def streams() -> list[dict]:
    ack = encode(T.ACK, b'{"seq": 1}')
    ack2 = encode(T.ACK, b'{"seq": 2}')
    good_body = bytes((T.ACK,)) + b'{"seq": 3}'
    # (what, bytes on the line, what a receiver must make of them: a frame type or a rejection)
    cases = [
        ("idle delimiters between frames", b"\x00\x00\x00" + ack + b"\x00" + ack2 + b"\x00\x00", "A A"),
        ("text garbage before a frame", b"Traceback (most recent call last):\r\n" + ack, "bad_cobs A"),
        ("garbage holding zeros", b"\x13\x00\xff\xfe\x00\x07" + ack, "bad_cobs bad_cobs bad_cobs A"),
        ("a frame cut off, then a whole one", ack[:-5] + ack2, "bad_cobs A"),
        ("a frame cut off without its closing delimiter", ack2[:9] + ack, "bad_cobs A"),
        ("one bit flipped", ack[:5] + bytes((ack[5] ^ 0x04,)) + ack[6:] + ack2, "bad_crc A"),
        ("wrong CRC", raw_frame(good_body, zlib.crc32(good_body) ^ 1) + ack, "bad_crc A"),
        ("too short", raw_frame(b"", 0)[:-1] + b"\x00" + b"\x00\x02A\x00" + ack, "too_short too_short A"),
        ("unknown type", raw_frame(b"Z{}") + ack, "unknown_type A"),
        ("oversized", b"\x00" + b"\x41" * 3000 + b"\x00" + ack, "oversized A"),
        ("a code running past the end", b"\x00\x09abc\x00" + ack, "bad_cobs A"),
    ]
    out = []
    for name, wire, want in cases:
        results = []
        for item in Decoder(MAX_PAYLOAD).feed(wire):
            if isinstance(item, Rejected):
                results.append({"reject": item.reason})
            else:
                results.append({"type": chr(item.type), "payload": item.payload.hex()})
        assert [r.get("reject") or r["type"] for r in results] == want.split(), name
        out.append({"about": name, "wire": wire.hex(), "expect": results})
    return out


def main() -> None:
    doc = {"about": "gridledger serial framing v1 known answers (docs/serial.md); see make_serial_frames_v1.py",
           "max_payload": MAX_PAYLOAD, "frames": frames(), "streams": streams()}
    (HERE / "serial_frames_v1.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
