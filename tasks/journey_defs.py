"""Journey definitions: declarative YAML, validated when loaded.

A journey is a trigger (a CRM event, a date field such as a birthday at 10:00 local time, or
inactivity for N days), then steps. Each step starts when the journey starts or when a later
event about the same entity arrives (``wait_for``), waits ``delay``, checks a ``condition`` on the
entity's current data, and sends its template. ``exit`` rules (an event, a reply) stop every
later step. Example: ``journeys/order_lifecycle.yaml``.

Conditions are Jinja2 expressions evaluated in a sandbox (``status == 'cancelled'``,
``amount | float > 1000``) over the contact's fields and the entity's merged event data.
"""
from __future__ import annotations

import fnmatch
import re
from datetime import time, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from smsflow.templates import MessageTemplate, TemplateError
from tasks.policy import ContactPolicy


class JourneyError(ValueError):
    """A journey file that cannot be used, with the file and the reason."""


_ENV = SandboxedEnvironment()
_DURATION = re.compile(r"^\s*(?:(\d+)\s*d)?\s*(?:(\d+)\s*h)?\s*(?:(\d+)\s*m)?\s*(?:(\d+)\s*s)?\s*$")


def parse_duration(value: Any) -> timedelta:
    """``7d``, ``2h30m``, ``15s``, a number of seconds, or 0."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("a delay cannot be negative")
        return timedelta(seconds=value)
    text = "0" if value is None else str(value).strip()
    if text in ("", "0"):
        return timedelta(0)
    m = _DURATION.match(text)
    if not m or not any(m.groups()):
        raise ValueError(f"bad duration {value!r}: use e.g. 7d, 2h30m, 15s")
    d, h, mi, s = (int(g or 0) for g in m.groups())
    return timedelta(days=d, hours=h, minutes=mi, seconds=s)


@lru_cache(maxsize=512)
def compile_condition(source: str):
    """A sandboxed Jinja2 expression; raises JourneyError when it does not compile."""
    try:
        return _ENV.compile_expression(source, undefined_to_none=True)
    except Exception as exc:  # noqa: BLE001 - TemplateSyntaxError and friends
        raise JourneyError(f"condition {source!r} does not compile: {exc}") from exc


def evaluate(source: str | None, context: dict[str, Any]) -> tuple[bool, str | None]:
    """(result, error). A missing condition is true; an expression that fails is false, with why."""
    if not source:
        return True, None
    try:
        return bool(compile_condition(source)(**context)), None
    except Exception as exc:  # noqa: BLE001 - a bad value in CRM data must not stop the batch
        return False, f"condition {source!r} failed: {type(exc).__name__}: {exc}"


class EventMatch(BaseModel):
    """An event of a type (glob: ``order.*``) and, optionally, a condition on its data.
    ``scope: contact`` matches events about any entity of the same contact (e.g. a new order
    ends a win-back journey)."""

    model_config = ConfigDict(extra="forbid")
    event: str
    when: str | None = None
    scope: Literal["entity", "contact"] = "entity"

    @field_validator("when")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v:
            compile_condition(v)
        return v

    def matches(self, event_type: str, context: dict[str, Any]) -> bool:
        return fnmatch.fnmatchcase(event_type, self.event) and evaluate(self.when, context)[0]

    def describe(self) -> str:
        return self.event + (f" when {self.when}" if self.when else "")


class Trigger(BaseModel):
    """Exactly one of: ``event`` (+ ``when``), ``date_field`` (+ ``at`` local time), ``inactive_days``."""

    model_config = ConfigDict(extra="forbid")
    event: str | None = None
    when: str | None = None
    date_field: str | None = None
    at: time = time(10, 0)
    inactive_days: int | None = Field(default=None, ge=1)
    activity_field: str = "last_activity_at"

    @model_validator(mode="after")
    def _one_kind(self) -> "Trigger":
        kinds = [k for k in ("event", "date_field", "inactive_days") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("a trigger needs exactly one of: event, date_field, inactive_days")
        if self.when:
            compile_condition(self.when)
        return self

    @property
    def kind(self) -> str:
        return "event" if self.event else ("date" if self.date_field else "inactivity")

    def as_match(self) -> EventMatch:
        return EventMatch(event=self.event or "", when=self.when)


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,60}$")
    wait_for: EventMatch | None = None  # None: the step starts when the journey starts
    delay: timedelta = timedelta(0)
    condition: str | None = None  # checked when the step is due, on the entity's current data
    kind: Literal["marketing", "transactional"] | None = None  # default: the journey's
    template: dict[str, str]  # language -> Jinja2 source

    @field_validator("delay", mode="before")
    @classmethod
    def _delay(cls, v: Any) -> timedelta:
        return parse_duration(v)

    @field_validator("condition")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v:
            compile_condition(v)
        return v


class ContactRef(BaseModel):
    """Where an event names its customer: a CRM contact id field and/or a phone field."""

    model_config = ConfigDict(extra="forbid")
    crm_id: str | None = "contact_id"
    phone: str | None = "phone"
    language: str | None = "language"
    # a CRM source Block that can tell whose deal/lead an event is about (AmoCrm, Bitrix24Crm,
    # HubSpotCrm: ``event_customer``), asked when the event names no customer itself
    crm_block: str | None = None


class Journey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,60}$")
    description: str = ""
    kind: Literal["marketing", "transactional"] = "transactional"
    default_language: str = "ru"
    trigger: Trigger
    contact: ContactRef = Field(default_factory=ContactRef)
    exit: list[EventMatch] = Field(default_factory=list)
    exit_on_reply: bool = False
    exit_on_click: bool = False  # a person's click on a link of the journey's messages ends it
    steps: list[Step]
    gateway: str | None = None
    price_per_segment: float = 0.0
    policy: dict[str, Any] | None = None  # tasks.policy.ContactPolicy; default: the standard windows
    origin: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "Journey":
        names = [s.name for s in self.steps]
        if not names:
            raise ValueError("a journey needs at least one step")
        if len(set(names)) != len(names):
            raise ValueError(f"step names must be unique: {names}")
        for s in self.steps:
            self.template_for(s)  # compiles, footers present for marketing
        if self.policy is not None:

            ContactPolicy.model_validate(self.policy)
        return self

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    def kind_of(self, step: Step) -> str:
        return step.kind or self.kind

    def campaign_name(self, step: Step) -> str:
        return f"journey:{self.name}:{step.name}"

    def template_for(self, step: Step) -> MessageTemplate:
        return _template(self.name, step.name, tuple(sorted(step.template.items())), self.kind_of(step),
                         self.default_language)


@lru_cache(maxsize=256)
def _template(journey: str, step: str, variants: tuple, kind: str, default_language: str) -> MessageTemplate:
    try:
        return MessageTemplate(name=f"{journey}.{step}", variants=dict(variants), kind=kind,
                               default_language=default_language)
    except TemplateError as exc:
        raise ValueError(f"step {step!r}: {exc}") from exc


def load_journey(path: str | Path) -> Journey:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise JourneyError(f"{path}: cannot read journey: {exc}") from exc
    if isinstance(raw, dict) and any(True in s for s in raw.get("steps") or [] if isinstance(s, dict)):
        raise JourneyError(f"{path}: a step has the key 'on', which YAML reads as true: use 'wait_for'")
    if not isinstance(raw, dict):
        raise JourneyError(f"{path}: a journey file holds one mapping (name, trigger, steps)")
    try:
        return Journey.model_validate({**raw, "origin": str(path)})
    except (ValidationError, JourneyError, ValueError) as exc:
        raise JourneyError(f"{path}: {exc}") from exc


def load_journeys(directory: str | Path) -> list[Journey]:
    """Every ``*.yaml`` journey in a directory; names must be unique."""
    directory = Path(directory)
    if not directory.is_dir():
        raise JourneyError(f"journeys directory {directory} does not exist")
    out = [load_journey(p) for p in sorted(directory.glob("*.y*ml"))]
    seen: dict[str, str] = {}
    for j in out:
        if j.name in seen:
            raise JourneyError(f"journey name {j.name!r} is used by {seen[j.name]} and {j.origin}")
        seen[j.name] = j.origin or ""
    return out
