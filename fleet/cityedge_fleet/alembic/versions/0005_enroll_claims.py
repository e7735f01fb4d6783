"""Allow-listed serials carry the SHA-256 of their device's claim secret
(``allowed_serial.claim_hash``); audit rows name their chaining rule (``audit_record.alg``:
``sha256`` for the rows written before the audit key, ``hmac-sha256:<key id>`` after).

Existing allow-list entries get no claim hash: they enroll nothing any more (a serial
alone proves nothing) until the vendor's manifest is uploaded again with claims.
Existing audit rows are marked ``sha256`` and keep verifying as before.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel import AutoString

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("allowed_serial",
                  sa.Column("claim_hash", AutoString(length=64), nullable=True))
    op.add_column("audit_record",
                  sa.Column("alg", AutoString(length=32), nullable=False,
                            server_default="sha256"))


def downgrade() -> None:
    with op.batch_alter_table("audit_record") as batch:
        batch.drop_column("alg")
    with op.batch_alter_table("allowed_serial") as batch:
        batch.drop_column("claim_hash")
