"""school portal: portal_users, portal_sessions, portal_events

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'portal_users',
        sa.Column('user_id', sa.String(length=40), nullable=False),
        sa.Column('email', sa.String(length=254), nullable=False),
        sa.Column('role', sa.String(length=20), nullable=False),
        sa.Column('organisations', sa.JSON(), nullable=False),
        sa.Column('auth', sa.String(length=10), nullable=False),
        sa.Column('password_hash', sa.String(length=200), nullable=True),
        sa.Column('totp_sealed', sa.Text(), nullable=True),
        sa.Column('totp_last_step', sa.BigInteger(), nullable=True),
        sa.Column('oidc_issuer', sa.String(length=300), nullable=True),
        sa.Column('oidc_subject', sa.String(length=300), nullable=True),
        sa.Column('disabled', sa.Boolean(), nullable=False),
        sa.Column('failed_attempts', sa.Integer(), nullable=False),
        sa.Column('locked_until', sa.DateTime(timezone=True), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('created_by', sa.String(length=60), nullable=False),
        sa.Column('last_sign_in_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('user_id', name=op.f('pk_portal_users')),
        sa.UniqueConstraint('email', name=op.f('uq_portal_users_email')),
    )
    op.create_index('uq_portal_users_oidc_issuer', 'portal_users', ['oidc_issuer', 'oidc_subject'], unique=True)
    op.create_table(
        'portal_sessions',
        sa.Column('session_hash', sa.String(length=64), nullable=False),
        sa.Column('kind', sa.String(length=10), nullable=False),
        sa.Column('user_id', sa.String(length=40), nullable=True),
        sa.Column('csrf_token', sa.String(length=64), nullable=False),
        sa.Column('role', sa.String(length=20), nullable=True),
        sa.Column('organisations', sa.JSON(), nullable=True),
        sa.Column('pending', sa.JSON(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('session_hash', name=op.f('pk_portal_sessions')),
    )
    op.create_index('ix_portal_sessions_user_id', 'portal_sessions', ['user_id'], unique=False)
    op.create_table(
        'portal_events',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('user_id', sa.String(length=40), nullable=True),
        sa.Column('event', sa.String(length=30), nullable=False),
        sa.Column('organisation', sa.String(length=10), nullable=True),
        sa.Column('detail', sa.String(length=300), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_portal_events')),
    )
    op.create_index('ix_portal_events_at', 'portal_events', ['at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_portal_events_at', table_name='portal_events')
    op.drop_table('portal_events')
    op.drop_index('ix_portal_sessions_user_id', table_name='portal_sessions')
    op.drop_table('portal_sessions')
    op.drop_index('uq_portal_users_oidc_issuer', table_name='portal_users')
    op.drop_table('portal_users')
