"""The coordinator's HTTP JSON API over its area ledgers (docs/queries.md).

    GET /v1/areas/{chain}/head                                    highest indexed certified header + cert
    GET /v1/areas/{chain}/blocks/{height}                         a certified header + cert
    GET /v1/areas/{chain}/accounts/{account}                      exact answer   [?height=H&certs=all]
    GET /v1/areas/{chain}/accounts/{account}/readings?from=T1&to=T2  interval answer [&limit=N&height=H&certs=all]
    GET /v1/areas/{chain}/accounts/{account}/state?height=H       state proof (or ?before=T: at boundary(T))

Answers are what `AreaLedger` returns, checked by `coordinator.proofs` on the
client. An interval answer holds at most `limit` (default and maximum
`MAX_READINGS`) readings in range; when it was cut, `next` is the `from` of the
next page. Refusals are JSON `{"error": reason, "detail": ...}`: 400 for bad
input, 404 for an unknown area, height or path, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Callable, Mapping

from aiohttp import web

from certlog.block import ChainError
from gridledger.logs import event

from .ledger import MAX_READINGS, AreaLedger

__all__ = ["make_app", "STATUS"]

log = logging.getLogger("gridledger.coordinator.api")

STATUS = {"bad_query": 400, "unknown_height": 404, "empty_chain": 404, "unknown_area": 404}


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _error(status: int, reason: str, detail: str = "") -> web.Response:
    return web.json_response({"error": reason, "detail": detail}, status=status, dumps=_dumps)


@web.middleware
async def _errors(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ChainError as exc:
        status = STATUS.get(exc.reason, 500)
        event(log, "refused", logging.INFO if status < 500 else logging.ERROR, path=request.path,
              reason=exc.reason, detail=exc.detail)
        return _error(status, exc.reason, exc.detail)
    except web.HTTPException as exc:  # no route, wrong method: the same JSON shape
        return _error(exc.status, exc.reason.lower().replace(" ", "_"), request.path)
    except Exception:
        log.exception("query failed", extra={"fields": {"path": request.path}})
        return _error(500, "internal", "see the coordinator's log")


def _int(request: web.Request, name: str, default: int | None = None) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        v = int(raw, 10)
    except ValueError:
        raise ChainError("bad_query", f"{name} must be an integer") from None
    if not 0 <= v < 2 ** 62:
        raise ChainError("bad_query", f"{name} out of range")
    return v


def make_app(ledgers: Mapping[str, AreaLedger]) -> web.Application:
    def ledger(request: web.Request) -> AreaLedger:
        led = ledgers.get(request.match_info["chain"])
        if led is None:
            raise ChainError("unknown_area", f"this coordinator follows {sorted(ledgers)}")
        return led

    async def answer(fn: Callable[[], object]) -> web.Response:
        # SQLite and hashing: off the event loop, one query per ledger at a time.
        return web.json_response(await asyncio.to_thread(fn), dumps=_dumps)

    def certified(led: AreaLedger, height: int) -> dict:
        header, cert = led.certified(height)
        return {"chain": led.chain, "height": height, "header": header.to_dict(), "cert": cert.to_dict()}

    async def head(request: web.Request) -> web.Response:
        led = ledger(request)
        return await answer(lambda: certified(led, led.head()[0].height))

    async def block(request: web.Request) -> web.Response:
        led = ledger(request)
        try:
            height = int(request.match_info["height"], 10)
        except ValueError:
            raise ChainError("bad_query", "height must be an integer") from None
        return await answer(lambda: certified(led, height))

    async def exact(request: web.Request) -> web.Response:
        led = ledger(request)
        account, height = request.match_info["account"], _int(request, "height")
        certs = request.query.get("certs", "linked")
        return await answer(lambda: led.exact(account, height=height, certs=certs))

    async def readings(request: web.Request) -> web.Response:
        led = ledger(request)
        account = request.match_info["account"]
        t1, t2 = _int(request, "from"), _int(request, "to")
        if t1 is None or t2 is None:
            raise ChainError("bad_query", "from and to are required")
        limit, height = _int(request, "limit", MAX_READINGS), _int(request, "height")
        certs = request.query.get("certs", "linked")
        return await answer(lambda: led.interval(account, t1, t2, limit=limit, height=height, certs=certs))

    async def state(request: web.Request) -> web.Response:
        led = ledger(request)
        account, height, before = request.match_info["account"], _int(request, "height"), _int(request, "before")
        if (height is None) == (before is None):
            raise ChainError("bad_query", "give height or before")

        def proof() -> dict:
            h = height if before is None else led.boundary(account, before)
            if h == 0:
                raise ChainError("unknown_height", f"{account} has no certified state before {before}")
            return led.state_proof(account, h)
        return await answer(proof)

    app = web.Application(middlewares=[_errors])
    base = "/v1/areas/{chain}"
    app.router.add_get(base + "/head", head)
    app.router.add_get(base + "/blocks/{height}", block)
    app.router.add_get(base + "/accounts/{account}", exact)
    app.router.add_get(base + "/accounts/{account}/readings", readings)
    app.router.add_get(base + "/accounts/{account}/state", state)
    return app
