"""``device.trust_version``: the command-key trust statement version the fleet handed out
in the device's last enrollment answer (None: none, or enrolled before this migration). A
command-key rotation counts a device enrolled with its statement as having installed it
(``command_key_rotation.threshold_reached``), from this record of the fleet's own, not
from anything the device says.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-04 21:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("device", sa.Column("trust_version", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("device") as batch:  # SQLite: a column drop is a table copy
        batch.drop_column("trust_version")
