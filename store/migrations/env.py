"""Alembic environment: migrations run on a connection handed in by ``store.db.migrate``
or, from the command line, on ``SMSFLOW_DATABASE_URL`` (``alembic -c store/alembic.ini upgrade head``)."""
from alembic import context
from sqlalchemy import create_engine

from store.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    from smsflow.settings import get_settings

    url = config.get_main_option("sqlalchemy.url") or get_settings().store_url
    engine = create_engine(url)
    with engine.begin() as conn:
        _run(conn)
