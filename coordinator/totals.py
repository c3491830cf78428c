"""Totals from encrypted readings: multiply ciphertexts, decrypt only the aggregate.

Decryption here uses the whole private key, a testbed shortcut; threshold
trustees replace it. No single reading is decrypted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from phe import paillier as phe_paillier

from gridledger.paillier import add_ciphertexts
from gridledger.wire import BANDS, Reading, unpack_slots

__all__ = ["EnergyTotals", "decrypt_total", "decrypt_ciphertext"]


@dataclass(frozen=True, slots=True)
class EnergyTotals:
    readings: int
    slots: tuple[int, ...]  # watt-hours per slot (2*band + direction)

    @property
    def import_wh(self) -> int:
        return sum(self.slots[0::2])

    @property
    def export_wh(self) -> int:
        return sum(self.slots[1::2])

    def band(self, band: int) -> tuple[int, int]:
        return self.slots[2 * band], self.slots[2 * band + 1]

    def bands_used(self) -> list[int]:
        return [b for b in range(BANDS) if any(self.band(b))]


def decrypt_total(priv: phe_paillier.PaillierPrivateKey, readings: Iterable[Reading]) -> EnergyTotals:
    readings = list(readings)
    n = priv.public_key.n
    return decrypt_ciphertext(priv, add_ciphertexts(n, (r.ciphertext for r in readings)), len(readings))


def decrypt_ciphertext(priv: phe_paillier.PaillierPrivateKey, c: int, readings: int = 0) -> EnergyTotals:
    """Decrypt an aggregate (a product of reading ciphertexts) into slot totals."""
    return EnergyTotals(readings, tuple(unpack_slots(priv.raw_decrypt(c))))
