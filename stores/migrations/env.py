"""Alembic environment: runs on the connection the metadata store hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from stores.metadata.models import Base

target_metadata = Base.metadata
config = context.config


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(
            connection=connection, target_metadata=target_metadata, render_as_batch=True
        )
        context.run_migrations()
        return
    # Offline use from the command line: `alembic -x url=... upgrade head`.
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise SystemExit(
            "pass the database URL: alembic -x url=sqlite:///path/metadata.db upgrade head"
        )
    engine = create_engine(url)
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        context.run_migrations()


run()
