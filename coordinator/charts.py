"""Pieces of the inline SVG charts in bills and load curves: a round value axis,
its grid and labels, a legend, the import/export colours, UTC labels.

Plain strings, no script, no external asset; every caller escapes its own text.
"""

from __future__ import annotations

import html
from datetime import datetime, timezone
from typing import Any, Iterable

__all__ = ["COLOURS", "axis_top", "tick_label", "value_axis", "legend", "utc", "esc"]

COLOURS = {"import": "#2f6db5", "export": "#3c9a5f"}
_GRID, _INK = "#e1e5ea", "#5b6670"


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def utc(ts: int, fmt: str = "%Y-%m-%d %H:%M UTC") -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime(fmt)


def axis_top(peak: float) -> tuple[float, float]:
    """A round axis maximum (and tick step, 1/2/5 x 10^k) at or above `peak`, about four ticks."""
    raw = peak / 4 if peak > 0 else 0.25
    mag = 10.0 ** _floor_log10(raw)
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    ticks = max(1, -(-peak // step))
    return ticks * step, step


def _floor_log10(x: float) -> int:
    k = 0
    while x >= 10:
        x, k = x / 10, k + 1
    while x < 1:
        x, k = x * 10, k - 1
    return k


def tick_label(v: float) -> str:
    return f"{v:.6g}"


def value_axis(top: float, step: float, *, left: float, right: float, y_top: float, height: float,
               unit: str) -> str:
    """Horizontal grid lines with their values at the left, the unit written up the
    side, and the base line: the plot spans y_top .. y_top + height, 0 at the bottom."""
    base = y_top + height
    ticks = max(1, round(top / step))
    out = []
    for i in range(ticks + 1):
        y = base - height * i / ticks
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="{_GRID}"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="{_INK}">'
                   f'{tick_label(i * step)}</text>')
    out.append(f'<text transform="translate(14 {y_top + height / 2:.0f}) rotate(-90)" text-anchor="middle" '
               f'fill="{_INK}">{esc(unit)}</text>')
    out.append(f'<line x1="{left}" y1="{base}" x2="{right}" y2="{base}" stroke="{_INK}"/>')
    return "".join(out)


def legend(x: float, y: float, entries: Iterable[tuple[str, str]], spacing: float = 90) -> str:
    """Colour swatches with their names in a row, from (x, y) at the swatch's top left."""
    return "".join(f'<rect x="{x + i * spacing}" y="{y}" width="12" height="12" fill="{colour}"/>'
                   f'<text x="{x + i * spacing + 17}" y="{y + 10}">{esc(name)}</text>'
                   for i, (name, colour) in enumerate(entries))
