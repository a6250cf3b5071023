"""An offline HubSpot (CRM v3 objects + v4 associations), as the developer docs describe it.

- auth: ``Authorization: Bearer <private app token>``, else 401
  {"status": "error", "message": "Authentication credentials not found. ...", "correlationId", "category": "INVALID_AUTHENTICATION"}
- burst limit: ``limit_per_window`` requests per rolling ``window_s`` (100 / 10 s) -> 429
  {"status": "error", "message": "You have reached your ten_secondly_rolling limit.", "errorType": "RATE_LIMIT",
   "correlationId", "policyName": "TEN_SECONDLY_ROLLING", "groupName"}; search on top: ``search_per_s`` (5/s per
  account) -> 429 policyName "SECONDLY". X-HubSpot-RateLimit-* headers on non-search answers;
  ``retry_after`` (None: no Retry-After header).
- POST /crm/v3/objects/contacts/search: filterGroups (<= 5, filters per group <= 10), operators EQ NEQ
  LT LTE GT GTE HAS_PROPERTY NOT_HAS_PROPERTY IN CONTAINS_TOKEN, one sort, limit <= 200, after (offset):
  {"total", "results": [{"id", "properties", "createdAt", "updatedAt", "archived"}], "paging": {"next": {"after"}}};
  paging to or past ``search_cap`` (10,000) -> 400 VALIDATION_ERROR. Ties of the sort property
  come in descending id order.
- POST /crm/v3/objects/notes/batch/create (<= 100, hs_timestamp required, association typeId 202 to an
  existing contact, else 400 for the whole batch; 201, results NOT in input order)
- POST /crm/v3/objects/notes/batch/read, /crm/v3/objects/contacts/batch/update (<= 100; unknown ids -> 207
  with errors[].context.ids; duplicate ids -> 400)
- POST /crm/v4/associations/contacts/notes/batch/read (per-contact paging, ``assoc_page``; contacts
  without notes -> errors, 207)
- POST /crm/v3/objects/deals/search: the same over deals (sorted by hs_lastmodifieddate; amount,
  deal_currency_code, dealstage, closedate, hs_is_closed, hs_is_closed_won calculated from the stage)
- POST /crm/v4/associations/deals/contacts/batch/read (<= 1,000 inputs; deals without contacts -> errors, 207)
- GET /crm/v4/objects/{deals|deal|0-3}/{id}/associations/{contacts|contact|0-1} (limit <= 500, after):
  {"results": [{"toObjectId", "associationTypes": [{"category": "HUBSPOT_DEFINED", "typeId": 3, "label"}]}],
  "paging"?} by contact id; a deal without contacts (or an unknown one) -> 200 {"results": []}
- GET /crm/v3/objects/contacts/{id} (properties=a,b; archived): the contact with those properties
  (plus createdate, hs_object_id, lastmodifieddate); unknown -> 404 {"status": "error",
  "message": "Object not found.  objectId are usually numeric.", "correlationId", "context": {"id": [..]},
  "category": "OBJECT_NOT_FOUND"}
- ``lose_responses = n``: the next n note batch creates are applied, then the answer is lost.
  ``force_429 = n``: the next n requests get the TEN_SECONDLY_ROLLING 429 whatever the rate.
"""
from __future__ import annotations

import collections
import re
import threading
import time
import uuid
from datetime import datetime, timezone

import httpx

DATETIME_PROPS = {"lastmodifieddate", "createdate", "hs_timestamp", "hs_createdate", "hs_lastmodifieddate", "closedate"}
NUMERIC_PROPS = {"hs_object_id"}
DEFAULT_DEAL_PROPS = ("amount", "closedate", "createdate", "dealname", "dealstage", "hs_lastmodifieddate", "hs_object_id",
                      "pipeline")
DEFAULT_CONTACT_PROPS = ("createdate", "email", "firstname", "hs_object_id", "lastmodifieddate", "lastname")


def iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def to_ms(value) -> int:
    s = str(value)
    if s.lstrip("-").isdigit():
        return int(s)
    return int(datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() * 1000)


class FakeHubSpot:
    base_url = "https://api.hubapi.com"

    def __init__(self, token: str = "pat-na1-11111111-2222-3333-4444-555555555555", *, limit_per_window: int = 100,
                 window_s: float = 10.0, search_per_s: float | None = 5, search_cap: int = 10_000,
                 retry_after: str | None = None, assoc_page: int = 500, clock=time.time):
        self.token = token
        self.limit_per_window, self.window_s = limit_per_window, window_s
        self.search_per_s, self.search_cap = search_per_s, search_cap
        self.retry_after = retry_after
        self.assoc_page = assoc_page
        self.clock = clock
        self.contacts: dict[str, dict] = {}
        self.notes: dict[str, dict] = {}
        self.deals: dict[str, dict] = {}
        self.deal_contacts: dict[str, list[str]] = collections.defaultdict(list)  # deal id -> contact ids
        self.assoc: dict[str, list[str]] = collections.defaultdict(list)  # contact id -> note ids
        self.log: list[tuple[str, str]] = []
        self.search_bodies: list[dict] = []
        self.write_sizes: list[tuple[str, int]] = []
        self.throttled = 0
        self.lose_responses = 0
        self.force_429 = 0
        self.times: list[float] = []  # time.monotonic() of every authenticated request
        self._calls: collections.deque[float] = collections.deque()
        self._searches: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()
        self._seq = 70_000_000_000

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    # ------------------------------------------------------------------ data
    def add_contact(self, cid: int | str, *, modified_ms: int, firstname: str, lastname: str = "", email: str | None = None,
                    phone: str | None = None, mobilephone: str | None = None, hs_language: str | None = "ru",
                    hs_timezone: str | None = "europe_slash_moscow", **props) -> dict:
        cid = str(cid)
        p = {"firstname": firstname, "lastname": lastname, "email": email, "phone": phone, "mobilephone": mobilephone,
             "hs_language": hs_language, "hs_timezone": hs_timezone, "createdate": iso_ms(modified_ms),
             "lastmodifieddate": iso_ms(modified_ms), "hs_object_id": cid}
        p.update({k: (None if v is None else str(v)) for k, v in props.items()})
        c = {"id": cid, "properties": p, "createdAt": iso_ms(modified_ms), "updatedAt": iso_ms(modified_ms), "archived": False}
        self.contacts[cid] = c
        return c

    def add_deal(self, did: int | str, *, contact_ids=(), dealname: str = "", dealstage: str = "appointmentscheduled",
                 pipeline: str = "default", amount: float | None = None, currency: str | None = "RUB",
                 modified_ms: int | None = None) -> dict:
        did = str(did)
        ms = int(self.clock() * 1000) if modified_ms is None else modified_ms
        d = {"id": did, "properties": {"dealname": dealname or f"Deal {did}", "pipeline": pipeline, "hs_object_id": did,
                                       "amount": None if amount is None else f"{amount:g}", "deal_currency_code": currency,
                                       "createdate": iso_ms(ms)},
             "createdAt": iso_ms(ms), "updatedAt": iso_ms(ms), "archived": False}
        self.set_stage(d, dealstage, modified_ms=ms)
        self.deals[did] = d
        self.deal_contacts[did] = [str(c) for c in contact_ids]
        return d

    @staticmethod
    def set_stage(d: dict, dealstage: str, *, modified_ms: int) -> None:
        """Move a deal as HubSpot does: the calculated hs_is_closed / hs_is_closed_won and closedate follow the
        stage (default pipeline: closedwon, closedlost are closed)."""
        won, closed = dealstage == "closedwon", dealstage in ("closedwon", "closedlost")
        d["properties"].update(dealstage=dealstage, hs_is_closed_won=str(won).lower(), hs_is_closed=str(closed).lower(),
                               closedate=iso_ms(modified_ms) if closed else None, hs_lastmodifieddate=iso_ms(modified_ms))
        d["updatedAt"] = iso_ms(modified_ms)

    def notes_of(self, cid) -> list[dict]:
        return [self.notes[n] for n in self.assoc.get(str(cid), [])]

    # ------------------------------------------------------------------ HTTP
    def _error(self, status: int, message: str, category: str, headers=None, **extra) -> httpx.Response:
        return httpx.Response(status, headers=headers or {}, json={
            "status": "error", "message": message, "correlationId": str(uuid.uuid4()), "category": category, **extra})

    def _rate_limited(self, search: bool) -> httpx.Response | None:
        now = time.monotonic()
        with self._lock:
            self.times.append(now)
            if self.force_429 > 0:
                self.force_429 -= 1
                self.throttled += 1
                return httpx.Response(429, headers={"Retry-After": self.retry_after} if self.retry_after else {}, json={
                    "status": "error", "message": "You have reached your ten_secondly_rolling limit.",
                    "errorType": "RATE_LIMIT", "correlationId": str(uuid.uuid4()), "policyName": "TEN_SECONDLY_ROLLING",
                    "groupName": "privateapp:12345"})
            while self._calls and now - self._calls[0] >= self.window_s:
                self._calls.popleft()
            while self._searches and now - self._searches[0] >= 1.0:
                self._searches.popleft()
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            if len(self._calls) >= self.limit_per_window:
                self.throttled += 1
                return httpx.Response(429, headers=headers, json={
                    "status": "error", "message": "You have reached your ten_secondly_rolling limit.",
                    "errorType": "RATE_LIMIT", "correlationId": str(uuid.uuid4()), "policyName": "TEN_SECONDLY_ROLLING",
                    "groupName": "privateapp:12345"})
            if search and self.search_per_s is not None and len(self._searches) >= self.search_per_s:
                self.throttled += 1
                return httpx.Response(429, headers=headers, json={
                    "status": "error", "message": "You have reached your secondly limit.", "errorType": "RATE_LIMIT",
                    "correlationId": str(uuid.uuid4()), "policyName": "SECONDLY", "groupName": "search:12345"})
            self._calls.append(now)
            if search:
                self._searches.append(now)
        return None

    def _limit_headers(self) -> dict[str, str]:
        return {"X-HubSpot-RateLimit-Interval-Milliseconds": str(int(self.window_s * 1000)),
                "X-HubSpot-RateLimit-Max": str(self.limit_per_window),
                "X-HubSpot-RateLimit-Remaining": str(max(0, self.limit_per_window - len(self._calls)))}

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.rstrip("/")
        self.log.append((request.method, path))
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return self._error(401, "Authentication credentials not found. This API supports OAuth 2.0 authentication and "
                                    "you can find more details at https://developers.hubspot.com/docs/methods/auth/oauth-overview",
                               "INVALID_AUTHENTICATION")
        search = path.endswith("/search")
        limited = self._rate_limited(search)
        if limited is not None:
            return limited
        try:
            body = httpx.Response(200, content=request.content).json() if request.content else {}
        except ValueError:
            return self._error(400, "Invalid input JSON on line 1", "VALIDATION_ERROR")
        routes = {
            ("POST", "/crm/v3/objects/contacts/search"): self._search,
            ("POST", "/crm/v3/objects/deals/search"): lambda b: self._search(b, self.deals, DEFAULT_DEAL_PROPS),
            ("POST", "/crm/v3/objects/notes/batch/create"): self._notes_create,
            ("POST", "/crm/v3/objects/notes/batch/read"): self._notes_read,
            ("POST", "/crm/v3/objects/contacts/batch/update"): self._contacts_update,
        }
        for frm in ("contacts", "contact", "0-1"):
            for to in ("notes", "note", "0-46"):
                routes[("POST", f"/crm/v4/associations/{frm}/{to}/batch/read")] = self._assoc_read
        for frm in ("deals", "deal", "0-3"):
            for to in ("contacts", "contact", "0-1"):
                routes[("POST", f"/crm/v4/associations/{frm}/{to}/batch/read")] = self._deal_contacts_read
        if request.method == "GET":
            resp = self._get(path, request.url.params)
            resp.headers.update(self._limit_headers())
            return resp
        fn = routes.get((request.method, path))
        if fn is None:
            return self._error(404, f"Unable to infer object type from: {path}", "OBJECT_NOT_FOUND")
        resp = fn(body)
        if resp.status_code < 400 and path.endswith("/notes/batch/create") and self.lose_responses > 0:
            self.lose_responses -= 1
            raise httpx.ReadTimeout("timed out", request=request)
        if not search:
            resp.headers.update(self._limit_headers())
        return resp

    # ------------------------------------------------------------------ single objects
    def _get(self, path: str, q) -> httpx.Response:
        m = re.fullmatch(r"/crm/v4/objects/(deals|deal|0-3)/([^/]+)/associations/(contacts|contact|0-1)", path)
        if m:
            limit, after = int(q.get("limit") or 500), int(q.get("after") or 0)
            if not 1 <= limit <= 500:
                return self._error(400, "limit must be between 1 and 500", "VALIDATION_ERROR")
            ids = sorted(self.deal_contacts.get(m.group(2)) or [], key=int)
            out: dict = {"results": [{"toObjectId": int(c), "associationTypes": [
                {"category": "HUBSPOT_DEFINED", "typeId": 3, "label": None}]} for c in ids[after:after + limit]]}
            if after + limit < len(ids):
                out["paging"] = {"next": {"after": str(after + limit), "link": None}}
            return httpx.Response(200, json=out)
        m = re.fullmatch(r"/crm/v3/objects/(contacts|contact|0-1)/([^/]+)", path)
        if m:
            c = self.contacts.get(m.group(2))
            if c is None or c["archived"] != (str(q.get("archived") or "false").lower() == "true"):
                return self._error(404, "Object not found.  objectId are usually numeric.", "OBJECT_NOT_FOUND",
                                   context={"id": [m.group(2)]})
            asked = [x for x in (q.get("properties") or "").split(",") if x] or list(DEFAULT_CONTACT_PROPS)
            return httpx.Response(200, json=self._render(c, list(dict.fromkeys(
                asked + ["createdate", "hs_object_id", "lastmodifieddate"]))))
        return self._error(404, f"Unable to infer object type from: {path}", "OBJECT_NOT_FOUND")

    # ------------------------------------------------------------------ search
    def _value(self, prop: str, v):
        if v is None:
            return None
        if prop in DATETIME_PROPS:
            return to_ms(v)
        if prop in NUMERIC_PROPS:
            return int(v)
        return str(v)

    def _matches(self, c: dict, f: dict) -> bool:
        prop, op = f.get("propertyName"), f.get("operator", "EQ")
        have = self._value(prop, c["properties"].get(prop))
        if op == "HAS_PROPERTY":
            return have not in (None, "")
        if op == "NOT_HAS_PROPERTY":
            return have in (None, "")
        if op == "IN":
            return have in {self._value(prop, v) for v in f.get("values") or []}
        if have is None:
            return op == "NEQ"
        want = self._value(prop, f.get("value"))
        if op == "CONTAINS_TOKEN":
            return str(f.get("value")).strip("*").lower() in str(have).lower()
        return {"EQ": have == want, "NEQ": have != want, "LT": have < want, "LTE": have <= want,
                "GT": have > want, "GTE": have >= want}[op]

    def _search(self, body: dict, table: dict | None = None, defaults=DEFAULT_CONTACT_PROPS) -> httpx.Response:
        table = self.contacts if table is None else table
        modified = "lastmodifieddate" if table is self.contacts else "hs_lastmodifieddate"
        self.search_bodies.append(body)
        groups = body.get("filterGroups") or []
        limit = int(body.get("limit") or 10)
        after = int(body.get("after") or 0)
        sorts = body.get("sorts") or []
        if len(groups) > 5 or any(len(g.get("filters") or []) > 10 for g in groups) or len(sorts) > 1:
            return self._error(400, "Too many filter groups, filters or sorts", "VALIDATION_ERROR")
        if not 1 <= limit <= 200:
            return self._error(400, "limit must be between 1 and 200", "VALIDATION_ERROR")
        if after >= self.search_cap:
            return self._error(400, f"The request exceeds the maximum of {self.search_cap} results for a search query. "
                                    f"Narrow the filters.", "VALIDATION_ERROR")
        items = [c for c in table.values()
                 if not groups or any(all(self._matches(c, f) for f in g.get("filters") or []) for g in groups)]
        items.sort(key=lambda c: -int(c["id"]))  # ties: descending id (unspecified by HubSpot)
        if sorts:
            s = sorts[0]
            prop = s.get("propertyName")
            items.sort(key=lambda c: (self._value(prop, c["properties"].get(prop)) is None,
                                      self._value(prop, c["properties"].get(prop)) or 0),
                       reverse=s.get("direction") == "DESCENDING")
        else:
            items.sort(key=lambda c: int(c["id"]))
        props = list(dict.fromkeys(list(body.get("properties") or defaults) + ["createdate", "hs_object_id", modified]))
        page = items[after:after + limit]
        out = {"total": len(items), "results": [self._render(c, props) for c in page]}
        if after + limit < len(items):
            out["paging"] = {"next": {"after": str(after + limit), "link": f"?after={after + limit}"}}
        return httpx.Response(200, json=out)

    @staticmethod
    def _render(obj: dict, props) -> dict:
        return {"id": obj["id"], "properties": {p: obj["properties"].get(p) for p in props},
                "createdAt": obj["createdAt"], "updatedAt": obj["updatedAt"], "archived": False}

    # ------------------------------------------------------------------ batches
    def _inputs(self, body: dict, limit: int = 100) -> list[dict] | httpx.Response:
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            return self._error(400, "inputs is required", "VALIDATION_ERROR")
        if len(inputs) > limit:
            return self._error(400, f"Batch input size {len(inputs)} exceeds the limit of {limit}", "VALIDATION_ERROR",
                               context={"limit": [str(limit)]})
        return inputs

    def _now(self) -> tuple[int, str]:
        ms = int(self.clock() * 1000)
        return ms, iso_ms(ms)

    def _notes_create(self, body: dict) -> httpx.Response:
        inputs = self._inputs(body)
        if isinstance(inputs, httpx.Response):
            return inputs
        for i, inp in enumerate(inputs):
            props = inp.get("properties") or {}
            if not props.get("hs_timestamp"):
                return self._error(400, f"Property values were not valid: hs_timestamp is required (input {i})",
                                   "VALIDATION_ERROR")
            for a in inp.get("associations") or []:
                to = str((a.get("to") or {}).get("id"))
                types = a.get("types") or []
                if to not in self.contacts or not any(t.get("associationTypeId") == 202 and
                                                      t.get("associationCategory") == "HUBSPOT_DEFINED" for t in types):
                    return self._error(400, f"One or more associations are invalid: contact {to} with type "
                                            f"{[t.get('associationTypeId') for t in types]}", "VALIDATION_ERROR")
        _, now = self._now()
        started = now
        results = []
        with self._lock:
            for inp in inputs:
                self._seq += 1
                nid = str(self._seq)
                p = {"hs_note_body": inp["properties"].get("hs_note_body"), "hs_timestamp": inp["properties"]["hs_timestamp"],
                     "hs_createdate": now, "hs_lastmodifieddate": now, "hs_object_id": nid}
                note = {"id": nid, "properties": p, "createdAt": now, "updatedAt": now, "archived": False}
                self.notes[nid] = note
                for a in inp.get("associations") or []:
                    self.assoc[str(a["to"]["id"])].append(nid)
                results.append(self._render(note, p.keys()))
            self.write_sizes.append(("notes", len(inputs)))
        results.reverse()  # HubSpot does not keep the input order
        return httpx.Response(201, json={"status": "COMPLETE", "results": results, "startedAt": started, "completedAt": now})

    def _notes_read(self, body: dict) -> httpx.Response:
        inputs = self._inputs(body)
        if isinstance(inputs, httpx.Response):
            return inputs
        props = body.get("properties") or ["hs_createdate", "hs_lastmodifieddate", "hs_object_id"]
        ids = [str(i.get("id")) for i in inputs]
        found = [self._render(self.notes[i], props) for i in ids if i in self.notes]
        missing = [i for i in ids if i not in self.notes]
        _, now = self._now()
        out = {"status": "COMPLETE", "results": found, "startedAt": now, "completedAt": now}
        if missing:
            out["numErrors"] = 1
            out["errors"] = [{"status": "error", "category": "OBJECT_NOT_FOUND", "context": {"ids": missing},
                              "message": "Could not get some NOTE objects, they may be deleted or not exist. Check that ids are valid."}]
        return httpx.Response(207 if missing else 200, json=out)

    def _contacts_update(self, body: dict) -> httpx.Response:
        inputs = self._inputs(body)
        if isinstance(inputs, httpx.Response):
            return inputs
        ids = [str(i.get("id")) for i in inputs]
        dups = sorted({i for i in ids if ids.count(i) > 1})
        if dups:
            return self._error(400, f"Duplicate IDs found in batch input: {dups}. IDs must be unique", "VALIDATION_ERROR")
        ms, now = self._now()
        results, missing = [], []
        with self._lock:
            for inp in inputs:
                c = self.contacts.get(str(inp.get("id")))
                if c is None:
                    missing.append(str(inp.get("id")))
                    continue
                c["properties"].update({k: None if v is None else str(v) for k, v in (inp.get("properties") or {}).items()})
                new_ms = max(ms, to_ms(c["properties"]["lastmodifieddate"]) + 1)
                c["properties"]["lastmodifieddate"] = iso_ms(new_ms)
                c["updatedAt"] = iso_ms(new_ms)
                results.append(self._render(c, list(inp.get("properties") or {}) + ["lastmodifieddate", "hs_object_id"]))
            self.write_sizes.append(("contacts", len(inputs)))
        out = {"status": "COMPLETE", "results": results, "startedAt": now, "completedAt": now}
        if missing:
            out["numErrors"] = 1
            out["errors"] = [{"status": "error", "category": "OBJECT_NOT_FOUND", "context": {"ids": missing},
                              "message": "Could not get some CONTACT objects, they may be deleted or not exist. Check that ids are valid."}]
        return httpx.Response(207 if missing else 200, json=out)

    def _assoc_read(self, body: dict) -> httpx.Response:
        return self._batch_assoc(body, self.assoc, "note", "contact", 201)

    def _deal_contacts_read(self, body: dict) -> httpx.Response:
        return self._batch_assoc(body, self.deal_contacts, "contact", "deal", 3)

    def _batch_assoc(self, body: dict, table: dict, to: str, frm: str, type_id: int) -> httpx.Response:
        """v4 associations batch read: per-object paging (``assoc_page``); objects without any -> errors, 207."""
        inputs = self._inputs(body, limit=1000)
        if isinstance(inputs, httpx.Response):
            return inputs
        results, errors = [], []
        for inp in inputs:
            oid = str(inp.get("id"))
            linked = table.get(oid) or []
            if not linked:
                errors.append({"status": "error", "category": "OBJECT_NOT_FOUND",
                               "subCategory": "crm.associations.NO_ASSOCIATIONS_FOUND",
                               "context": {"fromObjectId": [oid]}, "message": f"No {to} is associated with {frm} {oid}."})
                continue
            start = int(inp.get("after") or 0)
            res = {"from": {"id": oid}, "to": [{"toObjectId": int(n), "associationTypes": [
                {"category": "HUBSPOT_DEFINED", "typeId": type_id, "label": None}]}
                for n in linked[start:start + self.assoc_page]]}
            if start + self.assoc_page < len(linked):
                res["paging"] = {"next": {"after": str(start + self.assoc_page), "link": None}}
            results.append(res)
        _, now = self._now()
        out = {"status": "COMPLETE", "results": results, "startedAt": now, "completedAt": now}
        if errors:
            out["numErrors"] = len(errors)
            out["errors"] = errors
        return httpx.Response(207 if errors else 200, json=out)
