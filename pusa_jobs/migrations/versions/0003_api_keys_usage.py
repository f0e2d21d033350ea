"""API keys (hashed) with roles and quotas, and the per-key usage ledger.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float),
        sa.Column("max_concurrent_jobs", sa.Integer),
        sa.Column("jobs_per_minute", sa.Integer),
        sa.Column("gpu_seconds_per_day", sa.Float),
    )
    op.create_table(
        "usage",
        sa.Column("job_id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("gpu_seconds", sa.Float, nullable=False),
    )
    op.create_index("ix_usage_owner_created", "usage", ["owner", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_usage_owner_created", "usage")
    op.drop_table("usage")
    op.drop_table("api_keys")
