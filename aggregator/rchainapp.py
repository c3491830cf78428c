"""The R chain's app: audit results and the credibility (CRE) they give each node.

One transaction kind, proposed by the verifier:

    audit {kind, node, header, cert, index, nonce, outcome, answer, asked, at, cre}

`header` and `cert` are the audited area block's certified header and its
certificate (checked against the area validator set); `index` and `nonce` are the
question; `outcome` is ok, wrong, late or missing; `answer` is the node's signed
answer (for ok and wrong) or null (late, missing); `asked` and `at` are the
verifier's clock (ms) when it asked and when it saw the answer or gave up.

What every validator checks: the header is certified, the node is in the genesis,
the nonce was never recorded before, and for `ok` and `wrong` that the answer
really is one (`receipts.audit_outcome` under the node's key: a forged answer
claimed ok and a correct answer claimed wrong are both refused). `late` and
`missing`, and the times, are the verifier's word. `cre` must equal
`cre_after(previous CRE, outcome)`: the state's CRE is the app's own, recomputed
from the outcomes, never the verifier's number.

State (MPT keyed by SHA-256 of `kind NUL id`, as the P chain):

    node/N    RLP [cre, ok, wrong, late, missing]
    nonce/X   RLP [node, area height]   (a nonce is recorded once)
"""

from __future__ import annotations

from typing import MutableMapping, Sequence

import rlp

from certlog.app import InvalidBlock, Outcome
from certlog.block import Certificate, ChainError, Header, canonical
from certlog.mpt import BLANK_ROOT
from certlog.validators import ValidatorSet

from .pchainapp import PGenesis, TrieView, parse_record, state_key
from .receipts import AUDIT_OUTCOMES, AuditAnswer, audit_outcome
from .reliability import cre_after
from .storagewire import NONCE_RE

__all__ = ["RChainApp", "AuditRecord", "audit_tx", "rchain_id", "node_key", "nonce_key", "decode_node_leaf"]

RECORDS = {"audit": {"kind", "node", "header", "cert", "index", "nonce", "outcome", "answer", "asked", "at", "cre"}}


def rchain_id(area: str) -> str:
    return f"R-{area}"


def node_key(name: str) -> bytes:
    return state_key("node", name)


def nonce_key(nonce: str) -> bytes:
    return state_key("nonce", nonce)


def decode_node_leaf(raw: bytes) -> dict:
    """A `node/N` leaf as {cre, ok, wrong, late, missing}."""
    return dict(zip(("cre",) + AUDIT_OUTCOMES, (int.from_bytes(v, "big") for v in rlp.decode(raw))))


def audit_tx(*, node: str, header: Header, cert: Certificate, index: int, nonce: str, outcome: str,
             answer: AuditAnswer | None, asked: int, at: int, cre: int) -> bytes:
    return canonical({"kind": "audit", "node": node, "header": header.to_dict(), "cert": cert.to_dict(),
                      "index": index, "nonce": nonce, "outcome": outcome,
                      "answer": answer.to_dict() if answer is not None else None, "asked": asked, "at": at,
                      "cre": cre})


class AuditRecord:
    """A parsed audit record (`from_dict` raises ChainError with a tx_ reason)."""
    __slots__ = ("node", "header", "cert", "index", "nonce", "outcome", "answer", "asked", "at", "cre")

    @classmethod
    def from_dict(cls, rec: dict) -> "AuditRecord":
        r = cls()
        try:
            r.header, r.cert = Header.from_dict(rec["header"]), Certificate.from_dict(rec["cert"])
            r.answer = None if rec["answer"] is None else AuditAnswer.from_dict(rec["answer"])
        except ChainError as exc:
            raise ChainError("tx_bad_field", f"{exc.reason}: {exc.detail}") from None
        r.node, r.index, r.nonce, r.outcome = rec["node"], rec["index"], rec["nonce"], rec["outcome"]
        r.asked, r.at, r.cre = rec["asked"], rec["at"], rec["cre"]
        ints = (r.index, r.asked, r.at, r.cre)
        if not isinstance(r.node, str) or not all(type(v) is int and 0 <= v < 2 ** 62 for v in ints):
            raise ChainError("tx_bad_field", "node, index, asked, at, cre")
        if not isinstance(r.nonce, str) or not NONCE_RE.match(r.nonce) or r.outcome not in AUDIT_OUTCOMES:
            raise ChainError("tx_bad_field", "nonce or outcome")
        if r.index >= r.header.txs or r.at < r.asked:
            raise ChainError("tx_bad_field", "index beyond the block, or seen before asked")
        if (r.answer is None) != (r.outcome in ("late", "missing")):
            raise ChainError("tx_bad_field", "ok and wrong carry the node's answer; late and missing none")
        return r


class RChainApp:
    name = "rchain"
    genesis_root = BLANK_ROOT.hex()

    def __init__(self, genesis: PGenesis, area_validators: ValidatorSet):
        self.genesis = genesis                 # the P chain's: area, nodes and keys, cre_start
        self.area_validators = area_validators

    def execute(self, nodes: MutableMapping[bytes, bytes], parent_root: str, time_ms: int,
                txs: Sequence[bytes], *, trusted: bool = False, decoded: Sequence[object] | None = None) -> Outcome:
        view = TrieView(nodes, parent_root)
        counts = dict.fromkeys(AUDIT_OUTCOMES, 0)
        for i, tx in enumerate(txs):
            rec = parse_record(i, tx, RECORDS)
            try:
                r = AuditRecord.from_dict(rec)
            except ChainError as exc:
                raise InvalidBlock(exc.reason, exc.detail, index=i) from None
            self._audit(i, r, view.get, view.put, trusted)
            counts[r.outcome] += 1
        return Outcome(view.commit(), {"genesis": self.genesis.digest, **counts})

    def _audit(self, i: int, r: AuditRecord, get, put, trusted: bool) -> None:
        g = self.genesis
        node = g.node(r.node)
        if node is None:
            raise InvalidBlock("tx_unknown_node", r.node, index=i)
        if r.header.chain != g.area:
            raise InvalidBlock("tx_wrong_chain", f"header of {r.header.chain}", index=i)
        try:
            self.area_validators.check_certificate(r.cert, r.header, remember=True)
        except ChainError as exc:
            raise InvalidBlock("tx_bad_certificate", f"{exc.reason}: block {r.header.height}", index=i) from None
        if get(nonce_key(r.nonce)) is not None:
            raise InvalidBlock("tx_duplicate_audit", f"nonce {r.nonce[:16]}… is recorded already", index=i)
        if r.answer is not None and not trusted:
            try:
                seen = audit_outcome(r.answer, r.header, nonce=r.nonce, index=r.index, node=r.node,
                                     public_key=node.public_key)
            except ChainError as exc:
                raise InvalidBlock("tx_bad_answer", f"{exc.reason}: not {r.node}'s answer to this question",
                                   index=i) from None
            if seen != r.outcome:
                raise InvalidBlock("tx_wrong_outcome", f"the answer is {seen}, the record says {r.outcome}",
                                   index=i)
        leaf = get(node_key(r.node))
        counts = [int.from_bytes(v, "big") for v in leaf] if leaf else [g.cre_start, 0, 0, 0, 0]
        cre = cre_after(counts[0], r.outcome)
        if r.cre != cre:
            raise InvalidBlock("tx_wrong_cre", f"{r.node}: CRE {counts[0]} after {r.outcome} is {cre}, not {r.cre}",
                               index=i)
        counts[0] = cre
        counts[1 + AUDIT_OUTCOMES.index(r.outcome)] += 1
        put(node_key(r.node), counts)
        put(nonce_key(r.nonce), [r.node.encode(), r.header.height])
