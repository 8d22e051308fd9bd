"""MESH messages: each one we send (recorded before sending) and each one we take from our inbox

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('mesh_messages',
    sa.Column('local_id', sa.String(length=36), nullable=False),
    sa.Column('direction', sa.String(length=3), nullable=False),
    sa.Column('mailbox', sa.String(length=20), nullable=False),
    sa.Column('peer_mailbox', sa.String(length=20), nullable=False),
    sa.Column('workflow_id', sa.String(length=100), nullable=False),
    sa.Column('content_sha256', sa.String(length=64), nullable=False),
    sa.Column('byte_count', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.String(length=12), nullable=False),
    sa.Column('message_id', sa.String(length=100), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.String(length=500), nullable=True),
    sa.Column('reason', sa.String(length=500), nullable=True),
    sa.Column('run_id', sa.String(length=250), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('dead_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('local_id', name=op.f('pk_mesh_messages'))
    )
    op.create_index('ix_mesh_messages_direction_mailbox_status', 'mesh_messages',
                    ['direction', 'mailbox', 'status'], unique=False)
    op.create_index('uq_mesh_messages_direction_message_id', 'mesh_messages',
                    ['direction', 'message_id'], unique=True)


def downgrade() -> None:
    op.drop_index('uq_mesh_messages_direction_message_id', table_name='mesh_messages')
    op.drop_index('ix_mesh_messages_direction_mailbox_status', table_name='mesh_messages')
    op.drop_table('mesh_messages')
