"""Load curves for people: the JSON document, a CSV of every interval, and an SVG
plot of the area's average import and export power over time.

The plot draws each interval as a step over [t - dt, t] at its average power
(Wh * 3.6 / dt kW), so a gap in the line is an interval that was not decrypted;
those are shaded (withheld: fewer than k meters or not yet certified; refused:
a trustee said no). No script, no external asset.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Iterable, Mapping

from gridledger.errors import GridledgerError
from gridledger.wire import METER_ID_RE

from .charts import COLOURS, axis_top, esc, legend, utc, value_axis

__all__ = ["render_svg", "curve_csv", "write_curve_files", "curve_stem", "every_interval", "kw"]

# Plot geometry (px): 15-minute steps of a day are 9 px wide at this width.
_W, _LEFT, _RIGHT, _TOP, _PLOT_H, _BOTTOM = 960, 64, 24, 70, 240, 56
_PLOT_W = _W - _LEFT - _RIGHT
_SHADES = {"withheld": "#e6e9ed", "refused": "#f3d3d3"}
_TIME_STEPS = (900, 1800, 3600, 2 * 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86_400, 2 * 86_400, 7 * 86_400)
_MAX_TIME_TICKS = 12
_ISO = "%Y-%m-%dT%H:%M:%SZ"


def kw(wh: int, dt: int) -> float:
    """Average power in kW of `wh` watt-hours over `dt` seconds."""
    return wh * 3.6 / dt


def curve_stem(doc: Mapping) -> str:
    area = doc["area"]
    if not isinstance(area, str) or not METER_ID_RE.match(area):
        raise GridledgerError(f"area {area!r} is not a safe id for a file name")
    return f"loadcurve-{area}-{utc(doc['from'], '%Y%m%dT%H%M%SZ')}-{utc(doc['to'], '%Y%m%dT%H%M%SZ')}"


def every_interval(doc: Mapping) -> list[dict]:
    """Every interval of a document in time order, whatever became of it."""
    return sorted([*doc["points"], *doc["refused"], *doc["withheld"]], key=lambda p: (p["t"], p["dt"]))


# ---------------------------------------------------------------- CSV

def curve_csv(doc: Mapping) -> str:
    """One row per interval (decrypted or not); per-band columns for the bands with energy."""
    bands = [b for b in range(doc["bands"])
             if any(p["import_wh_by_band"][b] or p["export_wh_by_band"][b] for p in doc["points"])]
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["t", "t_unix", "dt", "meters", "status", "import_wh", "export_wh", "import_kw", "export_kw",
                *(f"band{b}_{d}_wh" for b in bands for d in ("import", "export")), "reason", "request", "item",
                "trustees"])
    for p in every_interval(doc):
        head = [utc(p["t"], _ISO), p["t"], p["dt"], p["meters"], p["status"]]
        if p["status"] != "decrypted":
            w.writerow(head + [""] * (4 + 2 * len(bands)) + [p.get("reason") or "", "", "", ""])
            continue
        per_band = [v for b in bands for v in (p["import_wh_by_band"][b], p["export_wh_by_band"][b])]
        w.writerow(head + [p["import_wh"], p["export_wh"], f"{kw(p['import_wh'], p['dt']):.3f}",
                           f"{kw(p['export_wh'], p['dt']):.3f}", *per_band, "", p["request"], p["item"],
                           ";".join(p["trustees"])])
    return out.getvalue()


# ---------------------------------------------------------------- SVG

def render_svg(doc: Mapping) -> str:
    t1, t2, points = doc["from"], doc["to"], doc["points"]
    peak = max((kw(p[k], p["dt"]) for p in points for k in ("import_wh", "export_wh")), default=0.0)
    top, step = axis_top(peak)
    height = _TOP + _PLOT_H + _BOTTOM

    def x(t: int) -> float:
        return _LEFT + _PLOT_W * (min(max(t, t1), t2) - t1) / (t2 - t1)

    def y(v: float) -> float:
        return _TOP + _PLOT_H - _PLOT_H * v / top

    area, k = esc(doc["area"]), esc(doc["min_meters"])
    gaps = len(doc["withheld"]) + len(doc["refused"])
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{height}" viewBox="0 0 {_W} {height}" '
           f'role="img" aria-label="Load curve of area {area}: average import and export power per interval" '
           'font-family="system-ui, sans-serif" font-size="11">',
           f'<rect width="{_W}" height="{height}" fill="#ffffff"/>',
           f'<text x="{_LEFT}" y="20" font-size="15" font-weight="600">Load curve of area {area}</text>',
           f'<text x="{_LEFT}" y="38" fill="#5b6670">{esc(utc(t1))} to {esc(utc(t2))}: '
           f'{len(points)} intervals decrypted, each over at least {k} meters; '
           f'{gaps} not decrypted (shaded)</text>']
    for p in [*doc["withheld"], *doc["refused"]]:
        x0, x1 = x(p["t"] - p["dt"]), x(p["t"])
        label = esc(f"{utc(p['t'])}: {p['status']} ({p.get('reason')}), {p['meters']} meters")
        out.append(f'<rect class="{p["status"]}" x="{x0:.1f}" y="{_TOP}" width="{max(x1 - x0, 0.5):.1f}" '
                   f'height="{_PLOT_H}" fill="{_SHADES[p["status"]]}"><title>{label}</title></rect>')
    out.append(value_axis(top, step, left=_LEFT, right=_W - _RIGHT, y_top=_TOP, height=_PLOT_H,
                          unit="kW (average per interval)"))
    out.append(_time_axis(t1, t2, x))
    for direction in ("import", "export"):
        out.append(f'<path class="line {direction}" d="{_steps(points, f"{direction}_wh", x, y)}" fill="none" '
                   f'stroke="{COLOURS[direction]}" stroke-width="1.6" stroke-linejoin="round"/>')
    for p in points:  # hover: each interval's numbers
        x0, x1 = x(p["t"] - p["dt"]), x(p["t"])
        label = esc(f"{utc(p['t'])} ({p['dt'] // 60} min, {p['meters']} meters): import "
                    f"{kw(p['import_wh'], p['dt']):.3f} kW, export {kw(p['export_wh'], p['dt']):.3f} kW")
        out.append(f'<rect x="{x0:.1f}" y="{_TOP}" width="{max(x1 - x0, 0.5):.1f}" height="{_PLOT_H}" '
                   f'fill="transparent"><title>{label}</title></rect>')
    out.append(legend(_LEFT, 46, [("import", COLOURS["import"]), ("export", COLOURS["export"]),
                                  ("withheld", _SHADES["withheld"]), ("refused", _SHADES["refused"])]))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _steps(points: Iterable[Mapping], field: str, x, y) -> str:
    """A step line: each interval flat over [t - dt, t]; a new sub-path after a gap."""
    d, end = [], None
    for p in sorted(points, key=lambda p: p["t"]):
        start, level = p["t"] - p["dt"], y(kw(p[field], p["dt"]))
        d.append(f"V{level:.1f}" if start == end else f"M{x(start):.1f},{level:.1f}")
        d.append(f"H{x(p['t']):.1f}")
        end = p["t"]
    return "".join(d) or "M0,0"


def _time_axis(t1: int, t2: int, x) -> str:
    """Vertical grid lines at round UTC times, labelled below the plot."""
    span = t2 - t1
    step = next((s for s in _TIME_STEPS if span / s <= _MAX_TIME_TICKS), _TIME_STEPS[-1])
    while span / step > _MAX_TIME_TICKS:
        step *= 2
    base = _TOP + _PLOT_H
    out, day = [], None
    for t in range(-(-t1 // step) * step, t2 + 1, step):
        xt = x(t)
        out.append(f'<line x1="{xt:.1f}" y1="{_TOP}" x2="{xt:.1f}" y2="{base + 4}" stroke="#e1e5ea"/>')
        if step >= 86_400:
            out.append(f'<text x="{xt:.1f}" y="{base + 18}" text-anchor="middle">{utc(t, "%Y-%m-%d")}</text>')
            continue
        out.append(f'<text x="{xt:.1f}" y="{base + 18}" text-anchor="middle">{utc(t, "%H:%M")}</text>')
        if utc(t, "%Y-%m-%d") != day:
            day = utc(t, "%Y-%m-%d")
            out.append(f'<text x="{xt:.1f}" y="{base + 33}" text-anchor="middle" fill="#5b6670">{day}</text>')
    out.append(f'<text x="{_W - _RIGHT}" y="{base + 50}" text-anchor="end" fill="#5b6670">'
               'time, UTC: each step is one interval at its average power</text>')
    return "".join(out)


# ---------------------------------------------------------------- files

def write_curve_files(doc: Mapping, directory: Path) -> dict[str, Path]:
    """Write STEM.json, .csv and .svg into `directory`; each file appears whole or not at all."""
    stem = curve_stem(doc)
    directory.mkdir(parents=True, exist_ok=True)
    texts = {"json": json.dumps(doc, indent=1, sort_keys=True) + "\n", "csv": curve_csv(doc), "svg": render_svg(doc)}
    paths = {}
    for kind, text in texts.items():
        path = paths[kind] = directory / f"{stem}.{kind}"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return paths
