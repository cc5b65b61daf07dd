"""Per-user API rate limits: beyond `APPLIANCE_API_RATE_LIMIT` a user gets 429 with Retry-After and the
API's error body, other users are still served, unauthenticated and non-API routes are not counted; an
empty setting disables limiting and a bad one stops the server from starting."""

from pathlib import Path

import httpx
import pytest

from appliance.config import ServerSettings, Settings
from appliance.errors import ApplianceError
from tests.conftest import run_cli, start_server, stop_server


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("limited"), {}, APPLIANCE_API_RATE_LIMIT="3/minute;50/hour")
    yield server
    stop_server(server)


def _get(server, path: str, key: str | None = None) -> httpx.Response:
    return httpx.get(server.url + path, headers=server.auth(key) if key else {}, timeout=30)


def test_a_user_over_the_limit_gets_429_and_others_are_still_served(limited):
    reader = limited.reader_key
    # /api and /v1 share one count per user.
    assert [_get(limited, path, reader).status_code for path in ("/api/tags", "/v1/models", "/api/ps")] == [200] * 3

    refused = _get(limited, "/api/tags", reader)
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 60  # the minute window frees first
    assert "too many requests" in refused.json()["error"]

    refused_v1 = _get(limited, "/v1/models", reader)
    assert refused_v1.status_code == 429
    assert 1 <= int(refused_v1.headers["Retry-After"]) <= 60
    assert refused_v1.json()["error"]["message"].startswith("too many requests")

    # Another user, unauthenticated callers and routes outside the API are not affected.
    assert [_get(limited, "/api/tags", limited.admin_key).status_code for _ in range(3)] == [200] * 3
    assert _get(limited, "/api/tags", "apk_not-a-real-key").status_code == 401
    assert _get(limited, "/api/tags").status_code == 401
    assert all(_get(limited, "/api/version").status_code == 200 for _ in range(5))
    assert _get(limited, "/login").status_code == 200
    assert _get(limited, "/static/app.css").status_code == 200
    assert _get(limited, "/api/tags", reader).status_code == 429

    log = limited.log_path.read_text()
    refusals = [line for line in log.splitlines() if "rate limit: refused" in line]
    assert len(refusals) == 3 and all("user reader" in line for line in refusals)
    assert reader not in log and limited.admin_key not in log


def test_an_empty_setting_disables_limiting(tmp_path):
    server = start_server(tmp_path / "home", {}, APPLIANCE_API_RATE_LIMIT="")
    try:
        assert [_get(server, "/api/tags", server.reader_key).status_code for _ in range(12)] == [200] * 12
    finally:
        stop_server(server)


@pytest.mark.parametrize("value", ["lots", "3/minute;", "0/minute", "3/fortnight"])
def test_a_bad_setting_fails_app_creation_naming_the_setting(tmp_path, value):
    from web.app import create_app

    with pytest.raises(ApplianceError, match="APPLIANCE_API_RATE_LIMIT"):
        create_app(Settings(home=Path(tmp_path), server=ServerSettings(api_rate_limit=value)))


def test_a_bad_setting_stops_appliance_serve(fresh_home):
    result = run_cli(fresh_home, "serve", check=False, APPLIANCE_API_RATE_LIMIT="lots", APPLIANCE_PORT="9")
    assert result.returncode == 1
    assert "error: APPLIANCE_API_RATE_LIMIT (server.api_rate_limit) is not a valid rate limit: 'lots'" in result.stderr
