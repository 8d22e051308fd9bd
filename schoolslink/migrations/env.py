"""Alembic environment: migrates the state store at SCHOOLSLINK_DB_URL (or the URL given in config)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from schoolslink.settings import db_url
from schoolslink.store.schema import metadata

config = context.config
url = config.get_main_option("sqlalchemy.url") or db_url()
connection = config.attributes.get("connection")

if connection is not None:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = create_engine(url)
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
