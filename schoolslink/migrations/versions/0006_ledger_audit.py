"""tamper-evident ledger: entry format 2 (task, key version, value commitments), ledger_values, ledger_checkpoints

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('ledger', schema=None) as batch_op:
        batch_op.add_column(sa.Column('entry_format', sa.Integer(), nullable=False, server_default='1'))
        batch_op.add_column(sa.Column('task_id', sa.String(length=250), nullable=True))
        batch_op.add_column(sa.Column('key_version', sa.String(length=20), nullable=True))
        batch_op.add_column(sa.Column('commitments', sa.Text(), nullable=True))
    op.create_table(
        'ledger_values',
        sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=False,
                  nullable=False),
        sa.Column('item', sa.String(length=100), nullable=False),
        sa.Column('salt', sa.String(length=32), nullable=True),
        sa.Column('value', sa.Text(), nullable=True),
        sa.Column('erased_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('seq', 'item', name=op.f('pk_ledger_values')),
    )
    op.create_table(
        'ledger_checkpoints',
        sa.Column('tree_size', sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column('run_id', sa.String(length=250), nullable=False),
        sa.Column('root', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('frontier', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('tree_size', 'run_id', name=op.f('pk_ledger_checkpoints')),
    )


def downgrade() -> None:
    op.drop_table('ledger_checkpoints')
    op.drop_table('ledger_values')
    with op.batch_alter_table('ledger', schema=None) as batch_op:
        batch_op.drop_column('commitments')
        batch_op.drop_column('key_version')
        batch_op.drop_column('task_id')
        batch_op.drop_column('entry_format')
