"""The web console: ``console_session`` (a signed-in browser: the SHA-256 of its cookie,
its API token, CSRF token and lifetimes), and the indexes its pages read through: the
device list filtered by state, site or model and paged by id (``(state, id)``,
``(site, id)``, ``(model, id)``: one index range per page at 100,000 devices), and the
overview's ingest classifications of the last day (``ingest_event.at``).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel import AutoString

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

DEVICE_INDEXES = {"ix_device_state_id": ["state", "id"], "ix_device_site_id": ["site", "id"],
                  "ix_device_model_id": ["model", "id"]}


def upgrade() -> None:
    op.create_table(
        "console_session",
        sa.Column("id_hash", AutoString(length=64), nullable=False),
        sa.Column("token_id", sa.Integer(), nullable=False),
        sa.Column("csrf", AutoString(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["token_id"], ["api_token.id"]),
        sa.PrimaryKeyConstraint("id_hash"),
    )
    op.create_index("ix_console_session_token_id", "console_session", ["token_id"])
    op.create_index("ix_console_session_expires_at", "console_session", ["expires_at"])
    for name, columns in DEVICE_INDEXES.items():
        op.create_index(name, "device", columns)
    op.create_index("ix_ingest_event_at", "ingest_event", ["at"])


def downgrade() -> None:
    op.drop_index("ix_ingest_event_at", table_name="ingest_event")
    for name in DEVICE_INDEXES:
        op.drop_index(name, table_name="device")
    op.drop_index("ix_console_session_expires_at", table_name="console_session")
    op.drop_index("ix_console_session_token_id", table_name="console_session")
    op.drop_table("console_session")
