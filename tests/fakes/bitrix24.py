"""An offline Bitrix24 portal reached through an inbound webhook, as the REST docs describe it.

- https://{portal}/rest/{user}/{secret}/{method}[.json]; parameters in the query string and/or a
  form body with PHP-style keys (filter[>=DATE_MODIFY]=.., select[0]=ID, cmd[k]=method?query)
- wrong user/secret -> 401 {"error": "INVALID_CREDENTIALS", "error_description": "Invalid request credentials"}
- leaky bucket: every request adds 1, ``drain_per_s`` leak away per second; above
  ``bucket_size`` -> 503 {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"}
  (cloud: 50 banked, 2/s drained). A batch is one request. ``force_limit = n``: the next n requests
  get that 503 whatever the level; ``retry_after``: a Retry-After header on it (None: none).
- crm.contact.list: select (PHONE/EMAIL/UF_* only when asked), filter with =, !, >, >=, <, <=
  prefixes on ID and DATE_MODIFY, order (several keys), start; 50 per page,
  {"result": [...], "next": start+50 (only when more), "total": N, "time": {...}}; start=-1: no count.
  DATE_MODIFY in the portal's time zone (+03:00), ids as strings.
- crm.deal.list: as crm.contact.list over deals (OPPORTUNITY "1500.00", CURRENCY_ID, STAGE_ID,
  STAGE_SEMANTIC_ID P/S/F, CLOSED Y/N, CLOSEDATE, BEGINDATE, DATE_CREATE, DATE_MODIFY; CONTACT_ID the primary).
- crm.deal.get (CONTACT_ID: the primary contact, null without contacts), crm.lead.get (PHONE,
  CONTACT_ID), crm.contact.get;
  an unknown id -> 400 {"error": "", "error_description": "Not found"}, a missing/invalid one ->
  400 {"error": "", "error_description": "ID is not defined or invalid."}
- crm.contact.update, crm.timeline.comment.add / .list, batch (<= 50 commands, halt, result /
  result_error / result_total / result_next / result_time; an empty map is sent as []).
- ``lose_responses = n``: the next n batches that write are executed, then the answer is lost (ReadTimeout).
"""
from __future__ import annotations

import json
import re
import threading
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qsl

import httpx

PAGE = 50
MAX_BATCH = 50
DEAL_DATES = ("DATE_CREATE", "DATE_MODIFY", "BEGINDATE", "CLOSEDATE")
STD_FIELDS = ("ID", "NAME", "SECOND_NAME", "LAST_NAME", "DATE_CREATE", "DATE_MODIFY", "ASSIGNED_BY_ID", "SOURCE_ID",
              "TYPE_ID", "OPENED", "HAS_PHONE", "HAS_EMAIL")


class BxError(Exception):
    def __init__(self, status: int, code: str, description: str):
        super().__init__(description)
        self.status, self.code, self.description = status, code, description


def php_decode(pairs: list[tuple[str, str]]) -> dict:
    """[('filter[>=ID]', '5'), ('select[]', 'ID')] -> {'filter': {'>=ID': '5'}, 'select': {'0': 'ID'}}"""
    out: dict = {}
    for key, value in pairs:
        m = re.match(r"^([^\[]+)((?:\[[^\]]*\])*)$", key)
        if not m:
            continue
        parts = [m.group(1)] + re.findall(r"\[([^\]]*)\]", m.group(2))
        node = out
        for i, p in enumerate(parts):
            last = i == len(parts) - 1
            if p == "":
                p = str(len(node))
            if last:
                node[p] = value
            else:
                node = node.setdefault(p, {})
                if not isinstance(node, dict):
                    raise BxError(400, "INVALID_ARG_VALUE", f"bad parameter {key}")
    return out


def as_list(v) -> list:
    if v is None:
        return []
    if isinstance(v, dict):
        return [v[k] for k in sorted(v, key=lambda k: int(k) if k.isdigit() else 0)]
    if isinstance(v, list):
        return v
    return [v]


class FakeBitrix24:
    def __init__(self, portal: str = "smsflow-test.bitrix24.ru", user_id: int = 1, secret: str = "k3yw3bh00ks3cr3t",
                 *, bucket_size: float = 50, drain_per_s: float = 2.0, consent_field: str = "UF_CRM_SMS_CONSENT",
                 tz: timezone = timezone(timedelta(hours=3)), retry_after: str | None = None, clock=time.time):
        self.portal, self.user_id, self.secret = portal, user_id, secret
        self.bucket_size, self.drain_per_s = bucket_size, drain_per_s
        self.consent_field = consent_field
        self.tz = tz
        self.clock = clock
        self.retry_after = retry_after
        self.force_limit = 0
        self.contacts: dict[int, dict] = {}
        self.deals: dict[int, dict] = {}
        self.leads: dict[int, dict] = {}
        self.comments: dict[int, dict] = {}
        self.log: list[str] = []  # method of every request
        self.times: list[float] = []  # time.monotonic() of every request
        self.batch_sizes: list[int] = []
        self.throttled = 0
        self.lose_responses = 0
        self._level = 0.0
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self._comment_seq = 9000

    @property
    def webhook_url(self) -> str:
        return f"https://{self.portal}/rest/{self.user_id}/{self.secret}/"

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    # ------------------------------------------------------------------ data
    def add_contact(self, cid: int, *, name: str, last_name: str = "", modified: int, phones=(), emails=(),
                    consent: str | None = "1", assigned_by: int = 1) -> dict:
        """phones/emails: (value, VALUE_TYPE) pairs; ``modified``: unix seconds."""
        c = {"ID": cid, "NAME": name, "SECOND_NAME": None, "LAST_NAME": last_name, "DATE_CREATE": modified,
             "DATE_MODIFY": modified, "ASSIGNED_BY_ID": assigned_by, "SOURCE_ID": "CALL", "TYPE_ID": "CLIENT", "OPENED": "Y",
             "PHONE": [{"ID": str(cid * 10 + i), "VALUE_TYPE": t, "VALUE": v, "TYPE_ID": "PHONE"} for i, (v, t) in enumerate(phones)],
             "EMAIL": [{"ID": str(cid * 10 + 5 + i), "VALUE_TYPE": t, "VALUE": v, "TYPE_ID": "EMAIL"} for i, (v, t) in enumerate(emails)],
             self.consent_field: consent}
        self.contacts[cid] = c
        return c

    def add_deal(self, did: int, *, title: str = "", contact_ids=(), primary: int | None = None, stage: str = "NEW",
                 modified: int | None = None, opportunity: float = 0, currency: str = "RUB",
                 closed_at: int | None = None) -> dict:
        """``contact_ids`` in their SORT order; ``primary`` (default: the first) is IS_PRIMARY=Y and CONTACT_ID.
        ``stage``: NEW, ..., WON (semantic S), LOSE (F), or with a pipeline prefix (C1:WON)."""
        ids = [int(c) for c in contact_ids]
        primary = primary if primary in ids else (ids[0] if ids else None)
        when = int(self.clock()) if modified is None else modified
        d = {"ID": did, "TITLE": title or f"Сделка #{did}", "TYPE_ID": "SALE", "STAGE_ID": stage, "CATEGORY_ID": "0",
             "CURRENCY_ID": currency, "OPPORTUNITY": f"{opportunity:.2f}", "LEAD_ID": None, "COMPANY_ID": "0",
             "ASSIGNED_BY_ID": 1, "DATE_CREATE": when, "DATE_MODIFY": when, "BEGINDATE": when, "OPENED": "Y",
             "_contacts": [{"CONTACT_ID": cid, "SORT": 10 * (n + 1), "ROLE_ID": 0, "IS_PRIMARY": "Y" if cid == primary else "N"}
                           for n, cid in enumerate(ids)]}
        self.set_stage(d, stage, modified=when, closed_at=closed_at)
        self.deals[did] = d
        return d

    @staticmethod
    def set_stage(d: dict, stage: str, *, modified: int, closed_at: int | None = None) -> None:
        """Move a deal to ``stage`` as the portal does: STAGE_SEMANTIC_ID, CLOSED and CLOSEDATE follow it."""
        tail = stage.rsplit(":", 1)[-1]
        semantic = "S" if tail == "WON" else "F" if tail == "LOSE" else "P"
        d.update(STAGE_ID=stage, STAGE_SEMANTIC_ID=semantic, CLOSED="N" if semantic == "P" else "Y",
                 CLOSEDATE=(closed_at or modified) if semantic != "P" else modified + 7 * 86400, DATE_MODIFY=modified)

    def add_lead(self, lid: int, *, title: str = "", phones=(), contact_id: int | None = None, status: str = "NEW",
                 modified: int | None = None) -> dict:
        """phones: (value, VALUE_TYPE) pairs of the lead itself; ``contact_id``: its contact, if any."""
        when = int(self.clock()) if modified is None else modified
        lead = {"ID": lid, "TITLE": title or f"Лид #{lid}", "STATUS_ID": status, "CONTACT_ID": contact_id,
                "COMPANY_ID": None, "ASSIGNED_BY_ID": 1, "DATE_CREATE": when, "DATE_MODIFY": when, "OPENED": "Y",
                "HAS_PHONE": "Y" if phones else "N",
                "PHONE": [{"ID": str(lid * 10 + i), "VALUE_TYPE": t, "VALUE": v, "TYPE_ID": "PHONE"}
                          for i, (v, t) in enumerate(phones)]}
        self.leads[lid] = lead
        return lead

    def comments_of(self, cid: int) -> list[dict]:
        return [c for c in self.comments.values() if c["ENTITY_TYPE"] == "contact" and c["ENTITY_ID"] == cid]

    def _time(self, epoch: int) -> str:
        return datetime.fromtimestamp(epoch, self.tz).isoformat()

    # ------------------------------------------------------------------ HTTP
    @staticmethod
    def _error(status: int, code: str, description: str) -> httpx.Response:
        return httpx.Response(status, json={"error": code, "error_description": description})

    def _timing(self, start: float) -> dict:
        end = time.time()
        return {"start": start, "finish": end, "duration": end - start, "processing": end - start,
                "date_start": datetime.fromtimestamp(start, self.tz).isoformat(),
                "date_finish": datetime.fromtimestamp(end, self.tz).isoformat(),
                "operating_reset_at": int(end) + 600, "operating": 0}

    def handle(self, request: httpx.Request) -> httpx.Response:
        started = time.time()
        m = re.fullmatch(r"/rest/(\d+)/([^/]+)/([a-z0-9_.]+?)(?:\.json)?", request.url.path)
        if not m:
            return self._error(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
        user, secret, method = m.groups()
        self.log.append(method)
        self.times.append(time.monotonic())
        if int(user) != self.user_id or secret != self.secret:
            return self._error(401, "INVALID_CREDENTIALS", "Invalid request credentials")
        with self._lock:
            if self.force_limit > 0:
                self.force_limit -= 1
                self.throttled += 1
                r = self._error(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
                if self.retry_after is not None:
                    r.headers["Retry-After"] = self.retry_after
                return r
            now = time.monotonic()
            self._level = max(0.0, self._level - (now - self._last) * self.drain_per_s)
            self._last = now
            if self._level + 1 > self.bucket_size:
                self.throttled += 1
                return self._error(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
            self._level += 1
        pairs = list(request.url.params.multi_items())
        if request.content:
            pairs += parse_qsl(request.content.decode(), keep_blank_values=True)
        params = php_decode(pairs)
        try:
            if method == "batch":
                result = self._batch(params)
                writes = any(str(c).startswith(("crm.timeline.comment.add", "crm.contact.update"))
                             for c in (params.get("cmd") or {}).values())
                if writes and self.lose_responses > 0:
                    self.lose_responses -= 1
                    raise httpx.ReadTimeout("timed out", request=request)
                return httpx.Response(200, json={"result": result, "time": self._timing(started)})
            result, extra = self._call(method, params)
        except BxError as e:
            return self._error(e.status, e.code, e.description)
        return httpx.Response(200, json={"result": result, **extra, "time": self._timing(started)})

    def _call(self, method: str, params: dict):
        fn = {"crm.contact.list": self._contact_list, "crm.deal.list": self._deal_list, "crm.contact.update": self._contact_update,
              "crm.timeline.comment.add": self._comment_add, "crm.timeline.comment.list": self._comment_list,
              "crm.contact.get": self._contact_get, "crm.deal.get": self._deal_get,
              "crm.lead.get": self._lead_get}.get(method)
        if fn is None:
            raise BxError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
        return fn(params)

    def _batch(self, params: dict) -> dict:
        cmds = params.get("cmd") or {}
        if not isinstance(cmds, dict) or not cmds:
            raise BxError(400, "INVALID_ARG_VALUE", "cmd is required")
        if len(cmds) > MAX_BATCH:
            raise BxError(400, "ERROR_BATCH_LENGTH_EXCEEDED", "Max batch length exceeded")
        self.batch_sizes.append(len(cmds))
        halt = str(params.get("halt", "0")) in ("1", "true", "Y")
        res, err, total, nxt, tim = {}, {}, {}, {}, {}
        for key, cmd in cmds.items():
            method, _, query = str(cmd).partition("?")
            t0 = time.time()
            try:
                r, extra = self._call(method, php_decode(parse_qsl(query, keep_blank_values=True)))
            except BxError as e:
                err[key] = {"error": e.code, "error_description": e.description}
                if halt:
                    break
                continue
            res[key] = r
            if "total" in extra:
                total[key] = extra["total"]
            if "next" in extra:
                nxt[key] = extra["next"]
            tim[key] = self._timing(t0)
        return {k: (v or []) for k, v in {"result": res, "result_error": err, "result_total": total,
                                           "result_next": nxt, "result_time": tim}.items()}

    # ------------------------------------------------------------------ methods
    def _parse_value(self, field: str, value):
        if field in ("DATE_MODIFY", "DATE_CREATE"):
            dt = datetime.fromisoformat(str(value))
            return int((dt if dt.tzinfo else dt.replace(tzinfo=self.tz)).timestamp())
        if field in ("ID", "ASSIGNED_BY_ID"):
            return int(value)
        return str(value)

    def _match(self, c: dict, flt: dict) -> bool:
        for raw, value in flt.items():
            m = re.match(r"^(>=|<=|!=|>|<|=|!|@)?(.+)$", raw)
            op, field = m.group(1) or "=", m.group(2)
            have = c.get(field)
            if op == "@":
                if str(have) not in {str(x) for x in as_list(value)}:
                    return False
                continue
            want = self._parse_value(field, value)
            have = self._parse_value(field, have) if have is not None and field in ("ID", "ASSIGNED_BY_ID") else have
            if field in ("DATE_MODIFY", "DATE_CREATE"):
                have = c[field]
            if have is None:
                return False
            ok = {"=": have == want, "!": have != want, "!=": have != want, ">": have > want, ">=": have >= want,
                  "<": have < want, "<=": have <= want}[op]
            if not ok:
                return False
        return True

    def _render(self, c: dict, select: list[str]) -> dict:
        if not select:
            select = list(STD_FIELDS)
        fields: list[str] = []
        for s in select:
            if s == "*":
                fields += list(STD_FIELDS)
            elif s == "UF_*":
                fields += [k for k in c if k.startswith("UF_")]
            else:
                fields.append(s)
        out = {}
        for f in dict.fromkeys(fields):
            if f in ("DATE_MODIFY", "DATE_CREATE"):
                out[f] = self._time(c[f])
            elif f == "ID":
                out[f] = str(c["ID"])
            elif f == "HAS_PHONE":
                out[f] = "Y" if c["PHONE"] else "N"
            elif f == "HAS_EMAIL":
                out[f] = "Y" if c["EMAIL"] else "N"
            elif f in ("PHONE", "EMAIL"):
                if c[f]:
                    out[f] = json.loads(json.dumps(c[f]))
            elif f in c:
                out[f] = None if c[f] is None else str(c[f])
        return out

    def _contact_list(self, p: dict):
        return self._list(self.contacts, p, self._render)

    def _deal_list(self, p: dict):
        return self._list(self.deals, p, self._render_deal)

    def _render_deal(self, d: dict, select: list[str]) -> dict:
        primary = next((x["CONTACT_ID"] for x in d["_contacts"] if x["IS_PRIMARY"] == "Y"), None)
        fields = [k for k in d if not k.startswith("_")] + ["CONTACT_ID"] if not select or "*" in select else select
        out = {}
        for f in dict.fromkeys(fields):
            if f == "CONTACT_ID":
                out[f] = None if primary is None else str(primary)
            elif f in DEAL_DATES:
                out[f] = self._time(d[f])
            elif f in d:
                out[f] = None if d[f] is None else str(d[f])
        return out

    def _list(self, table: dict[int, dict], p: dict, render):
        flt = p.get("filter") or {}
        order = p.get("order") or {"ID": "ASC"}
        select = [str(x) for x in as_list(p.get("select"))]
        start = int(p.get("start") or 0)
        items = [c for c in table.values() if self._match(c, flt)]
        keys = list(order.items())
        # the last sort key first (stable sort); ties left unspecified end up in descending id order
        items.sort(key=lambda c: -c["ID"])
        for field, direction in reversed(keys):
            items.sort(key=lambda c, f=field: c.get(f) if f != "ID" else c["ID"], reverse=str(direction).upper() == "DESC")
        if start == -1:
            return [render(c, select) for c in items[:PAGE]], {}
        page = items[start:start + PAGE]
        extra = {"total": len(items)}
        if start + PAGE < len(items):
            extra["next"] = start + PAGE
        return [render(c, select) for c in page], extra

    @staticmethod
    def _by_id(table: dict[int, dict], p: dict) -> dict:
        raw = str(p.get("id") or p.get("ID") or "").strip()
        if not raw.isdigit() or int(raw) <= 0:
            raise BxError(400, "", "ID is not defined or invalid.")
        if int(raw) not in table:
            raise BxError(400, "", "Not found")
        return table[int(raw)]

    def _contact_get(self, p: dict):
        c = self._by_id(self.contacts, p)
        return self._render(c, ["*", "PHONE", "EMAIL", "UF_*"]), {}

    def _deal_get(self, p: dict):
        d = self._by_id(self.deals, p)
        primary = next((x["CONTACT_ID"] for x in d["_contacts"] if x["IS_PRIMARY"] == "Y"), None)
        out = {k: (self._time(v) if k in DEAL_DATES else None if v is None else str(v))
               for k, v in d.items() if not k.startswith("_")}
        out["CONTACT_ID"] = None if primary is None else str(primary)
        return out, {}

    def _lead_get(self, p: dict):
        lead = self._by_id(self.leads, p)
        out = {k: (self._time(v) if k in ("DATE_CREATE", "DATE_MODIFY") else v if k == "PHONE"
                   else None if v is None else str(v)) for k, v in lead.items()}
        if not out["PHONE"]:
            del out["PHONE"]
        return json.loads(json.dumps(out)), {}

    def _contact_update(self, p: dict):
        cid = int(p.get("id") or p.get("ID") or 0)
        if cid not in self.contacts:
            raise BxError(400, "", "Not found")
        fields = p.get("fields") or {}
        c = self.contacts[cid]
        for k, v in fields.items():
            if k in ("PHONE", "EMAIL", "ID"):
                continue
            c[k] = v
        c["DATE_MODIFY"] = max(int(self.clock()), c["DATE_MODIFY"] + 1)
        return True, {}

    def _comment_add(self, p: dict):
        f = p.get("fields") or {}
        if not f.get("ENTITY_ID") or not f.get("ENTITY_TYPE") or not f.get("COMMENT"):
            raise BxError(400, "ERROR_CORE", "ENTITY_ID, ENTITY_TYPE and COMMENT are required")
        eid = int(f["ENTITY_ID"])
        if str(f["ENTITY_TYPE"]).lower() != "contact" or eid not in self.contacts:
            raise BxError(400, "", "Not found")
        with self._lock:
            self._comment_seq += 1
            cid = self._comment_seq
            self.comments[cid] = {"ID": cid, "CREATED": int(self.clock()), "ENTITY_ID": eid, "ENTITY_TYPE": "contact",
                                  "AUTHOR_ID": self.user_id, "COMMENT": str(f["COMMENT"]), "FILES": []}
        return cid, {}

    def _comment_list(self, p: dict):
        f = p.get("filter") or {}
        if not f.get("ENTITY_ID") or not f.get("ENTITY_TYPE"):
            raise BxError(400, "ERROR_CORE", "ENTITY_ID and ENTITY_TYPE are required in the filter")
        eid = int(f["ENTITY_ID"])
        select = [str(x) for x in as_list(p.get("select"))] or ["ID", "CREATED", "ENTITY_ID", "ENTITY_TYPE", "AUTHOR_ID", "COMMENT"]
        items = sorted((c for c in self.comments.values() if c["ENTITY_ID"] == eid
                        and c["ENTITY_TYPE"] == str(f["ENTITY_TYPE"]).lower()), key=lambda c: -c["ID"])
        start = int(p.get("start") or 0)
        page = items[start:start + PAGE]
        out = [{k: (self._time(c[k]) if k == "CREATED" else str(c[k]) if k in ("ID", "ENTITY_ID", "AUTHOR_ID") else c[k])
                for k in select if k in c} for c in page]
        extra = {"total": len(items)}
        if start + PAGE < len(items):
            extra["next"] = start + PAGE
        return out, extra
