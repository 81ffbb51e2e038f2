"""dataset ingest state, key names, key last-use

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 04:10:00.000000
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('status', sa.String(length=16), nullable=False,
                                      server_default='ready'))
        batch_op.add_column(sa.Column('error', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('name', sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('name')
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_column('enqueued_at')
        batch_op.drop_column('finished_at')
        batch_op.drop_column('error')
        batch_op.drop_column('status')
