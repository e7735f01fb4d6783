"""Intermediate CA rollover: ``credential.issuer``, the id of the intermediate that issued
each certificate (``ca.issuer_id``), so ``ca status``/``ca retire`` count the devices
that depend on an intermediate and a campaign selects them (``intermediate=<id>``).
Existing rows are filled in from their certificate's AuthorityKeyIdentifier.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 22:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel import AutoString

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

BATCH = 1000  # rows read and updated per round


def upgrade() -> None:
    from cityedge_fleet.ca import issuer_id_of_pem

    op.add_column("credential", sa.Column("issuer", AutoString(length=16), nullable=True))
    op.create_index("ix_credential_issuer", "credential", ["issuer"])
    conn = op.get_bind()
    table = sa.table("credential", sa.column("id", sa.Integer()),
                     sa.column("cert_pem", sa.Text()), sa.column("issuer", sa.String()))
    last = 0
    while True:
        rows = conn.execute(sa.select(table.c.id, table.c.cert_pem)
                            .where(table.c.id > last).order_by(table.c.id)
                            .limit(BATCH)).all()
        if not rows:
            break
        for rid, pem in rows:
            issuer = issuer_id_of_pem(pem)
            if issuer is not None:
                conn.execute(table.update().where(table.c.id == rid).values(issuer=issuer))
        last = rows[-1][0]


def downgrade() -> None:
    op.drop_index("ix_credential_issuer", table_name="credential")
    op.drop_column("credential", "issuer")
