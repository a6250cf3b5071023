"""Small builders shared by tests."""
from __future__ import annotations

import csv
from pathlib import Path

import os
from contextlib import contextmanager
from datetime import datetime, timezone
from smsflow.processes import free_ports

# A clock inside every default send window: Wednesday 25 Nov 2026, 12:00 in Moscow, not a holiday.
DAYTIME = datetime(2026, 11, 25, 9, 0, tzinfo=timezone.utc)

HEADER = ["id", "first_name", "last_name", "phone", "email", "language", "timezone", "sms_consent", "consent_at",
          "updated_at", "city", "funnel_stage", "orders_count", "total_spent", "last_order_at", "last_activity_at"]


def contact(i: int, **over) -> dict:
    row = {
        "id": f"C{i:05d}",
        "first_name": ["Анна", "Иван", "Ольга", "John"][i % 4],
        "last_name": "Петрова",
        "phone": f"+7 916 {1000000 + i:07d}",
        "email": f"u{i}@example.ru",
        "language": "en" if i % 4 == 3 else "ru",
        "timezone": "Europe/Moscow",
        "sms_consent": "true",
        "consent_at": "2025-01-01T10:00:00Z",
        "updated_at": f"2026-01-01T10:{i % 60:02d}:00Z",
        "city": "Москва",
        "funnel_stage": "customer",
        "orders_count": str(i % 7),
        "total_spent": str(100 * (i % 13)),
        "last_order_at": "2026-10-01T00:00:00Z",
        "last_activity_at": "2026-11-01T00:00:00Z",
    }
    row.update(over)
    return row


def write_csv(path: Path, rows: list[dict], header: list[str] | None = None) -> Path:
    header = header or list(rows[0].keys()) if rows else (header or HEADER)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


def load_csv(engine, path: Path, source: str = "test"):
    """Extract + validate a CSV into the store (plain functions, no Prefect)."""
    from blocks.crm import CsvCrm
    from tasks.extract import extract_source
    from tasks.validate import validate_new_contacts

    ex = extract_source(engine, CsvCrm(path=str(path), source_name=source))
    va = validate_new_contacts(engine, source, "RU")
    return ex, va




def wait_for(pred, what: str, timeout: float = 30.0, interval: float = 0.1):
    """Poll ``pred`` until it returns something truthy (returned); AssertionError after ``timeout``."""
    import time

    end = time.monotonic() + timeout
    while True:
        res = pred()
        if res:
            return res
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def service_unavailable(what: str, reason: str):
    """A service a test needs is missing: fail under CI, skip (with the reason) elsewhere."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"{what} is required under CI and could not start: {reason}")
    pytest.skip(f"{what} not available: {reason}")


def descendants(pid: int) -> list[int]:
    """Pids of every live descendant of pid (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    from pathlib import Path

    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for p in proc.iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@contextmanager
def served_in_thread(app):
    """An ASGI app on a free loopback port (uvicorn in a daemon thread); yields its base URL."""
    import threading

    import uvicorn

    (port,) = free_ports(1)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    wait_for(lambda: server.started, "the service")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(10)
