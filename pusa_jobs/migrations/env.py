"""Alembic environment: migrations run on the connection `pusa_jobs.db.migrate` passes in (inside its
locked transaction), or on ``sqlalchemy.url`` when Alembic's own command line runs them."""

from alembic import context
from sqlalchemy import create_engine

from pusa_jobs.schema import metadata


def run_migrations(connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    with create_engine(context.config.get_main_option("sqlalchemy.url")).begin() as conn:
        run_migrations(conn)
