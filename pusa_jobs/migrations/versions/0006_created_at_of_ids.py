"""Every job's, file's and batch's `created_at` is the time its id carries, to the millisecond.

Listing pages by (created_at, id) and reads a cursor's time from its id. Videos registered by batches
stored the batch's time at full precision, and files and batches a time stamped apart from their id's,
so a page's cursor fell between rows: paging stopped early or repeated a page. This rewrites those rows.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

ID_TIME_HEX = 12  # an id is its prefix, the creation time in ms (12 hex), then 12 hex of randomness


def _id_time(object_id: str) -> float | None:
    try:
        return int(object_id[-24:-24 + ID_TIME_HEX], 16) / 1000
    except ValueError:
        return None


def upgrade() -> None:
    conn = op.get_bind()
    for name in ("jobs", "files", "batches"):
        table = sa.table(name, sa.column("id", sa.String), sa.column("created_at", sa.Float))
        wrong = [(row.id, at) for row in conn.execute(sa.select(table.c.id, table.c.created_at))
                 if len(row.id) > 24 and (at := _id_time(row.id)) is not None and at != row.created_at]
        for object_id, at in wrong:
            conn.execute(sa.update(table).where(table.c.id == object_id).values(created_at=at))


def downgrade() -> None:
    pass  # the finer times are not kept
