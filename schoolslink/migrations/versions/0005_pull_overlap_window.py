"""incremental pull: the versions read inside each type's overlap window, so a re-read is skipped

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('watermarks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('seen', sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('watermarks', schema=None) as batch_op:
        batch_op.drop_column('seen')
