"""Tariffs (coordinator/tariff.py): hand-computed bills, the rounding rule, every rejection reason,
and a canonical form that hashes the same in any process (pure logic)."""

from __future__ import annotations

import copy
import decimal
import hashlib
import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from coordinator.tariff import Band, Charges, Line, Tariff, TariffError, format_kwh
from gridledger.errors import GridledgerError

ROOT = Path(__file__).resolve().parent.parent

TOU = {
    "name": "Residential time-of-use 2026", "currency": "EUR", "minor_units": 2,
    "standing_charge_per_day": "0.30",
    "band": [
        {"band": 1, "name": "peak", "import_per_kwh": "0.34", "export_per_kwh": "0.08"},
        {"band": 0, "name": "off-peak", "import_per_kwh": "0.18", "export_per_kwh": "0.08"},
    ],
}
TOU_TOML = """\
name = "Residential time-of-use 2026"
currency = "EUR"
minor_units = 2                       # cents
standing_charge_per_day = "0.30"
[[band]]
band = 0
name = "off-peak"
import_per_kwh = "0.18"
export_per_kwh = "0.08"
[[band]]
band = 1
name = "peak"
import_per_kwh = "0.34"
export_per_kwh = "0.08"
"""
# Written by hand: json.dumps(to_dict(), sort_keys=True, separators=(",", ":")) must give exactly this.
TOU_CANONICAL = (
    '{"band":[{"band":0,"export_per_kwh":"0.08","import_per_kwh":"0.18","name":"off-peak"},'
    '{"band":1,"export_per_kwh":"0.08","import_per_kwh":"0.34","name":"peak"}],'
    '"currency":"EUR","minor_units":2,"name":"Residential time-of-use 2026","standing_charge_per_day":"0.30"}'
)


def slots(**wh: int) -> list[int]:
    """slots(b0_import=..., b1_export=...) -> the 16 slot totals (slot = 2*band + direction)."""
    out = [0] * 16
    for key, v in wh.items():
        band, direction = key[1:].split("_")
        out[2 * int(band) + (direction == "export")] = v
    return out


def tariff(**changes) -> Tariff:
    d = copy.deepcopy(TOU)
    d.update(changes)
    return Tariff.from_dict(d)


def amounts(c: Charges) -> list[tuple[int, str, str]]:
    return [(ln.band, ln.direction, ln.amount) for ln in c.lines]


# ---------------------------------------------------------------- hand-computed bills

def test_worked_example_of_docs_tariffs_md():
    """The bill in docs/tariffs.md, line by line: 123.456 kWh x 0.18 = 22.22208 -> 22.22, and so on."""
    c = tariff().charge(slots(b0_import=123456, b0_export=2345, b1_import=45678), days=31)
    assert c.lines == (
        Line(0, "off-peak", "import", 123456, "123.456", "0.18", "22.22"),
        Line(0, "off-peak", "export", 2345, "2.345", "0.08", "-0.19"),  # 0.1876 credit
        Line(1, "peak", "import", 45678, "45.678", "0.34", "15.53"),    # 15.53052
    )
    assert (c.standing_days, c.standing_rate, c.standing_amount) == (31, "0.30", "9.30")
    assert (c.total, c.currency) == ("46.86", "EUR")


def test_the_docs_show_this_tariff_and_this_bill(tmp_path):
    """docs/tariffs.md's TOML block and JSON charges are the tariff and bill of the test above."""
    doc = (ROOT / "docs" / "tariffs.md").read_text()
    toml_block = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    json_block = doc.split("```json\n", 1)[1].split("```", 1)[0]
    (tmp_path / "t.toml").write_text(toml_block)
    t = Tariff.from_toml(tmp_path / "t.toml")
    assert t == Tariff.from_dict(TOU)
    assert json.loads(json_block) == t.charge(slots(b0_import=123456, b0_export=2345, b1_import=45678), 31).to_dict()


def test_a_net_exporter_gets_a_negative_total():
    """10 kWh bought at 0.18, 400 kWh sold at 0.08, 30 days standing: 1.80 - 32.00 + 9.00 = -21.20."""
    c = tariff().charge(slots(b0_import=10_000, b1_export=400_000), days=30)
    assert amounts(c) == [(0, "import", "1.80"), (1, "export", "-32.00")]
    assert (c.standing_amount, c.total) == ("9.00", "-21.20")


def test_rounding_is_half_up_at_the_half_cent():
    """0.025 -> 0.03 (half-even would give 0.02), a 0.005 credit -> -0.01, 0.004999 -> 0.00,
    0.005001 credit -> -0.01, standing 0.125 -> 0.13."""
    t = tariff(standing_charge_per_day="0.125", band=[
        {"band": 0, "name": "a", "import_per_kwh": "0.5", "export_per_kwh": "0.5"},
        {"band": 1, "name": "b", "import_per_kwh": "0.4999", "export_per_kwh": "0.5001"},
    ])
    c = t.charge(slots(b0_import=50, b0_export=10, b1_import=10, b1_export=10), days=1)
    assert amounts(c) == [(0, "import", "0.03"), (0, "export", "-0.01"), (1, "import", "0.00"),
                          (1, "export", "-0.01")]
    assert (c.standing_amount, c.total) == ("0.13", "0.14")


def test_the_total_is_the_sum_of_the_rounded_lines():
    """Three lines of 0.005 each print 0.01; the total is 0.03 (rounding the exact sum would give 0.02)."""
    t = tariff(standing_charge_per_day="0", band=[
        {"band": b, "name": f"b{b}", "import_per_kwh": "0.5", "export_per_kwh": "0"} for b in range(3)])
    c = t.charge(slots(b0_import=10, b1_import=10, b2_import=10), days=0)
    assert [ln.amount for ln in c.lines] == ["0.01"] * 3
    assert c.total == "0.03"


def test_zero_usage_is_the_standing_charge_only():
    c = tariff().charge([0] * 16, days=30)
    assert (c.lines, c.standing_amount, c.total) == ((), "9.00", "9.00")
    assert tariff().charge([0] * 16, days=0).total == "0.00"


def test_a_free_export_prints_zero_not_minus_zero():
    c = tariff(band=[{"band": 0, "name": "flat", "import_per_kwh": "0.2", "export_per_kwh": "0"}]).charge(
        slots(b0_export=5000), days=0)
    assert amounts(c) == [(0, "export", "0.00")] and c.total == "0.00"


def test_minor_units_zero_and_three():
    """JPY: 1.234 kWh x 25 = 30.85 -> 31, 3 x 10.5 = 31.5 -> 32; KWD keeps three decimals."""
    jpy = tariff(currency="JPY", minor_units=0, standing_charge_per_day="10.5",
                 band=[{"band": 0, "name": "flat", "import_per_kwh": "25", "export_per_kwh": "8"}])
    c = jpy.charge(slots(b0_import=1234), days=3)
    assert (amounts(c), c.standing_amount, c.total) == ([(0, "import", "31")], "32", "63")
    kwd = tariff(currency="KWD", minor_units=3, standing_charge_per_day="0.1",
                 band=[{"band": 0, "name": "flat", "import_per_kwh": "0.0305", "export_per_kwh": "0"}])
    assert kwd.charge(slots(b0_import=1000), days=1).total == "0.131"  # 0.0305 -> 0.031, + 0.100


def test_the_largest_slot_is_charged_exactly():
    """2^48-1 Wh at the largest price: 33 significant digits, more than Python's default 28, none lost.
    Expected value from integers: (2^48-1) * 999999999123456789 = 281474976463930020097.892248386795e-12."""
    big = (1 << 48) - 1
    t = tariff(band=[{"band": 7, "name": "x", "import_per_kwh": "999999999.123456789", "export_per_kwh": "0"}])
    c = t.charge(slots(b7_import=big), days=100_000)
    assert c.lines[0].kwh == format_kwh(big) == "281474976710.655"
    assert c.lines[0].amount == "281474976463930020097.89"
    assert c.total == "281474976463930050097.89"  # + 100000 days x 0.30


def test_charges_ignore_the_callers_decimal_context():
    """A caller's 2-digit ROUND_DOWN context changes nothing: charge() uses its own."""
    want = tariff().charge(slots(b0_import=123456, b0_export=2345, b1_import=45678), days=31)
    with decimal.localcontext(decimal.Context(prec=2, rounding=decimal.ROUND_DOWN)):
        got = tariff().charge(slots(b0_import=123456, b0_export=2345, b1_import=45678), days=31)
    assert got == want


# ---------------------------------------------------------------- canonical form and determinism

def test_canonical_json_and_sha256_match_a_hand_written_form():
    t = Tariff.from_dict(TOU)
    assert json.dumps(t.to_dict(), sort_keys=True, separators=(",", ":")) == TOU_CANONICAL
    assert t.sha256 == hashlib.sha256(TOU_CANONICAL.encode()).hexdigest()


def test_toml_and_dict_give_the_same_tariff(tmp_path):
    """Band order in the file does not matter; the sha256 pins the content."""
    p = tmp_path / "tou.toml"
    p.write_text(TOU_TOML)
    assert Tariff.from_toml(p) == Tariff.from_dict(TOU)
    assert Tariff.from_toml(p).sha256 == Tariff.from_dict(TOU).sha256


def test_round_trips_are_identities():
    t = Tariff.from_dict(TOU)
    back = Tariff.from_dict(json.loads(json.dumps(t.to_dict())))
    assert back == t and back.sha256 == t.sha256
    c = t.charge(slots(b0_import=123456, b0_export=2345, b1_import=45678), days=31)
    assert Charges.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_any_price_change_changes_the_sha256():
    base = Tariff.from_dict(TOU).sha256
    assert tariff(standing_charge_per_day="0.31").sha256 != base
    assert tariff(name="Residential time-of-use 2027").sha256 != base


_CHILD = """
import decimal, json, sys
decimal.getcontext().prec = 3
decimal.getcontext().rounding = decimal.ROUND_FLOOR
from coordinator.tariff import Tariff
t = Tariff.from_dict(json.loads(sys.argv[1]))
print(json.dumps({"sha": t.sha256, "charges": t.charge(json.loads(sys.argv[2]), 31).to_dict()}, sort_keys=True))
"""


def test_another_process_computes_the_same_bill():
    """What verify-bill relies on: a fresh interpreter (other hash seed, other decimal context) agrees."""
    s = slots(b0_import=123456, b0_export=2345, b1_import=45678)
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(TOU), json.dumps(s)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    t = Tariff.from_dict(TOU)
    assert json.loads(out) == {"sha": t.sha256, "charges": t.charge(s, 31).to_dict()}


# ---------------------------------------------------------------- rejections

def _band(**changes):
    """The band list with the off-peak band (band 0) changed."""
    return [{**TOU["band"][1], **changes}, TOU["band"][0]]


@pytest.mark.parametrize("changes, reason", [
    ({"colour": "red"}, "unknown_key"),
    ({"band": _band(peak=True)}, "unknown_key"),
    ({"standing_charge_per_day": 0.30}, "float_money"),
    ({"band": _band(import_per_kwh=0.18)}, "float_money"),
    ({"band": _band(export_per_kwh=0.08)}, "float_money"),
    ({"standing_charge_per_day": 1}, "bad_decimal"),
    ({"band": _band(import_per_kwh="1e3")}, "bad_decimal"),
    ({"band": _band(import_per_kwh=" 0.18")}, "bad_decimal"),
    ({"band": _band(import_per_kwh="0.1234567891")}, "bad_decimal"),
    ({"band": _band(import_per_kwh="NaN")}, "bad_decimal"),
    ({"band": _band(import_per_kwh="")}, "bad_decimal"),
    ({"band": _band(import_per_kwh="-0.18")}, "negative_price"),
    ({"band": _band(export_per_kwh="-0.08")}, "negative_price"),
    ({"standing_charge_per_day": "-0.30"}, "negative_price"),
    ({"band": _band(band=1)}, "duplicate_band"),
    ({"band": _band(band=8)}, "band_out_of_range"),
    ({"band": _band(band=-1)}, "band_out_of_range"),
    ({"band": _band(band="1")}, "band_out_of_range"),
    ({"band": _band(band=True)}, "band_out_of_range"),
    ({"currency": "eur"}, "bad_currency"),
    ({"currency": "EURO"}, "bad_currency"),
    ({"currency": "E1R"}, "bad_currency"),
    ({"currency": 978}, "bad_currency"),
    ({"minor_units": 5}, "bad_minor_units"),
    ({"minor_units": -1}, "bad_minor_units"),
    ({"minor_units": "2"}, "bad_minor_units"),
    ({"minor_units": True}, "bad_minor_units"),
    ({"name": ""}, "bad_name"),
    ({"band": _band(name=None)}, "bad_name"),
    ({"band": []}, "missing_field"),
    ({"band": {"band": 0}}, "bad_band"),
    ({"band": ["peak"]}, "bad_band"),
])
def test_bad_tariffs_are_refused_with_a_reason(changes, reason):
    d = copy.deepcopy(TOU)
    d.update(changes)
    with pytest.raises(TariffError) as e:
        Tariff.from_dict(d)
    assert e.value.reason == reason


@pytest.mark.parametrize("field", ["name", "currency", "minor_units", "standing_charge_per_day", "band"])
def test_every_top_level_field_is_required(field):
    d = copy.deepcopy(TOU)
    del d[field]
    with pytest.raises(TariffError) as e:
        Tariff.from_dict(d)
    assert e.value.reason == "missing_field" and field in e.value.detail


@pytest.mark.parametrize("field", ["band", "name", "import_per_kwh", "export_per_kwh"])
def test_every_band_field_is_required(field):
    d = copy.deepcopy(TOU)
    del d["band"][0][field]
    with pytest.raises(TariffError) as e:
        Tariff.from_dict(d)
    assert e.value.reason == "missing_field" and field in e.value.detail


def test_a_tariff_is_a_table():
    with pytest.raises(TariffError) as e:
        Tariff.from_dict(["name"])
    assert e.value.reason == "bad_tariff"


def test_constructors_hold_the_same_invariants():
    """Building a Band or Tariff directly cannot smuggle in a float, a negative price or a duplicate."""
    for kw, reason in [({"import_per_kwh": 0.18}, "float_money"), ({"import_per_kwh": Decimal("-1")}, "negative_price"),
                       ({"import_per_kwh": Decimal("Infinity")}, "bad_decimal"),
                       ({"import_per_kwh": Decimal("1E+9")}, "bad_decimal")]:
        with pytest.raises(TariffError) as e:
            Band(**{"band": 0, "name": "x", "import_per_kwh": Decimal("0.1"), "export_per_kwh": Decimal(0), **kw})
        assert e.value.reason == reason
    b = Band(0, "x", Decimal("0.1"), Decimal(0))
    with pytest.raises(TariffError) as e:
        Tariff("t", "EUR", 2, Decimal("0.3"), (b, b))
    assert e.value.reason == "duplicate_band"


def test_floats_in_a_toml_file_are_refused(tmp_path):
    """TOML reads an unquoted 0.30 as a binary float: refused, with the fix in the message."""
    p = tmp_path / "t.toml"
    p.write_text(TOU_TOML.replace('"0.30"', "0.30"))
    with pytest.raises(TariffError) as e:
        Tariff.from_toml(p)
    assert e.value.reason == "float_money" and '"0.3"' in str(e.value)


def test_unreadable_and_malformed_toml(tmp_path):
    with pytest.raises(TariffError) as e:
        Tariff.from_toml(tmp_path / "missing.toml")
    assert e.value.reason == "unreadable"
    (tmp_path / "bad.toml").write_text("name = \n")
    with pytest.raises(TariffError) as e:
        Tariff.from_toml(tmp_path / "bad.toml")
    assert e.value.reason == "bad_toml"


@pytest.mark.parametrize("bad", [[0] * 15, [0] * 17, [-1] + [0] * 15, [1.0] + [0] * 15, [True] + [0] * 15,
                                 [1 << 48] + [0] * 15, "0" * 16, None, {i: 0 for i in range(16)}])
def test_slots_must_be_16_non_negative_ints(bad):
    with pytest.raises(TariffError) as e:
        Tariff.from_dict(TOU).charge(bad, 30)
    assert e.value.reason == "bad_slots"


@pytest.mark.parametrize("days", [-1, True, 1.0, "30", 100_001])
def test_days_must_be_a_sensible_int(days):
    with pytest.raises(TariffError) as e:
        Tariff.from_dict(TOU).charge([0] * 16, days)
    assert e.value.reason == "bad_days"


@pytest.mark.parametrize("s", [slots(b2_import=1), slots(b7_export=5), slots(b0_import=9, b3_export=1)])
def test_energy_in_a_band_the_tariff_does_not_price_is_refused(s):
    """Never billed at zero by accident: energy in an unpriced band is an error."""
    with pytest.raises(TariffError) as e:
        Tariff.from_dict(TOU).charge(s, 30)
    assert e.value.reason == "unpriced_band"
    assert isinstance(e.value, GridledgerError)


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("total"),
    lambda d: d.update(extra=1),
    lambda d: d.update(total=46.86),
    lambda d: d.update(currency="eur"),
    lambda d: d.update(lines="none"),
    lambda d: d["lines"][0].update(direction="sideways"),
    lambda d: d["lines"][0].update(wh=0),
    lambda d: d["lines"][0].update(amount="=1+1"),
    lambda d: d["lines"][0].pop("rate"),
])
def test_malformed_charges_are_refused(mutate):
    d = Tariff.from_dict(TOU).charge(slots(b0_import=123456), 31).to_dict()
    mutate(d)
    with pytest.raises(TariffError) as e:
        Charges.from_dict(d)
    assert e.value.reason in ("bad_charges", "unknown_key", "missing_field")
