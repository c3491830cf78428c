"""Load curves on the coordinator's side, in process: window times, the grouping of
an interval's certified readings, the resumable store, and the exported files
(the trustees and the CLI over real processes are in test_loadcurve_network.py)."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import xml.etree.ElementTree as ET

import pytest

from coordinator.curverender import curve_csv, curve_stem, render_svg, write_curve_files
from coordinator.loadcurve import CurveStore, curve_document, intervals, parse_when
from gridledger.errors import GridledgerError

from settlekit import START, build_world

SVG = "{http://www.w3.org/2000/svg}"
DAY = 1_767_225_600       # 2026-01-01T00:00:00Z


def test_window_times_are_unix_seconds_or_iso_in_utc():
    assert parse_when(str(DAY)) == DAY
    assert parse_when("2026-01-01") == DAY
    assert parse_when("2026-01-01T06:15") == DAY + 6 * 3600 + 900
    assert parse_when("2026-01-01T06:00Z") == parse_when("2026-01-01T07:00+01:00") == DAY + 6 * 3600
    for bad in ("yesterday", "2026-13-01", "-5", ""):
        with pytest.raises(GridledgerError):
            parse_when(bad)


def test_an_interval_is_one_reading_per_meter_under_the_trustees_key(tmp_path):
    world = build_world(tmp_path, accounts=3, readings=8, per_block=8, tail=1, stragglers=2)
    t = START + 900                                                  # the tail block
    [iv] = intervals(world.ledger, t, world.key.kid)
    assert (iv.t, iv.dt, iv.meters) == (t, 900, 3)
    assert all(json.loads(r["tx"])["t"] == t for r in iv.readings)
    assert intervals(world.ledger, t + 900, world.key.kid)[0].meters == 2   # the stragglers
    assert intervals(world.ledger, t, "00" * 8) == []                 # another key's readings are not ours
    assert intervals(world.ledger, START + 86_400, world.key.kid) == []
    assert world.ledger.interval_ends(START - 1800, START + 900) == [START - 900, START, START + 900]


def _point(t, status, **kw):
    p = {"t": t, "dt": 900, "meters": 12, "status": status}
    if status == "decrypted":
        slots = [0] * 16
        slots[0], slots[3] = kw.pop("imp", 1000), kw.pop("exp", 250)
        p.update(energy_wh=slots, request="ab" * 16, item=0, trustees=["t1", "t2"])
    return {**p, **kw}


def test_decrypted_and_refused_points_are_final_withheld_ones_are_not():
    store = CurveStore(sqlite3.connect(":memory:"))
    store.save("A", [_point(DAY + 900, "withheld", reason="too_few_meters"),
                     _point(DAY + 1800, "decrypted"), _point(DAY + 2700, "refused", reason="overlaps_decrypted")])
    assert store.final("A", DAY, DAY + 3600) == {DAY + 1800: {900}, DAY + 2700: {900}}
    store.save("A", [_point(DAY + 900, "decrypted", imp=7), _point(DAY + 1800, "withheld", reason="open"),
                     _point(DAY + 2700, "decrypted")])
    points = store.points("A", DAY, DAY + 3600)
    assert [p["status"] for p in points] == ["decrypted", "decrypted", "refused"]
    assert points[0]["import_wh"] == 7 and points[0]["import_wh_by_band"][0] == 7
    assert (points[1]["import_wh"], points[1]["export_wh"], points[1]["export_wh_by_band"][1]) == (1000, 250, 250)
    assert store.points("B", DAY, DAY + 3600) == [] and store.points("A", DAY + 900, DAY + 1800)[0]["t"] == DAY + 1800


def _doc():
    store = CurveStore(sqlite3.connect(":memory:"))
    store.save("A", [_point(DAY + 900, "decrypted", imp=1000), _point(DAY + 1800, "decrypted", imp=3000),
                     _point(DAY + 2700, "withheld", reason="too_few_meters", meters=3),
                     _point(DAY + 3600, "decrypted"), _point(DAY + 4500, "refused", reason="overlaps_decrypted")])
    return curve_document("A", DAY, DAY + 4500, 10, store.points("A", DAY, DAY + 4500))


def test_the_csv_has_every_interval_with_kw_and_band_columns():
    rows = list(csv.DictReader(io.StringIO(curve_csv(_doc()))))
    assert [r["status"] for r in rows] == ["decrypted", "decrypted", "withheld", "decrypted", "refused"]
    assert rows[0]["t"] == "2026-01-01T00:15:00Z" and rows[1]["import_kw"] == "12.000"   # 3 kWh in 15 min
    assert rows[0]["band0_import_wh"] == "1000" and rows[0]["band1_export_wh"] == "250"
    assert "band2_import_wh" not in rows[0]                           # no energy in band 2
    assert rows[2]["reason"] == "too_few_meters" and rows[2]["import_wh"] == "" and rows[2]["meters"] == "3"
    assert rows[0]["trustees"] == "t1;t2"


def test_the_plot_is_a_step_line_broken_where_an_interval_was_not_decrypted(tmp_path):
    doc = _doc()
    root = ET.fromstring(render_svg(doc))
    paths = {p.get("class"): p.get("d") for p in root.iter(f"{SVG}path")}
    assert set(paths) == {"line import", "line export"}
    assert paths["line import"].count("M") == 2                        # a gap after the second interval
    shaded = [r.get("class") for r in root.iter(f"{SVG}rect") if r.get("class") in ("withheld", "refused")]
    assert shaded == ["withheld", "refused"]
    titles = " ".join(t.text for t in root.iter(f"{SVG}title"))
    assert "12.000 kW" in titles and "too_few_meters" in titles
    files = write_curve_files(doc, tmp_path)
    assert {p.name for p in files.values()} == {f"{curve_stem(doc)}.{k}" for k in ("json", "csv", "svg")}
    assert curve_stem(doc) == "loadcurve-A-20260101T000000Z-20260101T011500Z"
    assert json.loads(files["json"].read_text()) == doc
    empty = curve_document("A", DAY, DAY + 900, 10, [])
    ET.fromstring(render_svg(empty))                                  # no point: still a well-formed plot
    with pytest.raises(GridledgerError):
        curve_stem(dict(doc, area="../x"))
