"""What trustees are asked to decrypt, and how anyone checks it (DESIGN section 7).

Nobody ever sends a trustee a ciphertext. A request names what is to be
decrypted and carries the proofs that define it; the trustee (and later
`verify-bill`, and the customer) computes the ciphertext itself:

    bill  {"kind": "bill", "chain", "account", "from": state proof | null, "to": state proof}

The account's running encrypted total (its MPT leaf, `aggregator.areaapp`) at
the certified block `to`, divided by its total at the certified block `from`
(null: before its first reading, total E(0) = 1): the encryption of exactly
the readings the account produced between the two states, whatever their
number, in O(1) homomorphic work. A state proof is `certlog.light.state_proof`.

A request is signed with the coordinator's BLS key; trustees answer with a
batch of partial decryptions over the items their policy accepted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping

import gmpy2

from aggregator.areaapp import AccountState, account_key
from certlog import bls
from certlog.block import ChainError, canonical
from certlog.light import check_state_proof
from certlog.validators import ValidatorSet
from gridledger.errors import Rejected

from .ledger import MAX_ACCOUNT

__all__ = ["DecryptError", "BillFacts", "check_bill_item", "bill_item", "sign_request", "check_request",
           "request_id", "REQUESTS_TOPIC", "response_topic", "decisions_topic", "MAX_ITEMS"]

REQUESTS_TOPIC = "gl/v1/trustees/requests"
REQUEST_DOMAIN = b"gridledger trustee request v1\n"
MAX_ITEMS = 256


def response_topic(request: str) -> str:
    return f"gl/v1/trustees/responses/{request}"


def decisions_topic(trustee: str) -> str:
    return f"gl/v1/trustees/{trustee}/decisions"


class DecryptError(Rejected):
    """A request or an item that must not be decrypted; `reason` is a stable code."""


ZERO_STATE = AccountState("", 0, "0" * 64, 0, 0, 1)


@dataclass(frozen=True, slots=True)
class BillFacts:
    """What a checked bill item proves: the ciphertext of the account's readings
    between two certified states, and those states."""
    chain: str
    account: str
    c: int
    start: AccountState          # ZERO_STATE when `from` is null or the account did not exist yet
    end: AccountState
    from_height: int             # 0 for null
    to_height: int
    to_time_ms: int

    @property
    def readings(self) -> int:
        return self.end.count - self.start.count


def bill_item(chain: str, account: str, start: dict | None, end: dict) -> dict:
    return {"kind": "bill", "chain": chain, "account": account, "from": start, "to": end}


def _state(obj: Any, validators: ValidatorSet, chain: str, account: str, kid: str):
    try:
        header, leaf = check_state_proof(obj, validators, chain, account_key(account))
    except ChainError as exc:
        raise DecryptError(exc.reason, exc.detail) from None
    if header.app.get("kid") != kid:
        raise DecryptError("wrong_key", f"block {header.height} is under key {header.app.get('kid')}, not {kid}")
    try:
        state = AccountState.decode(leaf) if leaf else None
    except Exception as exc:  # a certified leaf that does not decode: not ours to decrypt
        raise DecryptError("bad_leaf", type(exc).__name__) from None
    return header, state


def check_bill_item(item: Any, validators: Mapping[str, ValidatorSet], kid: str, nsquare: int) -> BillFacts:
    """Check every certificate and proof of a bill item; its facts, or `DecryptError`."""
    if not isinstance(item, dict) or item.get("kind") != "bill" or set(item) != {"kind", "chain", "account",
                                                                                  "from", "to"}:
        raise DecryptError("item_schema", "a bill item is {kind, chain, account, from, to}")
    chain, account = item["chain"], item["account"]
    if not isinstance(account, str) or not 0 < len(account) <= MAX_ACCOUNT:
        raise DecryptError("item_schema", "account must be a short string")
    if not isinstance(chain, str) or chain not in validators:
        raise DecryptError("unknown_chain", repr(chain)[:40])
    vset = validators[chain]
    end_header, end = _state(item["to"], vset, chain, account, kid)
    if end is None:
        raise DecryptError("no_account", f"{account} has no state at {chain}/{end_header.height}")
    start, from_height = ZERO_STATE, 0
    if item["from"] is not None:
        start_header, st = _state(item["from"], vset, chain, account, kid)
        from_height = start_header.height
        if from_height >= end_header.height:
            raise DecryptError("not_forward", f"from {from_height} is not before to {end_header.height}")
        if st is not None:
            start = st
    if end.count < start.count:  # certified states of one chain never do this
        raise DecryptError("not_forward", "the reading count went down")
    nsq = gmpy2.mpz(nsquare)
    try:
        c = int(gmpy2.mpz(end.total) * gmpy2.invert(start.total, nsq) % nsq)
    except ZeroDivisionError:
        raise DecryptError("bad_leaf", "the starting total is not a unit") from None
    return BillFacts(chain, account, c, start, end, from_height, end_header.height, end_header.time)


# -- requests ----------------------------------------------------------------------------

def _body(req: Mapping) -> bytes:
    return REQUEST_DOMAIN + canonical({k: v for k, v in req.items() if k != "sig"})


def request_id(req: Mapping) -> str:
    return hashlib.sha256(_body(req)).hexdigest()[:32]


def sign_request(coordinator: str, items: list[dict], sk: int, *, nonce: str = "") -> dict:
    """A request for `items`; its id (the response topic) is the hash of what is signed."""
    if not 0 < len(items) <= MAX_ITEMS:
        raise ValueError(f"1..{MAX_ITEMS} items per request")
    req = {"v": 1, "coordinator": coordinator, "items": items, "nonce": nonce}
    return dict(req, sig=bls.Sign(sk, _body(req)).hex())


def check_request(obj: Any, coordinator_public: bytes) -> dict:
    """The request if it is well formed and signed by the coordinator, else `DecryptError`."""
    if not isinstance(obj, dict) or set(obj) != {"v", "coordinator", "items", "nonce", "sig"} or obj["v"] != 1:
        raise DecryptError("request_schema", "a request is {v, coordinator, items, nonce, sig}")
    items = obj["items"]
    if not isinstance(items, list) or not 0 < len(items) <= MAX_ITEMS:
        raise DecryptError("request_schema", f"1..{MAX_ITEMS} items")
    try:
        sig = bytes.fromhex(obj["sig"])
    except (TypeError, ValueError):
        raise DecryptError("bad_request_signature", "sig is not hex") from None
    if not bls.Verify(coordinator_public, _body(obj), sig):
        raise DecryptError("bad_request_signature", "not signed by the coordinator")
    return obj
