"""Bills for people: a printable HTML page, a CSV of many bills, and the two files settlement writes.

Every string taken from a bill is escaped; the page has no script and no external asset.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterable, Mapping

from gridledger.wire import BANDS, METER_ID_RE

from .charts import COLOURS, axis_top, legend, utc as _utc, esc as _e, value_axis
from .tariff import DIRECTIONS, Charges, Tariff, TariffError, check_slots, format_kwh

__all__ = ["BillError", "render_html", "bills_csv", "write_bill_files"]

_HEX_RE = re.compile(r"[0-9a-fA-F]{1,128}\Z")
_MAX_TS = 253402300799  # 9999-12-31T23:59:59Z, the last second datetime can print
_MAX_PROOF_LINES = 12
# Chart geometry (px): wide enough bars for a "12345.678" label at 10 px type.
_BAR_W, _BAR_GAP, _GROUP_GAP = 44, 4, 28
_LEFT, _RIGHT, _TOP, _BOTTOM, _PLOT_H = 64, 16, 40, 36, 170


class BillError(TariffError):
    """A bill that cannot be rendered or written (missing field, wrong type, unsafe name).

    A TariffError, so one except clause covers a settlement document and its tariff.
    """


@dataclass(frozen=True)
class _Bill:
    account: str
    period: str
    start: int
    end: int
    energy_wh: tuple[int, ...]
    charges: Charges
    bill_id: str
    chain: str | None
    readings: int | None
    tariff: Tariff | None
    tariff_sha256: str | None
    proofs: Any

    def band_name(self, band: int) -> str:
        b = self.tariff.band(band) if self.tariff else None
        if b is not None:
            return b.name
        return next((ln.name for ln in self.charges.lines if ln.band == band), f"band {band}")

    def bands_used(self) -> list[int]:
        return [b for b in range(BANDS) if self.energy_wh[2 * b] or self.energy_wh[2 * b + 1]]


def _bill(bill: Any) -> _Bill:
    """Check what a bill must carry; optional keys may be absent but not malformed."""
    if not isinstance(bill, Mapping):
        raise BillError("bad_bill", f"a bill is a JSON object, not {type(bill).__name__}")
    missing = [k for k in ("account", "period", "energy_wh", "charges", "bill_id") if k not in bill]
    if missing:
        raise BillError("missing_field", f"bill lacks {', '.join(missing)}")
    if bill.get("v", 1) != 1:
        raise BillError("bad_version", f"bill version {bill['v']!r}; this renderer knows version 1")
    period = bill["period"]
    _need(isinstance(period, Mapping), "period", "an object with name, from and to")
    if any(k not in period for k in ("name", "from", "to")):
        raise BillError("missing_field", "bill period needs name, from and to")
    _need(isinstance(bill["account"], str) and bill["account"] != "", "account", "a non-empty string")
    _need(isinstance(period["name"], str) and period["name"] != "", "period name", "a non-empty string")
    for k in ("from", "to"):
        _need(_is_int(period[k]) and 0 <= period[k] <= _MAX_TS, f"period {k}", "Unix seconds (UTC)")
    _need(period["from"] < period["to"], "period", "from before to")
    _need(isinstance(bill["bill_id"], str) and _HEX_RE.match(bill["bill_id"]) is not None, "bill_id", "hex")
    for k in ("chain", "tariff_sha256"):
        _need(isinstance(bill.get(k, ""), str), k, "a string")
    _need(_is_int(bill.get("readings", 0)) and bill.get("readings", 0) >= 0, "readings", "an integer >= 0")
    try:
        energy = check_slots(bill["energy_wh"])
        charges = Charges.from_dict(bill["charges"])
        tariff = Tariff.from_dict(bill["tariff"]) if "tariff" in bill else None
    except TariffError as e:
        raise BillError(e.reason, e.detail) from e
    return _Bill(account=bill["account"], period=period["name"], start=period["from"], end=period["to"],
                 energy_wh=energy, charges=charges, bill_id=bill["bill_id"], chain=bill.get("chain"),
                 readings=bill.get("readings"), tariff=tariff, tariff_sha256=bill.get("tariff_sha256"),
                 proofs=bill.get("proofs"))


def _need(ok: bool, what: str, expected: str) -> None:
    if not ok:
        raise BillError("bad_field", f"bill {what} must be {expected}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _safe_names(b: _Bill) -> None:
    """Account and period become file names and CSV cells: safe ids only, never a path."""
    for what, value in (("account", b.account), ("period name", b.period)):
        if not METER_ID_RE.match(value):
            raise BillError("unsafe_name", f"{what} {value!r} is not [A-Za-z0-9_-]{{1,32}}")


# ---------------------------------------------------------------- HTML

_CSS = """
@page { size: A4; margin: 14mm; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d232a;
       max-width: 820px; margin: 24px auto; padding: 0 16px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 24px 0 8px; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 12px 0; }
dl.meta dt { color: #5b6670; } dl.meta dd { margin: 0; }
code, .id { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; word-break: break-all; }
table { border-collapse: collapse; width: 100%; }
th, td { padding: 6px 8px; border-bottom: 1px solid #d6dbe0; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.standing td { border-top: 2px solid #9aa5b1; }
tr.total td { font-weight: 700; font-size: 16px; border-bottom: 3px double #1d232a; }
svg { max-width: 100%; height: auto; }
.verify { border: 2px solid #2f6db5; border-radius: 6px; padding: 4px 16px 10px; margin-top: 28px;
          break-inside: avoid; }
.verify pre { background: #eef3f9; padding: 8px 12px; border-radius: 4px; }
.note { color: #5b6670; font-size: 12px; }
@media print { body { margin: 0; max-width: none; } .verify { border-color: #000; } }
"""


def render_html(bill: Mapping[str, Any]) -> str:
    """One self-contained printable page: header, usage chart, charges, how to verify."""
    return _page(_bill(bill))


def _page(b: _Bill) -> str:
    c, cur = b.charges, _e(b.charges.currency)
    meta = [("Account", _e(b.account)), ("Period", _e(b.period)),
            ("From", _e(_utc(b.start))), ("To (exclusive)", _e(_utc(b.end))),
            ("Bill id", f'<span class="id">{_e(b.bill_id)}</span>')]
    if b.readings is not None:
        meta.append(("Readings", _e(b.readings)))
    if b.chain:
        meta.append(("Ledger chain", _e(b.chain)))
    if b.tariff is not None:
        meta.append(("Tariff", _e(b.tariff.name)))
    if b.tariff_sha256:
        meta.append(("Tariff SHA-256", f'<span class="id">{_e(b.tariff_sha256)}</span>'))
    rows = [f'<tr class="line"><td>{_e(ln.name)} <span class="note">(band {_e(ln.band)})</span></td>'
            f'<td>{_e(ln.direction)}{" (credit)" if ln.direction == "export" else ""}</td>'
            f'<td class="num">{_e(ln.kwh)} kWh</td><td class="num">{_e(ln.rate)} {cur}/kWh</td>'
            f'<td class="num">{_e(ln.amount)}</td></tr>' for ln in c.lines]
    if not rows:
        rows.append('<tr><td colspan="5" class="note">No energy was recorded in this period.</td></tr>')
    rounding = ""
    if b.tariff is not None:
        unit = _e(format(Decimal(1).scaleb(-b.tariff.minor_units), "f"))
        rounding = (f"Each amount is kWh × rate, rounded half up to {unit} {cur}; export lines are credits "
                    "(negative). The total is the sum of the rounded amounts.")
    stem = _e(f"{b.account}-{b.period}.json")
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Electricity bill {_e(b.account)} {_e(b.period)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<header>",
        "<h1>Electricity bill</h1>",
        '<dl class="meta">',
        *(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in meta),
        "</dl>",
        "</header>",
        "<section>",
        "<h2>Your energy use</h2>",
        _usage_svg(b),
        "</section>",
        "<section>",
        "<h2>Charges</h2>",
        "<table>",
        '<thead><tr><th>Band</th><th>Direction</th><th class="num">Energy</th><th class="num">Rate</th>'
        f'<th class="num">Amount ({cur})</th></tr></thead>',
        "<tbody>",
        *rows,
        f'<tr class="standing"><td>Standing charge</td><td></td>'
        f'<td class="num">{_e(c.standing_days)} days</td><td class="num">{_e(c.standing_rate)} {cur}/day</td>'
        f'<td class="num">{_e(c.standing_amount)}</td></tr>',
        f'<tr class="total"><td>Total</td><td></td><td></td><td></td>'
        f'<td class="num">{_e(c.total)} {cur}</td></tr>',
        "</tbody>",
        "</table>",
        f'<p class="note">{rounding}</p>' if rounding else "",
        "</section>",
        '<section class="verify">',
        "<h2>How to verify this bill</h2>",
        "<p>You do not have to trust whoever sent this bill. It comes with a data file "
        f"(<code>{stem}</code>) that carries the ledger's proofs. Save it as <code>bill.json</code> and run</p>",
        "<pre>gridledger verify-bill bill.json</pre>",
        "<p>with the validator public keys of the ledger consortium. It checks the validators' certificates "
        "on the ledger states at the start and end of the period, that the energy above is what the trustees "
        "decrypted from them, that the tariff matches its SHA-256, and recomputes every charge line and the "
        "total.</p>",
        _proof_summary(b.proofs),
        "</section>",
        "</body>",
        "</html>",
        "",
    ])


def _usage_svg(b: _Bill) -> str:
    """Inline SVG bar chart: import and export kWh per band, one bar per (band, direction) with energy."""
    bands = b.bands_used()
    if not bands:
        return ('<svg xmlns="http://www.w3.org/2000/svg" width="480" height="40" viewBox="0 0 480 40" role="img" '
                'aria-label="No energy"><text x="0" y="24" font-size="14">No energy was recorded in this period.'
                '</text></svg>')
    top, step = axis_top(max(b.energy_wh) / 1000)
    group_w = 2 * _BAR_W + _BAR_GAP
    width = max(360, _LEFT + len(bands) * (group_w + _GROUP_GAP) + _GROUP_GAP + _RIGHT)
    height = _TOP + _PLOT_H + _BOTTOM
    base = _TOP + _PLOT_H
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="Energy per tariff band in kWh" '
           'font-family="system-ui, sans-serif" font-size="11">']
    out.append(value_axis(top, step, left=_LEFT, right=width - _RIGHT, y_top=_TOP, height=_PLOT_H, unit="kWh"))
    for g, band in enumerate(bands):
        x0 = _LEFT + _GROUP_GAP + g * (group_w + _GROUP_GAP)
        for d, direction in enumerate(DIRECTIONS):
            wh = b.energy_wh[2 * band + d]
            if not wh:
                continue
            kwh = format_kwh(wh)
            h = max(1.0, _PLOT_H * (wh / 1000) / top)
            x = x0 + d * (_BAR_W + _BAR_GAP)
            label = _e(f"{b.band_name(band)} {direction}: {kwh} kWh")
            out.append(f'<rect class="bar {direction}" data-band="{band}" data-direction="{direction}" '
                       f'x="{x}" y="{base - h:.1f}" width="{_BAR_W}" height="{h:.1f}" '
                       f'fill="{COLOURS[direction]}"><title>{label}</title></rect>'
                       f'<text class="value" x="{x + _BAR_W / 2:.1f}" y="{base - h - 4:.1f}" '
                       f'text-anchor="middle" font-size="10">{_e(kwh)}</text>')
        name = b.band_name(band)
        name = name if len(name) <= 18 else name[:17] + "…"
        out.append(f'<text class="band" x="{x0 + group_w / 2:.1f}" y="{base + 16}" text-anchor="middle">'
                   f'{_e(name)}</text>')
    out.append(legend(_LEFT, 8, ((d, COLOURS[d]) for d in DIRECTIONS)))
    out.append("</svg>")
    return "".join(out)


def _proof_summary(proofs: Any) -> str:
    """Proofs are opaque here; name what they cover: heights and certificate signer counts, if present."""
    found: list[str] = []

    def walk(obj: Any, path: str, depth: int) -> None:
        if len(found) >= _MAX_PROOF_LINES or depth > 3:
            return
        if isinstance(obj, Mapping):
            cert = obj.get("certificate") if isinstance(obj.get("certificate"), Mapping) else obj
            height = obj.get("height", cert.get("height"))
            if _is_int(height):
                signers = cert.get("signers")
                n = len(signers) if isinstance(signers, list) else signers if _is_int(signers) else None
                found.append(f"{path or 'proof'}: height {height}" + (f", {n} signers" if n is not None else ""))
                return
            for k in sorted(obj, key=str):
                walk(obj[k], f"{path}.{k}" if path else str(k), depth + 1)
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]", depth + 1)

    walk(proofs, "", 0)
    if not found:
        return ""
    items = "".join(f"<li>{_e(s)}</li>" for s in found)
    return f'<p class="note">Proofs carried by this bill:</p><ul class="note proofs">{items}</ul>'


# ---------------------------------------------------------------- CSV

def bills_csv(bills: Iterable[Mapping[str, Any]]) -> str:
    """One row per bill; per-band columns for every band with energy in any bill, in band order."""
    parsed = [_bill(x) for x in bills]
    for b in parsed:
        _safe_names(b)
    bands = sorted({band for b in parsed for band in b.bands_used()})
    band_cols = [(f"band{band}_{direction}_kwh", 2 * band + d) for band in bands
                 for d, direction in enumerate(DIRECTIONS)]
    header = ["account", "period", "from", "to", "readings", "import_kwh", "export_kwh",
              *(name for name, _ in band_cols), "standing", "total", "currency", "bill_id"]
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(header)
    for b in parsed:
        iso = "%Y-%m-%dT%H:%M:%SZ"
        w.writerow([b.account, b.period, _utc(b.start, iso), _utc(b.end, iso),
                    "" if b.readings is None else b.readings,
                    format_kwh(sum(b.energy_wh[0::2])), format_kwh(sum(b.energy_wh[1::2])),
                    *(format_kwh(b.energy_wh[slot]) for _, slot in band_cols),
                    b.charges.standing_amount, b.charges.total, b.charges.currency, b.bill_id])
    return out.getvalue()


# ---------------------------------------------------------------- files

def write_bill_files(bill: Mapping[str, Any], directory: str | Path) -> dict[str, Path]:
    """Write {account}-{period}.json and .html into `directory`; each file appears whole or not at all."""
    b = _bill(bill)
    _safe_names(b)
    page = _page(b)
    data = json.dumps(bill, indent=1, sort_keys=True) + "\n"
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{b.account}-{b.period}"
    paths = {"json": directory / f"{stem}.json", "html": directory / f"{stem}.html"}
    for kind, text in (("json", data), ("html", page)):
        tmp = paths[kind].with_name(paths[kind].name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, paths[kind])
    return paths
