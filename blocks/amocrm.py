"""amoCRM (API v4) as a ``CrmSource`` with write-back.

    Authorization: Bearer <long-lived token>      https://{subdomain}.amocrm.ru
    GET  /api/v4/contacts?limit=250&page=N&with=leads&filter[updated_at][from]=<unix>&order[updated_at]=asc
         200 application/hal+json {"_page": N, "_links": {"self", "next"?}, "_embedded": {"contacts": [...]}}
         204 No Content when nothing matches; follow _links.next until it is absent
    GET  /api/v4/leads?filter[id][]=..                        (lead status/pipeline/price, optional)
    GET  /api/v4/contacts/custom_fields?limit=50&page=N       (the consent field's id, for opt-outs)
    GET  /api/v4/leads/{id}?with=contacts     one lead; _embedded.contacts: [{"id", "is_main", "_links"}]
    GET  /api/v4/contacts/{id}                one contact (custom_fields_values); 204 when it does not exist
    GET  /api/v4/contacts/notes?filter[entity_id][]=..&filter[note_type][]=common&filter[updated_at][from]=..
    POST /api/v4/contacts/notes    [{"entity_id", "note_type": "common", "params": {"text"}, "request_id"}]
    PATCH /api/v4/contacts         [{"id", "custom_fields_values": [{"field_id", "values": [{"value"}]}], "request_id"}]
    errors: application/problem+json {"title", "type", "status", "detail"}; 400 adds
         "validation-errors": [{"request_id", "errors": [{"code", "path", "detail"}]}]
    401 token invalid/expired; 402 account not paid; 403 account/IP blocked; 429 over 7 requests/s
    (repeated 429s get the IP blocked: 403), 5xx.

A contact's phones/emails are the PHONE/EMAIL multitext fields (``enum_code`` MOB/WORK/...);
the phone taken is the first MOB value, else the first value. SMS consent is a custom field
found by id, code or name (default: code SMS_CONSENT or name "SMS consent"), truthy = consent.
An opt-out sets that field to ``opt_out_value`` (False for a checkbox).

The extract re-anchors on the last seen ``updated_at`` (unix seconds) after each page
(``pages_per_query``) rather than paging deep: ``filter[updated_at][from]`` is inclusive, so
the contacts already seen at that second are skipped by id. A page whose contacts all share
one second is walked with ``filter[updated_at][from]=to=<that second>&order[id]=asc``,
following ``_links.next``.

Nothing secret is logged: the token lives in a SecretStr and in the Authorization header only.
"""
from __future__ import annotations

import time
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx
from pydantic import Field, SecretStr

from blocks.crm import CrmSourceError
from blocks.crm_writeback import (
    VendorRejected,
    WriteBackItem,
    WriteBackResult,
    chunks,
    keys_in,
)
from blocks.rest_crm import (
    RestCrmSource,
    Verdict,
    frames,
    iso_utc,
    parse_since,
)
from smsflow.ratelimit import retry_after_seconds
from smsflow.values import truthy


class AmoCrm(RestCrmSource):
    """amoCRM contacts (API v4), incrementally by updated_at; notes and opt-outs written back."""

    _block_type_name = "amoCRM"
    _vendor: ClassVar[str] = "amoCRM"
    note_batch_limit: ClassVar[int] = 250

    subdomain: str | None = Field(default=None, description="Account subdomain: https://{subdomain}.amocrm.ru")
    base_url: str | None = Field(default=None, description="API root instead of the subdomain (e.g. an amocrm.com account).")
    access_token: SecretStr = Field(description="Long-lived token of the integration (sent as Authorization: Bearer).")
    rate_per_second: float = Field(default=7, gt=0, description="amoCRM allows 7 requests per second per integration.")
    page_size: int = Field(default=250, ge=1, le=250, description="Contacts per page (amoCRM maximum: 250).")
    consent_field_id: int | None = Field(default=None, description="Id of the SMS consent custom field (beats code/name).")
    consent_field_code: str | None = Field(default="SMS_CONSENT", description="Code of the SMS consent custom field.")
    consent_field_name: str | None = Field(default="SMS consent", description="Name of the SMS consent custom field.")
    opt_out_value: bool | str = Field(default=False, description="Value written to the consent field on an opt-out.")
    with_leads: bool = Field(default=True, description="Ask for the contacts' leads (with=leads): lead_count, last_lead_id.")
    lead_details: bool = Field(default=False, description="Also read the leads: last lead's status_id, pipeline_id, price.")
    note_batch_size: int = Field(default=50, ge=1, le=250, description="Notes per POST (amoCRM takes up to 250; 50 recommended).")
    update_batch_size: int = Field(default=50, ge=1, le=250, description="Contacts per PATCH.")
    writeback_lookback_days: int = Field(default=30, ge=1, description="How far back existing notes are read for markers.")
    deals: bool = Field(default=True, description="Read leads (deals) as orders for conversions: price, won (status "
                        "142) counts as a sale, lost (143) not; incremental by updated_at.")
    won_status_ids: list[int] = Field(default_factory=lambda: [142], description="Lead statuses that are a sale "
                                      "(142: 'Успешно реализовано' in every pipeline).")

    # ------------------------------------------------------------------ plumbing
    def _base_url(self) -> str:
        if self.base_url:
            return self.base_url.rstrip("/")
        if not self.subdomain:
            raise CrmSourceError(f"amoCRM '{self.source_name}': set subdomain or base_url")
        return f"https://{self.subdomain}.amocrm.ru"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token.get_secret_value()}", "Accept": "application/hal+json"}

    def _rate(self) -> float:
        return self.rate_per_second

    def _note_batch_size(self) -> int:
        return self.note_batch_size

    def _classify(self, r: httpx.Response) -> Verdict:
        s = r.status_code
        if s in (200, 201, 202, 204):
            return Verdict("ok")
        detail = _problem(r)
        who = f"amoCRM '{self.source_name}'"
        if s == 401:
            return Verdict("auth", f"{who}: the access token was rejected (401 {detail}); issue a new long-lived token "
                                   f"for the integration and save it in the block")
        if s == 402:
            return Verdict("auth", f"{who}: the account is not paid (402 {detail})")
        if s == 403:
            return Verdict("auth", f"{who}: access forbidden (403 {detail}): the account, the token's user or this IP "
                                   f"is blocked (amoCRM blocks IPs that keep exceeding 7 requests/s)")
        if s == 429:
            return Verdict("rate", f"{who}: 429 Too Many Requests", retry_after_seconds(r.headers.get("Retry-After")))
        if s >= 500:
            return Verdict("server", f"{who}: {s} {detail}")
        return Verdict("client", f"{who}: {s} {detail}")

    def _next_href(self, body: dict) -> str | None:
        href = ((body.get("_links") or {}).get("next") or {}).get("href")
        if not href:
            return None
        if urlsplit(href).netloc and urlsplit(href).netloc != urlsplit(self._base_url()).netloc:
            # never send the token to another host
            raise CrmSourceError(f"amoCRM '{self.source_name}': next-page link points to another host")
        return href

    def _pages(self, path: str, params: list[tuple[str, Any]], key: str):
        """Follow _links.next; yields (items, more)."""
        call = self._call
        url: str | None = path
        while url:
            r = call("GET", url, params=params)
            params = None  # the next link carries the whole query
            if r.status_code == 204 or not r.content:
                yield [], False
                return
            body = r.json()
            items = (body.get("_embedded") or {}).get(key) or []
            url = self._next_href(body)
            yield items, url is not None

    # ------------------------------------------------------------------ extract
    def _rows(self, since: str | None):
        base = [("limit", self.page_size)]
        if self.with_leads:
            base.append(("with", "leads"))

        def rows(page: list[dict]) -> list[dict]:
            leads = self._lead_details(page) if (self.with_leads and self.lead_details) else {}
            return [self._row(c, leads) for c in page]

        return self._walk("/api/v4/contacts", "contacts", base, since, rows)

    def _walk(self, path: str, key: str, base: list[tuple[str, Any]], since: str | None, rows):
        """Contacts or leads with updated_at >= ``since``: ``order[updated_at]=asc`` pages, the entities sharing
        one second walked by id (``_scan``); ``rows(page)`` maps each page."""
        start = parse_since(since)
        anchor = None if start is None else int(start.timestamp())  # floor: the filter is inclusive

        def query(a: int | None):
            params = list(base) + [("page", 1), ("order[updated_at]", "asc")]
            if a is not None:
                params.append(("filter[updated_at][from]", a))
            return self._pages(path, params, key)

        def tie(t: int):
            params = list(base) + [("page", 1), ("order[id]", "asc"), ("filter[updated_at][from]", t),
                                   ("filter[updated_at][to]", t)]
            for items, _more in self._pages(path, params, key):
                yield items

        return self._scan(query, tie, since=anchor, ts=lambda x: int(x.get("updated_at") or 0), ident=lambda x: x["id"],
                          rows=rows)

    # ------------------------------------------------------------------ deals as orders
    @property
    def has_orders(self) -> bool:
        return self.deals

    def fetch_orders(self, since: str | None = None, batch_size: int = 50_000):
        """Leads changed since ``since``: ``GET /api/v4/leads?with=contacts&order[updated_at]=asc&filter[updated_at]
        [from]=..``, walked like the contacts (ties in one second by id). The order's contact is the lead's main
        contact; its time the lead's ``closed_at`` (else ``created_at``)."""
        if not self.deals:
            return None
        rows = self._walk("/api/v4/leads", "leads", [("limit", self.page_size), ("with", "contacts")], since,
                          lambda page: [self._deal(lead) for lead in page])
        return frames(rows, batch_size)

    def _deal(self, lead: dict) -> dict:
        contacts = (lead.get("_embedded") or {}).get("contacts") or []
        main = next((c for c in contacts if c.get("is_main")), contacts[0] if contacts else None)
        status_id = int(lead.get("status_id") or 0)
        status = "won" if status_id in self.won_status_ids else ("lost" if status_id == 143 else f"open-{status_id}")
        at = lead.get("closed_at") or lead.get("created_at") or lead.get("updated_at") or 0

        def stamp(t) -> str:
            return iso_utc(datetime.fromtimestamp(int(t), timezone.utc))

        return {"order_id": str(lead["id"]), "contact_id": str(main["id"]) if main else None,
                "amount": lead.get("price") or 0, "status": status, "ordered_at": stamp(at),
                "updated_at": stamp(lead.get("updated_at") or at)}

    def _lead_details(self, contacts: list[dict]) -> dict[int, dict]:
        ids = sorted({l["id"] for c in contacts for l in ((c.get("_embedded") or {}).get("leads") or [])})
        out: dict[int, dict] = {}
        for part in chunks(ids, 100):
            params = [("filter[id][]", i) for i in part] + [("limit", 250), ("page", 1)]
            for items, _more in self._pages("/api/v4/leads", params, "leads"):
                out.update({l["id"]: l for l in items})
        return out

    def _is_consent_field(self, cf: dict) -> bool:
        if self.consent_field_id is not None:
            return cf.get("field_id") == self.consent_field_id
        if self.consent_field_code and (cf.get("field_code") or "") == self.consent_field_code:
            return True
        name = (self.consent_field_name or "").strip().lower()
        return bool(name) and (cf.get("field_name") or "").strip().lower() == name

    def _row(self, c: dict, leads: dict[int, dict]) -> dict:
        cfs = c.get("custom_fields_values") or []
        consent_values = [v.get("value") for cf in cfs if self._is_consent_field(cf) for v in (cf.get("values") or [])]
        row = {
            "id": str(c["id"]),
            "first_name": c.get("first_name") or c.get("name") or None,
            "last_name": c.get("last_name") or None,
            "phone": _multitext(cfs, "PHONE", "MOB"),
            "email": _multitext(cfs, "EMAIL", "WORK"),
            "language": None,
            "timezone": None,
            "sms_consent": bool(consent_values) and truthy(consent_values[0]),
            "consent_at": None,
            "updated_at": iso_utc(datetime.fromtimestamp(int(c.get("updated_at") or 0), timezone.utc)),
            "name": c.get("name") or None,
            "responsible_user_id": c.get("responsible_user_id"),
        }
        if self.with_leads:
            lead_ids = [l["id"] for l in ((c.get("_embedded") or {}).get("leads") or [])]
            row["lead_count"] = len(lead_ids)
            row["last_lead_id"] = max(lead_ids) if lead_ids else None
            known = [leads[i] for i in lead_ids if i in leads]
            if known:
                last = max(known, key=lambda l: (l.get("updated_at") or 0, l["id"]))
                row["last_lead_id"] = last["id"]
                row["last_lead_status_id"] = last.get("status_id")
                row["last_lead_pipeline_id"] = last.get("pipeline_id")
                row["last_lead_price"] = last.get("price")
        return row

    # ------------------------------------------------------------------ webhook events
    def _entity(self, path: str, params: list[tuple[str, Any]] | None = None) -> dict | None:
        """GET one entity by id; None when amoCRM answers 204 No Content (or 404): no such entity."""
        r = self._call("GET", path, params=params)
        if r.status_code == 204 or not r.content:
            return None
        body = r.json()
        return body if isinstance(body, dict) and body.get("id") is not None else None

    def _customer_of(self, kind: str, entity_id: str) -> dict | None:
        """amoCRM webhooks name a lead (``leads[status][0][id]``) or a contact. For a lead (amoCRM's
        deal): ``GET /api/v4/leads/{id}?with=contacts`` and its main contact (``is_main``, else the
        first) from ``_embedded.contacts``; then ``GET /api/v4/contacts/{contact_id}`` for the PHONE
        field (a mobile number preferred, as in the extract). crm_id is the contact id, as extracted."""
        contact_id = entity_id
        if kind != "contact":
            lead = self._entity(f"/api/v4/leads/{entity_id}", [("with", "contacts")])
            linked = ((lead or {}).get("_embedded") or {}).get("contacts") or []
            main = next((c for c in linked if c.get("is_main")), linked[0] if linked else None)
            if main is None or main.get("id") is None:
                return None
            contact_id = str(main["id"])
        contact = self._entity(f"/api/v4/contacts/{contact_id}")
        if contact is None:
            return None
        return {"crm_id": str(contact["id"]), "phone": _multitext(contact.get("custom_fields_values") or [], "PHONE", "MOB"),
                "language": None}

    # ------------------------------------------------------------------ write-back
    def _existing_notes(self, items: list[WriteBackItem]) -> dict[str, str]:
        wanted: dict[str, set[str]] = defaultdict(set)
        for it in items:
            wanted[it.crm_id].add(it.key)
        since = int(time.time()) - self.writeback_lookback_days * 86400
        found: dict[str, str] = {}
        for ids in chunks(sorted(wanted, key=int), 50):
            params = [("filter[entity_id][]", i) for i in ids] + [
                ("filter[note_type][]", "common"), ("filter[updated_at][from]", since), ("limit", 250), ("page", 1)]
            for notes, _more in self._pages("/api/v4/contacts/notes", params, "notes"):
                for n in notes:
                    text = (n.get("params") or {}).get("text") or ""
                    for k in keys_in(text) & wanted.get(str(n.get("entity_id")), set()):
                        found.setdefault(k, str(n["id"]))
        return found

    def _create_notes(self, items: list[WriteBackItem]) -> dict[str, WriteBackResult]:
        payload = [{"entity_id": int(i.crm_id), "note_type": "common", "params": {"text": self.note_text(i)},
                    "request_id": i.key} for i in items]
        try:
            r = self._call("POST", "/api/v4/contacts/notes", json=payload, idempotent=False)
        except VendorRejected as exc:
            raise _with_bad_keys(exc, items) from None
        notes = ((r.json() or {}).get("_embedded") or {}).get("notes") or []
        return _by_request_id(notes, items, ref=lambda n: str(n["id"]))

    def _consent_field_ref(self) -> dict[str, Any]:
        if self.consent_field_id is not None:
            return {"field_id": self.consent_field_id}
        cached = getattr(self, "_consent_ref", None)
        if cached:
            return cached
        ref: dict[str, Any] | None = None
        for fields, _more in self._pages("/api/v4/contacts/custom_fields", [("limit", 50), ("page", 1)], "custom_fields"):
            for f in fields:
                if self._is_consent_field({"field_id": f.get("id"), "field_code": f.get("code"), "field_name": f.get("name")}):
                    ref = {"field_id": f["id"]}
                    break
            if ref:
                break
        if ref is None and self.consent_field_code:
            ref = {"field_code": self.consent_field_code}
        if ref is None:
            raise VendorRejected(f"amoCRM '{self.source_name}': no contact custom field named "
                                 f"{self.consent_field_name!r}: set consent_field_id")
        object.__setattr__(self, "_consent_ref", ref)
        return ref

    def _apply_opt_outs(self, items: list[WriteBackItem]) -> dict[str, WriteBackResult]:
        ref = self._consent_field_ref()
        out: dict[str, WriteBackResult] = {}
        for batch in chunks(items, self.update_batch_size):
            payload = [{"id": int(i.crm_id), "custom_fields_values": [{**ref, "values": [{"value": self.opt_out_value}]}],
                        "request_id": i.key} for i in batch]
            try:
                r = self._call("PATCH", "/api/v4/contacts", json=payload, idempotent=True)
            except VendorRejected as exc:
                raise _with_bad_keys(exc, batch) from None
            contacts = ((r.json() or {}).get("_embedded") or {}).get("contacts") or []
            out.update(_by_request_id(contacts, batch, ref=lambda c: str(c["id"])))
        return out


def _problem(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.reason_phrase or ""
    if isinstance(body, dict):
        return " ".join(str(body[k]) for k in ("title", "detail") if body.get(k)) or r.reason_phrase or ""
    return r.reason_phrase or ""


def _multitext(cfs: list[dict], code: str, prefer: str) -> str | None:
    values = [v for cf in cfs if (cf.get("field_code") or "") == code for v in (cf.get("values") or []) if v.get("value")]
    for v in values:
        if (v.get("enum_code") or "") == prefer:
            return str(v["value"])
    return str(values[0]["value"]) if values else None


def _by_request_id(answers: list[dict], items: list[WriteBackItem], ref) -> dict[str, WriteBackResult]:
    by_key = {i.key: i for i in items}
    out: dict[str, WriteBackResult] = {}
    for pos, a in enumerate(answers):
        rid = str(a.get("request_id", ""))
        it = by_key.get(rid)
        if it is None and rid.isdigit() and int(rid) < len(items):
            it = items[int(rid)]
        if it is None and pos < len(items):
            it = items[pos]
        if it is not None:
            out[it.key] = WriteBackResult(it.key, True, ref(a))
    return out


def _with_bad_keys(exc: VendorRejected, items: list[WriteBackItem]) -> VendorRejected:
    """Name the items amoCRM's validation-errors point at (request_id is our key, or the index)."""
    bad: dict[str, str] = {}
    body = exc.body if isinstance(exc.body, dict) else {}
    keys = [i.key for i in items]
    for ve in body.get("validation-errors") or []:
        rid = str(ve.get("request_id", ""))
        key = rid if rid in keys else (keys[int(rid)] if rid.isdigit() and int(rid) < len(keys) else None)
        if key:
            errs = "; ".join(f"{e.get('code')} {e.get('path')}: {e.get('detail')}" for e in ve.get("errors") or [])
            bad[key] = f"rejected by amoCRM: {errs}"
    return VendorRejected(exc.message, exc.status, exc.body, bad)
