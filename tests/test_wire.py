"""Wire format v1 in CPython: slot packing edges and payload parsing (pure logic)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from gridledger import wire
from gridledger.errors import Rejected
from gridledger.wire import (SLOT_BITS, SLOTS, Reading, pack_slots, parse_reading, slot_index, unpack_slots,
                             well_formed)

from helpers import SimMeter
from gridledger.meterkeys import MeterKey

MAX = (1 << SLOT_BITS) - 1


def test_pack_unpack_round_trip_at_the_edges():
    """Every slot holds 0..2^48-1 and unpacks to exactly what was packed."""
    vals = {s: (MAX if s % 3 == 0 else s * 1000 + 1) for s in range(SLOTS)}
    assert unpack_slots(pack_slots(vals)) == [vals[s] for s in range(SLOTS)]
    assert unpack_slots(0) == [0] * SLOTS


@pytest.mark.parametrize("slots", [{0: -1}, {0: MAX + 1}, {SLOTS: 1}, {-1: 1}])
def test_pack_refuses_what_does_not_fit(slots):
    """Negative values, values above 48 bits and slots outside 0..15 are refused, never wrapped."""
    with pytest.raises(ValueError):
        pack_slots(slots)


def test_unpack_refuses_a_plaintext_beyond_the_slots():
    with pytest.raises(ValueError):
        unpack_slots(1 << (SLOT_BITS * SLOTS))


def test_sums_of_packed_plaintexts_add_slotwise():
    """Adding packed plaintexts adds every slot at once (what the homomorphic product does)."""
    a, b = {0: 500, 5: 7}, {0: 250, 5: 3, 9: 1}
    assert unpack_slots(pack_slots(a) + pack_slots(b))[:10] == [750, 0, 0, 0, 0, 10, 0, 0, 0, 1]


def test_slot_index_is_band_and_direction():
    assert slot_index(0, 0) == 0 and slot_index(0, 1) == 1 and slot_index(7, 1) == 15
    with pytest.raises(ValueError):
        slot_index(8, 0)


def good_body() -> dict:
    return json.loads(SimMeter(MeterKey("m1", bytes(32))).next().to_json())


def test_parse_accepts_extra_fields_from_later_versions():
    """Later wire versions may add fields; v1 readings with extras still parse."""
    body = good_body() | {"tsrc": "ntp"}
    assert parse_reading(json.dumps(body).encode()).seq == 1


@pytest.mark.parametrize("tq", wire.TIME_QUALITIES)
def test_parse_takes_each_time_quality_into_the_signed_bytes(tq):
    """A present tq is parsed, ends the signed bytes as one more line, changes the hash, and
    comes back in canonical JSON between c and sig; without it nothing of v1 changes."""
    plain = SimMeter(MeterKey("m1", bytes(32))).next()
    r = parse_reading(json.dumps(json.loads(plain.to_json()) | {"tq": tq}).encode())
    assert r.tq == tq and plain.tq is None
    assert r.signed_bytes == plain.signed_bytes + b"\ntq=" + tq.encode() and r.hash != plain.hash
    assert r.to_json() == plain.to_json().replace(b',"sig"', f',"tq":"{tq}","sig"'.encode())
    assert parse_reading(r.to_json()) == r and wire.well_formed(r)


@pytest.mark.parametrize("value,reason", [("gps", "bad_value"), ("NTP", "bad_value"), ("", "bad_value"),
                                          (None, "bad_type"), (1, "bad_type"), (["ntp"], "bad_type")])
def test_parse_refuses_an_unknown_time_quality(value, reason):
    """tq, when present, is one of ntp, rtc, host, unsynced: anything else (null included) is refused."""
    body = good_body() | {"tq": value}
    with pytest.raises(Rejected) as exc:
        parse_reading(json.dumps(body).encode())
    assert exc.value.reason == reason and "tq" in exc.value.detail


@pytest.mark.parametrize("field,value,reason", [
    ("meter", "bad meter!", "bad_value"), ("meter", "x" * 33, "bad_value"), ("dt", 0, "bad_value"),
    ("t", -1, "bad_value"), ("prev", "0" * 63, "bad_value"), ("kid", "zz" * 8, "bad_value"),
    ("sig", "00", "bad_value"), ("c", "00ff", "bad_value"), ("c", "0x1f", "bad_value"),
    ("seq", 1.0, "bad_type"), ("meter", None, "bad_type"), ("v", "1", "bad_type"),
])
def test_parse_rejects_each_bad_field_with_a_reason(field, value, reason):
    body = good_body()
    body[field] = value
    with pytest.raises(Rejected) as exc:
        parse_reading(json.dumps(body).encode())
    assert exc.value.reason == reason


def test_parse_rejects_oversized_before_decoding():
    with pytest.raises(Rejected) as exc:
        parse_reading(b"{" + b" " * 10000 + b"}")
    assert exc.value.reason == "oversized"


@pytest.mark.parametrize("payload", [
    b"[" * 3000,  # nesting deeper than Python's recursion limit still fits in 8 KiB
    b"\xef\xbb\xbf" + json.dumps(good_body()).encode(),  # UTF-8 with a BOM
    json.dumps(good_body()).encode("utf-16"),  # json.loads alone would take UTF-16 and UTF-32
], ids=["deep_nesting", "utf8_bom", "utf16"])
def test_parse_takes_only_plain_utf8_json(payload):
    """DESIGN section 4 says UTF-8 JSON: anything else is malformed_json, never an exception."""
    with pytest.raises(Rejected) as exc:
        parse_reading(payload)
    assert exc.value.reason == "malformed_json"


# --- the fast paths agree with the field-by-field checks and with json.dumps ----------------

_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 3), st.integers(), st.floats(allow_nan=False),
    st.text(max_size=4), st.text(alphabet="0123456789abcdefABCDEF_-\n\"\\\x00\x7fé", max_size=140),
    st.sampled_from(["a" * 64, "A" * 64, "a" * 63, "0" * 16, "g" * 16, "1" * 4096, "1" * 4097, "0f", "\ud800"]),
    st.sampled_from(wire.TIME_QUALITIES))
_FIELDS = ("v", "meter", "seq", "t", "dt", "prev", "kid", "c", "sig", "tq")
_GOOD = good_body()  # one encryption, not one per example
_PROPS = settings(max_examples=600, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow])


def _reading_or_none(fields: dict) -> Reading | None:
    """A Reading of any field values its signed bytes can be made of (ASCII text)."""
    try:
        return Reading(**{k: fields[k] for k in _FIELDS if k in fields})
    except (TypeError, UnicodeEncodeError):
        return None


@_PROPS
@given(st.dictionaries(st.sampled_from(_FIELDS), _VALUES, max_size=3), st.sets(st.sampled_from(_FIELDS), max_size=2))
def test_one_pass_check_accepts_exactly_what_the_field_checks_accept(changes, dropped):
    """parse_reading's one-pass check (`_valid_reading`) and its field-by-field checks
    (`_checked_reading`, which names the reason) take the same objects to the same reading."""
    obj = {k: v for k, v in (_GOOD | changes).items() if k not in dropped}
    fast = wire._valid_reading(obj)
    try:
        slow = wire._checked_reading(obj)
    except Rejected:
        slow = None
    assert fast == slow


@_PROPS
@given(st.dictionaries(st.sampled_from(_FIELDS), _VALUES, max_size=4))
def test_to_json_is_json_dumps_for_any_field_values(changes):
    r = _reading_or_none(_GOOD | changes)
    assume(r is not None)
    fields = {k: getattr(r, k) for k in _FIELDS if k != "tq" or r.tq is not None}
    if "tq" in fields:  # canonical order: tq between c and sig
        fields = {k: fields[k] for k in (*_FIELDS[:-2], "tq", "sig")}
    try:
        expected = json.dumps(fields, separators=(",", ":")).encode()
    except ValueError as exc:  # an int beyond the str conversion limit: the same error either way
        with pytest.raises(type(exc)):
            r.to_json()
        return
    assert r.to_json() == expected


@_PROPS
@given(st.dictionaries(st.sampled_from(_FIELDS), _VALUES, max_size=2))
def test_well_formed_is_exactly_a_reading_that_round_trips(changes):
    r = _reading_or_none(_GOOD | changes)
    assume(r is not None)
    try:
        back = parse_reading(r.to_json(), max_size=1 << 20) == r
    except (Rejected, ValueError):
        back = False
    assert well_formed(r) == back


# --- orjson reads a flat payload as json.loads does -----------------------------------------

_JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2**70, 2**70),
                          st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                          st.sampled_from(["\ud800", "\x00", "é", "{", "["]))
_JSON_VALUES = st.recursive(_JSON_SCALARS, lambda inner: st.lists(inner, max_size=2)
                            | st.dictionaries(st.text(max_size=3), inner, max_size=2), max_leaves=4)


def _slow_parse(payload: bytes) -> Reading | str:
    """parse_reading without its orjson path: json.loads, then the same checks (or the reason)."""
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "malformed_json"
    try:
        r = wire._valid_reading(obj)
        return r if r is not None else wire._checked_reading(obj)
    except Rejected as exc:
        return exc.reason


def _typed(obj):
    return {k: (type(v), v) for k, v in obj.items()} if isinstance(obj, dict) else obj


@_PROPS
@given(st.dictionaries(st.sampled_from(_FIELDS + ("x", "zz")), _JSON_VALUES, max_size=4),
       st.sampled_from(["none", "dup", "flip", "cut", "space"]), st.integers(0, 10**6), st.integers(0, 255))
def test_the_orjson_path_reads_what_json_loads_reads(changes, edit, at, byte):
    """`_flat_object` returns None or exactly json.loads' object (types included), and
    parse_reading gives the reading or the reason the json.loads path gives, whatever
    the bytes: big integers, NaN, lone surrogates, duplicate keys, nesting, bad bytes."""
    payload = json.dumps(_GOOD | changes).encode()
    if edit == "dup":  # a key given twice: json.loads keeps the last
        payload = payload[:-1] + b', "seq": ' + str(at).encode() + b"}"
    elif edit == "flip":
        i = at % len(payload)
        payload = payload[:i] + bytes([byte]) + payload[i + 1:]
    elif edit == "cut":
        payload = payload[:at % len(payload)]
    elif edit == "space":
        payload = b" \n" + payload.replace(b":", b" : ", 2) + b"\t"
    fast = wire._flat_object(payload)
    if fast is not None:
        assert _typed(fast) == _typed(json.loads(payload.decode("utf-8")))
    try:
        got = parse_reading(payload)
    except Rejected as exc:
        got = exc.reason
    assert got == _slow_parse(payload)


@pytest.mark.parametrize("payload", [
    b'{"t": NaN}', b'{"t": 1E400}', b'{"meter": "\\ud800"}', b'{"a": [1]}', b'{"a": {"b": 1}}',
    "{\"meter\": \"\u00e9\"}".encode(),
], ids=["nan", "inf", "lone_surrogate", "nested_list", "nested_object", "utf8"])
def test_payloads_the_orjson_path_leaves_to_json_loads(payload):
    assert wire._flat_object(payload) is None


@pytest.mark.parametrize("big", [2**64, -2**63 - 1, 10**30])
def test_an_integer_beyond_64_bits_is_read_by_json_loads(big):
    """orjson gives a float for it, which no reading field takes: json.loads reads it exactly."""
    body = _GOOD | {"seq": big}
    payload = json.dumps(body).encode()
    assert type(wire._flat_object(payload)["seq"]) is float
    if big > 0:
        assert parse_reading(payload) == _slow_parse(payload) == Reading(**{k: body[k] for k in _FIELDS if k in body})
    else:
        with pytest.raises(Rejected) as exc:
            parse_reading(payload)
        assert exc.value.reason == _slow_parse(payload) == "bad_value"


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=(1 << 4096) - 1), st.booleans(), st.integers(min_value=0, max_value=3))
def test_ciphertext_bytes_are_the_hex_decoded_with_or_without_the_number(value, parsed_first, zeros):
    """From the number the checks made or from the hex: the same bytes, one per two
    digits, an odd count read with a leading 0 digit (leading zero digits, which no
    parsed reading has, included)."""
    c = "0" * zeros + format(value, "x")
    r = Reading(meter="m1", seq=1, t=900, dt=900, prev="0" * 64, kid="ab" * 8, c=c, sig="cd" * 64)
    if parsed_first:
        assert r.ciphertext_mpz == value
    got = r.ciphertext_bytes()
    assert got == bytes.fromhex(c if len(c) % 2 == 0 else "0" + c)
    assert len(got) == (len(c) + 1) // 2 and int.from_bytes(got, "big") == value
