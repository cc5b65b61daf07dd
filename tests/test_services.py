"""`Services`: the core of a home, each part built on first use, so a command opens only what it needs."""

from appliance.access import users
from appliance.config import Settings
from appliance.services import Services


def test_a_command_on_users_never_opens_the_vector_store(tmp_path):
    settings = Settings(home=tmp_path / "home")
    with Services(settings) as services:
        users.add_user(services.db, "alice", "reader")
        assert [u.name for u in users.list_users(services.db)] == ["alice"]
        assert not any(settings.chroma_dir.iterdir())
        assert services.index.check().documents == 0  # the index opens Chroma, on the same database
        assert any(settings.chroma_dir.iterdir())
