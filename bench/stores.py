"""A fresh, empty store for one benchmark run: a SQLite file in the run's temp dir (the embedded default)
or, with ``--database-url`` (any database on a PostgreSQL server), a new database created on that server
for the run and dropped afterwards. Used by every bench script."""
from __future__ import annotations

import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def store_label(base_url: str | None) -> str:
    return "PostgreSQL" if base_url and base_url.startswith("postgresql") else "SQLite"


@contextmanager
def fresh_store(base_url: str | None, d: Path, name: str = "store") -> Iterator[str]:
    """The URL of a new store; a PostgreSQL database made here is dropped on exit (its connections closed)."""
    if not base_url:
        yield f"sqlite:///{Path(d) / f'{name}.sqlite'}"
        return
    import sqlalchemy as sa

    db = f"bench_{name}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(base_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{db}"'))
        yield sa.engine.make_url(base_url).set(database=db).render_as_string(hide_password=False)
    finally:
        from store.db import dispose_engines

        dispose_engines()
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        admin.dispose()
