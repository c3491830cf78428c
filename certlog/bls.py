"""BLS12-381 signatures, IETF proof-of-possession ciphersuite, with the API and
bytes of `py_ecc.bls.G2ProofOfPossession`, carried by a compiled backend.

Measured here (see docs/performance.md): blspy verifies in ~1.3 ms, milagro in
~4.4 ms, py_ecc in ~350 ms, so blspy carries the load. py_ecc stays the
reference: tests prove byte equality, and `GRIDLEDGER_BLS=py_ecc` selects it.
Verification returns False on any malformed input instead of raising.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

from py_ecc.bls import G2ProofOfPossession as _ref

__all__ = ["BACKEND", "BlspyBackend", "PyEccBackend", "KeyGen", "SkToPk", "Sign", "Verify", "Aggregate", "FastAggregateVerify",
           "AggregateVerify", "PopProve", "PopVerify", "PUBKEY_LEN", "SIGNATURE_LEN", "CURVE_ORDER"]

PUBKEY_LEN = 48
SIGNATURE_LEN = 96
CURVE_ORDER = 0x73EDA753299D7D483339D80809A1D80553BDA402FFFE5BFEFFFFFFFF00000001
# Public keys kept decoded and validated (blspy): a chain's few validator keys are
# checked against every certificate, and decoding one (a square root and the
# subgroup check) costs about 43 µs, a tenth of a 3-signature certificate's check.
PK_CACHE = 4096


def KeyGen(ikm: bytes, key_info: bytes = b"") -> int:
    """IETF KeyGen (HKDF); py_ecc's, because blspy's key_gen derives differently."""
    return _ref.KeyGen(ikm, key_info)


def _valid_sk(sk: int) -> None:
    if not 0 < sk < CURVE_ORDER:
        raise ValueError("secret key out of range")


class PyEccBackend:
    name = "py_ecc"
    SkToPk = staticmethod(_ref.SkToPk)
    Sign = staticmethod(_ref.Sign)
    Verify = staticmethod(_ref.Verify)
    Aggregate = staticmethod(_ref.Aggregate)
    FastAggregateVerify = staticmethod(_ref.FastAggregateVerify)
    AggregateVerify = staticmethod(_ref.AggregateVerify)
    PopProve = staticmethod(_ref.PopProve)
    PopVerify = staticmethod(_ref.PopVerify)


class BlspyBackend:
    name = "blspy"

    def __init__(self) -> None:
        import blspy
        self._b = blspy
        self._s = blspy.PopSchemeMPL
        # Only keys that pass KeyValidate are kept: a refusal raises, and lru_cache keeps no exceptions.
        self._validated_pk = functools.lru_cache(maxsize=PK_CACHE)(self._decode_pk)

    def _sk(self, sk: int):
        _valid_sk(sk)
        return self._b.PrivateKey.from_bytes(sk.to_bytes(32, "big"))

    def _pk(self, pk: bytes):
        if not isinstance(pk, (bytes, bytearray)) or len(pk) != PUBKEY_LEN:
            raise ValueError("bad public key length")
        return self._validated_pk(bytes(pk))

    def _decode_pk(self, pk: bytes):
        # KeyValidate: a well-formed, non-identity point of the G1 subgroup.
        p = self._b.G1Element.from_bytes(pk)
        if p == self._b.G1Element():
            raise ValueError("identity public key")
        return p

    def _sig(self, sig: bytes):
        if not isinstance(sig, (bytes, bytearray)) or len(sig) != SIGNATURE_LEN:
            raise ValueError("bad signature length")
        return self._b.G2Element.from_bytes(bytes(sig))

    def SkToPk(self, sk: int) -> bytes:
        return bytes(self._sk(sk).get_g1())

    def Sign(self, sk: int, msg: bytes) -> bytes:
        return bytes(self._s.sign(self._sk(sk), msg))

    def Verify(self, pk: bytes, msg: bytes, sig: bytes) -> bool:
        try:
            return bool(self._s.verify(self._pk(pk), msg, self._sig(sig)))
        except (ValueError, RuntimeError, TypeError):
            return False

    def Aggregate(self, sigs: Sequence[bytes]) -> bytes:
        if not sigs:
            raise ValueError("nothing to aggregate")
        return bytes(self._s.aggregate([self._sig(s) for s in sigs]))

    def FastAggregateVerify(self, pks: Sequence[bytes], msg: bytes, sig: bytes) -> bool:
        try:
            if not pks:
                return False
            return bool(self._s.fast_aggregate_verify([self._pk(p) for p in pks], msg, self._sig(sig)))
        except (ValueError, RuntimeError, TypeError):
            return False

    def AggregateVerify(self, pks: Sequence[bytes], msgs: Sequence[bytes], sig: bytes) -> bool:
        try:
            if not pks or len(pks) != len(msgs):
                return False
            return bool(self._s.aggregate_verify([self._pk(p) for p in pks], list(msgs), self._sig(sig)))
        except (ValueError, RuntimeError, TypeError):
            return False

    def PopProve(self, sk: int) -> bytes:
        return bytes(self._s.pop_prove(self._sk(sk)))

    def PopVerify(self, pk: bytes, proof: bytes) -> bool:
        try:
            return bool(self._s.pop_verify(self._pk(pk), self._sig(proof)))
        except (ValueError, RuntimeError, TypeError):
            return False


def _load():
    choice = os.environ.get("GRIDLEDGER_BLS", "blspy")
    if choice == "py_ecc":
        return PyEccBackend()
    if choice == "blspy":
        return BlspyBackend()
    raise ValueError(f"GRIDLEDGER_BLS={choice!r}: choose blspy or py_ecc")


_backend = _load()
BACKEND: str = _backend.name
SkToPk = _backend.SkToPk
Sign = _backend.Sign
Verify = _backend.Verify
Aggregate = _backend.Aggregate
FastAggregateVerify = _backend.FastAggregateVerify
AggregateVerify = _backend.AggregateVerify
PopProve = _backend.PopProve
PopVerify = _backend.PopVerify
