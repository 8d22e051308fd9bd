"""identity matching: per-attribute match keys on learners and patients, and the candidates a reviewer weighs

The trust's Patients already stored have no match keys: their `_lastUpdated` watermark is forgotten, so the next
nhs_sync reads every Patient again (an upsert: nothing else changes) and stores their keys. Learners get theirs
from the next export of their school.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('learners', schema=None) as batch_op:
        batch_op.add_column(sa.Column('match_keys', sa.JSON(none_as_null=True), nullable=True))
    with op.batch_alter_table('patients', schema=None) as batch_op:
        batch_op.add_column(sa.Column('match_keys', sa.JSON(none_as_null=True), nullable=True))
    op.create_table('match_candidates',
    sa.Column('trust_ods', sa.String(length=10), nullable=False),
    sa.Column('patient_ref', sa.String(length=100), nullable=False),
    sa.Column('learner_key', sa.String(length=40), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('exact', sa.Boolean(), nullable=False),
    sa.Column('score', sa.Float(), nullable=True),
    sa.Column('agreement', sa.String(length=200), nullable=True),
    sa.Column('updated_run', sa.String(length=250), nullable=False),
    sa.PrimaryKeyConstraint('trust_ods', 'patient_ref', 'learner_key', name=op.f('pk_match_candidates'))
    )
    watermarks = sa.table('watermarks', sa.column('resource_type', sa.String))
    op.execute(watermarks.delete().where(watermarks.c.resource_type == 'Patient'))


def downgrade() -> None:
    op.drop_table('match_candidates')
    with op.batch_alter_table('patients', schema=None) as batch_op:
        batch_op.drop_column('match_keys')
    with op.batch_alter_table('learners', schema=None) as batch_op:
        batch_op.drop_column('match_keys')
