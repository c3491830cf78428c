"""A light client (seed 000's simplified verification).

It keeps only headers and their certificates, checked link by link against the
validator set, and then believes two kinds of statements without any body or
state: "this transaction is in block h" (a Merkle path to the certified tx
root) and "this is the account's state at block h" (an MPT proof against the
certified state root). Every refusal is a `ChainError` with its reason.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import rlp
from trie import HexaryTrie
from trie.exceptions import BadTrieProof

from . import merkle
from .mpt import rlp_encode
from .block import ZERO_HASH, Certificate, ChainError, Header
from .validators import ValidatorSet

__all__ = ["LightClient", "prove", "proven_value", "state_proof", "check_state_proof"]


class LightClient:
    def __init__(self, chain: str, validators: ValidatorSet):
        self.chain = chain
        self.validators = validators
        self.headers: list[Header] = []

    @property
    def height(self) -> int:
        return len(self.headers)

    def add(self, header: Header, cert: Certificate) -> None:
        """Accept the next certified header, or raise `ChainError`."""
        h = header.height
        if header.chain != self.chain:
            raise ChainError("wrong_chain", header.chain, height=h)
        if h != self.height + 1:
            raise ChainError("wrong_height", f"expected {self.height + 1}, got {h}", height=h)
        if header.prev != (self.headers[-1].hash if self.headers else ZERO_HASH):
            raise ChainError("prev_mismatch", "prev is not the hash of the parent header", height=h)
        if self.headers and header.time <= self.headers[-1].time:
            raise ChainError("time_not_increasing", f"{header.time}", height=h)
        self.validators.check_certificate(cert, header)
        self.headers.append(header)

    def header(self, height: int) -> Header:
        if not 1 <= height <= self.height:
            raise ChainError("unknown_height", f"no certified header at {height}", height=height)
        return self.headers[height - 1]

    def verify_tx(self, height: int, tx: bytes, index: int, path: Sequence[str]) -> None:
        h = self.header(height)
        if not merkle.verify_path(h.tx_root, tx, index, h.txs, path):
            raise ChainError("bad_merkle_path", f"tx {index} is not in block {height}", height=height)

    def verify_state(self, height: int, key: bytes, proof: Sequence) -> bytes:
        """The value under `key` in the certified state at `height` (b"" when absent)."""
        root = bytes.fromhex(self.header(height).state_root)
        try:
            return HexaryTrie.get_from_proof(root, key, proof)
        except (BadTrieProof, KeyError, ValueError, TypeError, IndexError) as exc:
            raise ChainError("bad_state_proof", f"{type(exc).__name__}", height=height) from None


# -- portable state proofs: a certified header, its certificate, an MPT proof -------

def prove(nodes_db, state_root: str, key: bytes) -> dict:
    """`{"leaf", "proof"}`: the value under `key` in the state at `state_root` (hex,
    None when absent) and its MPT proof, each trie node as hex of its RLP."""
    trie = HexaryTrie(nodes_db, root_hash=bytes.fromhex(state_root))
    value = trie.get(key)
    return {"leaf": value.hex() if value else None,
            "proof": [rlp_encode(_as_list(node)).hex() for node in trie.get_proof(key)]}


def proven_value(state_root: str, key: bytes, obj: Mapping, *, height: int | None = None) -> bytes:
    """The value (b"" when absent) that `obj`'s proof (`prove`'s form) establishes
    under `key` in the state at `state_root`, or `ChainError("bad_state_proof")`
    unless that is exactly the leaf `obj` claims."""
    try:
        nodes = [rlp.decode(bytes.fromhex(n)) for n in obj["proof"]]
        value = HexaryTrie.get_from_proof(bytes.fromhex(state_root), key, nodes)
        leaf = obj["leaf"]
    except (BadTrieProof, rlp.exceptions.RLPException, KeyError, ValueError, TypeError, IndexError,
            AttributeError, RecursionError) as exc:
        raise ChainError("bad_state_proof", type(exc).__name__, height=height) from None
    if (value.hex() if value else None) != leaf:
        raise ChainError("bad_state_proof", "the leaf is not what the proof proves", height=height)
    return value


def _as_list(node) -> bytes | list:
    """py-trie's proof nodes are tuples of bytes and nested tuples; RLP wants lists."""
    return [_as_list(x) for x in node] if isinstance(node, (list, tuple)) else bytes(node)


def state_proof(nodes_db, header: Header, cert: Certificate, key: bytes) -> dict:
    """The value under `key` in the state of `header` (a replica's certified block), with
    everything a stranger needs to believe it: see `check_state_proof`."""
    return {"height": header.height, "header": header.to_dict(), "cert": cert.to_dict(),
            **prove(nodes_db, header.state_root, key)}


def check_state_proof(obj: object, validators: ValidatorSet, chain: str, key: bytes) -> tuple[Header, bytes]:
    """(certified header, value under `key` in its state; b"" when absent), or `ChainError`.

    The header must be of `chain` and certified by `validators`; the proof must
    lead from its state root to exactly the claimed leaf (or to its absence).
    The set remembers certificates it verified: a settlement proves every account
    against the same boundary blocks, whose certificates are then checked once."""
    try:
        header = Header.from_dict(obj["header"])
        cert = Certificate.from_dict(obj["cert"])
        height = obj["height"]
    except (KeyError, TypeError) as exc:
        raise ChainError("proof_schema", f"{type(exc).__name__}: {exc}") from None
    if header.chain != chain:
        raise ChainError("wrong_chain", f"{header.chain!r} is not {chain!r}", height=header.height)
    if height != header.height:
        raise ChainError("proof_schema", "height differs from the header's", height=header.height)
    validators.check_certificate(cert, header, remember=True)
    return header, proven_value(header.state_root, key, obj, height=header.height)
