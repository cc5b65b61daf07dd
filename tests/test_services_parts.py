"""`Services` with parts built elsewhere (used as they are, closed by their caller) and read-only (the doctor's:
nothing made, migrated or installed)."""

import pytest
from sqlalchemy import inspect

from appliance.config import Settings
from appliance.services import Services


class _Ingestor:
    closed = False

    def close(self) -> None:
        self.closed = True


def test_a_given_part_is_used_as_it_is_and_left_to_its_caller(tmp_path):
    given = _Ingestor()
    with Services(Settings(home=tmp_path / "home"), ingestor=given) as services:
        assert services.ingestor is given
    assert not given.closed
    assert not (tmp_path / "home").exists()  # nothing else was built
    with pytest.raises(TypeError, match="no part named 'embeder'"):
        Services(Settings(home=tmp_path / "home"), embeder=object())


def test_read_only_opens_the_home_as_it_is(tmp_path):
    home = tmp_path / "home"
    with Services(Settings(home=home)) as services:
        assert "alembic_version" in inspect(services.db).get_table_names()  # made and migrated
    (home / "models").rmdir()
    empty = tmp_path / "empty.db"
    empty.touch()
    settings = Settings(home=home, database_url=f"sqlite:///{empty}", scheduler={"default_model": True})
    services = Services(settings, read_only=True)
    assert inspect(services.db).get_table_names() == []  # not migrated
    assert services.vectors.get_settings().anonymized_telemetry is False
    assert not (home / "models").exists()  # the home's folders are not made
    assert services.store.list() == []  # and no default model is installed
