"""An index on ``reading.t``: the open-data Observations of a time window over many
devices (``$filter`` on ``phenomenonTime``, ``$orderby=phenomenonTime``) walk it in order
and stop after a page, instead of reading every device's rows of the window and sorting
them (``bench/scale_queries.py``, docs/CAPACITY.md C8: 1,000,000 devices, 100,000,000
readings, one page of a site's day in time order: 3,896 ms and 109,999 rows read without
this index, 47 ms and 10,144 rows with it).

On PostgreSQL the index is made on the partitioned ``reading`` and so on every partition
(and on every partition ``reading_partitions`` attaches later).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-04 15:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_reading_t", "reading", ["t"])


def downgrade() -> None:
    op.drop_index("ix_reading_t", table_name="reading")
