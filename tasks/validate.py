"""The validate-and-dedup step against the store: contacts -> valid | quarantined | duplicate.

Normally the extract does the per-contact work (see ``tasks.extract.extract_source``): each batch is
checked with the Great Expectations suite and its phones classified *before* it is written, so a
contact is written once, with its verdict, and the batch leaves a receipt (an ``extract.validated``
event: counts and check results). ``validate_new_contacts`` then reports those receipts (stats, the
expectations artifact), validates whatever is still 'new' (a batch that failed its checks, or contacts
extracted without validation) and merges duplicates over the whole source.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from sqlalchemy import bindparam, text

from smsflow.keyflags import KeyFlags
from smsflow.phones import normalize_phones_parallel
from smsflow.privacy import phone_hash
from store.db import bulk_update, executemany, fetch_tuples, get_engine, is_postgres, read_chunks, read_frame, utcnow
from store.quarantine import write_quarantine
from tasks.dedup import dedup_source
from tasks.erasure import suppressed_hashes
from tasks.expectations import ExtractCheckResult, check_extract, check_values

RECEIPT_KIND = "extract.validated"  # a validated extract batch not yet reported by validate_and_dedup
REPORTED_KIND = "extract.validated.reported"
SUPPRESSED_REASON = "erased person: the number is on the suppression list"


class ExtractCheckFailed(RuntimeError):
    """The Great Expectations suite failed on the extract: the run stops before anything is sent."""


@dataclass
class ValidateStats:
    checked: int = 0
    valid: int = 0
    quarantined: int = 0
    duplicates: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    expectations_markdown: str = ""
    expectations_success: bool = True


def _payload(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items() if v is not None and k != "attributes"}


def _add_counts(into: dict[str, int], counts: dict[str, int]) -> None:
    for k, v in counts.items():
        into[str(k)] = into.get(str(k), 0) + int(v)


# --------------------------------------------------------------------------- verdicts (shared with the extract)


@dataclass
class Verdicts:
    """Phone status code (ok, invalid, not_mobile, missing, suppressed) and reason per contact of a batch."""

    codes: list[str]
    reasons: list[str]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.codes:
            out[c] = out.get(c, 0) + 1
        return out


def suppress(codes: list[str], e164: list, reasons: list[str], hashes) -> None:
    """Numbers of erased people (salted hashes on the suppression list) are never imported again."""
    if not hashes:
        return

    for i, (code, phone) in enumerate(zip(codes, e164)):
        if code == "ok" and phone and phone_hash(phone) in hashes:
            codes[i] = "suppressed"
            reasons[i] = SUPPRESSED_REASON


def apply_verdicts(rows, norm: pd.DataFrame, suppressed) -> Verdicts:
    """Fill the validate columns of an extract batch (``tasks.extract.ContactBatch``) from its classified
    phones, by the same rules as the 'new' path below: ok -> valid with its E.164 number, anything else
    -> quarantined with the reason."""
    codes = norm["phone_status"].tolist()
    e164 = norm["phone_e164"].tolist()
    reasons = norm["reason"].tolist()
    suppress(codes, e164, reasons, suppressed)
    ok = [c == "ok" for c in codes]
    n = len(codes)
    rows["phone_e164"] = [p if k else None for p, k in zip(e164, ok)]
    rows["phone_region"] = [r or None for r in norm["region"].tolist()]
    rows["status"] = ["valid" if k else "quarantined" for k in ok]
    rows["status_reason"] = [None if k else r for r, k in zip(reasons, ok)]
    rows["duplicate_of"] = [None] * n
    rows["validated_at"] = [utcnow()] * n
    return Verdicts(codes, reasons)


def check_batch(rows) -> ExtractCheckResult:
    """The Great Expectations suite over one extract batch, on the values as they will be stored."""
    return check_values(rows["crm_id"], rows["phone_raw"], rows["language"])


def _contact_ids(conn, source: str, crm_ids: list[str], chunk: int = 500) -> dict[str, int]:
    """Store ids of the given CRM ids (unique index lookups). PostgreSQL: the CRM ids as one array, joined (one
    statement per batch; 1M contacts: 255 statements of 500 parameters each took 1.4 s in the server and as
    much here building them, see ``tasks.policy`` for the same form); SQLite: a few hundred per statement."""
    out: dict[str, int] = {}
    if is_postgres(conn):
        if crm_ids:
            sql = ("SELECT crm_id, id FROM contacts WHERE source = :s AND crm_id IN "
                   "(SELECT unnest(CAST(:ids AS text[])))")
            out.update((r[0], int(r[1])) for r in fetch_tuples(conn, sql, {"s": source, "ids": list(crm_ids)}))
        return out
    sql = text("SELECT crm_id, id FROM contacts WHERE source = :s AND crm_id IN :ids").bindparams(
        bindparam("ids", expanding=True))
    for i in range(0, len(crm_ids), chunk):
        out.update((r[0], int(r[1])) for r in conn.execute(sql, {"s": source, "ids": crm_ids[i : i + chunk]}))
    return out


@dataclass
class BatchValidation:
    """What the extract needs to write a batch's verdicts: the suppression list, and whether the source
    may have quarantine rows from an earlier validation that a now valid contact must lose."""

    source: str
    suppressed: set[str]
    quarantined: KeyFlags  # CRM ids with a validate quarantine row (row_key) flagged, kept up to date batch by batch

    @classmethod
    def start(cls, conn, source: str) -> "BatchValidation":

        keys = KeyFlags()
        for part in read_chunks(conn, "SELECT row_key FROM quarantine WHERE step = 'validate' AND source = :s",
                                {"s": source}):
            keys.set([r[0] for r in part], [True] * len(part))
        return cls(source, suppressed_hashes(conn), keys)

    def store(self, conn, rows, verdicts: Verdicts, check: ExtractCheckResult) -> None:
        """Quarantine rows for the batch's bad phones, stale ones cleared for its valid contacts, and the
        receipt validate_and_dedup reports from; in the batch's transaction."""
        crm = rows["crm_id"]
        bad = [i for i, c in enumerate(verdicts.codes) if c != "ok"]
        if len(self.quarantined):  # contacts quarantined before whose phone is fine now (usually none)
            ok = [crm[i] for i, c in enumerate(verdicts.codes) if c == "ok"]
            flagged = self.quarantined.get(ok)[1]  # an id never set reads as not flagged
            fixed = [k for k, f in zip(ok, flagged.tolist()) if f]
            if fixed:
                executemany(conn, "DELETE FROM quarantine WHERE step = 'validate' AND source = ? AND row_key = ?",
                            [(self.source, k) for k in fixed])
                self.quarantined.set(fixed, [False] * len(fixed))
        if bad:
            ids = _contact_ids(conn, self.source, [crm[i] for i in bad])
            write_quarantine(conn, [self._quarantine_row(conn, rows, i, ids[crm[i]], verdicts) for i in bad])
            self.quarantined.set([crm[i] for i in bad], [True] * len(bad))
        record_receipt(conn, self.source, len(crm), len(bad), verdicts.counts(), check)

    def _quarantine_row(self, conn, rows, i: int, contact_id: int, verdicts: Verdicts) -> dict[str, Any]:
        # the payload the 'new' path below builds from the stored row (its timestamp as the driver returns it)
        upd = rows["crm_updated_at"][i]
        if hasattr(upd, "dtype"):  # a numpy datetime64 (the extract keeps timestamps as arrays)
            upd = upd.astype("datetime64[us]").item()
        if upd is not None:
            upd = upd.isoformat() if is_postgres(conn) else upd.isoformat(" ", "microseconds")
        record = {"id": contact_id, "crm_id": rows["crm_id"][i], "first_name": rows["first_name"][i],
                  "last_name": rows["last_name"][i], "phone_raw": rows["phone_raw"][i], "language": rows["language"][i],
                  "crm_updated_at": upd}
        return dict(step="validate", source=self.source, row_key=str(rows["crm_id"][i]), campaign_id=None,
                    contact_id=contact_id, reason_code=verdicts.codes[i], reason=verdicts.reasons[i],
                    payload=_payload(record))


# --------------------------------------------------------------------------- receipts


def record_receipt(conn, source: str, checked: int, quarantined: int, by_status: dict[str, int],
                   check: ExtractCheckResult) -> None:
    """An ``extract.validated`` event: what the extract validated in one batch (counts only, no personal data)."""
    payload = {"source": source, "checked": checked, "quarantined": quarantined, "by_status": by_status,
               "check": check.to_dict()}
    conn.execute(text("INSERT INTO event_log (ts, kind, payload) VALUES (:ts, :k, :p)"),
                 {"ts": utcnow(), "k": RECEIPT_KIND, "p": json.dumps(payload, ensure_ascii=False, default=str)})


def pending_receipts(conn, source: str) -> list[tuple[int, dict]]:
    """Receipts of the source's extract batches not reported yet, oldest first."""
    out = []
    for event_id, payload in conn.execute(text("SELECT id, payload FROM event_log WHERE kind = :k ORDER BY id"),
                                          {"k": RECEIPT_KIND}):
        data = json.loads(payload) if isinstance(payload, (str, bytes)) else payload
        if data and data.get("source") == source:
            out.append((int(event_id), data))
    return out


def mark_reported(conn, event_ids: list[int]) -> None:
    if event_ids:
        executemany(conn, "UPDATE event_log SET kind = ? WHERE id = ?", [(REPORTED_KIND, i) for i in event_ids])


# --------------------------------------------------------------------------- the step


def validate_new_contacts(engine, source: str, default_region: str = "RU", processes: int = 1) -> ValidateStats:
    """Report the batches the extract validated, validate the contacts still 'new', then re-run dedup
    over the source. Runs alone as well: contacts extracted without validation are all 'new'."""
    stats = ValidateStats()
    with engine.begin() as conn:
        receipts = pending_receipts(conn, source)
    checks = []
    for _, r in receipts:
        stats.checked += int(r["checked"])
        stats.quarantined += int(r["quarantined"])
        _add_counts(stats.by_status, r["by_status"])
        checks.append(ExtractCheckResult.from_dict(r["check"]))
    new_check = _validate_new(engine, source, default_region, processes, stats)
    if new_check is not None:
        checks.append(new_check)
    combined = ExtractCheckResult.combine(checks)
    if combined is not None:
        stats.expectations_markdown = combined.markdown()
        stats.expectations_success = combined.success
    stats.duplicates = dedup_source(engine, source)
    with engine.begin() as conn:
        mark_reported(conn, [i for i, _ in receipts])
        stats.valid = int(conn.execute(text("SELECT COUNT(*) FROM contacts WHERE source=:s AND status='valid'"), {"s": source}).scalar())
    return stats


def _validate_new(engine, source: str, default_region: str, processes: int, stats: ValidateStats) -> ExtractCheckResult | None:
    """Contacts still 'new': the extract checks over all of them (a failure stops the run), then
    phones, statuses and quarantine, as the extract would have done batch by batch."""
    with engine.begin() as conn:
        new = read_frame(
            conn,
            "SELECT id, crm_id, first_name, last_name, phone_raw, language, crm_updated_at FROM contacts "
            "WHERE source = :s AND status = 'new'",
            {"s": source},
            objects=True,
        )
    if not len(new):
        return None
    stats.checked += len(new)
    check = check_extract(new.drop(columns=["id"]).rename(columns={"crm_id": "id", "phone_raw": "phone"}))
    if not check.success:
        stats.expectations_markdown = check.markdown()
        stats.expectations_success = False
        raise ExtractCheckFailed(
            f"extract of '{source}' failed its checks, nothing was validated or sent: {check.summary()}. "
            "Fix the CRM query/export and rerun; the contacts stay in the store as 'new'."
        )
    norm = normalize_phones_parallel(new["phone_raw"], default_region=default_region, processes=processes)
    _apply_suppression(engine, norm)
    now = utcnow()
    ok = norm["phone_status"] == "ok"
    status = ok.map({True: "valid", False: "quarantined"})
    with engine.begin() as conn:
        bulk_update(
            conn,
            "contacts",
            "id",
            ("phone_e164", "phone_region", "status", "status_reason", "duplicate_of", "validated_at"),
            zip(
                norm["phone_e164"].where(ok, None),
                norm["region"].where(norm["region"] != "", None),
                status,
                norm["reason"].where(~ok, None),
                [None] * len(new),
                [now] * len(new),
                new["id"].astype(int),
            ),
        )
        bad = new[~ok.to_numpy()]
        quarantine = [
            dict(step="validate", source=source, row_key=str(r["crm_id"]), campaign_id=None, contact_id=int(r["id"]),
                 reason_code=str(code), reason=str(reason), payload=_payload(r))
            for r, code, reason in zip(
                bad.to_dict("records"), norm.loc[~ok, "phone_status"], norm.loc[~ok, "reason"]
            )
        ]
        conn.execute(
            text("DELETE FROM quarantine WHERE step = 'validate' AND source = :s AND contact_id IN "
                 "(SELECT id FROM contacts WHERE source = :s AND status = 'valid')"),
            {"s": source},
        )
        write_quarantine(conn, quarantine)
    _add_counts(stats.by_status, norm["phone_status"].value_counts().to_dict())
    stats.quarantined += int((~ok).sum())
    return check


def _apply_suppression(engine, norm: pd.DataFrame) -> None:
    """Numbers of erased people (salted hashes on the suppression list) are never imported again."""

    with engine.begin() as conn:
        hashes = suppressed_hashes(conn)
    if not hashes:
        return
    ok = norm["phone_status"] == "ok"
    hit = ok & norm["phone_e164"].map(lambda p: bool(p) and phone_hash(p) in hashes).astype(bool)
    norm.loc[hit, "phone_status"] = "suppressed"
    norm.loc[hit, "reason"] = SUPPRESSED_REASON


# --------------------------------------------------------------------------- Prefect task
from smsflow.lazy_task import prefect_task  # noqa: E402 - Prefect itself only when a flow runs the task

from tasks.retrying import retry_if_transient  # noqa: E402


@prefect_task(name="validate-and-dedup-contacts", retries=1, retry_delay_seconds=5,
              retry_condition_fn=retry_if_transient)
def validate_task(source: str, default_region: str, processes: int, database_url: str | None) -> ValidateStats:
    from prefect.artifacts import create_markdown_artifact


    try:
        stats = validate_new_contacts(get_engine(database_url), source, default_region, processes)
    except ExtractCheckFailed as exc:
        create_markdown_artifact(f"# Extract checks FAILED for `{source}`\n\n{exc}", key="extract-checks", description=str(exc)[:200])
        raise
    if stats.expectations_markdown:
        create_markdown_artifact(stats.expectations_markdown, key="extract-checks",
                                 description=f"Great Expectations results for {source}")
    return stats
