"""Moving a test database to one migration: what the migration tests share."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

from cityedge_fleet.db import MIGRATIONS_DIR


def migrate_to(engine: Engine, revision: str, down: bool = False) -> None:
    """Upgrade (or, with ``down``, downgrade) ``engine``'s database to ``revision``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, revision)
