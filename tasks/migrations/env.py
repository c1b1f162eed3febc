"""Alembic's entry point: run the migrations against the URL that `tasks.db` configured."""

from __future__ import annotations

from alembic import context

from tasks import db


def run() -> None:
    """Apply the migrations online, on one connection; SQLite alters tables in batch mode."""
    engine = db.create_engine(context.config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=db.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run()
