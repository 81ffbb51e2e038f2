"""evaluation shards: evaluations.shards, the evaluation_shards jobs, the workers seen

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 18:00:00.000000
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('shards', sa.Integer(), server_default='1',
                                      nullable=False))
    op.create_table(
        'evaluation_shards',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('evaluation_id', sa.Uuid(), nullable=False),
        sa.Column('index', sa.Integer(), nullable=False),
        sa.Column('start', sa.Integer(), nullable=False),
        sa.Column('stop', sa.Integer(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('progress_fraction', sa.Float(), nullable=False),
        sa.Column('progress_stage', sa.String(length=100), nullable=False),
        sa.Column('progress_message', sa.Text(), nullable=False),
        sa.Column('cancel_requested', sa.Boolean(), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('worker', sa.String(length=200), nullable=True),
        sa.Column('device', sa.String(length=200), nullable=True),
        sa.Column('error', sa.JSON(), nullable=True),
        sa.Column('completed_entries', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['evaluation_id'], ['evaluations.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('evaluation_id', 'index'),
    )
    op.create_index('ix_evaluation_shards_evaluation_id', 'evaluation_shards',
                    ['evaluation_id'])
    op.create_index('ix_evaluation_shards_status', 'evaluation_shards', ['status'])
    op.create_table(
        'workers_seen',
        sa.Column('name', sa.String(length=200), nullable=False),
        sa.Column('seen_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('name'),
    )


def downgrade() -> None:
    op.drop_table('workers_seen')
    op.drop_index('ix_evaluation_shards_status', table_name='evaluation_shards')
    op.drop_index('ix_evaluation_shards_evaluation_id', table_name='evaluation_shards')
    op.drop_table('evaluation_shards')
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.drop_column('shards')
