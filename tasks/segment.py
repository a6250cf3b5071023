"""Declarative segments: attribute filters, RFM scores, funnel stage, days since last activity.

A segment is data (YAML or a pydantic model), evaluated over a DataFrame of contacts with
their CRM attributes expanded into columns; membership is written to the store.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, Field, model_validator
from store.db import bulk_insert, get_engine, read_frame, refresh_statistics, utcnow

Op = Literal["eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte", "contains", "exists", "missing"]


class AttributeFilter(BaseModel):
    """``field op value``; ``field`` is a contact column (language, timezone, ...) or a CRM attribute."""

    field: str
    op: Op = "eq"
    value: Any = None


class Range(BaseModel):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"range min {self.min} is greater than max {self.max}")
        return self


class RfmRule(BaseModel):
    """Recency / frequency / monetary scores 1-5 by quintile over the evaluated contacts."""

    recency_field: str = "last_order_at"
    frequency_field: str = "orders_count"
    monetary_field: str = "total_spent"
    min_recency: int = Field(default=1, ge=1, le=5)
    min_frequency: int = Field(default=1, ge=1, le=5)
    min_monetary: int = Field(default=1, ge=1, le=5)
    min_total: int | None = Field(default=None, ge=3, le=15, description="Minimum R+F+M.")


class SegmentDefinition(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    description: str = ""
    filters: list[AttributeFilter] = Field(default_factory=list)
    funnel_stages: list[str] | None = Field(default=None, description="Keep contacts whose funnel_stage is one of these.")
    funnel_field: str = "funnel_stage"
    days_since_last_activity: Range | None = None
    activity_field: str = "last_activity_at"
    rfm: RfmRule | None = None

    def needed_fields(self) -> set[str]:
        f = {x.field for x in self.filters}
        if self.funnel_stages is not None:
            f.add(self.funnel_field)
        if self.days_since_last_activity is not None:
            f.add(self.activity_field)
        if self.rfm is not None:
            f |= {self.rfm.recency_field, self.rfm.frequency_field, self.rfm.monetary_field}
        return f


ALL = SegmentDefinition(name="all", description="Every contact with a valid, deduplicated mobile number.")


def load_segments(path: str | Path) -> dict[str, SegmentDefinition]:
    """Segments from a YAML file: a list of definitions, or a mapping name -> definition."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or []
    if isinstance(data, dict):
        data = [{"name": k, **(v or {})} for k, v in data.items()]
    out = {"all": ALL}
    for item in data:
        seg = SegmentDefinition.model_validate(item)
        out[seg.name] = seg
    return out


def resolve_segment(segment: str, segments_file: str | None) -> SegmentDefinition:
    """The segment by name: 'all', or one defined in the segments file (a clear error otherwise)."""
    if segment == "all" and not segments_file:
        return ALL
    if not segments_file:
        raise ValueError(f"segment '{segment}' needs a segments file (YAML) that defines it")
    defs = load_segments(segments_file)
    if segment not in defs:
        raise ValueError(f"segment '{segment}' is not defined in {segments_file}; defined: {', '.join(sorted(defs))}")
    return defs[segment]


def expand_attributes(df: pd.DataFrame, fields: set[str]) -> pd.DataFrame:
    """Add the needed CRM attributes (JSON column ``attributes``) as columns."""
    wanted = [f for f in fields if f not in df.columns]
    if not wanted or "attributes" not in df.columns:
        return df
    parsed = df["attributes"].map(lambda a: a if isinstance(a, dict) else (json.loads(a) if a else {}))
    out = df.copy()
    for f in wanted:
        out[f] = parsed.map(lambda a, f=f: a.get(f))
    return out


def _numeric(s: pd.Series) -> pd.Series:
    return pd.to_numeric(s, errors="coerce")


def _apply_filter(df: pd.DataFrame, flt: AttributeFilter) -> pd.Series:
    if flt.field not in df.columns:
        s = pd.Series([None] * len(df), index=df.index, dtype=object)
    else:
        s = df[flt.field]
    present = s.notna() & (s.astype(str) != "")
    v = flt.value
    if flt.op == "exists":
        return present
    if flt.op == "missing":
        return ~present
    if flt.op in ("in", "not_in"):
        values = {str(x) for x in (v if isinstance(v, (list, tuple, set)) else [v])}
        m = s.astype(str).isin(values) & present
        return m if flt.op == "in" else ~m
    if flt.op == "contains":
        return s.astype(str).str.contains(str(v), case=False, regex=False) & present
    if flt.op in ("gt", "gte", "lt", "lte"):
        if isinstance(v, (int, float)):
            left, right = _numeric(s), float(v)
        else:
            left = pd.to_datetime(s, errors="coerce", utc=True, format="mixed")
            right = pd.Timestamp(v, tz="UTC") if pd.Timestamp(v).tzinfo is None else pd.Timestamp(v)
        res = {"gt": left > right, "gte": left >= right, "lt": left < right, "lte": left <= right}[flt.op]
        return res.fillna(False).astype(bool)
    if isinstance(v, bool):
        m = s.map(lambda x: str(x).strip().lower() in ("1", "true", "yes", "t", "да") if x is not None else False)
        eq = m == v
    elif isinstance(v, (int, float)):
        eq = (_numeric(s) == float(v)).fillna(False)
    else:
        eq = (s.astype(str) == str(v)) & present
    return eq if flt.op == "eq" else ~eq


def _quintile_score(values: pd.Series, higher_is_better: bool = True) -> pd.Series:
    """1..5 by rank quintile; missing values score 1."""
    ranks = values.rank(method="average", pct=True, ascending=higher_is_better)
    score = np.ceil(ranks * 5).clip(1, 5)
    return score.fillna(1).astype(int)


def rfm_scores(df: pd.DataFrame, rule: RfmRule, now: datetime) -> pd.DataFrame:
    last = pd.to_datetime(df.get(rule.recency_field), errors="coerce", utc=True, format="mixed")
    now_ts = pd.Timestamp(now, tz="UTC") if pd.Timestamp(now).tzinfo is None else pd.Timestamp(now)
    recency_days = (now_ts - last).dt.total_seconds() / 86400
    r = _quintile_score(recency_days, higher_is_better=False)  # fewer days since = better
    f = _quintile_score(_numeric(df.get(rule.frequency_field)))
    m = _quintile_score(_numeric(df.get(rule.monetary_field)))
    return pd.DataFrame({"r": r, "f": f, "m": m}, index=df.index)


def evaluate(df: pd.DataFrame, seg: SegmentDefinition, now: datetime) -> tuple[pd.Series, pd.Series | None]:
    """(membership mask, RFM score strings like '545' or None)."""
    mask = pd.Series(True, index=df.index)
    for flt in seg.filters:
        mask &= _apply_filter(df, flt)
    if seg.funnel_stages is not None:
        col = df[seg.funnel_field] if seg.funnel_field in df.columns else pd.Series(None, index=df.index, dtype=object)
        mask &= col.astype(str).isin(seg.funnel_stages)
    if seg.days_since_last_activity is not None:
        col = df[seg.activity_field] if seg.activity_field in df.columns else pd.Series(None, index=df.index, dtype=object)
        last = pd.to_datetime(col, errors="coerce", utc=True, format="mixed")
        now_ts = pd.Timestamp(now, tz="UTC") if pd.Timestamp(now).tzinfo is None else pd.Timestamp(now)
        days = (now_ts - last).dt.total_seconds() / 86400
        rng = seg.days_since_last_activity
        ok = days.notna()
        if rng.min is not None:
            ok &= days >= rng.min
        if rng.max is not None:
            ok &= days <= rng.max
        mask &= ok.fillna(False)
    score = None
    if seg.rfm is not None:
        s = rfm_scores(df, seg.rfm, now)
        rule = seg.rfm
        ok = (s.r >= rule.min_recency) & (s.f >= rule.min_frequency) & (s.m >= rule.min_monetary)
        if rule.min_total is not None:
            ok &= (s.r + s.f + s.m) >= rule.min_total
        mask &= ok
        score = s.r.astype(str) + s.f.astype(str) + s.m.astype(str)
    return mask.astype(bool), score


# --------------------------------------------------------------------------- store side


_BASE_COLUMNS = ("language", "timezone", "first_name", "last_name", "email", "sms_consent", "crm_updated_at")


def selects_everyone(seg: SegmentDefinition) -> bool:
    """No filter, funnel, activity or RFM rule: every valid contact is a member (e.g. ``ALL``)."""
    return not seg.filters and seg.funnel_stages is None and seg.days_since_last_activity is None and seg.rfm is None


def build_membership(engine, source: str, seg: SegmentDefinition, now: datetime) -> int:
    """Recompute one segment's membership among the valid contacts of a source.

    A segment without rules is written by the database alone (INSERT ... SELECT): nothing to evaluate,
    so no contact needs to travel through Python. Otherwise only the columns the rules use are read."""
    from sqlalchemy import text


    members = None
    if not selects_everyone(seg):
        fields = seg.needed_fields()
        cols = ["id", *(c for c in _BASE_COLUMNS if c in fields)]
        if fields - set(cols):
            cols.append("attributes")
        with engine.begin() as conn:
            df = read_frame(conn, f"SELECT {', '.join(cols)} FROM contacts WHERE source = :s AND status = 'valid'",
                            {"s": source})
        df = expand_attributes(df, fields)
        if df.empty:
            mask, score = pd.Series([], dtype=bool), None
        else:
            mask, score = evaluate(df, seg, now)
        members = df.loc[mask.to_numpy(), "id"].astype(int)
        scores = score[mask.to_numpy()] if score is not None else [None] * len(members)
    with engine.begin() as conn:
        bulk_insert(
            conn,
            "segments",
            ("name", "definition", "size", "computed_at"),
            [(seg.name, seg.model_dump(mode="json"), 0, utcnow())],
            on_conflict="update",
            conflict_columns=("name",),
            update_columns=("definition", "computed_at"),
        )
        conn.execute(
            text("DELETE FROM segment_memberships WHERE segment = :g AND contact_id IN (SELECT id FROM contacts WHERE source = :s)"),
            {"g": seg.name, "s": source},
        )
        if members is None:
            count = conn.execute(
                text("INSERT INTO segment_memberships (segment, contact_id, rfm_score) "
                     "SELECT :g, id, NULL FROM contacts WHERE source = :s AND status = 'valid' ORDER BY id"),
                {"g": seg.name, "s": source},
            ).rowcount
        else:
            count = len(members)
            bulk_insert(conn, "segment_memberships", ("segment", "contact_id", "rfm_score"),
                        zip([seg.name] * len(members), members, scores))
        conn.execute(
            text("UPDATE segments SET size = (SELECT COUNT(*) FROM segment_memberships m WHERE m.segment = :g) WHERE name = :g"),
            {"g": seg.name},
        )
    refresh_statistics(engine, "segment_memberships")
    return int(count)


# --------------------------------------------------------------------------- Prefect task
from smsflow.lazy_task import prefect_task  # noqa: E402 - Prefect itself only when a flow runs the task

from tasks.retrying import retry_if_transient  # noqa: E402


@prefect_task(name="build-segment", retries=1, retry_delay_seconds=5,
              retry_condition_fn=retry_if_transient)
def segment_task(source: str, segment: SegmentDefinition, database_url: str | None) -> int:

    return build_membership(get_engine(database_url), source, segment, utcnow())
