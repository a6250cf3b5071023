"""Writing campaign outcomes back to a CRM.

``write_back([WriteBackItem(key, crm_id, kind, text)])`` puts one note/comment per item on
the CRM contact (a delivery report, an SMS reply, an opt-out) and, for ``opt_out`` items,
also clears the contact's SMS consent field. It returns one ``WriteBackResult`` per item:
``ok`` with the CRM's reference, or an error that is ``transient`` (try again later) or not.

Never duplicated on rerun. The caller keeps the keys it has done; the crash window (the
CRM created the note, we died before recording it) is closed here: every note ends with
the marker ``[smsflow:{key}]``, and before creating anything ``existing_keys(items)``
reads the contacts' recent notes back and skips every key already there. The same check
runs again whenever a create request may have been executed without an answer (timeout,
5xx), so a retry only sends what the CRM does not have. Opt-outs set a field to a fixed
value, which is idempotent by nature. The REST CRMs' shared plumbing is ``blocks/rest_crm.py``.
"""
from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from blocks.crm import CrmSourceError
from smsflow.privacy import mask_phones_in

log = logging.getLogger("smsflow.crm")

Kind = Literal["delivery", "opt_out", "reply", "click"]
KINDS = ("delivery", "opt_out", "reply", "click")
_KEY_CHARS = r"A-Za-z0-9_.:@/+=-"
_KEY_RE = re.compile(rf"^[{_KEY_CHARS}]{{1,200}}$")
MARKER_RE = re.compile(rf"\[smsflow:([{_KEY_CHARS}]{{1,200}})\]")


def marker(key: str) -> str:
    return f"[smsflow:{key}]"


def keys_in(text: str | None) -> set[str]:
    """The write-back keys marked in a note/comment text."""
    return set(MARKER_RE.findall(text or ""))


# --------------------------------------------------------------------------- write-back types
@dataclass(frozen=True)
class WriteBackItem:
    key: str  # our idempotency key (e.g. "msg:123:delivered"); letters, digits and _.:@/+=- only
    crm_id: str  # the contact's id in the CRM
    kind: Kind
    text: str = ""

    def __post_init__(self) -> None:
        if not _KEY_RE.match(self.key or ""):
            raise ValueError(f"write-back key {self.key!r}: 1-200 characters of [{_KEY_CHARS}]")
        if self.kind not in KINDS:
            raise ValueError(f"write-back kind {self.kind!r}: one of {', '.join(KINDS)}")
        object.__setattr__(self, "crm_id", str(self.crm_id).strip())


@dataclass
class WriteBackResult:
    key: str
    ok: bool
    crm_ref: str | None = None
    error: str | None = None
    transient: bool = False


class WriteBackTransient(Exception):
    """The vendor did not execute the request (rate limited, unreachable): safe to send again."""


class WriteBackUncertain(Exception):
    """The request may have been executed (no answer, 5xx after sending): check before resending."""


class VendorRejected(Exception):
    """A 4xx answer (validation, not found). ``bad`` maps the keys the vendor named to its reason."""

    def __init__(self, message: str, status: int | None = None, body: Any = None, bad: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.body = body
        self.bad = bad or {}


_DEFAULT_NOTE = {"delivery": "SMS delivery", "reply": "SMS reply", "opt_out": "SMS opt-out", "click": "SMS link clicked"}


class CrmWriteBack(ABC):
    """Mixin: notes/comments and opt-outs written back to the CRM, at most once per key.

    Vendors implement ``_existing_notes`` (key -> note id of the keys already on the
    contacts), ``_create_notes`` (one request for a batch within the vendor's limit) and
    ``_apply_opt_outs``; everything else (deduplication, the crash window, isolating a
    rejected item of a batch) lives here. Vendor calls run inside ``_session()``.
    """

    note_batch_limit: ClassVar[int] = 50  # per request; vendors narrow it
    max_uncertain_rounds: ClassVar[int] = 3

    # ---- vendor hooks
    @abstractmethod
    def _existing_notes(self, items: list[WriteBackItem]) -> dict[str, str]:
        """key -> CRM note id, for the items whose marker is already on their contact."""

    @abstractmethod
    def _create_notes(self, items: list[WriteBackItem]) -> dict[str, WriteBackResult]:
        """One create request; results for the items the answer names (others are re-checked)."""

    @abstractmethod
    def _apply_opt_outs(self, items: list[WriteBackItem]) -> dict[str, WriteBackResult]:
        """Clear SMS consent on the contacts (idempotent), within the vendor's batch limit."""

    @abstractmethod
    def _session(self):
        """Context manager: an open HTTP session for the vendor calls (re-entrant)."""

    def _note_batch_size(self) -> int:
        return self.note_batch_limit

    def _writes_opt_out_note(self) -> bool:
        return bool(getattr(self, "opt_out_note", True))

    def note_text(self, item: WriteBackItem) -> str:
        body = (item.text or "").strip() or _DEFAULT_NOTE[item.kind]
        # a marker inside the text (e.g. typed into an SMS reply) must not pass for one of ours
        body = MARKER_RE.sub(lambda m: f"(smsflow:{m.group(1)})", body)
        return f"{body}\n{marker(item.key)}"

    def _validate(self, item: WriteBackItem) -> str | None:
        if not item.crm_id.isdigit():
            return f"CRM id {item.crm_id!r} is not a numeric contact id"
        return None

    # ---- public API
    def existing_keys(self, items: Iterable[WriteBackItem]) -> set[str]:
        """The keys of ``items`` whose note/comment is already on the CRM contact."""
        items = [i for i in items if self._validate(i) is None]
        if not items:
            return set()
        with self._session():
            return set(self._existing_notes(items))

    def write_back(self, items: list[WriteBackItem]) -> list[WriteBackResult]:
        unique: dict[str, WriteBackItem] = {}
        results: dict[str, WriteBackResult] = {}
        for it in items:
            if it.key in unique or it.key in results:
                continue
            problem = self._validate(it)
            if problem:
                results[it.key] = WriteBackResult(it.key, False, None, problem, transient=False)
            else:
                unique[it.key] = it
        if unique:
            with self._session():
                results.update(self._write(list(unique.values())))
        return [results[it.key] for it in items]

    # ---- the algorithm
    def _write(self, items: list[WriteBackItem]) -> dict[str, WriteBackResult]:
        out: dict[str, WriteBackResult] = {}
        opt = [i for i in items if i.kind == "opt_out"]
        opt_res = self._isolating(opt, self._apply_opt_outs, uncertain_is_transient=True) if opt else {}
        notes = [i for i in items if i.kind != "opt_out"]
        if self._writes_opt_out_note():
            notes += [i for i in opt if opt_res[i.key].ok]
        note_res = self._write_notes(notes) if notes else {}
        for it in items:
            if it.kind != "opt_out":
                out[it.key] = note_res[it.key]
                continue
            o = opt_res[it.key]
            n = note_res.get(it.key)
            if not o.ok or n is None:
                out[it.key] = o
            elif n.ok:
                out[it.key] = WriteBackResult(it.key, True, n.crm_ref)
            else:
                out[it.key] = WriteBackResult(it.key, False, None, f"opt-out saved, note failed: {n.error}", n.transient)
        return out

    def _write_notes(self, items: list[WriteBackItem]) -> dict[str, WriteBackResult]:
        out: dict[str, WriteBackResult] = {}
        try:
            found = self._existing_notes(items)
        except CrmSourceError:
            raise
        except (WriteBackTransient, WriteBackUncertain, VendorRejected) as exc:
            msg = _clean(f"existing notes could not be read, nothing written: {exc}")
            return {i.key: WriteBackResult(i.key, False, None, msg, transient=True) for i in items}
        for it in items:
            if it.key in found:
                out[it.key] = WriteBackResult(it.key, True, found[it.key])
        todo = [i for i in items if i.key not in found]
        for batch in chunks(todo, self._note_batch_size()):
            out.update(self._create_safely(batch))
        return out

    def _create_safely(self, batch: list[WriteBackItem]) -> dict[str, WriteBackResult]:
        """Create notes; when the outcome is unknown, read back what exists and send only the rest."""
        out: dict[str, WriteBackResult] = {}
        pending = list(batch)
        for round_ in range(self.max_uncertain_rounds + 1):
            res = self._isolating(pending, self._create_notes, uncertain_is_transient=False)
            out.update({k: r for k, r in res.items() if r is not None})
            unknown = [i for i in pending if res.get(i.key) is None]
            if not unknown:
                return out
            try:
                found = self._existing_notes(unknown)
            except CrmSourceError:
                raise
            except (WriteBackTransient, WriteBackUncertain, VendorRejected) as exc:
                msg = _clean(f"outcome unknown and notes could not be re-read: {exc}")
                out.update({i.key: WriteBackResult(i.key, False, None, msg, transient=True) for i in unknown})
                return out
            for it in unknown:
                if it.key in found:
                    out[it.key] = WriteBackResult(it.key, True, found[it.key])
            pending = [i for i in unknown if i.key not in found]
            if not pending:
                return out
            log.warning("CRM write-back: %d note(s) not confirmed, sending again (round %d)", len(pending), round_ + 1)
        for it in pending:
            out[it.key] = WriteBackResult(it.key, False, None, "no confirmation from the CRM", transient=True)
        return out

    def _isolating(self, items: list[WriteBackItem], fn: Callable[[list[WriteBackItem]], dict[str, WriteBackResult]],
                   *, uncertain_is_transient: bool) -> dict[str, WriteBackResult | None]:
        """Run ``fn`` on a batch; a rejected batch is split so one bad item fails alone.
        Returns None for items whose outcome is unknown (only when not ``uncertain_is_transient``)."""
        if not items:
            return {}
        try:
            res: dict[str, WriteBackResult | None] = dict(fn(items))
        except CrmSourceError:
            raise
        except WriteBackTransient as exc:
            return {i.key: WriteBackResult(i.key, False, None, _clean(str(exc)), transient=True) for i in items}
        except WriteBackUncertain as exc:
            if uncertain_is_transient:
                return {i.key: WriteBackResult(i.key, False, None, _clean(str(exc)), transient=True) for i in items}
            return {i.key: None for i in items}
        except VendorRejected as exc:
            if exc.bad:
                res = {k: WriteBackResult(k, False, None, _clean(v), transient=False)
                       for k, v in exc.bad.items() if any(i.key == k for i in items)}
                rest = [i for i in items if i.key not in res]
                if rest and len(rest) < len(items):
                    res.update(self._isolating(rest, fn, uncertain_is_transient=uncertain_is_transient))
                    return res
            if len(items) == 1:
                return {items[0].key: WriteBackResult(items[0].key, False, None, _clean(exc.message), transient=False)}
            res = {}
            for it in items:
                res.update(self._isolating([it], fn, uncertain_is_transient=uncertain_is_transient))
            return res
        for it in items:
            if it.key not in res:
                res[it.key] = (WriteBackResult(it.key, False, None, "not confirmed by the CRM", transient=True)
                               if uncertain_is_transient else None)
        return res


def _clean(message: str) -> str:
    return mask_phones_in(message)[:500]


def chunks(seq: Sequence, n: int) -> Iterator[list]:
    for i in range(0, len(seq), n):
        yield list(seq[i:i + n])
