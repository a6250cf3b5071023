"""The REST plumbing the REST CRM blocks (amoCRM, Bitrix24, HubSpot) share.

``RestCaller``: a token bucket at the vendor's rate, then retries on the vendor's rate-limit answer
(honouring ``Retry-After`` when sent) and, for idempotent requests, on 5xx/transport errors;
401/403 become a ``CrmSourceError`` whose message never carries a secret. ``keyset_scan``:
incremental extraction that re-anchors on the last seen updated-at instead of paging deep, so
records that change while we page cannot shift others out of the pages we have not read yet.
``RestCrmSource``: a CRM source that also writes back (``blocks.crm_writeback``).
"""
from __future__ import annotations

import logging
import math
import re
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, ClassVar, Literal

import httpx
import pandas as pd
from pydantic import Field

from blocks.crm import CONTACT_COLUMNS, CrmSource, CrmSourceError
from blocks.crm_writeback import CrmWriteBack, VendorRejected, WriteBackTransient, WriteBackUncertain, _clean
from smsflow.ratelimit import TokenBucket

log = logging.getLogger("smsflow.crm")


def parse_since(since: str | None) -> datetime | None:
    if since is None or str(since).strip() == "":
        return None
    ts = pd.to_datetime(since, utc=True, format="mixed")
    return ts.to_pydatetime()


def iso_utc(dt: datetime) -> str:
    """2026-01-01T10:00:00Z (milliseconds only when there are any)."""
    dt = dt.astimezone(timezone.utc)
    if dt.microsecond:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Verdict:
    kind: Literal["ok", "rate", "auth", "server", "client"]
    message: str = ""
    wait: float | None = None


class RestCaller:
    """Send one request at the vendor's rate, retrying what the vendor says may be retried."""

    def __init__(self, client: httpx.Client, *, vendor: str, classify: Callable[[httpx.Response], Verdict],
                 bucket, max_retries: int, backoff_s: float, max_backoff_s: float, sleep: Callable[[float], None] = time.sleep):
        self.client = client
        self.vendor = vendor
        self.classify = classify
        self.bucket = bucket
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.sleep = sleep
        self.requests = 0
        self.throttled = 0

    def __call__(self, method: str, url: str, *, idempotent: bool = True, buckets: Sequence = (), **kw) -> httpx.Response:
        attempt = 0
        while True:
            for b in (self.bucket, *buckets):
                b.acquire()
            self.requests += 1
            try:
                r = self.client.request(method, url, **kw)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nothing reached the vendor
                verdict = Verdict("server", f"{self.vendor}: unreachable ({type(exc).__name__})")
            except httpx.TransportError as exc:  # sent, no answer: the vendor may have executed it
                if not idempotent:
                    raise WriteBackUncertain(f"{self.vendor}: no answer ({type(exc).__name__})") from None
                verdict = Verdict("server", f"{self.vendor}: no answer ({type(exc).__name__})")
            else:
                verdict = self.classify(r)
                if verdict.kind == "ok":
                    return r
                if verdict.kind == "auth":
                    raise CrmSourceError(_clean(verdict.message))
                if verdict.kind == "client":
                    raise VendorRejected(_clean(verdict.message), r.status_code, _json_or_none(r))
                if verdict.kind == "server" and not idempotent:
                    raise WriteBackUncertain(_clean(verdict.message))
            if attempt >= self.max_retries:
                raise WriteBackTransient(_clean(f"{verdict.message}; gave up after {attempt + 1} attempts"))
            if verdict.kind == "rate":
                self.throttled += 1
            # Retry-After first; if the vendor still refuses, back off exponentially (never less than it asked)
            backoff = self.backoff_s * (2 ** attempt)
            wait = backoff if verdict.wait is None else (verdict.wait if attempt == 0 else max(verdict.wait, backoff))
            wait = min(wait, max(self.max_backoff_s, verdict.wait or 0.0))
            log.warning("%s (attempt %d/%d), waiting %.2f s", _clean(verdict.message), attempt + 1, self.max_retries + 1, wait)
            self.sleep(wait)
            attempt += 1


def _json_or_none(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return None


def keyset_scan(
    query: Callable[[int | None], Iterator[tuple[list, bool]]],
    tie_scan: Callable[[int], Iterator[list]],
    bump: Callable[[int], int],
    *,
    since: int | None,
    pages_per_query: int,
    ts: Callable[[Any], int],
    ident: Callable[[Any], Any],
) -> Iterator[list]:
    """Every record with ``ts >= since``, ascending, page by page.

    ``query(anchor)`` yields ``(page, more)``: the records with ``ts >= anchor`` ascending,
    following the vendor's own next-page mechanism (it may stop by itself with ``more=True``,
    e.g. at a search cap). After ``pages_per_query`` pages the scan re-queries from the largest
    ``ts`` seen, skipping the records already yielded at that ``ts``. When a whole query's
    worth of records shares one ``ts``, ``tie_scan(ts)`` walks them (by id), and the scan
    continues from ``bump(ts)``, the first value after it.
    """
    anchor, seen = since, set()
    while True:
        rows: list = []
        more = False
        for n, (page, more) in enumerate(query(anchor), 1):
            fresh = [r for r in page if not (ts(r) == anchor and ident(r) in seen)]
            if fresh:
                yield fresh
            rows.extend(page)
            if not more or n >= pages_per_query:
                break
        if not more or not rows:
            return
        stamps = [ts(r) for r in rows]
        lo, hi = min(stamps), max(stamps)
        if anchor is not None and hi < anchor:
            raise CrmSourceError("the CRM returned records older than the requested updated-at filter")
        if lo == hi:
            done = {ident(r) for r in rows} | (seen if hi == anchor else set())
            for page in tie_scan(hi):
                fresh = [r for r in page if ident(r) not in done]
                done.update(ident(r) for r in fresh)
                if fresh:
                    yield fresh
            anchor, seen = bump(hi), set()
        else:
            anchor, seen = hi, {ident(r) for r in rows if ts(r) == hi}


def frames(rows: Iterable[dict], batch_size: int) -> Iterator[pd.DataFrame]:
    """Rows (dicts with our column names) -> DataFrames of about ``batch_size`` rows, object dtype."""
    buf: list[dict] = []
    for row in rows:
        buf.append(row)
        if len(buf) >= batch_size:
            yield _frame(buf)
            buf = []
    if buf:
        yield _frame(buf)


def _frame(rows: list[dict]) -> pd.DataFrame:
    cols = list(CONTACT_COLUMNS) + sorted({k for r in rows for k in r} - set(CONTACT_COLUMNS))
    return pd.DataFrame([[r.get(c) for c in cols] for r in rows], columns=cols, dtype=object)


_SESSIONS: dict[tuple[int, int], RestCaller] = {}


class RestCrmSource(CrmSource, CrmWriteBack):
    """What the REST CRM blocks share: an httpx session with a rate-limited, retrying caller."""

    timeout_s: float = Field(default=30.0, gt=0)
    max_retries: int = Field(default=8, ge=0, le=50, description="Retries of a rate-limited/failed request.")
    backoff_s: float = Field(default=1.0, ge=0, description="First wait when the vendor sends no Retry-After (doubles).")
    max_backoff_s: float = Field(default=60.0, ge=0)
    pages_per_query: int = Field(
        default=1, ge=1,
        description="Pages followed with the vendor's next-page link before re-querying from the last seen "
        "updated-at (1: re-query every page, so contacts edited while we page cannot shift others out).")
    opt_out_note: bool = Field(default=True, description="Also leave a note on the contact for an opt-out.")

    _vendor: ClassVar[str] = "CRM"

    # ---- vendor hooks
    @abstractmethod
    def _base_url(self) -> str: ...

    @abstractmethod
    def _headers(self) -> dict[str, str]: ...

    @abstractmethod
    def _classify(self, r: httpx.Response) -> Verdict: ...

    @abstractmethod
    def _rate(self) -> float: ...

    @abstractmethod
    def _rows(self, since: str | None) -> Iterator[dict]:
        """The contacts with updated-at >= ``since`` as rows of our columns (usually via ``_scan``)."""

    # ---- extract
    def fetch(self, since: str | None = None, batch_size: int = 50_000) -> Iterator[pd.DataFrame]:
        return frames(self._rows(since), batch_size)

    def _scan(self, query: Callable[[int | None], Iterator[tuple[list, bool]]], tie: Callable[[int], Iterator[list]], *,
              since: int | None, ts: Callable[[Any], int], ident: Callable[[Any], Any],
              rows: Callable[[list], Iterable[dict]]) -> Iterator[dict]:
        """``keyset_scan`` over the vendor's ``query``/``tie`` (integer timestamps, the next one is +1),
        inside a session, ``pages_per_query`` pages per query; ``rows(page)`` maps each page to our rows.
        Whatever the vendor still refuses after the retries becomes a ``CrmSourceError``."""
        try:
            with self._session():
                for page in keyset_scan(query, tie, lambda t: t + 1, since=since, pages_per_query=self.pages_per_query,
                                        ts=ts, ident=ident):
                    yield from rows(page)
        except (WriteBackTransient, WriteBackUncertain, VendorRejected) as exc:
            raise self._as_source_error(exc) from None

    # ---- session
    def with_transport(self, transport: httpx.BaseTransport):
        """Use a custom transport (httpx.MockTransport in offline tests)."""
        object.__setattr__(self, "_transport", transport)
        return self

    @property
    def _call(self) -> RestCaller:
        call = _SESSIONS.get((id(self), threading.get_ident()))
        if call is None:
            raise RuntimeError("no open session")
        return call

    @contextmanager
    def _session(self):
        key = (id(self), threading.get_ident())  # one session per block per thread; nothing kept on the model
        active = _SESSIONS.get(key)
        if active is not None:
            yield active
            return
        client = httpx.Client(base_url=self._base_url(), headers=self._headers(), timeout=self.timeout_s,
                              transport=getattr(self, "_transport", None))
        call = RestCaller(client, vendor=f"{self._vendor} '{self.source_name}'", classify=self._classify,
                          bucket=TokenBucket(self._rate(), capacity=1), max_retries=self.max_retries,
                          backoff_s=self.backoff_s, max_backoff_s=self.max_backoff_s)
        _SESSIONS[key] = call
        try:
            self._on_session_open(call)
            yield call
        finally:
            _SESSIONS.pop(key, None)
            client.close()
            log.info("%s '%s': %d request(s), %d throttled", self._vendor, self.source_name, call.requests, call.throttled)

    def _on_session_open(self, call: RestCaller) -> None:
        pass

    def _as_source_error(self, exc: Exception) -> CrmSourceError:
        return CrmSourceError(_clean(f"{self._vendor} '{self.source_name}': {exc}"))

    # ---- webhook events: whose deal is it?
    def event_customer(self, event_type: str, entity_id: str | None, payload: dict) -> dict | None:
        """The customer of a CRM webhook event that names only its deal/lead/contact.

        ``event_entity`` tells what the event is about; the vendor's ``_customer_of`` reads it
        through the rate-limited, retrying caller (429/Retry-After/QUERY_LIMIT_EXCEEDED apply).
        Returns ``{"crm_id", "phone", "language"}`` (crm_id as the extract keys contacts), or None
        when the entity is not one we can look up, does not exist (404, empty answer) or has no
        contact. A rejected token/webhook raises ``CrmSourceError`` (as the extract does), and so
        does a lookup that still fails after the retries: the event is not silently dropped.
        """
        kind = event_entity(event_type, payload)
        eid = str(entity_id if entity_id not in (None, "") else payload.get("objectId") or "").strip()
        if kind is None or not eid.isdigit() or int(eid) <= 0:
            return None
        try:
            with self._session():
                return self._customer_of(kind, eid)
        except VendorRejected as exc:
            if exc.status == 404:
                return None
            raise self._as_source_error(exc) from None
        except (WriteBackTransient, WriteBackUncertain) as exc:
            raise self._as_source_error(exc) from None

    def _customer_of(self, kind: str, entity_id: str) -> dict | None:
        """Vendor hook: the customer of a ``deal``/``lead``/``contact`` (inside a session)."""
        return None


# what a webhook event is about, by its type ("lead.status", "ONCRMDEALUPDATE", "deal.propertyChange")
# or its payload (amoCRM "entity": "leads", HubSpot "subscriptionType"/"objectTypeId" 0-1/0-3)
_ENTITY_WORDS = {"deal": "deal", "deals": "deal", "lead": "lead", "leads": "lead", "contact": "contact",
                 "contacts": "contact", "0-3": "deal", "0-1": "contact"}


def event_entity(event_type: str | None, payload: dict | None = None) -> str | None:
    """``'deal'``, ``'lead'`` or ``'contact'``: the kind of CRM entity a webhook event is about, or None.

    amoCRM sends ``lead.status``/``contact.add`` (and ``entity``: ``leads``/``contacts``), Bitrix24
    ``ONCRMDEALUPDATE``/``ONCRMLEADADD``/``ONCRMCONTACTUPDATE``, HubSpot ``deal.propertyChange``/
    ``contact.creation`` (``subscriptionType``, ``objectTypeId`` 0-3/0-1). Note that an amoCRM "lead"
    is a deal; each vendor maps the kinds to its own objects."""
    payload = payload or {}
    for raw in (event_type, payload.get("subscriptionType"), payload.get("entity"), payload.get("objectTypeId")):
        word = str(raw or "").strip().lower()
        if word.startswith("oncrm"):  # Bitrix24 event names: ONCRM + DEAL/LEAD/CONTACT + ADD/UPDATE/...
            word = next((k for k in ("deal", "lead", "contact") if word[5:].startswith(k)), "")
        kind = _ENTITY_WORDS.get(re.split(r"[.:/ ]", word, maxsplit=1)[0])
        if kind:
            return kind
    return None


def ms_epoch(dt: datetime) -> int:
    return int(math.floor(dt.timestamp() * 1000))
