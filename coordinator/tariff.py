"""Tariffs: turn an account's decrypted slot totals (Wh per band and direction) into money.

Exact decimal arithmetic only; each line is rounded once, so a customer can recompute the
total line by line (docs/tariffs.md).
"""

from __future__ import annotations

import decimal
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Mapping, Sequence

from gridledger.errors import Rejected
from gridledger.wire import BANDS, SLOT_BITS, SLOTS

__all__ = ["TariffError", "Band", "Tariff", "Line", "Charges", "ROUNDING", "DIRECTIONS", "check_slots", "format_kwh"]

# Half away from zero (Decimal calls it ROUND_HALF_UP): 0.005 -> 0.01 and a credit of
# -0.005 -> -0.01, so a charge and a credit of the same size round to the same magnitude.
ROUNDING = decimal.ROUND_HALF_UP
DIRECTIONS = ("import", "export")  # slot = 2*band + direction index
MAX_DAYS = 100_000
# Prices have at most 9 integer and 9 fractional digits, slots at most 15 digits of Wh and
# days 6, so 50 digits hold every product exactly; _EXACT traps anything inexact as a bug.
_PRICE_RE = re.compile(r"-?[0-9]{1,9}(\.[0-9]{1,9})?\Z")
_PRICE_LIMIT = Decimal(10) ** 9
_DECIMAL_RE = re.compile(r"-?[0-9]+(\.[0-9]+)?\Z")  # amounts and quantities as charges print them
_CURRENCY_RE = re.compile(r"[A-Z]{3}\Z")
_SLOT_MAX = (1 << SLOT_BITS) - 1
# Explicit contexts: charge() must not depend on whatever the caller set decimal.getcontext() to.
_EXACT = decimal.Context(prec=50, rounding=ROUNDING, traps=[decimal.Inexact, decimal.InvalidOperation,
                                                             decimal.Overflow, decimal.DivisionByZero])
_ROUND = decimal.Context(prec=50, rounding=ROUNDING, traps=[decimal.InvalidOperation, decimal.Overflow])

_TARIFF_KEYS = ("name", "currency", "minor_units", "standing_charge_per_day", "band")
_BAND_KEYS = ("band", "name", "import_per_kwh", "export_per_kwh")
_LINE_KEYS = ("band", "name", "direction", "wh", "kwh", "rate", "amount")
_CHARGES_KEYS = ("lines", "standing_days", "standing_rate", "standing_amount", "total", "currency")


class TariffError(Rejected):
    """A tariff, or charges, refused for a stable `reason` (``float_money``, ``unpriced_band``, ...)."""


@dataclass(frozen=True)
class Band:
    band: int
    name: str
    import_per_kwh: Decimal
    export_per_kwh: Decimal  # credit paid per exported kWh

    def __post_init__(self):
        if not _is_int(self.band) or not 0 <= self.band < BANDS:
            raise TariffError("band_out_of_range", f"band {self.band!r} is not in 0..{BANDS - 1}")
        _check_name(self.name, f"band {self.band} name")
        _check_price(self.import_per_kwh, f"band {self.band} import_per_kwh")
        _check_price(self.export_per_kwh, f"band {self.band} export_per_kwh")

    def rate(self, direction: int) -> Decimal:
        return self.export_per_kwh if direction else self.import_per_kwh


@dataclass(frozen=True)
class Line:
    band: int
    name: str
    direction: str  # "import" or "export"
    wh: int
    kwh: str
    rate: str
    amount: str  # negative for export: a credit


@dataclass(frozen=True)
class Charges:
    lines: tuple[Line, ...]
    standing_days: int
    standing_rate: str
    standing_amount: str
    total: str
    currency: str

    def to_dict(self) -> dict[str, Any]:
        return {"lines": [{k: getattr(line, k) for k in _LINE_KEYS} for line in self.lines],
                "standing_days": self.standing_days, "standing_rate": self.standing_rate,
                "standing_amount": self.standing_amount, "total": self.total, "currency": self.currency}

    @classmethod
    def from_dict(cls, d: Any) -> "Charges":
        """Parse charges as a bill carries them; shape and types only (verify-bill recomputes the values)."""
        _check_keys(d, _CHARGES_KEYS, "charges", "bad_charges")
        if not isinstance(d["lines"], list):
            raise TariffError("bad_charges", "charges lines must be a list")
        lines = []
        for i, ld in enumerate(d["lines"]):
            _check_keys(ld, _LINE_KEYS, f"charges line {i}", "bad_charges")
            ok = (_is_int(ld["band"]) and 0 <= ld["band"] < BANDS and ld["direction"] in DIRECTIONS
                  and _is_int(ld["wh"]) and ld["wh"] > 0 and isinstance(ld["name"], str)
                  and all(_is_decimal(ld[k]) for k in ("kwh", "rate", "amount")))
            if not ok:
                raise TariffError("bad_charges", f"charges line {i} has a field of the wrong type or range")
            lines.append(Line(**{k: ld[k] for k in _LINE_KEYS}))
        if not _is_int(d["standing_days"]) or d["standing_days"] < 0:
            raise TariffError("bad_charges", "standing_days must be an integer >= 0")
        for k in ("standing_rate", "standing_amount", "total"):
            if not _is_decimal(d[k]):
                raise TariffError("bad_charges", f"charges {k} must be a decimal string, not {d[k]!r}")
        if not isinstance(d["currency"], str) or not _CURRENCY_RE.match(d["currency"]):
            raise TariffError("bad_charges", f"charges currency {d['currency']!r} is not 3 uppercase letters")
        return cls(lines=tuple(lines), standing_days=d["standing_days"], standing_rate=d["standing_rate"],
                   standing_amount=d["standing_amount"], total=d["total"], currency=d["currency"])


@dataclass(frozen=True)
class Tariff:
    name: str
    currency: str
    minor_units: int
    standing_charge_per_day: Decimal
    bands: tuple[Band, ...]

    def __post_init__(self):
        _check_name(self.name, "tariff name")
        if not isinstance(self.currency, str) or not _CURRENCY_RE.match(self.currency):
            raise TariffError("bad_currency", f"currency {self.currency!r} is not 3 uppercase letters (ISO 4217)")
        if not _is_int(self.minor_units) or not 0 <= self.minor_units <= 4:
            raise TariffError("bad_minor_units", f"minor_units {self.minor_units!r} is not an integer in 0..4")
        _check_price(self.standing_charge_per_day, "standing_charge_per_day")
        bands = tuple(self.bands)
        if not bands:
            raise TariffError("missing_field", "a tariff prices at least one [[band]]")
        if not all(isinstance(b, Band) for b in bands):
            raise TariffError("bad_band", "bands must be Band objects")
        seen = set()
        for b in bands:
            if b.band in seen:
                raise TariffError("duplicate_band", f"band {b.band} is priced twice")
            seen.add(b.band)
        object.__setattr__(self, "bands", tuple(sorted(bands, key=lambda b: b.band)))

    @classmethod
    def from_toml(cls, path: str | Path) -> "Tariff":
        try:
            with open(path, "rb") as f:
                d = tomllib.load(f)
        except OSError as e:
            raise TariffError("unreadable", f"{path}: {e.strerror or e}") from e
        except tomllib.TOMLDecodeError as e:
            raise TariffError("bad_toml", f"{path}: {e}") from e
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: Any) -> "Tariff":
        """Build from the TOML shape (also what to_dict returns); every rejection has a reason."""
        _check_keys(d, _TARIFF_KEYS, "tariff", "bad_tariff")
        if not isinstance(d["band"], list) or not all(isinstance(b, dict) for b in d["band"]):
            raise TariffError("bad_band", "band must be a list of [[band]] tables")
        bands = []
        for i, bd in enumerate(d["band"]):
            _check_keys(bd, _BAND_KEYS, f"band entry {i}", "bad_band")
            bands.append(Band(band=bd["band"], name=bd["name"],
                              import_per_kwh=_parse_price(bd["import_per_kwh"], f"band entry {i} import_per_kwh"),
                              export_per_kwh=_parse_price(bd["export_per_kwh"], f"band entry {i} export_per_kwh")))
        return cls(name=d["name"], currency=d["currency"], minor_units=d["minor_units"],
                   standing_charge_per_day=_parse_price(d["standing_charge_per_day"], "standing_charge_per_day"),
                   bands=tuple(bands))

    def to_dict(self) -> dict[str, Any]:
        """Canonical form: decimals as plain strings (as written, never exponent form), bands sorted."""
        return {"name": self.name, "currency": self.currency, "minor_units": self.minor_units,
                "standing_charge_per_day": _plain(self.standing_charge_per_day),
                "band": [{"band": b.band, "name": b.name, "import_per_kwh": _plain(b.import_per_kwh),
                          "export_per_kwh": _plain(b.export_per_kwh)} for b in self.bands]}

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the canonical JSON of to_dict(); a bill names its tariff by it."""
        canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()

    def band(self, band: int) -> Band | None:
        return next((b for b in self.bands if b.band == band), None)

    def charge(self, slots: Sequence[int], days: int) -> Charges:
        """Charges for slot totals (Wh, slot = 2*band + direction) over `days` of standing charge."""
        slots = check_slots(slots)
        if not _is_int(days) or not 0 <= days <= MAX_DAYS:
            raise TariffError("bad_days", f"days {days!r} is not an integer in 0..{MAX_DAYS}")
        lines = []
        for s, wh in enumerate(slots):
            if wh == 0:
                continue
            band_no, direction = divmod(s, 2)
            band = self.band(band_no)
            if band is None:
                raise TariffError("unpriced_band", f"{wh} Wh {DIRECTIONS[direction]} in band {band_no}, "
                                                   f"which tariff {self.name!r} does not price")
            rate = band.rate(direction)
            amount = _EXACT.multiply(_kwh(wh), rate)
            lines.append(Line(band=band_no, name=band.name, direction=DIRECTIONS[direction], wh=wh,
                              kwh=format_kwh(wh), rate=_plain(rate),
                              amount=self._money(_EXACT.minus(amount) if direction else amount)))
        standing = self._money(_EXACT.multiply(Decimal(days), self.standing_charge_per_day))
        total = Decimal(0)
        for x in [*(ln.amount for ln in lines), standing]:  # the rounded amounts, as printed
            total = _EXACT.add(total, Decimal(x))
        return Charges(lines=tuple(lines), standing_days=days, standing_rate=_plain(self.standing_charge_per_day),
                       standing_amount=standing, total=self._money(total), currency=self.currency)

    def _money(self, d: Decimal) -> str:
        q = d.quantize(Decimal(1).scaleb(-self.minor_units, _EXACT), rounding=ROUNDING, context=_ROUND)
        return _plain(_ROUND.abs(q) if q == 0 else q)  # never print "-0.00"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_decimal(v: Any) -> bool:
    return isinstance(v, str) and _DECIMAL_RE.match(v) is not None


def _plain(d: Decimal) -> str:
    return format(d, "f")


def _check_keys(d: Any, keys: Sequence[str], what: str, bad_type: str) -> None:
    """Exactly `keys`: an unknown key is as likely a typo of a price as anything else."""
    if not isinstance(d, Mapping):
        raise TariffError(bad_type, f"{what} must be a table/object, not {type(d).__name__}")
    unknown = sorted(set(d) - set(keys), key=str)
    if unknown:
        raise TariffError("unknown_key", f"{what}: unknown key(s) {', '.join(map(str, unknown))}")
    missing = [k for k in keys if k not in d]
    if missing:
        raise TariffError("missing_field", f"{what}: missing {', '.join(missing)}")


def _check_name(name: Any, what: str) -> None:
    if not isinstance(name, str) or not name.strip() or len(name) > 100:
        raise TariffError("bad_name", f"{what} must be a non-empty string of at most 100 characters")


def _parse_price(v: Any, what: str) -> Decimal:
    if isinstance(v, float):
        raise TariffError("float_money", f"{what} is a float ({v!r}); write it as a decimal string, e.g. \"{v}\"")
    if not isinstance(v, str) or not _PRICE_RE.match(v):
        raise TariffError("bad_decimal", f"{what} must be a decimal string like \"0.18\", not {v!r}")
    return Decimal(v)


def _check_price(d: Any, what: str) -> None:
    if isinstance(d, float):
        raise TariffError("float_money", f"{what} is a float; money must not be binary floating point")
    if not isinstance(d, Decimal) or not d.is_finite():
        raise TariffError("bad_decimal", f"{what} must be a finite Decimal, not {d!r}")
    if d.is_signed():
        raise TariffError("negative_price", f"{what} is negative ({d}); exports are priced as a positive credit")
    if d >= _PRICE_LIMIT or d.as_tuple().exponent < -9:
        raise TariffError("bad_decimal", f"{what} {d} has more than 9 integer or 9 fractional digits")


def format_kwh(wh: int) -> str:
    """Wh as exact kWh with three decimals: 1234 -> "1.234"."""
    return _plain(_kwh(wh))


def _kwh(wh: int) -> Decimal:
    return Decimal(wh).scaleb(-3, _EXACT)


def check_slots(slots: Any) -> tuple[int, ...]:
    """Slot totals as settlement decrypts them: 16 integers in 0..2^48-1 (Wh)."""
    if isinstance(slots, (str, bytes)) or not isinstance(slots, Sequence) or len(slots) != SLOTS:
        raise TariffError("bad_slots", f"slots must be a sequence of {SLOTS} integers (Wh per band and direction)")
    if not all(_is_int(v) and 0 <= v <= _SLOT_MAX for v in slots):
        raise TariffError("bad_slots", f"every slot must be an integer in 0..2^{SLOT_BITS}-1 (Wh)")
    return tuple(slots)
