"""Builders for storage tests: a certified chain made in process (storage nodes do
not re-run apps, so synthetic transactions under real BLS certificates are enough)."""

from __future__ import annotations

from dataclasses import dataclass

from certlog import bls, merkle
from certlog.block import ZERO_HASH, Certificate, Header, cert_message
from certlog.validators import ValidatorSet

from chainkit import CHAIN, validator_keys, validator_set


@dataclass
class Block:
    header: Header
    cert: Certificate
    txs: list[bytes]


def sign(sks: list[int], header: Header, signers=(0, 1, 2)) -> Certificate:
    """A certificate of `header` signed by the validators `signers` (indices into `sks`)."""
    msg = cert_message(header.chain, header.height, header.hash)
    return Certificate(header.chain, header.height, header.hash, tuple(signers),
                       bls.Aggregate([bls.Sign(sks[i], msg) for i in signers]))


def make_chain(blocks: int, txs_per_block: int = 5, *, chain: str = CHAIN, tx_bytes: int = 60,
               sks: list[int] | None = None) -> tuple[list[Block], ValidatorSet, list[int]]:
    """`blocks` certified blocks of `chain` (4 validators, 3 signing each)."""
    sks = sks or validator_keys(4)
    out, prev = [], ZERO_HASH
    for h in range(1, blocks + 1):
        txs = [f'{{"block":{h},"i":{i},"pad":"{"x" * tx_bytes}"}}'.encode() for i in range(txs_per_block)]
        header = Header(chain=chain, height=h, prev=prev, time=1_000 * h, tx_root=merkle.root(txs),
                        state_root="0" * 64, txs=len(txs), app={})
        out.append(Block(header, sign(sks, header), txs))
        prev = header.hash
    return out, validator_set(sks), sks
