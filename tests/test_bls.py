"""BLS on the compiled backend (blspy) is byte-for-byte py_ecc's G2ProofOfPossession:
keys, signatures, aggregates, proofs of possession, and every verification verdict."""

import os

import pytest
from py_ecc.bls import G2ProofOfPossession as ref

from certlog import bls

# Always the compiled backend, whatever GRIDLEDGER_BLS selects for the process:
# comparing py_ecc with itself would prove nothing.
fast = bls.BlspyBackend()

SKS = [bls.KeyGen(bytes([i]) * 32) for i in range(1, 5)]
MSG = b"gl-header-v1\narea1\n7\n" + bytes(range(32))
IDENTITY_G1 = b"\xc0" + bytes(47)
IDENTITY_G2 = b"\xc0" + bytes(95)


def test_backend_is_compiled_by_default():
    """The load is carried by blspy unless py_ecc is chosen explicitly."""
    if "GRIDLEDGER_BLS" in os.environ:
        pytest.skip("a backend was chosen explicitly")
    assert bls.BACKEND == "blspy"
    assert isinstance(bls._backend, bls.BlspyBackend)


def test_keys_signatures_and_proofs_equal_py_ecc():
    for sk in SKS:
        assert fast.SkToPk(sk) == ref.SkToPk(sk)
        assert fast.Sign(sk, MSG) == ref.Sign(sk, MSG)
        assert fast.PopProve(sk) == ref.PopProve(sk)


def test_aggregate_equals_py_ecc_and_verifies_in_both():
    """2f+1 = 3 of 4 signatures on one header aggregate identically and verify with both libraries."""
    sigs = [ref.Sign(sk, MSG) for sk in SKS[:3]]
    pks = [ref.SkToPk(sk) for sk in SKS[:3]]
    agg = fast.Aggregate(sigs)
    assert agg == ref.Aggregate(sigs)
    assert fast.FastAggregateVerify(pks, MSG, agg) and ref.FastAggregateVerify(pks, MSG, agg)
    assert not fast.FastAggregateVerify(pks[:2], MSG, agg)  # a missing signer breaks it
    assert not fast.FastAggregateVerify(pks, MSG + b"x", agg)


def test_aggregate_verify_over_distinct_messages_matches_py_ecc():
    msgs = [MSG + bytes([i]) for i in range(3)]
    sigs = [fast.Sign(sk, m) for sk, m in zip(SKS, msgs)]
    pks = [fast.SkToPk(sk) for sk in SKS[:3]]
    agg = fast.Aggregate(sigs)
    assert fast.AggregateVerify(pks, msgs, agg) is ref.AggregateVerify(pks, msgs, agg) is True
    assert fast.AggregateVerify(pks, msgs[::-1], agg) is ref.AggregateVerify(pks, msgs[::-1], agg) is False


def _cases():
    sk = SKS[0]
    pk, sig = ref.SkToPk(sk), ref.Sign(sk, MSG)
    flipped = bytearray(sig)
    flipped[50] ^= 1
    return {
        "valid": (pk, MSG, sig),
        "wrong_message": (pk, MSG[:-1], sig),
        "wrong_key": (ref.SkToPk(SKS[1]), MSG, sig),
        "flipped_signature_byte": (pk, MSG, bytes(flipped)),
        "identity_pubkey": (IDENTITY_G1, MSG, IDENTITY_G2),
        "identity_signature": (pk, MSG, IDENTITY_G2),
        "short_pubkey": (pk[:-1], MSG, sig),
        "long_signature": (pk, MSG, sig + b"\x00"),
        "garbage_pubkey": (b"\xff" * 48, MSG, sig),
        "uncompressed_flag_cleared": (bytes([pk[0] & 0x7F]) + pk[1:], MSG, sig),
        "not_bytes": ("pk", MSG, sig),
    }


@pytest.mark.parametrize("case", sorted(_cases()))
def test_verify_verdicts_equal_py_ecc(case):
    """Valid or malformed, the compiled backend gives py_ecc's verdict and never raises."""
    pk, msg, sig = _cases()[case]
    assert fast.Verify(pk, msg, sig) is ref.Verify(pk, msg, sig) is (case == "valid")


def test_proof_of_possession_rejects_a_rogue_key():
    """A proof made for one key does not vouch for another (rogue-key defence)."""
    pk0, pk1 = fast.SkToPk(SKS[0]), fast.SkToPk(SKS[1])
    proof0 = fast.PopProve(SKS[0])
    assert fast.PopVerify(pk0, proof0) and not fast.PopVerify(pk1, proof0)
    assert ref.PopVerify(pk0, proof0) and not ref.PopVerify(pk1, proof0)


def test_out_of_range_secret_keys_are_refused():
    for sk in (0, bls.CURVE_ORDER):
        with pytest.raises(ValueError):
            fast.Sign(sk, MSG)


def test_public_keys_are_decoded_once_and_refusals_never_kept():
    """A key that passes KeyValidate is decoded once for every later check (a
    certificate is checked against the same few validator keys); a key that fails
    is refused again every time, never remembered as valid, and a bytearray
    spelling of a key is the same key."""
    be = bls.BlspyBackend()
    pks = [be.SkToPk(sk) for sk in SKS[:3]]
    agg = be.Aggregate([be.Sign(sk, MSG) for sk in SKS[:3]])
    for _ in range(5):
        assert be.FastAggregateVerify(pks, MSG, agg)
    assert be.FastAggregateVerify([bytearray(pk) for pk in pks], MSG, agg)
    info = be._validated_pk.cache_info()
    assert (info.misses, info.hits) == (3, 15)
    bad = _cases()
    for case in ("identity_pubkey", "garbage_pubkey", "uncompressed_flag_cleared"):
        pk, msg, sig = bad[case]
        for _ in range(3):
            assert not be.Verify(pk, msg, sig)
            assert not be.FastAggregateVerify([pk, *pks[1:]], MSG, agg)
    assert be._validated_pk.cache_info().currsize == 3
