"""CRM events as the store keeps them (table ``crm_events``): written by the webhook service and by
imports, read by the journey flow. One writer for all of them."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy.engine import Connection

from store.db import is_postgres, utcnow
from store.models import CrmEvent


def insert_ignore(conn: Connection, table, values: dict[str, Any]) -> int | None:
    """INSERT .. ON CONFLICT DO NOTHING; the new row's primary key, None when it was already there."""
    if is_postgres(conn):
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    pk = list(table.primary_key.columns)[0]
    row = conn.execute(insert(table).values(**values).on_conflict_do_nothing().returning(pk)).first()
    return None if row is None else row[0]


def record_event(conn: Connection, source: str, event_type: str, entity_id: str | None, payload: dict[str, Any],
                 dedup_key: str, received_at: datetime | None = None) -> int | None:
    """Store one CRM event once per (source, dedup_key): its id when new, None for a repeated delivery."""
    if received_at is not None and received_at.tzinfo is not None:
        received_at = received_at.astimezone(timezone.utc).replace(tzinfo=None)
    return insert_ignore(conn, CrmEvent.__table__, dict(
        source=source, dedup_key=dedup_key, event_type=event_type, entity_id=entity_id, payload=payload,
        received_at=received_at or utcnow()))
