"""HL7v2 messages received over MLLP: stored (sealed) before they are acknowledged

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'hl7_messages',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
        sa.Column('sender', sa.String(length=200), nullable=True),
        sa.Column('control_id', sa.String(length=200), nullable=True),
        sa.Column('message_type', sa.String(length=100), nullable=True),
        sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('body', sa.LargeBinary(), nullable=False),
        sa.Column('status', sa.String(length=12), nullable=False),
        sa.Column('reason', sa.Text(), nullable=True),
        sa.Column('ack_code', sa.String(length=2), nullable=False),
        sa.Column('ack_error', sa.String(length=3), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_hl7_messages')),
    )
    op.create_index('ix_hl7_messages_status', 'hl7_messages', ['status', 'id'], unique=False)
    op.create_index('uq_hl7_messages_sender_control_id', 'hl7_messages', ['sender', 'control_id'], unique=True)


def downgrade() -> None:
    op.drop_index('uq_hl7_messages_sender_control_id', table_name='hl7_messages')
    op.drop_index('ix_hl7_messages_status', table_name='hl7_messages')
    op.drop_table('hl7_messages')
