"""Batch videos registered once, and the retention of files and batches.

``batch_videos`` records each batch row whose video was registered, in the transaction that makes the
video: a video its owner deleted during the batch is never made again. ``files.expires_at`` and
``batches.retention_ends_at`` are when the runners' sweep deletes a file, or an ended batch with its
stored input and outputs (rows made before this revision have neither and are kept).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batch_videos",
        sa.Column("batch_id", sa.String(64), sa.ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("custom_id", sa.String(128), primary_key=True),
        sa.Column("video_id", sa.String(64), nullable=False),
    )
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("expires_at", sa.Float))
    op.create_index("ix_files_expires_at", "files", ["expires_at"])
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("retention_ends_at", sa.Float))
    op.create_index("ix_batches_retention_ends_at", "batches", ["retention_ends_at"])


def downgrade() -> None:
    op.drop_index("ix_batches_retention_ends_at", "batches")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("retention_ends_at")
    op.drop_index("ix_files_expires_at", "files")
    with op.batch_alter_table("files") as batch:
        batch.drop_column("expires_at")
    op.drop_table("batch_videos")
