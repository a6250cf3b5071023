"""An offline amoCRM (API v4), as its documentation describes it (httpx.MockTransport).

Stateful: contacts (custom_fields_values PHONE/EMAIL/consent, updated_at in unix seconds),
leads, contact notes, the contacts' custom field list.

- auth: ``Authorization: Bearer <long-lived token>``, else 401 application/problem+json
- GET /api/v4/contacts: limit (<= 250), page, with=leads, filter[updated_at] / [from] / [to]
  (inclusive), filter[id][], order[updated_at|id]=asc|desc; HAL JSON with _page,
  _links.self/next (next only when another page exists); 204 No Content when empty.
  Contacts that share an updated_at come in an order that is NOT their id order.
- GET /api/v4/leads (filter[id][]), /api/v4/contacts/custom_fields (limit <= 50)
- GET /api/v4/leads/{id} (with=contacts: _embedded.contacts [{"id", "is_main", "_links"}], the contacts
  whose leads include it, by id; one is main) and GET /api/v4/contacts/{id} (with=leads);
  204 No Content when the entity does not exist
- GET /api/v4/contacts/notes (filter[entity_id][], filter[note_type][], filter[updated_at][from]),
  GET /api/v4/contacts/{id}/notes
- POST /api/v4/contacts/notes, PATCH /api/v4/contacts: a list (<= 250), all or nothing:
  400 {"validation-errors": [{"request_id", "errors": [{"code", "path", "detail"}]}], ...}
- more than ``rate_per_s`` requests in any second -> 429; after ``block_after_429``
  violations the "IP" is blocked: 403 for everything. ``force_429 = n``: the next n requests get
  the 429 whatever the rate; ``retry_after``: a Retry-After header on the 429s (None: none).
- ``lose_responses = n``: the next n writes are applied, then the answer is lost (ReadTimeout).
"""
from __future__ import annotations

import collections
import json
import re
import threading
import time
from urllib.parse import urlencode

import httpx

PHONE_FIELD_ID = 1001
EMAIL_FIELD_ID = 1002
CONSENT_FIELD_ID = 777001
MAX_LIMIT = 250
MAX_BATCH = 250


class FakeAmoCrm:
    def __init__(self, token: str = "amo-long-lived-token", *, host: str = "smsflow-test.amocrm.ru",
                 rate_per_s: float | None = 7, block_after_429: int | None = None, retry_after: str | None = None,
                 consent_field_name: str = "SMS consent", consent_field_code: str | None = None, clock=time.time):
        self.token = token
        self.host = host
        self.rate_per_s = rate_per_s
        self.block_after_429 = block_after_429
        self.retry_after = retry_after
        self.force_429 = 0
        self.consent_field_name = consent_field_name
        self.consent_field_code = consent_field_code
        self.clock = clock
        self.contacts: dict[int, dict] = {}
        self.leads: dict[int, dict] = {}
        self.notes: dict[int, dict] = {}
        self.log: list[tuple[str, str]] = []  # (method, path) of every request
        self.times: list[float] = []  # time.monotonic() of every request
        self.write_sizes: list[tuple[str, int]] = []  # (path, items) of every accepted write
        self.throttled = 0
        self.blocked = False
        self.lose_responses = 0
        self._window: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()
        self._note_seq = 5_000_000

    @property
    def base_url(self) -> str:
        return f"https://{self.host}"

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    # ------------------------------------------------------------------ data
    def custom_fields(self) -> list[dict]:
        return [
            {"id": PHONE_FIELD_ID, "name": "Телефон", "code": "PHONE", "type": "multitext", "sort": 4, "is_api_only": False,
             "enums": [{"id": 1, "value": "WORK", "sort": 2}, {"id": 3, "value": "MOB", "sort": 6}],
             "entity_type": "contacts", "is_predefined": True, "is_deletable": False},
            {"id": EMAIL_FIELD_ID, "name": "Email", "code": "EMAIL", "type": "multitext", "sort": 6, "is_api_only": False,
             "enums": [{"id": 7, "value": "WORK", "sort": 2}, {"id": 9, "value": "PRIV", "sort": 4}],
             "entity_type": "contacts", "is_predefined": True, "is_deletable": False},
            {"id": CONSENT_FIELD_ID, "name": self.consent_field_name, "code": self.consent_field_code, "type": "checkbox",
             "sort": 510, "is_api_only": False, "enums": None, "entity_type": "contacts", "is_predefined": False,
             "is_deletable": True},
        ]

    def add_contact(self, cid: int, *, first_name: str, last_name: str = "", updated_at: int,
                    phones=(), emails=(), consent: bool | None = True, lead_ids=(), responsible_user_id: int = 504141) -> dict:
        """phones/emails: (value, enum_code) pairs."""
        cfs = []
        if phones:
            cfs.append({"field_id": PHONE_FIELD_ID, "field_name": "Телефон", "field_code": "PHONE", "field_type": "multitext",
                        "values": [{"value": v, "enum_id": 3 if e == "MOB" else 1, "enum_code": e} for v, e in phones]})
        if emails:
            cfs.append({"field_id": EMAIL_FIELD_ID, "field_name": "Email", "field_code": "EMAIL", "field_type": "multitext",
                        "values": [{"value": v, "enum_id": 7, "enum_code": e} for v, e in emails]})
        if consent is not None:
            cfs.append(self._consent_cf(consent))
        c = {"id": cid, "name": f"{first_name} {last_name}".strip(), "first_name": first_name, "last_name": last_name,
             "responsible_user_id": responsible_user_id, "group_id": 0, "created_by": 0, "updated_by": 0,
             "created_at": updated_at, "updated_at": updated_at, "closest_task_at": None, "is_deleted": False,
             "is_unsorted": False, "custom_fields_values": cfs or None, "account_id": 29000000,
             "_lead_ids": list(lead_ids)}
        self.contacts[cid] = c
        return c

    def _consent_cf(self, value) -> dict:
        return {"field_id": CONSENT_FIELD_ID, "field_name": self.consent_field_name, "field_code": self.consent_field_code,
                "field_type": "checkbox", "values": [{"value": value}]}

    def add_lead(self, lid: int, *, status_id: int, pipeline_id: int, price: int, updated_at: int,
                 main_contact_id: int | None = None) -> dict:
        """The lead's contacts are those whose ``lead_ids`` name it; ``main_contact_id`` is the main one
        (default: the first linked)."""
        lead = {"id": lid, "name": f"Сделка #{lid}", "price": price, "responsible_user_id": 504141, "group_id": 0,
                "status_id": status_id, "pipeline_id": pipeline_id, "loss_reason_id": None, "created_by": 0, "updated_by": 0,
                "created_at": updated_at, "updated_at": updated_at, "closed_at": None, "closest_task_at": None,
                "is_deleted": False, "custom_fields_values": None, "score": None, "account_id": 29000000,
                "_main_contact_id": main_contact_id}
        self.leads[lid] = lead
        return lead

    def consent_of(self, cid: int):
        for cf in self.contacts[cid].get("custom_fields_values") or []:
            if cf["field_id"] == CONSENT_FIELD_ID:
                return cf["values"][0]["value"]
        return None

    def notes_of(self, cid: int) -> list[dict]:
        return [n for n in self.notes.values() if n["entity_id"] == cid]

    # ------------------------------------------------------------------ HTTP
    @staticmethod
    def _problem(status: int, title: str, detail: str, **extra) -> httpx.Response:
        body = {"title": title, "type": f"https://httpstatus.es/{status}", "status": status, "detail": detail, **extra}
        return httpx.Response(status, headers={"content-type": "application/problem+json"}, content=json.dumps(body).encode())

    def _hal(self, body: dict, status: int = 200) -> httpx.Response:
        return httpx.Response(status, headers={"content-type": "application/hal+json"},
                              content=json.dumps(body, ensure_ascii=False).encode())

    def handle(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.log.append((request.method, request.url.path))
            self.times.append(time.monotonic())
            if self.blocked:
                return self._problem(403, "Forbidden", "Your IP address has been blocked")
            if self.force_429 > 0:
                self.force_429 -= 1
                self.throttled += 1
                return self._too_many()
            if self.rate_per_s is not None:
                now = time.monotonic()
                while self._window and now - self._window[0] >= 1.0:
                    self._window.popleft()
                if len(self._window) >= self.rate_per_s:
                    self.throttled += 1
                    if self.block_after_429 is not None and self.throttled >= self.block_after_429:
                        self.blocked = True
                    return self._too_many()
                self._window.append(now)
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return self._problem(401, "Unauthorized", "Unauthorized")
        path = request.url.path.rstrip("/")
        q = request.url.params
        m = request.method
        try:
            if m == "GET" and path == "/api/v4/contacts":
                return self._list(request, self._contacts(q), "contacts")
            if m == "PATCH" and path == "/api/v4/contacts":
                return self._patch_contacts(request)
            if m == "GET" and path == "/api/v4/contacts/custom_fields":
                return self._list(request, self.custom_fields(), "custom_fields", max_limit=50)
            if m == "GET" and path == "/api/v4/leads":
                return self._list(request, self._leads(q), "leads")
            mm = re.fullmatch(r"/api/v4/(leads|contacts)/(\d+)", path)
            if m == "GET" and mm:
                return self._one(request, mm.group(1), int(mm.group(2)))
            if m == "GET" and path == "/api/v4/contacts/notes":
                return self._list(request, self._notes(q), "notes")
            mm = re.fullmatch(r"/api/v4/contacts/(\d+)/notes", path)
            if m == "GET" and mm:
                return self._list(request, self._notes(q, entity=int(mm.group(1))), "notes")
            if m == "POST" and path == "/api/v4/contacts/notes":
                return self._add_notes(request)
        except (ValueError, KeyError, TypeError) as exc:
            return self._problem(400, "Bad Request", f"Request validation failed: {exc}")
        return self._problem(404, "Not Found", "Not found")

    def _too_many(self) -> httpx.Response:
        r = self._problem(429, "Too Many Requests", "Too many requests")
        if self.retry_after is not None:
            r.headers["Retry-After"] = self.retry_after
        return r

    # ------------------------------------------------------------------ one entity
    def lead_contacts(self, lid: int) -> list[dict]:
        """[{"id", "is_main"}] of a lead, by contact id, exactly one main when there are any."""
        ids = sorted(c["id"] for c in self.contacts.values() if lid in c["_lead_ids"])
        main = self.leads[lid].get("_main_contact_id")
        main = main if main in ids else (ids[0] if ids else None)
        return [{"id": cid, "is_main": cid == main} for cid in ids]

    def _one(self, request: httpx.Request, kind: str, eid: int) -> httpx.Response:
        """GET /api/v4/leads/{id} | /api/v4/contacts/{id}: the entity, or 204 No Content."""
        found = (self.leads if kind == "leads" else self.contacts).get(eid)
        if found is None:
            return httpx.Response(204)
        withs = (request.url.params.get("with") or "").split(",")
        if kind == "contacts":
            return self._hal(self._render(found, "contacts", "leads" in withs))
        lead = {k: v for k, v in found.items() if not k.startswith("_")}
        lead["_links"] = {"self": {"href": f"{self.base_url}/api/v4/leads/{eid}"}}
        emb: dict = {"tags": [], "companies": []}
        if "contacts" in withs:
            emb["contacts"] = [{**c, "_links": {"self": {"href": f"{self.base_url}/api/v4/contacts/{c['id']}"}}}
                               for c in self.lead_contacts(eid)]
        lead["_embedded"] = emb
        return self._hal(lead)

    # ------------------------------------------------------------------ lists
    def _list(self, request: httpx.Request, items: list[dict], key: str, max_limit: int = MAX_LIMIT) -> httpx.Response:
        q = request.url.params
        limit = int(q.get("limit", 50))
        page = int(q.get("page", 1))
        if limit < 1 or limit > max_limit or page < 1:
            return self._problem(400, "Bad Request", "Request validation failed", **{"validation-errors": [
                {"request_id": "0", "errors": [{"code": "OutOfRange", "path": "limit", "detail": f"limit <= {max_limit}"}]}]})
        chunk = items[(page - 1) * limit: page * limit]
        if not chunk:
            return httpx.Response(204)
        withs = (q.get("with") or "").split(",")
        out = [self._render(x, key, "leads" in withs, "contacts" in withs) for x in chunk]

        def link(p: int) -> dict:
            pairs = [(k, v) for k, v in q.multi_items() if k != "page"] + [("page", str(p))]
            return {"href": f"{self.base_url}{request.url.path}?{urlencode(pairs)}"}

        links = {"self": link(page)}
        if page > 1:
            links["first"] = link(1)
            links["prev"] = link(page - 1)
        if len(items) > page * limit:
            links["next"] = link(page + 1)
        return self._hal({"_page": page, "_links": links, "_embedded": {key: out}})

    def _render(self, x: dict, key: str, with_leads: bool, with_contacts: bool = False) -> dict:
        if key == "contacts":
            c = {k: v for k, v in x.items() if not k.startswith("_")}
            c["_links"] = {"self": {"href": f"{self.base_url}/api/v4/contacts/{x['id']}"}}
            emb = {"tags": [], "companies": []}
            if with_leads:
                emb["leads"] = [{"id": lid, "_links": {"self": {"href": f"{self.base_url}/api/v4/leads/{lid}"}}}
                                for lid in x["_lead_ids"]]
            c["_embedded"] = emb
            return json.loads(json.dumps(c))
        out = {k: v for k, v in x.items() if not k.startswith("_")}
        if key == "leads" and with_contacts:  # with=contacts: [{"id", "is_main", "_links"}]
            out["_embedded"] = {"tags": [], "companies": [], "contacts": [
                {**c, "_links": {"self": {"href": f"{self.base_url}/api/v4/contacts/{c['id']}"}}}
                for c in self.lead_contacts(x["id"])]}
        return json.loads(json.dumps(out))

    def _leads(self, q) -> list[dict]:
        """filter[id][], filter[updated_at][from]/[to], order[updated_at]|order[id] (like contacts)."""
        ids = {int(x) for x in q.get_list("filter[id][]") + q.get_list("filter[id]")}
        lo, hi = q.get("filter[updated_at][from]"), q.get("filter[updated_at][to]")
        items = [l for l in self.leads.values() if (not ids or l["id"] in ids)
                 and (lo is None or l["updated_at"] >= int(lo)) and (hi is None or l["updated_at"] <= int(hi))]
        if q.get("order[updated_at]"):
            items.sort(key=lambda l: (l["updated_at"], -l["id"]), reverse=q["order[updated_at]"] == "desc")
        else:
            items.sort(key=lambda l: l["id"], reverse=q.get("order[id]") == "desc")
        return items

    def _contacts(self, q) -> list[dict]:
        lo = q.get("filter[updated_at][from]") or q.get("filter[updated_at]")
        hi = q.get("filter[updated_at][to]")
        ids = {int(x) for x in q.get_list("filter[id][]") + q.get_list("filter[id]")}
        items = [c for c in self.contacts.values()
                 if (lo is None or c["updated_at"] >= int(lo)) and (hi is None or c["updated_at"] <= int(hi))
                 and (not ids or c["id"] in ids)]
        if q.get("order[id]"):
            items.sort(key=lambda c: c["id"], reverse=q["order[id]"] == "desc")
        elif q.get("order[updated_at]"):
            desc = q["order[updated_at]"] == "desc"
            # within one second amoCRM's order is unspecified: here it is the reverse of the id order
            items.sort(key=lambda c: (c["updated_at"], -c["id"]), reverse=desc)
        else:
            items.sort(key=lambda c: c["id"])
        return items

    def _notes(self, q, entity: int | None = None) -> list[dict]:
        ents = {int(x) for x in q.get_list("filter[entity_id][]") + q.get_list("filter[entity_id]")}
        if entity is not None:
            ents = {entity}
        types = set(q.get_list("filter[note_type][]") + q.get_list("filter[note_type]"))
        lo = q.get("filter[updated_at][from]") or q.get("filter[updated_at]")
        items = [n for n in self.notes.values() if (not ents or n["entity_id"] in ents) and (not types or n["note_type"] in types)
                 and (lo is None or n["updated_at"] >= int(lo))]
        items.sort(key=lambda n: n["id"], reverse=q.get("order[id]") == "desc")
        return items

    # ------------------------------------------------------------------ writes
    def _lost(self, request: httpx.Request) -> None:
        if self.lose_responses > 0:
            self.lose_responses -= 1
            raise httpx.ReadTimeout("timed out", request=request)

    def _batch(self, request: httpx.Request) -> list[dict]:
        body = json.loads(request.content)
        if not isinstance(body, list) or not body or len(body) > MAX_BATCH:
            raise ValueError(f"a list of 1..{MAX_BATCH} entities is expected")
        return body

    def _add_notes(self, request: httpx.Request) -> httpx.Response:
        body = self._batch(request)
        errors = []
        for i, n in enumerate(body):
            rid = str(n.get("request_id", i))
            errs = []
            if n.get("entity_id") not in self.contacts:
                errs.append({"code": "NotFound", "path": "entity_id", "detail": "Entity not found"})
            if n.get("note_type") != "common":
                errs.append({"code": "NotSupportedChoice", "path": "note_type", "detail": "The value you selected is not a valid choice."})
            elif not ((n.get("params") or {}).get("text") or "").strip():
                errs.append({"code": "NotBlank", "path": "params.text", "detail": "This value should not be blank."})
            if errs:
                errors.append({"request_id": rid, "errors": errs})
        if errors:
            return self._problem(400, "Bad Request", "Request validation failed", **{"validation-errors": errors})
        now = int(self.clock())
        out = []
        with self._lock:
            for i, n in enumerate(body):
                self._note_seq += 1
                note = {"id": self._note_seq, "entity_id": n["entity_id"], "created_by": 0, "updated_by": 0,
                        "created_at": now, "updated_at": now, "responsible_user_id": 504141, "group_id": 0,
                        "note_type": "common", "params": {"text": n["params"]["text"]}, "account_id": 29000000,
                        "_links": {"self": {"href": f"{self.base_url}/api/v4/contacts/{n['entity_id']}/notes/{self._note_seq}"}}}
                self.notes[note["id"]] = note
                out.append({"id": note["id"], "entity_id": n["entity_id"], "request_id": str(n.get("request_id", i)),
                            "_links": note["_links"]})
            self.write_sizes.append(("notes", len(body)))
        self._lost(request)
        return self._hal({"_links": {"self": {"href": f"{self.base_url}/api/v4/contacts/notes"}}, "_embedded": {"notes": out}})

    def _patch_contacts(self, request: httpx.Request) -> httpx.Response:
        body = self._batch(request)
        fields = {f["id"]: f for f in self.custom_fields()}
        codes = {f["code"]: f for f in self.custom_fields() if f["code"]}
        errors = []
        for i, c in enumerate(body):
            rid = str(c.get("request_id", i))
            errs = []
            if c.get("id") not in self.contacts:
                errs.append({"code": "NotFound", "path": "id", "detail": "Entity not found"})
            for j, cf in enumerate(c.get("custom_fields_values") or []):
                if cf.get("field_id") not in fields and cf.get("field_code") not in codes:
                    errs.append({"code": "NotSupportedChoice", "path": f"custom_fields_values.{j}.field_id",
                                 "detail": "The value you selected is not a valid choice."})
            if errs:
                errors.append({"request_id": rid, "errors": errs})
        if errors:
            return self._problem(400, "Bad Request", "Request validation failed", **{"validation-errors": errors})
        now = int(self.clock())
        out = []
        with self._lock:
            for i, c in enumerate(body):
                contact = self.contacts[c["id"]]
                cfs = [x for x in contact.get("custom_fields_values") or []]
                for cf in c.get("custom_fields_values") or []:
                    fid = cf.get("field_id") or codes[cf["field_code"]]["id"]
                    cfs = [x for x in cfs if x["field_id"] != fid]
                    if fid == CONSENT_FIELD_ID:
                        cfs.append(self._consent_cf(cf["values"][0]["value"]))
                contact["custom_fields_values"] = cfs or None
                contact["updated_at"] = max(now, contact["updated_at"] + 1)
                out.append({"id": c["id"], "name": contact["name"], "updated_at": contact["updated_at"],
                            "request_id": str(c.get("request_id", i)),
                            "_links": {"self": {"href": f"{self.base_url}/api/v4/contacts/{c['id']}"}}})
            self.write_sizes.append(("contacts", len(body)))
        return self._hal({"_links": {"self": {"href": f"{self.base_url}/api/v4/contacts"}}, "_embedded": {"contacts": out}})
