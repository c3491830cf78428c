"""The combiner: ask the trustees, check every partial, combine any t of them.

`TrusteeClient.decrypt` signs a request for a batch of items, publishes it,
and collects the answers. A trustee's batch counts only when its proof checks
against that trustee's published verification key; a trustee whose batch
fails is named (and ignored). Items some trustee refused come back refused,
with every reason given, and the rest is asked again, so every plaintext
returned was allowed by at least t trustees' policies.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field

import aiomqtt

from gridledger.logs import event

from .decrypt import REQUESTS_TOPIC, request_id, response_topic, sign_request
from .threshold import PartialBatch, ThresholdError, ThresholdPublicKey

__all__ = ["TrusteeClient", "Decryption", "TrusteesUnavailable"]

log = logging.getLogger("gridledger.combiner")


class TrusteesUnavailable(Exception):
    """Fewer than t trustees answered with valid partials in time."""


@dataclass(slots=True)
class Decryption:
    """Plaintexts by item index; refusals by item index (reason per trustee); the
    batches used (for bills to carry); the request (id) that decrypted each item,
    where the trustees' decision records find it; trustees whose partials failed their proof."""
    plaintexts: dict[int, int] = field(default_factory=dict)
    refused: dict[int, dict[str, str]] = field(default_factory=dict)
    batches: dict[int, tuple[list[int], list[PartialBatch]]] = field(default_factory=dict)  # item -> (cs, batches)
    positions: dict[int, int] = field(default_factory=dict)   # item -> its position in its batch
    requests: dict[int, str] = field(default_factory=dict)    # item -> request id
    bad_trustees: set[str] = field(default_factory=set)


class TrusteeClient:
    def __init__(self, key: ThresholdPublicKey, coordinator: str, sk: int, *, timeout_s: float = 60.0):
        self.key = key
        self.coordinator = coordinator
        self.sk = sk
        self.timeout_s = timeout_s

    async def decrypt(self, client: aiomqtt.Client, items: list[dict], cs: list[int], *,
                      nonce: str = "") -> Decryption:
        """Decrypt `cs` (the ciphertexts `items` define, computed by the caller from
        the same proofs the trustees check)."""
        result = Decryption()
        todo = list(range(len(items)))
        attempt = 0
        while todo:
            attempt += 1
            req = sign_request(self.coordinator, [items[i] for i in todo], self.sk, nonce=f"{nonce}/{attempt}")
            answers = await self._ask(client, req)
            sub_cs = [cs[i] for i in todo]
            full, refused = [], defaultdict(dict)
            for name, resp in answers.items():
                verdicts = resp.get("items") or []
                if resp.get("status") == "refused" or len(verdicts) != len(todo):
                    for j in range(len(todo)):
                        refused[j][name] = resp.get("reason") or "malformed_response"
                    continue
                for j, v in enumerate(verdicts):
                    if v.get("status") != "accepted":
                        refused[j][name] = str(v.get("reason"))
                if all(v.get("status") == "accepted" for v in verdicts):
                    try:
                        batch = PartialBatch.from_dict(resp["partials"])
                        ok = batch.index == resp.get("index") and self.key.verify(sub_cs, batch)
                    except (ThresholdError, KeyError, TypeError, ValueError):
                        ok = False
                    if ok:
                        full.append(batch)
                    else:
                        result.bad_trustees.add(name)
                        event(log, "bad_partial", logging.WARNING, trustee=name, request=request_id(req))
            if len(full) >= self.key.threshold:
                used = full[:self.key.threshold]
                plain = self.key.combine(sub_cs, used).plaintexts
                for j, i in enumerate(todo):
                    result.plaintexts[i] = plain[j]
                    result.batches[i] = (sub_cs, used)
                    result.positions[i] = j
                    result.requests[i] = request_id(req)
                return result
            if not refused:
                raise TrusteesUnavailable(f"{len(full)} valid answers of {self.key.threshold} needed "
                                          f"(bad: {sorted(result.bad_trustees)})")
            # An item a trustee refused cannot be decrypted by that trustee; ask again
            # for the rest, or give up on items fewer than t trustees would accept.
            still = []
            for j, i in enumerate(todo):
                if j in refused and len(answers) - len(refused[j]) < self.key.threshold:
                    result.refused[i] = refused[j]
                else:
                    still.append(i)
            if still == todo:
                raise TrusteesUnavailable("trustees disagree on which items they allow")
            todo = still
        return result

    async def _ask(self, client: aiomqtt.Client, req: dict) -> dict[str, dict]:
        """Publish `req`, collect answers until every trustee answered or time is up
        (once t trustees accepted everything, a short grace for the rest)."""
        rid = request_id(req)
        topic = response_topic(rid)
        answers: dict[str, dict] = {}
        await client.subscribe(topic, qos=1)
        try:
            await client.publish(REQUESTS_TOPIC, json.dumps(req), qos=1)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.timeout_s
            while len(answers) < self.key.trustees and loop.time() < deadline:
                accepted = sum(1 for a in answers.values() if a.get("items") and
                               all(v.get("status") == "accepted" for v in a["items"]))
                wait = deadline - loop.time() if accepted < self.key.threshold else 0.5
                try:
                    msg = await asyncio.wait_for(anext(client.messages), timeout=max(wait, 0.01))
                except asyncio.TimeoutError:
                    break
                if msg.topic.value != topic:
                    continue
                try:
                    resp = json.loads(bytes(msg.payload))
                    name = resp["trustee"]
                except (ValueError, KeyError, TypeError):
                    continue
                if isinstance(name, str) and resp.get("request") == rid:
                    answers.setdefault(name, resp)
        finally:
            await client.unsubscribe(topic)
        return answers
