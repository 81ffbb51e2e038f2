"""dataset ingests: an upload's ingest is a job (dataset_ingests), datasets.enqueued_at goes

Every upload gets its ingest row: one still ``ingesting`` a queued ingest (sent when it was,
so the reconciler re-sends it as any lost job), one ``ready`` or ``failed`` a finished one
with the dataset's error. A migrated ingest's id is its dataset's, so an ingest message the
broker still holds from before (it carries the dataset's id) finds its job.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 03:00:00.000000
"""
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_datasets = sa.table(
    'datasets',
    sa.column('id', sa.Uuid()),
    sa.column('status', sa.String(16)),
    sa.column('error', sa.JSON()),
    sa.column('created_at', sa.DateTime(timezone=True)),
    sa.column('enqueued_at', sa.DateTime(timezone=True)),
    sa.column('finished_at', sa.DateTime(timezone=True)),
)
_ingests = sa.table(
    'dataset_ingests',
    sa.column('id', sa.Uuid()),
    sa.column('dataset_id', sa.Uuid()),
    sa.column('status', sa.String(16)),
    sa.column('progress_fraction', sa.Float()),
    sa.column('progress_stage', sa.String(100)),
    sa.column('progress_message', sa.Text()),
    sa.column('cancel_requested', sa.Boolean()),
    sa.column('attempts', sa.Integer()),
    sa.column('error', sa.JSON()),
    sa.column('created_at', sa.DateTime(timezone=True)),
    sa.column('enqueued_at', sa.DateTime(timezone=True)),
    sa.column('finished_at', sa.DateTime(timezone=True)),
)

#: A dataset's status, and its ingest's state, stage and message.
_STATES = {
    'ingesting': ('queued', 'queued', 'waiting for a worker', 0.0),
    'ready': ('succeeded', 'succeeded', 'done', 1.0),
    'failed': ('failed', 'failed', 'the archive could not be ingested', 0.0),
}


def upgrade() -> None:
    conn = op.get_bind()
    now = datetime.now(UTC)
    rows = []
    for ds in conn.execute(sa.select(_datasets)):
        status, stage, message, fraction = _STATES.get(ds.status, _STATES['failed'])
        rows.append({
            'id': ds.id, 'dataset_id': ds.id, 'status': status, 'progress_fraction': fraction,
            'progress_stage': stage, 'progress_message': message, 'cancel_requested': False,
            'attempts': 0, 'error': ds.error if status == 'failed' else None,
            'created_at': ds.created_at or now, 'enqueued_at': ds.enqueued_at or now,
            'finished_at': ds.finished_at if status != 'queued' else None,
        })
    # Not batch mode: on SQLite that copies the table and drops the old one, and with foreign
    # keys on the drop would null the evaluations' and trainings' dataset ids (SQLite drops a
    # plain column in place since 3.35).
    op.drop_column('datasets', 'enqueued_at')
    op.create_table(
        'dataset_ingests',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('dataset_id', sa.Uuid(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('progress_fraction', sa.Float(), nullable=False),
        sa.Column('progress_stage', sa.String(length=100), nullable=False),
        sa.Column('progress_message', sa.Text(), nullable=False),
        sa.Column('cancel_requested', sa.Boolean(), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('worker', sa.String(length=200), nullable=True),
        sa.Column('device', sa.String(length=200), nullable=True),
        sa.Column('error', sa.JSON(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('dataset_id'),
    )
    op.create_index('ix_dataset_ingests_status', 'dataset_ingests', ['status'])
    if rows:
        op.bulk_insert(_ingests, rows)


def downgrade() -> None:
    conn = op.get_bind()
    sent = list(conn.execute(sa.select(_ingests.c.dataset_id, _ingests.c.enqueued_at)))
    op.drop_index('ix_dataset_ingests_status', table_name='dataset_ingests')
    op.drop_table('dataset_ingests')
    op.add_column('datasets', sa.Column('enqueued_at', sa.DateTime(timezone=True),
                                        nullable=True))
    for job in sent:
        conn.execute(_datasets.update().where(_datasets.c.id == job.dataset_id)
                     .values(enqueued_at=job.enqueued_at))
