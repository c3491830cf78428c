"""Wire format v1 (DESIGN section 4): readings, their signed bytes and hash, slot packing,
and the time-quality extension ``tq`` (docs/architecture.md, "Wire format v1").

This is the CPython twin of ``firmware/wire.py``; ``tests/vectors/readings_v1.json``
pins both to the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

import gmpy2
import orjson

from .errors import Rejected

__all__ = [
    "VERSION", "METER_ID_RE", "SLOT_BITS", "BANDS", "SLOTS", "ZERO_HASH", "MAX_PAYLOAD", "TIME_QUALITIES",
    "Reading", "parse_reading", "well_formed", "stored_reading", "make_reading", "signed_bytes", "kid_of",
    "pack_slots", "unpack_slots", "slot_index", "readings_topic", "ack_topic", "nack_topic",
]

VERSION = 1
SLOT_BITS = 48
BANDS = 8
SLOTS = 2 * BANDS  # slot = 2*band + direction (0 import, 1 export)
ZERO_HASH = "0" * 64
# A 4096-bit modulus gives 2048 hex digits of ciphertext; anything much larger is abuse.
MAX_PAYLOAD = 8192

METER_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}\Z")
_HEX64_RE = re.compile(r"[0-9a-f]{64}\Z")
_KID_RE = re.compile(r"[0-9a-f]{16}\Z")
_SIG_RE = re.compile(r"[0-9a-f]{128}\Z")
_CT_RE = re.compile(r"[0-9a-f]{1,4096}\Z")
_SLOT_MAX = (1 << SLOT_BITS) - 1
_HEX_DIGITS = b"0123456789abcdef"

# How the meter's clock was set when it stamped the reading (firmware/clock.py). When
# present, the signed bytes end with one more line, "tq=<value>".
TIME_QUALITIES = ("ntp", "rtc", "host", "unsynced")
_TQ = frozenset(TIME_QUALITIES)

_INT_FIELDS = ("v", "seq", "t", "dt")
_STR_FIELDS = ("meter", "prev", "kid", "c", "sig")


def readings_topic(area: str, meter: str) -> str:
    return f"gl/v1/{area}/meters/{meter}/readings"


def ack_topic(area: str, meter: str) -> str:
    return f"gl/v1/{area}/meters/{meter}/ack"


def nack_topic(area: str, meter: str) -> str:
    return f"gl/v1/{area}/meters/{meter}/nack"


def kid_of(n: int) -> str:
    """Key id: hex of the first 8 bytes of SHA-256 of the decimal modulus."""
    return hashlib.sha256(str(n).encode()).digest()[:8].hex()


def slot_index(band: int, direction: int) -> int:
    if not (0 <= band < BANDS and direction in (0, 1)):
        raise ValueError(f"no slot for band {band} direction {direction}")
    return 2 * band + direction


def pack_slots(values: Mapping[int, int]) -> int:
    """Pack {slot: watt-hours} into one plaintext, 48 bits per slot."""
    m = 0
    for s, v in values.items():
        if not 0 <= s < SLOTS:
            raise ValueError(f"slot {s} out of range")
        if not 0 <= v <= _SLOT_MAX:
            raise ValueError(f"value {v} does not fit a {SLOT_BITS}-bit slot")
        m |= v << (SLOT_BITS * s)
    return m


def unpack_slots(m: int) -> list[int]:
    """The 16 slot values of a (possibly summed) plaintext."""
    if m < 0 or m >> (SLOT_BITS * SLOTS):
        raise ValueError("plaintext is not a packed slot vector")
    return [(m >> (SLOT_BITS * s)) & _SLOT_MAX for s in range(SLOTS)]


def signed_bytes(meter: str, seq: int, t: int, dt: int, prev: str, kid: str, c: str, tq: str | None = None) -> bytes:
    sb = "\n".join(("gl-reading-v1", meter, str(seq), str(t), str(dt), prev, kid, c)).encode("ascii")
    return sb if tq is None else sb + ("\ntq=" + tq).encode("ascii")


@dataclass(frozen=True, slots=True)
class Reading:
    meter: str
    seq: int
    t: int
    dt: int
    prev: str
    kid: str
    c: str
    sig: str
    v: int = VERSION
    tq: str | None = None  # time quality (TIME_QUALITIES); None: a plain v1 reading
    # Derived once: the gateway needs both for the signature, the chain and the store.
    signed_bytes: bytes = field(init=False, repr=False, compare=False)
    hash: str = field(init=False, repr=False, compare=False)
    _json: bytes | None = field(init=False, repr=False, compare=False)  # to_json's, once asked
    _mpz: gmpy2.mpz | None = field(init=False, repr=False, compare=False)  # ciphertext_mpz's, once asked
    parsed: bool = field(init=False, repr=False, compare=False)  # made by parse_reading: well formed

    def __post_init__(self) -> None:
        sb = signed_bytes(self.meter, self.seq, self.t, self.dt, self.prev, self.kid, self.c, self.tq)
        object.__setattr__(self, "signed_bytes", sb)
        object.__setattr__(self, "hash", hashlib.sha256(sb).hexdigest())
        object.__setattr__(self, "_json", None)
        object.__setattr__(self, "_mpz", None)
        object.__setattr__(self, "parsed", False)

    @property
    def ciphertext(self) -> int:
        """c as an int (the gateway's and the app's hot paths take `ciphertext_mpz`)."""
        return int(self.ciphertext_mpz)

    @property
    def ciphertext_mpz(self) -> gmpy2.mpz:
        """c as a gmpy2 number, parsed once: the gateway's range check and the block's
        product take it as it is, where an int would be converted for each. By
        bytes: twice as fast as int(c, 16) for 1,024 hex digits."""
        if self._mpz is None:
            object.__setattr__(self, "_mpz", gmpy2.mpz.from_bytes(self.ciphertext_bytes()))
        return self._mpz

    def ciphertext_bytes(self) -> bytes:
        """c as big-endian bytes, one per two hex digits (an odd count reads as a
        leading 0 digit). From the number when the checks already made it
        (`ciphertext_mpz`): half the time of decoding 1,024 hex digits again."""
        c, m = self.c, self._mpz
        if m is not None:
            return m.to_bytes((len(c) + 1) // 2, "big")
        return bytes.fromhex(c if not len(c) & 1 else "0" + c)

    def to_json(self) -> bytes:
        """Canonical JSON: the fields in wire order (tq, when present, before sig), no
        spaces, ASCII escapes (json.dumps'). Encoded once: a proposer encodes each
        reading for the block and its app compares."""
        if self._json is None:
            object.__setattr__(self, "_json", self._encode())
        return self._json

    def _encode(self) -> bytes:
        if self.parsed or _plain(self):  # parse_reading's checks imply _plain's
            # What json.dumps gives for these values, without its scan of 1.2 KB for
            # characters to escape: the gateway and every validator encode each reading.
            tq = "" if self.tq is None else f'"tq":"{self.tq}",'
            return (f'{{"v":{self.v},"meter":"{self.meter}","seq":{self.seq},"t":{self.t},"dt":{self.dt},'
                    f'"prev":"{self.prev}","kid":"{self.kid}","c":"{self.c}",{tq}"sig":"{self.sig}"}}').encode()
        obj = {"v": self.v, "meter": self.meter, "seq": self.seq, "t": self.t, "dt": self.dt, "prev": self.prev,
               "kid": self.kid, "c": self.c}
        if self.tq is not None:
            obj["tq"] = self.tq
        obj["sig"] = self.sig
        return json.dumps(obj, separators=(",", ":")).encode()


def _plain(r: Reading) -> bool:
    """True when json.dumps would write each field as is: ints of type int (not bool,
    no subclass) and strings of ASCII letters and digits (the meter also - and _), so
    no character needs an escape."""
    if not (type(r.v) is type(r.seq) is type(r.t) is type(r.dt) is int
            and type(r.meter) is type(r.prev) is type(r.kid) is type(r.c) is type(r.sig) is str):
        return False
    hexes = r.prev + r.kid + r.c + r.sig
    return (METER_ID_RE.match(r.meter) is not None and hexes.isascii() and hexes.encode("ascii").isalnum()
            and (r.tq is None or (type(r.tq) is str and r.tq in _TQ)))


# The frozen dataclass's setters, one per slot: `_parsed` fills a new Reading through
# them, where its __init__ and __post_init__ go through object.__setattr__ fifteen times.
(_set_meter, _set_seq, _set_t, _set_dt, _set_prev, _set_kid, _set_c, _set_sig, _set_v, _set_tq, _set_sb,
 _set_hash, _set_json, _set_mpz, _set_parsed) = (
    getattr(Reading, name).__set__ for name in ("meter", "seq", "t", "dt", "prev", "kid", "c", "sig", "v", "tq",
                                               "signed_bytes", "hash", "_json", "_mpz", "parsed"))


def _parsed(meter: str, seq: int, t: int, dt: int, prev: str, kid: str, c: str, sig: str, tq: str | None) -> Reading:
    """`Reading(...)` with `parsed` set, for values `_valid_fields` passed: the same
    object in a third less time (the gateway and every validator make one per reading)."""
    sb = signed_bytes(meter, seq, t, dt, prev, kid, c, tq)
    r = object.__new__(Reading)
    _set_meter(r, meter)
    _set_seq(r, seq)
    _set_t(r, t)
    _set_dt(r, dt)
    _set_prev(r, prev)
    _set_kid(r, kid)
    _set_c(r, c)
    _set_sig(r, sig)
    _set_v(r, VERSION)
    _set_tq(r, tq)
    _set_sb(r, sb)
    _set_hash(r, hashlib.sha256(sb).hexdigest())
    _set_json(r, None)
    _set_mpz(r, None)
    _set_parsed(r, True)
    return r


def stored_reading(meter: object, seq: object, t: object, dt: object, prev: bytes, kid: object, c: bytes,
                   sig: bytes, tq: object) -> Reading | None:
    """The reading a store kept as columns, its hex fields as the bytes they spell (`c`
    with a leading zero nibble when its digit count is odd), made as `parse_reading`
    makes one (well formed, its ciphertext already a number); None when the columns
    are not such a reading, which the caller then rebuilds and judges field by field.

    What `bytes.hex()` writes is lowercase hex, so of `_valid_fields`' checks the
    hex fields need only their lengths and c no leading zero digit; the rest are
    checked here as they are there. Against a plain `Reading` that the area app then
    re-validated, re-encoded and re-parsed, a reading rebuilt from its row costs
    about 1.3 µs less (in-process, blocks of 1,000 built wholly from rows)."""
    if not (type(prev) is type(c) is type(sig) is bytes and len(prev) == 32 and len(sig) == 64
            and 0 < len(c) <= 2048 and c[0] and type(seq) is type(t) is type(dt) is int
            and seq >= 1 and t >= 0 and dt > 0 and type(meter) is type(kid) is str
            and METER_ID_RE.match(meter) and _KID_RE.match(kid) and (tq is None or (type(tq) is str and tq in _TQ))):
        return None
    h = c.hex()
    r = _parsed(meter, seq, t, dt, prev.hex(), kid, h[1:] if c[0] < 16 else h, sig.hex(), tq)
    _set_mpz(r, gmpy2.mpz.from_bytes(c))
    return r


def make_reading(*, meter: str, seq: int, t: int, dt: int, prev: str, kid: str, c: int,
                 sign: Callable[[bytes], bytes], tq: str | None = None) -> Reading:
    ch = format(c, "x")
    sig = sign(signed_bytes(meter, seq, t, dt, prev, kid, ch, tq)).hex()
    return Reading(meter=meter, seq=seq, t=t, dt=dt, prev=prev, kid=kid, c=ch, sig=sig, tq=tq)


def parse_reading(payload: bytes, *, max_size: int = MAX_PAYLOAD) -> Reading:
    """Check the shape of a v1 reading; raises `Rejected` with the reason.

    Only syntax is checked here; keys, signatures and sequence belong to the gateway.
    Unknown extra fields are allowed: later wire versions add fields, never change these.
    ``tq`` is the one extension read: when present it must be one of TIME_QUALITIES.
    """
    if len(payload) > max_size:
        raise Rejected("oversized", f"{len(payload)} bytes > {max_size}")
    obj = _flat_object(payload)
    if obj is not None:
        r = _valid_reading(obj)
        if r is not None:
            return r
    try:
        # Decoded as UTF-8 here: json.loads would also take UTF-16/32 and a BOM.
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # "[[[[..." fits 8 KiB
        raise Rejected("malformed_json", str(exc)[:120]) from None
    r = _valid_reading(obj)
    return r if r is not None else _checked_reading(obj)


def _flat_object(payload: bytes) -> dict | None:
    """What json.loads gives for an ASCII payload holding one flat JSON object, by
    orjson (a quarter of the time for a reading); None for anything else, which
    json.loads then decides. On such payloads the two agree: orjson refuses what
    json.loads would also refuse or would read differently (NaN, Infinity, lone
    surrogates, integers beyond 64 bits come back as floats, which no reading field
    takes), and without a nested array or object neither reaches a depth limit."""
    if not payload.isascii() or payload.count(b"{") != 1 or b"[" in payload:
        return None
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return obj if type(obj) is dict else None


def _valid_reading(obj: object) -> Reading | None:
    """The reading when `obj` passes every check of `_checked_reading`, else None.

    The common case in one pass: a gateway and every validator parse each reading.
    It accepts exactly what `_checked_reading` accepts (json.loads makes no
    subclasses, so exact types are the same test as isinstance there) and says
    nothing about what is wrong: `_checked_reading` finds the reason, in its order.
    """
    if type(obj) is not dict:
        return None
    try:
        v, meter, seq, t, dt = obj["v"], obj["meter"], obj["seq"], obj["t"], obj["dt"]
        prev, kid, c, sig = obj["prev"], obj["kid"], obj["c"], obj["sig"]
    except KeyError:
        return None
    tq = None
    if "tq" in obj:  # looked at only when present: a plain v1 reading pays one lookup
        tq = obj["tq"]
        if type(tq) is not str or tq not in _TQ:
            return None
    if not _valid_fields(v, meter, seq, t, dt, prev, kid, c, sig):
        return None
    return _parsed(meter, seq, t, dt, prev, kid, c, sig, tq)


def _valid_fields(v: object, meter: object, seq: object, t: object, dt: object, prev: object, kid: object,
                  c: object, sig: object) -> bool:
    """Every value check of `_checked_reading`, on exact types."""
    if not (type(v) is type(seq) is type(t) is type(dt) is int and v == VERSION
            and seq >= 1 and t >= 0 and dt > 0
            and type(meter) is type(prev) is type(kid) is type(c) is type(sig) is str
            and len(prev) == 64 and len(kid) == 16 and len(sig) == 128 and 0 < len(c) <= 4096
            and c[0] != "0" and METER_ID_RE.match(meter)):
        return False
    # One scan of all four for lowercase hex: deleting the hex digits leaves nothing.
    hexes = prev + kid + c + sig
    return hexes.isascii() and not hexes.encode("ascii").translate(None, _HEX_DIGITS)


def well_formed(r: Reading) -> bool:
    """True when `parse_reading(r.to_json())` accepts and gives back `r`: every field
    of the right type and shape (a reading rebuilt from storage, for one). A reading
    `parse_reading` made is, by construction (its fields cannot be changed)."""
    return r.parsed or (_valid_fields(r.v, r.meter, r.seq, r.t, r.dt, r.prev, r.kid, r.c, r.sig)
            and (r.tq is None or (type(r.tq) is str and r.tq in _TQ)))


def _checked_reading(obj: object) -> Reading:
    """The reading, or `Rejected` for the first check `obj` fails, in the documented order."""
    if not isinstance(obj, dict):
        raise Rejected("malformed_json", "not a JSON object")
    meter = obj.get("meter") if isinstance(obj.get("meter"), str) else None
    seq = obj.get("seq") if type(obj.get("seq")) is int else None

    def reject(reason: str, detail: str) -> Rejected:
        return Rejected(reason, detail, meter=meter, seq=seq)

    missing = [k for k in _INT_FIELDS + _STR_FIELDS if k not in obj]
    if missing:
        raise reject("missing_field", ",".join(missing))
    for k in _INT_FIELDS:
        if type(obj[k]) is not int:  # bool is not an int here
            raise reject("bad_type", f"{k} must be an integer")
    for k in _STR_FIELDS:
        if not isinstance(obj[k], str):
            raise reject("bad_type", f"{k} must be a string")
    if obj["v"] != VERSION:
        raise reject("unsupported_version", str(obj["v"]))
    if not METER_ID_RE.match(obj["meter"]):
        raise reject("bad_value", "meter id")
    if obj["seq"] < 1 or obj["t"] < 0 or obj["dt"] <= 0:
        raise reject("bad_value", "seq >= 1, t >= 0, dt > 0")
    for k, rx in (("prev", _HEX64_RE), ("kid", _KID_RE), ("sig", _SIG_RE), ("c", _CT_RE)):
        if not rx.match(obj[k]):
            raise reject("bad_value", f"{k} is not lowercase hex of the right length")
    if obj["c"][0] == "0":
        raise reject("bad_value", "c has leading zeros")
    tq = obj.get("tq")
    if "tq" in obj:
        if not isinstance(tq, str):
            raise reject("bad_type", "tq must be a string")
        if tq not in _TQ:
            raise reject("bad_value", f"tq {tq[:16]!r} is not one of {', '.join(TIME_QUALITIES)}")
    return Reading(meter=obj["meter"], seq=obj["seq"], t=obj["t"], dt=obj["dt"], prev=obj["prev"],
                   kid=obj["kid"], c=obj["c"], sig=obj["sig"], tq=tq)
