"""The database schema comes from Alembic migrations, and they match the declared tables exactly, on SQLite and
on PostgreSQL."""

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlmodel import SQLModel

from appliance.access.users import add_user, authenticate_key, create_key
from appliance.db import FTS_TABLE, alembic_config, create_db_engine, include_name, migrate
from tests.conftest import database_url

pytestmark = pytest.mark.usefixtures("fresh_stores")


def _current_revision(engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def test_migrations_create_exactly_the_declared_schema(tmp_path):
    engine = create_db_engine(database_url(tmp_path))
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"include_name": include_name})
        differences = compare_metadata(context, SQLModel.metadata)
    assert differences == [], "a table changed without a migration: add one under appliance/migrations/versions"
    head = ScriptDirectory.from_config(alembic_config(str(engine.url))).get_current_head()
    assert _current_revision(engine) == head
    tables = set(inspect(engine).get_table_names())
    assert (FTS_TABLE in tables) == (engine.dialect.name == "sqlite")  # PostgreSQL: BM25 runs in memory


def test_upgrading_again_keeps_the_data(tmp_path):
    url = database_url(tmp_path)
    engine = create_db_engine(url)
    add_user(engine, "alice", "reader")
    key = create_key(engine, "alice")
    migrate(engine)  # every start runs this
    assert authenticate_key(create_db_engine(url), key).name == "alice"


def test_downgrade_to_nothing_and_back(tmp_path):
    engine = create_db_engine(database_url(tmp_path))
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    command.downgrade(config, "base")
    assert _current_revision(engine) is None
    command.upgrade(config, "head")
    add_user(engine, "bob", "admin")
