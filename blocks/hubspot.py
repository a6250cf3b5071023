"""HubSpot (CRM v3 objects, v4 associations) as a ``CrmSource`` with write-back.

    Authorization: Bearer <private app token>        https://api.hubapi.com
    POST /crm/v3/objects/contacts/search
         {"filterGroups": [{"filters": [{"propertyName": "lastmodifieddate", "operator": "GTE", "value": "<ms>"}]}],
          "sorts": [{"propertyName": "lastmodifieddate", "direction": "ASCENDING"}],
          "properties": [...], "limit": 100 (max 200), "after": "<paging.next.after>"}
         -> {"total": N, "results": [{"id", "properties": {..}, "createdAt", "updatedAt", "archived"}],
             "paging": {"next": {"after": "100"}}}          (no paging on the last page)
         A query returns at most 10,000 results: paging past them is a 400. Search requests are
         limited to 5/s per account on top of the app's 100 requests / 10 s (Free/Starter).
    POST /crm/v3/objects/notes/batch/create   {"inputs": [{"properties": {"hs_timestamp", "hs_note_body"},
         "associations": [{"to": {"id"}, "types": [{"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 202}]}]}]}
         (<= 100 inputs; 202 = note -> contact; results are not in input order)
    POST /crm/v3/objects/contacts/batch/update {"inputs": [{"id", "properties": {"sms_opt_out": "true"}}]}  (<= 100)
    POST /crm/v4/associations/contacts/notes/batch/read {"inputs": [{"id", "after"?}]}  -> note ids per contact
    POST /crm/v3/objects/notes/batch/read {"properties": ["hs_note_body"], "inputs": [{"id"}]}   (<= 100)
    POST /crm/v3/objects/deals/search    as the contacts' search, on hs_lastmodifieddate; properties amount,
         deal_currency_code, dealstage, closedate, createdate, hs_is_closed_won, hs_is_closed
    POST /crm/v4/associations/deals/contacts/batch/read {"inputs": [{"id"}]} (<= 1,000)
         -> {"results": [{"from": {"id"}, "to": [{"toObjectId", "associationTypes"}]}]}; deals without
         contacts come back in "errors" (207 Multi-Status)
    GET  /crm/v4/objects/deals/{dealId}/associations/contacts?limit=500
         -> {"results": [{"toObjectId", "associationTypes": [{"category", "typeId": 3, "label"}]}], "paging"?}
    GET  /crm/v3/objects/contacts/{contactId}?properties=phone,mobilephone,hs_language
         -> {"id", "properties": {..}, ...}; 404 {"status": "error", "category": "OBJECT_NOT_FOUND", ...}
    errors: {"status": "error", "message", "correlationId", "category"}; 429 adds "errorType": "RATE_LIMIT"
         and "policyName" (TEN_SECONDLY_ROLLING, SECONDLY, DAILY); 207 Multi-Status carries "errors".

Existing notes are read through the associations and batch read, not the notes search: the
search index lags writes by seconds, exactly the crash window the markers must close.

The 10,000 cap: the extract re-queries from the last seen ``lastmodifieddate`` (skipping the
ids already seen at that millisecond) before ``after`` would pass the cap, and after every
``pages_per_query`` pages anyway; a query whose results all share one millisecond is walked
by ``hs_object_id``.
"""
from __future__ import annotations

import html
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any, ClassVar

import httpx
from pydantic import Field, SecretStr

from blocks.crm_writeback import (
    VendorRejected,
    WriteBackItem,
    WriteBackResult,
    chunks,
    keys_in,
    marker,
)
from blocks.rest_crm import (
    RestCrmSource,
    RestCaller,
    Verdict,
    frames,
    iso_utc,
    ms_epoch,
    parse_since,
)
from smsflow.ratelimit import retry_after_seconds
from smsflow.values import truthy
from smsflow.ratelimit import TokenBucket

NOTE_TO_CONTACT = 202


class HubSpotCrm(RestCrmSource):
    """HubSpot contacts by lastmodifieddate; notes (associated to the contact) and opt-outs written back."""

    _block_type_name = "HubSpot CRM"
    _vendor: ClassVar[str] = "HubSpot"
    note_batch_limit: ClassVar[int] = 100

    base_url: str = Field(default="https://api.hubapi.com")
    access_token: SecretStr = Field(description="Private app access token (sent as Authorization: Bearer).")
    requests_per_10s: int = Field(default=100, ge=1, description="The app's burst limit (Free/Starter 100 per 10 s).")
    search_rate_per_second: float = Field(default=4, gt=0, description="Search requests per second (HubSpot: 5 per account).")
    page_size: int = Field(default=100, ge=1, le=200, description="Search results per page (HubSpot maximum: 200).")
    search_cap: int = Field(default=10_000, ge=1, description="Results one search query can page through (HubSpot: 10,000).")
    consent_property: str = Field(default="sms_consent", description="Contact property holding SMS consent.")
    consent_at_property: str | None = Field(default=None, description="Contact property with the consent time, if any.")
    opt_out_property: str = Field(default="sms_opt_out", description="Contact property set on an opt-out.")
    opt_out_value: str = Field(default="true")
    extra_properties: list[str] = Field(default_factory=list, description="More properties to read (become attributes).")
    note_batch_size: int = Field(default=100, ge=1, le=100)
    update_batch_size: int = Field(default=100, ge=1, le=100)
    max_notes_per_contact: int = Field(default=500, ge=1, description="Newest notes of a contact read back for markers.")
    deals: bool = Field(default=True, description="Read deals as orders for conversions: amount, closed won is a sale "
                        "(needs the crm.objects.deals.read scope).")

    # ------------------------------------------------------------------ plumbing
    def _base_url(self) -> str:
        return self.base_url.rstrip("/")

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token.get_secret_value()}", "Accept": "application/json"}

    def _rate(self) -> float:
        return max(1, self.requests_per_10s - 1) / 10.0  # one token is banked: stay one under the window

    def _note_batch_size(self) -> int:
        return self.note_batch_size

    def _on_session_open(self, call: RestCaller) -> None:
        call.search_bucket = TokenBucket(self.search_rate_per_second, capacity=1)

    def _classify(self, r: httpx.Response) -> Verdict:
        s = r.status_code
        if s in (200, 201, 204, 207):
            return Verdict("ok")
        try:
            body = r.json()
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        category = body.get("category") or body.get("errorType") or ""
        msg = str(body.get("message") or r.reason_phrase or "")
        who = f"HubSpot '{self.source_name}'"
        if s == 401:
            return Verdict("auth", f"{who}: the access token was rejected (401 {category}); create or rotate the private "
                                   f"app token and save it in the block")
        if s == 403:
            return Verdict("auth", f"{who}: access refused (403 {category}: {msg}); the private app needs the "
                                   f"crm.objects.contacts.read/write scopes (and crm.objects.deals.read for deals)")
        if s == 429:
            policy = body.get("policyName") or ""
            if policy == "DAILY":
                return Verdict("auth", f"{who}: the daily API limit is used up (429 DAILY); try again tomorrow")
            return Verdict("rate", f"{who}: 429 {policy or 'RATE_LIMIT'}: {msg}", retry_after_seconds(r.headers.get("Retry-After")))
        if s >= 500:
            return Verdict("server", f"{who}: {s} {category}: {msg}")
        return Verdict("client", f"{who}: {s} {category}: {msg}")

    def _search(self, body: dict, objects: str = "contacts") -> dict:
        r = self._call("POST", f"/crm/v3/objects/{objects}/search", json=body, buckets=[self._call.search_bucket])
        return r.json()

    # ------------------------------------------------------------------ extract
    def _properties(self) -> list[str]:
        props = ["firstname", "lastname", "phone", "mobilephone", "email", "hs_language", "hs_timezone",
                 "lastmodifieddate", self.consent_property, self.opt_out_property]
        if self.consent_at_property:
            props.append(self.consent_at_property)
        return props + [p for p in self.extra_properties if p not in props]

    def _rows(self, since: str | None):
        return self._walk("contacts", "lastmodifieddate", self._properties(), since, lambda page: map(self._row, page))

    def _walk(self, objects: str, modified: str, props: list[str], since: str | None, rows):
        """Contacts (``lastmodifieddate``) or deals (``hs_lastmodifieddate``) modified at or after ``since``, through
        the search API sorted by that property; re-anchored before the 10,000 cap; a millisecond shared by a whole
        query walked by ``hs_object_id`` (``_scan``). ``rows(page)`` maps each page."""
        start = parse_since(since)
        anchor = None if start is None else ms_epoch(start)
        sort_by_time = [{"propertyName": modified, "direction": "ASCENDING"}]

        def query(a: int | None):
            body: dict[str, Any] = {
                "filterGroups": [] if a is None else
                [{"filters": [{"propertyName": modified, "operator": "GTE", "value": str(a)}]}],
                "sorts": sort_by_time, "properties": props, "limit": self.page_size}
            after = None
            while True:
                try:
                    data = self._search(body if after is None else {**body, "after": after}, objects)
                except VendorRejected as exc:
                    if after is not None and exc.status == 400:  # paged past the search cap: re-anchor
                        yield [], True
                        return
                    raise
                page = data.get("results") or []
                after = ((data.get("paging") or {}).get("next") or {}).get("after")
                if after is None:
                    yield page, False
                    return
                yield page, True
                if _int(after) is not None and _int(after) + self.page_size > self.search_cap:
                    return  # the next page would pass the cap: the scan re-anchors

        def tie(t: int):
            last: str | None = None
            while True:
                filters = [{"propertyName": modified, "operator": "EQ", "value": str(t)}]
                if last is not None:
                    filters.append({"propertyName": "hs_object_id", "operator": "GT", "value": last})
                data = self._search({"filterGroups": [{"filters": filters}], "properties": props, "limit": self.page_size,
                                     "sorts": [{"propertyName": "hs_object_id", "direction": "ASCENDING"}]}, objects)
                page = data.get("results") or []
                yield page
                if not page or not (data.get("paging") or {}).get("next"):
                    return
                last = max((str(c["id"]) for c in page), key=int)

        return self._scan(query, tie, since=anchor, ts=lambda o: _modified_ms(o, modified), ident=lambda c: str(c["id"]),
                          rows=rows)

    # ------------------------------------------------------------------ deals as orders
    @property
    def has_orders(self) -> bool:
        return self.deals

    def fetch_orders(self, since: str | None = None, batch_size: int = 50_000):
        """Deals modified since ``since`` (``POST /crm/v3/objects/deals/search`` on ``hs_lastmodifieddate``, walked
        like the contacts), each page's contacts from ``POST /crm/v4/associations/deals/contacts/batch/read``
        (deals have no primary contact: the lowest id). Amount ``amount`` in ``deal_currency_code``; status
        ``won`` when ``hs_is_closed_won``, ``lost`` when closed otherwise, else ``open-<dealstage>``; its time
        ``closedate`` when closed, else ``createdate``."""
        if not self.deals:
            return None
        props = ["amount", "deal_currency_code", "dealstage", "closedate", "createdate", "hs_lastmodifieddate",
                 "hs_is_closed_won", "hs_is_closed"]

        def rows(page: list[dict]) -> list[dict]:
            contacts = self._deal_contacts([str(d["id"]) for d in page])
            return [self._deal(d, contacts.get(str(d["id"]))) for d in page]

        return frames(self._walk("deals", "hs_lastmodifieddate", props, since, rows), batch_size)

    def _deal_contacts(self, deal_ids: list[str]) -> dict[str, str]:
        """deal id -> its contact (the lowest associated id); deals without contacts come back as errors (207)."""
        out: dict[str, str] = {}
        for part in chunks(deal_ids, 1000):
            r = self._call("POST", "/crm/v4/associations/deals/contacts/batch/read",
                           json={"inputs": [{"id": d} for d in part]})
            for res in (r.json() or {}).get("results") or []:
                ids = [int(t["toObjectId"]) for t in res.get("to") or [] if str(t.get("toObjectId") or "").isdigit()]
                if ids:
                    out[str((res.get("from") or {}).get("id"))] = str(min(ids))
        return out

    def _deal(self, d: dict, contact_id: str | None) -> dict:
        p = d.get("properties") or {}
        closed = truthy(p.get("hs_is_closed"))
        if truthy(p.get("hs_is_closed_won")):
            status = "won"
        elif closed:
            status = "lost"
        else:
            status = f"open-{p.get('dealstage') or 'none'}"
        at = (p.get("closedate") if closed else None) or p.get("createdate") or d.get("createdAt")

        def stamp(v) -> str | None:
            t = parse_since(str(v)) if v else None
            return iso_utc(t) if t else None

        return {"order_id": str(d["id"]), "contact_id": contact_id, "amount": p.get("amount"),
                "currency": p.get("deal_currency_code") or None, "status": status, "ordered_at": stamp(at),
                "updated_at": iso_utc(datetime.fromtimestamp(_modified_ms(d, "hs_lastmodifieddate") / 1000, timezone.utc))}

    def _row(self, c: dict) -> dict:
        p = c.get("properties") or {}
        row = {
            "id": str(c["id"]),
            "first_name": p.get("firstname") or None,
            "last_name": p.get("lastname") or None,
            "phone": p.get("mobilephone") or p.get("phone") or None,
            "email": p.get("email") or None,
            "language": p.get("hs_language") or None,
            "timezone": _timezone(p.get("hs_timezone")),
            "sms_consent": truthy(p.get(self.consent_property)) and not truthy(p.get(self.opt_out_property)),
            "consent_at": p.get(self.consent_at_property) if self.consent_at_property else None,
            "updated_at": iso_utc(datetime.fromtimestamp(_modified_ms(c) / 1000, timezone.utc)),
        }
        for prop in self.extra_properties:
            row[prop] = p.get(prop)
        return row

    # ------------------------------------------------------------------ webhook events
    def _customer_of(self, kind: str, entity_id: str) -> dict | None:
        """HubSpot webhooks carry the ``objectId`` of a deal (``deal.propertyChange``) or a contact.
        A deal: ``GET /crm/v4/objects/deals/{id}/associations/contacts`` and its first contact
        (deals have no primary contact label); then ``GET /crm/v3/objects/contacts/{id}`` with
        ``properties=phone,mobilephone,hs_language``. A 404 (no such object) is None, as is a deal
        without contacts. crm_id is the contact's id and the phone the mobile one first, as extracted."""
        if kind == "lead":
            return None  # HubSpot's lead object is not a contact source here
        contact_id = entity_id
        if kind == "deal":
            r = self._call("GET", f"/crm/v4/objects/deals/{entity_id}/associations/contacts", params={"limit": 500})
            linked = [str(a["toObjectId"]) for a in (r.json() or {}).get("results") or [] if a.get("toObjectId")]
            if not linked:
                return None
            contact_id = linked[0]
        r = self._call("GET", f"/crm/v3/objects/contacts/{contact_id}",
                       params={"properties": "phone,mobilephone,hs_language", "archived": "false"})
        c = r.json() or {}
        p = c.get("properties") or {}
        return {"crm_id": str(c.get("id") or contact_id), "phone": p.get("mobilephone") or p.get("phone") or None,
                "language": p.get("hs_language") or None}

    # ------------------------------------------------------------------ write-back
    def note_text(self, item: WriteBackItem) -> str:
        text = super().note_text(item).rsplit("\n", 1)[0]  # hs_note_body is HTML
        return f"<p>{html.escape(text)}</p><p>{marker(item.key)}</p>"

    def _existing_notes(self, items: list[WriteBackItem]) -> dict[str, str]:
        wanted: dict[str, set[str]] = defaultdict(set)
        for it in items:
            wanted[it.crm_id].add(it.key)
        notes_of: dict[str, list[str]] = defaultdict(list)
        for ids in chunks(sorted(wanted, key=int), 100):
            inputs: list[dict] = [{"id": cid} for cid in ids]
            while inputs:
                r = self._call("POST", "/crm/v4/associations/contacts/notes/batch/read", json={"inputs": inputs})
                follow = []
                for res in (r.json() or {}).get("results") or []:
                    cid = str((res.get("from") or {}).get("id"))
                    notes_of[cid].extend(str(t.get("toObjectId")) for t in res.get("to") or [])
                    after = ((res.get("paging") or {}).get("next") or {}).get("after")
                    if after and len(notes_of[cid]) < self.max_notes_per_contact:
                        follow.append({"id": cid, "after": after})
                inputs = follow  # contacts without notes come back as errors: nothing to read
        contacts_of: dict[str, set[str]] = defaultdict(set)
        for cid, nids in notes_of.items():
            for nid in sorted(set(nids), key=lambda x: int(x) if x.isdigit() else 0, reverse=True)[:self.max_notes_per_contact]:
                contacts_of[nid].add(cid)
        found: dict[str, str] = {}
        for part in chunks(sorted(contacts_of), 100):
            r = self._call("POST", "/crm/v3/objects/notes/batch/read",
                           json={"properties": ["hs_note_body"], "inputs": [{"id": n} for n in part]})
            for res in (r.json() or {}).get("results") or []:
                body = (res.get("properties") or {}).get("hs_note_body")
                for cid in contacts_of.get(str(res.get("id")), ()):
                    for k in keys_in(body) & wanted[cid]:
                        found.setdefault(k, str(res["id"]))
        return found

    def _create_notes(self, items: list[WriteBackItem]) -> dict[str, WriteBackResult]:
        now = iso_utc(datetime.now(timezone.utc))
        inputs = [{"properties": {"hs_timestamp": now, "hs_note_body": self.note_text(i)},
                   "associations": [{"to": {"id": i.crm_id}, "types": [
                       {"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": NOTE_TO_CONTACT}]}]} for i in items]
        r = self._call("POST", "/crm/v3/objects/notes/batch/create", json={"inputs": inputs}, idempotent=False)
        keys = {i.key for i in items}
        out: dict[str, WriteBackResult] = {}
        # results are not in input order: our marker names each one; 207 errors stay unknown and are re-checked
        for res in (r.json() or {}).get("results") or []:
            for k in keys_in((res.get("properties") or {}).get("hs_note_body")) & keys:
                out[k] = WriteBackResult(k, True, str(res["id"]))
        return out

    def _apply_opt_outs(self, items: list[WriteBackItem]) -> dict[str, WriteBackResult]:
        out: dict[str, WriteBackResult] = {}
        by_contact: dict[str, list[WriteBackItem]] = defaultdict(list)
        for it in items:
            by_contact[it.crm_id].append(it)
        for ids in chunks(list(by_contact), self.update_batch_size):
            r = self._call("POST", "/crm/v3/objects/contacts/batch/update", idempotent=True, json={
                "inputs": [{"id": cid, "properties": {self.opt_out_property: self.opt_out_value}} for cid in ids]})
            data = r.json() or {}
            done = {str(x.get("id")) for x in data.get("results") or []}
            failed: dict[str, str] = {}
            for e in data.get("errors") or []:
                for cid in (e.get("context") or {}).get("ids") or []:
                    failed[str(cid)] = f"HubSpot: {e.get('category', 'error')}: {e.get('message', '')}"
            for cid in ids:
                for it in by_contact[cid]:
                    if cid in done:
                        out[it.key] = WriteBackResult(it.key, True, cid)
                    elif cid in failed:
                        out[it.key] = WriteBackResult(it.key, False, None, failed[cid], transient=False)
        return out


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _modified_ms(c: dict, prop: str = "lastmodifieddate") -> int:
    v = (c.get("properties") or {}).get(prop) or c.get("updatedAt")
    if not v:
        return 0
    if str(v).isdigit():
        return int(v)
    ts = parse_since(str(v))
    return ms_epoch(ts) if ts else 0


def _timezone(value: str | None) -> str | None:
    """HubSpot's hs_timezone ('europe_slash_moscow') -> 'Europe/Moscow' (None when not an IANA zone)."""
    if not value:
        return None
    global _ZONES
    if _ZONES is None:
        import zoneinfo

        _ZONES = {z.lower(): z for z in zoneinfo.available_timezones()}
    return _ZONES.get(str(value).strip().lower().replace("_slash_", "/"))


_ZONES: dict[str, str] | None = None
