"""learner events (left, moved, returned) and MIS source ids

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('learner_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('learner_key', sa.String(length=40), nullable=False),
    sa.Column('kind', sa.String(length=10), nullable=False),
    sa.Column('other_key', sa.String(length=40), nullable=True),
    sa.Column('from_urn', sa.String(length=10), nullable=True),
    sa.Column('to_urn', sa.String(length=10), nullable=True),
    sa.Column('source', sa.String(length=300), nullable=False),
    sa.Column('run_id', sa.String(length=250), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_learner_events'))
    )
    op.create_index(op.f('ix_learner_events_learner_key'), 'learner_events', ['learner_key'], unique=False)
    op.create_index(op.f('ix_learner_events_run_id'), 'learner_events', ['run_id'], unique=False)
    op.create_table('source_ids',
    sa.Column('source_key', sa.String(length=40), nullable=False),
    sa.Column('learner_key', sa.String(length=40), nullable=False),
    sa.Column('updated_run', sa.String(length=250), nullable=False),
    sa.PrimaryKeyConstraint('source_key', name=op.f('pk_source_ids'))
    )


def downgrade() -> None:
    op.drop_table('source_ids')
    op.drop_index(op.f('ix_learner_events_run_id'), table_name='learner_events')
    op.drop_index(op.f('ix_learner_events_learner_key'), table_name='learner_events')
    op.drop_table('learner_events')
