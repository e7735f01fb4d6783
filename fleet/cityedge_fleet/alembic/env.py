"""Alembic environment: migrations run on the connection ``db.migrate`` hands over."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import cityedge_fleet.models  # noqa: F401  (registers the tables on the metadata)

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through cityedge_fleet.db.migrate(engine)")

context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
