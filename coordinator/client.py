"""The client side of queries (`gridledger query`): fetch an answer from the
coordinator's files or its HTTP API, verify it against the area's validator
set, and return what it proves as plain JSON. Readings stay ciphertexts."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Protocol

from aggregator.areaapp import AccountState
from certlog.validators import ValidatorSet
from gridledger.errors import GridledgerError
from gridledger.wire import Reading

from .ledger import AreaLedger
from .proofs import verify_exact, verify_interval_page

__all__ = ["Source", "LedgerSource", "HttpSource", "exact", "interval", "reading_json", "state_json"]


class Source(Protocol):
    def exact(self, account: str) -> dict: ...
    def interval(self, account: str, t1: int, t2: int) -> dict: ...


class LedgerSource:
    """Answers from a local `AreaLedger` (the coordinator's own files)."""

    def __init__(self, ledger: AreaLedger):
        self.ledger = ledger

    def exact(self, account: str) -> dict:
        return json.loads(json.dumps(self.ledger.exact(account)))

    def interval(self, account: str, t1: int, t2: int) -> dict:
        return json.loads(json.dumps(self.ledger.interval(account, t1, t2)))


class HttpSource:
    """Answers from a coordinator's API; its refusals become `GridledgerError`s."""

    def __init__(self, url: str, chain: str, *, timeout_s: float = 30.0):
        self.base = f"{url.rstrip('/')}/v1/areas/{urllib.parse.quote(chain, safe='')}"
        self.timeout_s = timeout_s

    def _get(self, path: str, **query) -> dict:
        url = self.base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            try:
                body = json.loads(exc.read())
                why = f"{body['error']}: {body.get('detail', '')}"
            except (ValueError, KeyError, TypeError):
                why = str(exc)
            raise GridledgerError(f"the coordinator refused ({exc.code}) {why}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise GridledgerError(f"cannot query {url}: {exc}") from None

    def _account(self, account: str) -> str:
        return "/accounts/" + urllib.parse.quote(account, safe="")

    def exact(self, account: str) -> dict:
        return self._get(self._account(account))

    def interval(self, account: str, t1: int, t2: int) -> dict:
        return self._get(self._account(account) + "/readings", **{"from": t1, "to": t2})


def reading_json(r: Reading) -> dict:
    out = {"meter": r.meter, "seq": r.seq, "t": r.t, "dt": r.dt, "prev": r.prev, "kid": r.kid, "c": r.c,
           "sig": r.sig, "hash": r.hash}
    if r.tq is not None:
        out["tq"] = r.tq  # how the meter's clock was set (signed: wire extension tq)
    return out


def state_json(st: AccountState) -> dict:
    return {"meter": st.meter, "seq": st.seq, "hash": st.hash, "count": st.count, "last_t": st.last_t,
            "total": format(st.total, "x")}


def exact(source: Source, validators: ValidatorSet, chain: str, account: str, *, min_height: int = 0) -> dict:
    """The account's latest certified state and reading, verified (`ChainError` if not)."""
    got = verify_exact(source.exact(account), validators, chain, account=account, min_height=min_height)
    return {"chain": chain, "account": account, "height": got.height, "verified": True,
            "state": state_json(got.state) if got.state else None,
            "reading": reading_json(got.reading) if got.reading else None}


def interval(source: Source, validators: ValidatorSet, chain: str, account: str, t1: int, t2: int, *,
             min_height: int = 0) -> dict:
    """Every reading of the account in [t1, t2], page after page, each verified complete."""
    readings, start = [], t1
    while True:
        page = verify_interval_page(source.interval(account, start, t2), validators, chain, account, start, t2,
                                    min_height=min_height)
        readings += page.readings
        if page.next is None:
            break
        start = page.next
    return {"chain": chain, "account": account, "from": t1, "to": t2, "height": page.height, "final": page.final,
            "verified": True, "readings": [reading_json(r) for r in readings]}
