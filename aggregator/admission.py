"""What a storage node lets in: a header only with a certificate the validator set
signed, a body only if it is exactly what that certified header commits to.

Pure checks over parsed objects; each refusal is a `ChainError` whose reason is
counted and logged by the caller, and nothing refused is ever stored. A body that
passes comes back as an `AdmittedBody`, the only form a node keeps: the check is
done once, where the body arrives (so a bad peer is named there), not again.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

from certlog import merkle
from certlog.block import Certificate, ChainError, Header
from certlog.validators import ValidatorSet

__all__ = ["admit_header", "admit_body", "AdmittedBody"]


class AdmittedBody(NamedTuple):
    """A body that matched its certified header (made by `admit_body` only), with what
    the check computed anyway: its leaf hashes (kept for serving paths) and, when it
    came over the wire, its transfer bytes (written as they are)."""
    header: Header
    txs: Sequence[bytes]
    leaves: Sequence[bytes] = ()
    raw: bytes | None = None


def admit_header(validators: ValidatorSet, chain: str, header: Header, cert: Certificate | None) -> None:
    """Raise `ChainError` unless `header` is of `chain` and `cert` certifies it."""
    if header.chain != chain:
        raise ChainError("wrong_chain", f"{header.chain!r} is not {chain!r}", height=header.height)
    if cert is None:
        raise ChainError("no_certificate", "a header travels with its certificate", height=header.height)
    validators.check_certificate(cert, header, remember=True)


def admit_body(header: Header, txs: Sequence[bytes], raw: bytes | None = None) -> AdmittedBody:
    """The body, admitted; `ChainError` unless `txs` is what the (certified) `header` commits to.
    `raw`: the transfer bytes `txs` were decoded from, if they were."""
    if len(txs) != header.txs:
        raise ChainError("tx_count_mismatch", f"header says {header.txs}, body has {len(txs)}",
                         height=header.height)
    leaves = merkle.leaf_hashes(txs)
    if merkle.root_of_leaves(leaves) != header.tx_root:
        raise ChainError("tx_root_mismatch", "body does not hash to the certified tx_root", height=header.height)
    return AdmittedBody(header, txs, leaves, raw)
