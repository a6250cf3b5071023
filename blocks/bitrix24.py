"""Bitrix24 (REST, inbound webhook) as a ``CrmSource`` with write-back.

    POST https://{portal}.bitrix24.ru/rest/{user}/{secret}/{method}     form-encoded, PHP-style keys
    crm.contact.list  select[]=ID,NAME,LAST_NAME,PHONE,EMAIL,DATE_MODIFY,UF_CRM_...  filter[>=DATE_MODIFY]=..
                      order[DATE_MODIFY]=ASC&order[ID]=ASC&start=0
        -> {"result": [...50 at most], "next": 50, "total": N, "time": {...}}   (no "next" on the last page)
        PHONE/EMAIL are lists [{"ID", "VALUE_TYPE": "MOBILE"|"WORK"|..., "VALUE", "TYPE_ID"}]
    batch   halt=0&cmd[k]=method?urlencoded-params  (at most 50 commands, one request against the limit)
        -> {"result": {"result": {k: ..}, "result_error": {k: {"error", "error_description"}},
                       "result_total": {..}, "result_next": {..}, "result_time": {..}}, "time": {..}}
        (an empty map is sent as [])
    crm.timeline.comment.list  filter[ENTITY_ID]=..&filter[ENTITY_TYPE]=contact  (paged by start, 50)
    crm.timeline.comment.add   fields[ENTITY_ID], fields[ENTITY_TYPE]=contact, fields[COMMENT]  -> comment id
    crm.deal.list     select[]=ID,CONTACT_ID,OPPORTUNITY,CURRENCY_ID,STAGE_ID,STAGE_SEMANTIC_ID,CLOSED,CLOSEDATE,..
                      filter/order/start as crm.contact.list (50 per page); STAGE_SEMANTIC_ID P|S|F
                      (in progress, success, failure); CONTACT_ID is the primary contact
    crm.contact.update         id, fields[UF_CRM_...]=0, params[REGISTER_SONET_EVENT]=N       -> true
    crm.deal.get / crm.lead.get / crm.contact.get   id -> {"result": {...}}; a deal's CONTACT_ID is its
        primary contact; a lead has CONTACT_ID and its own PHONE; an unknown id is
        400 {"error": "", "error_description": "Not found"}
    errors: {"error": CODE, "error_description": text}
        503 QUERY_LIMIT_EXCEEDED (leaky bucket: 2 requests/s drained, 50 banked; Enterprise 5/250)
        OPERATION_TIME_LIMIT (a method used more than 480 s of server time in 10 minutes)
        401 INVALID_CREDENTIALS (webhook deleted, secret regenerated, wrong URL), expired_token,
        403 insufficient_scope / ACCESS_DENIED / OVERLOAD_LIMIT (REST blocked for overload)

The extract keysets on (DATE_MODIFY, ID): after each page (``pages_per_query``) it re-queries
``>=DATE_MODIFY`` from the last seen time, skipping the ids already seen at that second;
when a whole page shares one second it walks that second with ``>ID``.

The webhook URL carries the secret in its path: it is a SecretStr, never logged, never put
in an error message, and a filter on the ``httpx`` logger masks it in httpx's request lines.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any, ClassVar
from urllib.parse import urlencode

import httpx
from pydantic import Field, SecretStr

from blocks.crm import CrmSourceError
from blocks.crm_writeback import (
    VendorRejected,
    WriteBackItem,
    WriteBackResult,
    WriteBackTransient,
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

RATE_ERRORS = {"QUERY_LIMIT_EXCEEDED", "OPERATION_TIME_LIMIT"}
AUTH_ERRORS = {"INVALID_CREDENTIALS", "expired_token", "invalid_token", "NO_AUTH_FOUND", "WRONG_AUTH_TYPE",
               "INVALID_TOKEN", "authorization_error"}
FORBIDDEN_ERRORS = {"insufficient_scope", "ACCESS_DENIED", "OVERLOAD_LIMIT", "METHOD_NOT_ALLOWED", "PAYMENT_REQUIRED",
                    "ERROR_METHOD_NOT_FOUND"}
TRANSIENT_ERRORS = RATE_ERRORS | {"INTERNAL_SERVER_ERROR", "ERROR_UNEXPECTED_ANSWER"}
NOT_FOUND_ERRORS = {"NOT_FOUND", "ERROR_NOT_FOUND"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
PAGE = 50  # fixed by Bitrix24

_WEBHOOK_PATH = re.compile(r"(/rest/\d+/)[^/\s\"']+")


class _RedactWebhook(logging.Filter):
    """httpx logs every request URL at INFO: mask the webhook secret in it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(_WEBHOOK_PATH.sub(r"\1***", str(a)) if isinstance(a, (str, httpx.URL)) else a
                                for a in record.args)
        if isinstance(record.msg, str):
            record.msg = _WEBHOOK_PATH.sub(r"\1***", record.msg)
        return True


def _install_redaction() -> None:
    lg = logging.getLogger("httpx")
    if not any(isinstance(f, _RedactWebhook) for f in lg.filters):
        lg.addFilter(_RedactWebhook())


_install_redaction()


def php_pairs(params: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """{'filter': {'>=DATE_MODIFY': x}, 'select': ['ID']} -> [('filter[>=DATE_MODIFY]', x), ('select[0]', 'ID')]
    (PHP http_build_query style, which Bitrix24 reads)."""
    out: list[tuple[str, str]] = []
    for k, v in params.items():
        name = f"{prefix}[{k}]" if prefix else str(k)
        if isinstance(v, dict):
            out.extend(php_pairs(v, name))
        elif isinstance(v, (list, tuple)):
            out.extend(php_pairs({str(i): x for i, x in enumerate(v)}, name))
        elif isinstance(v, bool):
            out.append((name, "Y" if v else "N"))
        elif v is None:
            out.append((name, ""))
        else:
            out.append((name, str(v)))
    return out


def php_query(params: dict[str, Any]) -> str:
    return urlencode(php_pairs(params))


def _as_map(value: Any) -> dict:
    """Bitrix24 sends an empty map as []."""
    if isinstance(value, dict):
        return value
    if isinstance(value, list):
        return {str(i): v for i, v in enumerate(value)}
    return {}


class Bitrix24Crm(RestCrmSource):
    """Bitrix24 CRM contacts through an inbound webhook; timeline comments and opt-outs written back."""

    _block_type_name = "Bitrix24 CRM"
    _vendor: ClassVar[str] = "Bitrix24"
    note_batch_limit: ClassVar[int] = 50

    webhook_url: SecretStr = Field(description="Inbound webhook: https://{portal}.bitrix24.ru/rest/{user}/{secret}/ (crm scope).")
    rate_per_second: float = Field(default=2, gt=0, description="Bitrix24 drains 2 requests/s (Enterprise: 5).")
    consent_field: str = Field(default="UF_CRM_SMS_CONSENT", description="User field (UF_CRM_...) holding SMS consent.")
    opt_out_value: str = Field(default="0", description="Value written to the consent field on an opt-out.")
    extra_fields: list[str] = Field(default_factory=list, description="More contact fields to select (become attributes).")
    batch_commands: int = Field(default=50, ge=1, le=50, description="Commands per batch request (Bitrix24 maximum: 50).")
    max_comment_pages: int = Field(default=20, ge=1, description="Pages of 50 timeline comments read per contact for markers.")
    deals: bool = Field(default=True, description="Read deals as orders for conversions: OPPORTUNITY, won "
                        "(STAGE_SEMANTIC_ID S) is a sale, failed (F) is not.")

    # ------------------------------------------------------------------ plumbing
    def _base_url(self) -> str:
        url = self.webhook_url.get_secret_value().strip()
        if not url.startswith(("https://", "http://")) or "/rest/" not in url:
            raise CrmSourceError(f"Bitrix24 '{self.source_name}': webhook_url must look like "
                                 f"https://PORTAL.bitrix24.ru/rest/USER/SECRET/")
        return url.rstrip("/") + "/"

    def _headers(self) -> dict[str, str]:
        return {"Accept": "application/json"}

    def _rate(self) -> float:
        return self.rate_per_second

    def _note_batch_size(self) -> int:
        return self.batch_commands

    def _classify(self, r: httpx.Response) -> Verdict:
        s = r.status_code
        try:
            body = r.json()
        except ValueError:
            body = None
        err = body.get("error") if isinstance(body, dict) else None
        if s == 200 and not err:
            return Verdict("ok")
        desc = str(body.get("error_description") or "") if isinstance(body, dict) else ""
        code = str(err or s)
        who = f"Bitrix24 '{self.source_name}'"
        if code in RATE_ERRORS or s == 429:
            return Verdict("rate", f"{who}: {s} {code}: {desc}", retry_after_seconds(r.headers.get("Retry-After")))
        if s == 401 or code in AUTH_ERRORS:
            return Verdict("auth", f"{who}: the webhook was rejected ({code}: {desc}); it may have been deleted or its "
                                   f"secret regenerated: save the current webhook URL in the block")
        if s == 403 or code in FORBIDDEN_ERRORS:
            return Verdict("auth", f"{who}: access refused ({code}: {desc}); the webhook needs the crm scope")
        if s >= 500 or code in TRANSIENT_ERRORS:
            return Verdict("server", f"{who}: {s} {code}: {desc}")
        return Verdict("client", f"{who}: {s} {code}: {desc}")

    def _method(self, method: str, params: dict[str, Any], *, idempotent: bool = True) -> dict:
        r = self._call("POST", method, content=php_query(params), headers=FORM, idempotent=idempotent)
        return r.json()

    # ------------------------------------------------------------------ extract
    def _select(self) -> list[str]:
        base = ["ID", "NAME", "LAST_NAME", "PHONE", "EMAIL", "DATE_MODIFY", self.consent_field]
        return base + [f for f in self.extra_fields if f not in base]

    def _rows(self, since: str | None):
        return self._walk("crm.contact.list", self._select(), since, lambda page: map(self._row, page))

    def _walk(self, method: str, select: list[str], since: str | None, rows):
        """Contacts (``crm.contact.list``) or deals (``crm.deal.list``) with DATE_MODIFY >= ``since``, in
        (DATE_MODIFY, ID) order, paged by ``start``; entities sharing one second walked by ``>ID`` (``_scan``)."""
        start = parse_since(since)
        anchor = None if start is None else int(start.timestamp())

        def query(a: int | None):
            flt = {} if a is None else {">=DATE_MODIFY": _bx_time(a)}
            pos = 0
            while True:
                body = self._method(method, {"select": select, "filter": flt,
                                             "order": {"DATE_MODIFY": "ASC", "ID": "ASC"}, "start": pos})
                page = body.get("result") or []
                nxt = body.get("next")
                yield page, nxt is not None
                if nxt is None:
                    return
                pos = int(nxt)

        def tie(t: int):
            last = 0
            while True:
                body = self._method(method, {
                    "select": select, "order": {"ID": "ASC"}, "start": 0,
                    "filter": {">=DATE_MODIFY": _bx_time(t), "<=DATE_MODIFY": _bx_time(t), ">ID": last}})
                page = body.get("result") or []
                yield page
                if body.get("next") is None or not page:
                    return
                last = max(int(c["ID"]) for c in page)

        return self._scan(query, tie, since=anchor, ts=lambda c: _epoch(c.get("DATE_MODIFY")), ident=lambda c: str(c["ID"]),
                          rows=rows)

    # ------------------------------------------------------------------ deals as orders
    @property
    def has_orders(self) -> bool:
        return self.deals

    def fetch_orders(self, since: str | None = None, batch_size: int = 50_000):
        """Deals changed since ``since``: ``crm.deal.list`` with ``filter[>=DATE_MODIFY]``, ordered by
        (DATE_MODIFY, ID), walked like the contacts. The order's contact is the deal's ``CONTACT_ID`` (its
        primary contact); the amount ``OPPORTUNITY`` in ``CURRENCY_ID``; the status by ``STAGE_SEMANTIC_ID``:
        S (success) is ``won``, F (failure) ``lost``, else ``open-<STAGE_ID>``; its time ``CLOSEDATE`` when
        closed, else ``DATE_CREATE``. A won deal moved back to a failed stage is re-read and stops counting."""
        if not self.deals:
            return None
        select = ["ID", "CONTACT_ID", "OPPORTUNITY", "CURRENCY_ID", "STAGE_ID", "STAGE_SEMANTIC_ID", "CLOSED",
                  "CLOSEDATE", "DATE_CREATE", "DATE_MODIFY"]
        return frames(self._walk("crm.deal.list", select, since, lambda page: [self._deal(d) for d in page]), batch_size)

    def _deal(self, d: dict) -> dict:
        semantic = str(d.get("STAGE_SEMANTIC_ID") or "").upper()
        stage = str(d.get("STAGE_ID") or "")
        if semantic == "S" or stage.rsplit(":", 1)[-1] == "WON":
            status = "won"
        elif semantic == "F" or stage.rsplit(":", 1)[-1] == "LOSE":
            status = "lost"
        else:
            status = f"open-{stage or 'NEW'}"
        closed = truthy(d.get("CLOSED")) and d.get("CLOSEDATE")
        at = (d.get("CLOSEDATE") if closed else None) or d.get("DATE_CREATE") or d.get("DATE_MODIFY")

        def stamp(v) -> str:
            return iso_utc(datetime.fromtimestamp(_epoch(v), timezone.utc))

        return {"order_id": str(d["ID"]), "contact_id": str(d["CONTACT_ID"]) if _id(d.get("CONTACT_ID")) else None,
                "amount": d.get("OPPORTUNITY"), "currency": d.get("CURRENCY_ID") or None, "status": status,
                "ordered_at": stamp(at), "updated_at": stamp(d.get("DATE_MODIFY") or at)}

    def _row(self, c: dict) -> dict:
        row = {
            "id": str(c["ID"]),
            "first_name": c.get("NAME") or None,
            "last_name": c.get("LAST_NAME") or None,
            "phone": _multi(c.get("PHONE"), "MOBILE"),
            "email": _multi(c.get("EMAIL"), "WORK"),
            "language": None,
            "timezone": None,
            "sms_consent": truthy(c.get(self.consent_field)),
            "consent_at": None,
            "updated_at": iso_utc(datetime.fromtimestamp(_epoch(c.get("DATE_MODIFY")), timezone.utc)),
        }
        for f in self.extra_fields:
            if f in c and f not in ("PHONE", "EMAIL"):
                row[f.lower()] = c.get(f)
        return row

    # ------------------------------------------------------------------ webhook events
    def _get(self, method: str, entity_id: str) -> Any:
        """``crm.deal.get`` / ``crm.lead.get`` / ``crm.contact.get`` with ``id``; None when Bitrix24
        answers 400 {"error": "", "error_description": "Not found"} (or NOT_FOUND): no such entity."""
        try:
            return self._method(method, {"id": entity_id}).get("result")
        except VendorRejected as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            if body.get("error") in NOT_FOUND_ERRORS or str(body.get("error_description") or "").strip().lower() == "not found":
                return None
            raise

    def _customer_of(self, kind: str, entity_id: str) -> dict | None:
        """Bitrix24 webhooks (``ONCRMDEALUPDATE`` ...) send only ``data[FIELDS][ID]``.
        A deal: ``crm.deal.get`` -> ``CONTACT_ID``, its primary contact (the IS_PRIMARY=Y one of
        ``crm.deal.contact.items.get``; empty without contacts). A lead: ``crm.lead.get`` ->
        ``CONTACT_ID``, else the lead's own PHONE (crm_id None). A contact: itself. Then
        ``crm.contact.get`` -> PHONE (MOBILE preferred, as in the extract); crm_id is its ID."""
        phone = None
        contact_id: Any = entity_id
        if kind == "deal":
            deal = self._get("crm.deal.get", entity_id)
            if not isinstance(deal, dict):
                return None
            contact_id = deal.get("CONTACT_ID")
        elif kind == "lead":
            lead = self._get("crm.lead.get", entity_id)
            if not isinstance(lead, dict):
                return None
            contact_id, phone = lead.get("CONTACT_ID"), _multi(lead.get("PHONE"), "MOBILE")
        if not _id(contact_id):
            return {"crm_id": None, "phone": phone, "language": None} if phone else None
        contact = self._get("crm.contact.get", str(contact_id))
        if not isinstance(contact, dict):
            return {"crm_id": None, "phone": phone, "language": None} if phone else None
        return {"crm_id": str(contact["ID"]), "phone": _multi(contact.get("PHONE"), "MOBILE") or phone, "language": None}

    # ------------------------------------------------------------------ write-back
    def _batch(self, cmds: dict[str, tuple[str, dict]], *, idempotent: bool) -> tuple[dict, dict, dict]:
        pairs = [("halt", "0")] + [(f"cmd[{k}]", f"{m}?{php_query(p)}") for k, (m, p) in cmds.items()]
        r = self._call("POST", "batch", content=urlencode(pairs), headers=FORM, idempotent=idempotent)
        res = _as_map((r.json() or {}).get("result"))
        return _as_map(res.get("result")), _as_map(res.get("result_error")), _as_map(res.get("result_next"))

    def _existing_notes(self, items: list[WriteBackItem]) -> dict[str, str]:
        wanted: dict[str, set[str]] = defaultdict(set)
        for it in items:
            wanted[it.crm_id].add(it.key)
        found: dict[str, str] = {}
        for ids in chunks(sorted(wanted, key=int), self.batch_commands):
            pending = {f"c{n}": (cid, 0) for n, cid in enumerate(ids)}
            for _ in range(self.max_comment_pages):
                if not pending:
                    break
                cmds = {k: ("crm.timeline.comment.list", {
                    "filter": {"ENTITY_ID": cid, "ENTITY_TYPE": "contact"}, "select": ["ID", "COMMENT"], "start": pos})
                    for k, (cid, pos) in pending.items()}
                results, errors, nexts = self._batch(cmds, idempotent=True)
                for k, e in errors.items():
                    if (e or {}).get("error") in TRANSIENT_ERRORS:
                        raise WriteBackTransient(f"Bitrix24 '{self.source_name}': {e.get('error')}: {e.get('error_description')}")
                for k, (cid, _pos) in pending.items():
                    for com in results.get(k) or []:
                        for key in keys_in(com.get("COMMENT")) & wanted[cid]:
                            found.setdefault(key, str(com.get("ID")))
                pending = {k: (cid, int(nexts[k])) for k, (cid, _p) in pending.items() if nexts.get(k) not in (None, "")}
        return found

    def _results(self, cmds: dict[str, tuple[str, dict]], keys: dict[str, WriteBackItem], *, idempotent: bool,
                 ref) -> dict[str, WriteBackResult]:
        results, errors, _ = self._batch(cmds, idempotent=idempotent)
        out: dict[str, WriteBackResult] = {}
        for k, it in keys.items():
            if k in errors:
                e = errors[k] or {}
                code = e.get("error") or "error"
                out[it.key] = WriteBackResult(it.key, False, None, f"Bitrix24: {code}: {e.get('error_description', '')}",
                                              transient=code in TRANSIENT_ERRORS)
            elif k in results and results[k] not in (None, False):
                out[it.key] = WriteBackResult(it.key, True, ref(it, results[k]))
        return out

    def _create_notes(self, items: list[WriteBackItem]) -> dict[str, WriteBackResult]:
        keys = {f"n{n}": it for n, it in enumerate(items)}
        cmds = {k: ("crm.timeline.comment.add", {"fields": {"ENTITY_ID": it.crm_id, "ENTITY_TYPE": "contact",
                                                            "COMMENT": self.note_text(it)}}) for k, it in keys.items()}
        return self._results(cmds, keys, idempotent=False, ref=lambda it, v: str(v))

    def _apply_opt_outs(self, items: list[WriteBackItem]) -> dict[str, WriteBackResult]:
        out: dict[str, WriteBackResult] = {}
        for batch in chunks(items, self.batch_commands):
            keys = {f"u{n}": it for n, it in enumerate(batch)}
            cmds = {k: ("crm.contact.update", {"id": it.crm_id, "fields": {self.consent_field: self.opt_out_value},
                                               "params": {"REGISTER_SONET_EVENT": "N"}}) for k, it in keys.items()}
            out.update(self._results(cmds, keys, idempotent=True, ref=lambda it, v: it.crm_id))
        return out


def _bx_time(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+00:00")


def _epoch(value: Any) -> int:
    if not value:
        return 0
    try:
        dt = datetime.fromisoformat(str(value))
        return int((dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp())
    except ValueError:
        ts = parse_since(str(value))
        return int(ts.timestamp()) if ts else 0


def _id(value: Any) -> bool:
    """A real entity id (Bitrix24 sends null, "" or "0" for no link)."""
    return str(value or "").strip().isdigit() and int(str(value).strip()) > 0


def _multi(values: Any, prefer: str) -> str | None:
    vals = [v for v in (values or []) if isinstance(v, dict) and v.get("VALUE")]
    for v in vals:
        if (v.get("VALUE_TYPE") or "") == prefer:
            return str(v["VALUE"])
    return str(vals[0]["VALUE"]) if vals else None
