"""Bill rendering (coordinator/billrender.py): well-formed, escaped, self-contained HTML with one chart
bar per energy slot; CSV that parses back to the bill's numbers; files that cannot escape their directory."""

from __future__ import annotations

import csv
import io
import json
from html.parser import HTMLParser

import pytest

from coordinator.billrender import BillError, bills_csv, render_html, write_bill_files
from coordinator.tariff import Tariff

OCT_1, NOV_1 = 1790812800, 1793491200  # 2026-10-01 and 2026-11-01, 00:00 UTC
TOU = {
    "name": "Residential time-of-use 2026", "currency": "EUR", "minor_units": 2,
    "standing_charge_per_day": "0.30",
    "band": [{"band": 0, "name": "off-peak", "import_per_kwh": "0.18", "export_per_kwh": "0.08"},
             {"band": 1, "name": "peak", "import_per_kwh": "0.34", "export_per_kwh": "0.08"}],
}
ALICE = [123456, 2345, 45678] + [0] * 13  # the worked example of docs/tariffs.md: total 46.86
BOB = [10_000, 0, 0, 400_000] + [0] * 12  # a net exporter: total -21.20
PROOFS = {"start": {"height": 12, "certificate": {"signers": [0, 1, 2], "sig": "ab" * 96}},
          "end": {"height": 40, "certificate": {"signers": [0, 2, 3], "sig": "cd" * 96}}}


def make_bill(account="alice", energy=ALICE, tariff=TOU, period="2026-10", days=31, **extra):
    t = Tariff.from_dict(tariff)
    bill = {"v": 1, "account": account, "chain": "area-1",
            "period": {"name": period, "from": OCT_1, "to": NOV_1}, "readings": 2976,
            "energy_wh": list(energy), "tariff": t.to_dict(), "tariff_sha256": t.sha256,
            "charges": t.charge(energy, days).to_dict(), "bill_id": "9f" * 32, "proofs": PROOFS}
    bill.update(extra)
    return bill


class StrictPage(HTMLParser):
    """Parses a page, failing on any mis-nested or unclosed element; keeps text, tags and table rows."""
    VOID = {"meta", "br", "hr", "img", "input", "link"}
    SVG_EMPTY = {"line", "rect", "path", "circle"}  # may be written <x/> inside SVG

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.stack, self.tags, self.text, self.rows, self.bars, self.values = [], [], [], [], [], []
        self._cell = self._row = None
        self._in_value = False
        self.feed(page)
        self.close()
        assert self.stack == [], f"unclosed elements: {self.stack}"

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "rect" and a.get("class", "").startswith("bar "):
            self.bars.append(a)
        self._in_value = tag == "text" and a.get("class") == "value"
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        assert tag in self.SVG_EMPTY or tag in self.VOID, f"<{tag}/> is not a void element"
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()
        if tag in ("td", "th"):
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr":
            self.rows.append(self._row)
        self._in_value = False

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._in_value:
            self.values.append(data)

    def all_text(self) -> str:
        return "".join(self.text)


def test_the_page_is_well_formed_and_self_contained():
    """Balanced tags, no script, no external asset (no src/href), inline CSS only."""
    page = StrictPage(render_html(make_bill()))
    names = [t for t, _ in page.tags]
    assert names[0] == "html" and "style" in names and "svg" in names
    assert not {"script", "link", "img", "iframe", "object"} & set(names)
    assert not [a for _, a in page.tags if "src" in a or "href" in a or any(k.startswith("on") for k in a)]


def test_the_charges_table_has_every_line_the_standing_charge_and_the_total():
    rows = StrictPage(render_html(make_bill())).rows
    assert rows == [
        ["Band", "Direction", "Energy", "Rate", "Amount (EUR)"],
        ["off-peak (band 0)", "import", "123.456 kWh", "0.18 EUR/kWh", "22.22"],
        ["off-peak (band 0)", "export (credit)", "2.345 kWh", "0.08 EUR/kWh", "-0.19"],
        ["peak (band 1)", "import", "45.678 kWh", "0.34 EUR/kWh", "15.53"],
        ["Standing charge", "", "31 days", "0.30 EUR/day", "9.30"],
        ["Total", "", "", "", "46.86 EUR"],
    ]


def test_the_header_names_account_period_in_utc_and_bill_id():
    text = StrictPage(render_html(make_bill())).all_text()
    for s in ["alice", "2026-10", "2026-10-01 00:00 UTC", "2026-11-01 00:00 UTC", "9f" * 32, "2976",
              "Residential time-of-use 2026", Tariff.from_dict(TOU).sha256]:
        assert s in text


def test_the_verify_box_tells_the_customer_what_to_run():
    text = StrictPage(render_html(make_bill())).all_text()
    assert "How to verify this bill" in text and "gridledger verify-bill bill.json" in text
    assert "alice-2026-10.json" in text and "validator public keys" in text


def test_proofs_are_summarised_not_dumped():
    """Heights and signer counts appear; signatures do not."""
    page = render_html(make_bill())
    text = StrictPage(page).all_text()
    assert "end: height 40, 3 signers" in text and "start: height 12, 3 signers" in text
    assert "ab" * 96 not in page and "cd" * 96 not in page


def test_the_chart_has_one_bar_per_band_and_direction_with_energy():
    page = StrictPage(render_html(make_bill()))
    assert sorted((b["data-band"], b["data-direction"]) for b in page.bars) == [
        ("0", "export"), ("0", "import"), ("1", "import")]
    height = {(b["data-band"], b["data-direction"]): float(b["height"]) for b in page.bars}
    assert height["0", "import"] > height["1", "import"] > height["0", "export"] > 0
    assert sorted(page.values) == ["123.456", "2.345", "45.678"]
    assert {"off-peak", "peak", "kWh", "import", "export"} <= set(page.text)  # axis and band labels


def test_a_net_exporters_chart_and_negative_total():
    page = StrictPage(render_html(make_bill("bob", BOB, days=30)))
    assert sorted((b["data-band"], b["data-direction"]) for b in page.bars) == [("0", "import"), ("1", "export")]
    assert page.rows[-1] == ["Total", "", "", "", "-21.20 EUR"]


def test_zero_usage_draws_no_bars_and_bills_the_standing_charge():
    page = StrictPage(render_html(make_bill(energy=[0] * 16)))
    assert page.bars == []
    assert "No energy was recorded in this period." in page.all_text()
    assert page.rows[-2:] == [["Standing charge", "", "31 days", "0.30 EUR/day", "9.30"],
                              ["Total", "", "", "", "9.30 EUR"]]


def test_every_string_from_the_bill_is_escaped():
    """A hostile account and band names come out as text, never as markup."""
    evil = "<script>alert(1)</script>"
    tariff = {**TOU, "name": 'T&"<i>', "band": [{**TOU["band"][0], "name": 'off&"<b>peak'},
                                                 {**TOU["band"][1], "name": "<img src=x onerror=alert(1)>"}]}
    bill = make_bill(evil, tariff=tariff, period='10"<u>', chain="<marquee>",
                     proofs={"<i>x</i>": {"height": 1, "signers": 2}})
    raw = render_html(bill)
    page = StrictPage(raw)
    assert evil not in raw and "<b>" not in raw and "<img" not in raw
    assert not {"script", "b", "img", "i", "u", "marquee"} & {t for t, _ in page.tags}
    text = page.all_text()
    for s in [evil, 'off&"<b>peak', "<img src=x onerror=alert(1)>", 'T&"<i>', '10"<u>', "<marquee>",
              "<i>x</i>: height 1, 2 signers"]:
        assert s in text
    assert page.rows[1][0] == 'off&"<b>peak (band 0)'


def test_optional_keys_may_be_missing():
    """Without tariff, chain, readings, proofs or v the page still renders; band names come from the lines."""
    bill = make_bill()
    for k in ("v", "chain", "readings", "tariff", "tariff_sha256", "proofs"):
        del bill[k]
    page = StrictPage(render_html(bill))
    assert page.rows[1][0] == "off-peak (band 0)" and page.rows[-1][-1] == "46.86 EUR"
    assert "peak" in page.text


@pytest.mark.parametrize("key", ["account", "period", "energy_wh", "charges", "bill_id"])
def test_a_missing_required_key_is_a_clear_error(key):
    bill = make_bill()
    del bill[key]
    with pytest.raises(BillError) as e:
        render_html(bill)
    assert e.value.reason == "missing_field" and key in str(e.value)


@pytest.mark.parametrize("change, reason", [
    ({"account": 7}, "bad_field"),
    ({"period": {"name": "2026-10", "from": NOV_1, "to": OCT_1}}, "bad_field"),
    ({"period": {"name": "2026-10", "from": "yesterday", "to": NOV_1}}, "bad_field"),
    ({"period": {"name": "2026-10", "from": OCT_1}}, "missing_field"),
    ({"bill_id": "not hex"}, "bad_field"),
    ({"readings": -1}, "bad_field"),
    ({"v": 2}, "bad_version"),
    ({"energy_wh": [1] * 15}, "bad_slots"),
    ({"charges": {"total": "1.00"}}, "missing_field"),
    ({"charges": {**make_bill()["charges"], "discount": "1.00"}}, "unknown_key"),
    ({"charges": {**make_bill()["charges"], "total": 46.86}}, "bad_charges"),
    ({"tariff": {**TOU, "currency": "eur"}}, "bad_currency"),
])
def test_malformed_fields_are_refused_with_a_reason(change, reason):
    bill = make_bill()
    bill.update(change)
    with pytest.raises(BillError) as e:
        render_html(bill)
    assert e.value.reason == reason


def test_csv_has_one_row_per_bill_that_parses_back_to_its_numbers():
    text = bills_csv([make_bill(), make_bill("bob", BOB, days=30, bill_id="0a" * 32)])
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == ["account", "period", "from", "to", "readings", "import_kwh", "export_kwh",
                             "band0_import_kwh", "band0_export_kwh", "band1_import_kwh", "band1_export_kwh",
                             "standing", "total", "currency", "bill_id"]
    assert rows == [
        {"account": "alice", "period": "2026-10", "from": "2026-10-01T00:00:00Z", "to": "2026-11-01T00:00:00Z",
         "readings": "2976", "import_kwh": "169.134", "export_kwh": "2.345",
         "band0_import_kwh": "123.456", "band0_export_kwh": "2.345", "band1_import_kwh": "45.678",
         "band1_export_kwh": "0.000", "standing": "9.30", "total": "46.86", "currency": "EUR", "bill_id": "9f" * 32},
        {"account": "bob", "period": "2026-10", "from": "2026-10-01T00:00:00Z", "to": "2026-11-01T00:00:00Z",
         "readings": "2976", "import_kwh": "10.000", "export_kwh": "400.000",
         "band0_import_kwh": "10.000", "band0_export_kwh": "0.000", "band1_import_kwh": "0.000",
         "band1_export_kwh": "400.000", "standing": "9.00", "total": "-21.20", "currency": "EUR",
         "bill_id": "0a" * 32},
    ]


def test_csv_band_columns_follow_the_bands_with_energy():
    """Only bands with energy in some bill get columns; an empty list is a header alone."""
    assert bills_csv([make_bill(energy=[0] * 16)]).splitlines()[0] == (
        "account,period,from,to,readings,import_kwh,export_kwh,standing,total,currency,bill_id")
    assert bills_csv([]).count("\n") == 1


def test_csv_refuses_account_names_a_spreadsheet_would_run():
    with pytest.raises(BillError) as e:
        bills_csv([make_bill("=HYPERLINK(1)")])
    assert e.value.reason == "unsafe_name"


def test_write_bill_files_writes_the_json_and_the_page(tmp_path):
    bill = make_bill()
    paths = write_bill_files(bill, tmp_path / "out")
    assert paths == {"json": tmp_path / "out" / "alice-2026-10.json", "html": tmp_path / "out" / "alice-2026-10.html"}
    assert paths["json"].read_text() == json.dumps(bill, indent=1, sort_keys=True) + "\n"
    assert json.loads(paths["json"].read_text()) == bill
    assert paths["html"].read_text() == render_html(bill)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["alice-2026-10.html", "alice-2026-10.json"]


@pytest.mark.parametrize("account, period", [("../x", "2026-10"), ("alice", "../../etc/x"), ("a/b", "2026-10"),
                                             ("", "2026-10"), ("alice", "2026 10"), ("a" * 33, "2026-10"),
                                             ("alice\n", "2026-10")])
def test_write_bill_files_refuses_names_that_are_not_safe_ids(tmp_path, account, period):
    with pytest.raises(BillError) as e:
        write_bill_files(make_bill(account, period=period), tmp_path)
    assert e.value.reason in ("unsafe_name", "bad_field")
    assert list(tmp_path.iterdir()) == []
