"""Wire format v1 in CPython: slot packing edges and payload parsing (pure logic)."""

import json

import pytest

from gridledger.errors import Rejected
from gridledger.wire import SLOT_BITS, SLOTS, pack_slots, parse_reading, slot_index, unpack_slots

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
