"""Shared fixtures.

- ``store_url``: a fresh store per test, on SQLite and (for tests that ask for ``any_store``)
  on PostgreSQL at 127.0.0.1:5432. Without PostgreSQL those cases skip locally and FAIL
  under ``CI``.
- ``prefect``: one ``prefect_test_harness`` for the whole session (it takes ~20 s to start).
"""
from __future__ import annotations

import os
import sys
import uuid

import pytest

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

if os.environ.get("TEST_CLOCK_SHIFT_DAYS"):
    # Children (Prefect server, worker, CLI commands, the service) often run in another directory;
    # a relative PYTHONPATH would leave them on the real clock, and a Prefect server a year behind
    # its clients never hands out their runs. Make every entry absolute for the whole run.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)
    if "time_machine" not in sys.modules:  # loaded by tests/clockshift/sitecustomize.py
        raise RuntimeError("TEST_CLOCK_SHIFT_DAYS is set but the clock is not moved: PYTHONPATH must hold tests/clockshift")

PG_ADMIN = os.environ.get("SMSFLOW_TEST_PG", "host=127.0.0.1 port=5432 dbname=postgres user=postgres")


def _pg_available() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return None
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"


@pytest.fixture(autouse=True)
def _isolated_data_dir(tmp_path, monkeypatch):
    """Every test gets its own data dir (embedded store, sandbox gateway state, reports)."""
    from smsflow.settings import reset_settings

    monkeypatch.setenv("SMSFLOW_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("SMSFLOW_DATABASE_URL", raising=False)
    reset_settings()
    yield
    reset_settings()


def _make_pg_database() -> tuple[str, str]:
    import psycopg

    name = f"smsflow_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = dict(p.split("=", 1) for p in PG_ADMIN.split())
    url = f"postgresql+psycopg://{params.get('user', 'postgres')}@{params.get('host', '127.0.0.1')}:{params.get('port', '5432')}/{name}"
    return name, url


def _drop_pg_database(name: str) -> None:
    import psycopg

    from store.db import dispose_engines

    dispose_engines()
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_server():
    """The PostgreSQL server's SQLAlchemy URL (its admin database); fails under CI when unreachable."""
    problem = _pg_available()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required under CI and is not reachable: {problem}")
        pytest.skip(f"PostgreSQL not reachable: {problem}")
    params = dict(p.split("=", 1) for p in PG_ADMIN.split())
    return (f"postgresql+psycopg://{params.get('user', 'postgres')}@{params.get('host', '127.0.0.1')}:"
            f"{params.get('port', '5432')}/{params.get('dbname', 'postgres')}")


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request, tmp_path):
    """A fresh, migrated store URL: the test runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.sqlite'}"
        return
    problem = _pg_available()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required under CI and is not reachable: {problem}")
        pytest.skip(f"PostgreSQL not reachable: {problem}")
    name, url = _make_pg_database()
    try:
        yield url
    finally:
        _drop_pg_database(name)


@pytest.fixture
def store_url(tmp_path):
    """A fresh SQLite store URL (the embedded default)."""
    return f"sqlite:///{tmp_path / 'store.sqlite'}"


@pytest.fixture
def engine(any_store):
    from store.db import get_engine

    return get_engine(any_store)


@pytest.fixture
def sqlite_engine(store_url):
    from store.db import get_engine

    return get_engine(store_url)


@pytest.fixture(scope="session")
def prefect():
    """One temporary Prefect server (SQLite) for every flow test."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
