"""The load script against a real server (network guard on): several users at once, streaming asks,
searches, listings, chats and uploads for a fixed time, with no 5xx but deliberate 503s, no lost upload
and the server's memory bounded."""

import pytest

from bench import load
from tests.conftest import launch_server, stop_server

USERS = 4
DURATION_S = 20
SEED = load.SEED_FILES[:3]
EVERY_KIND = ("ask", "search", "list", "chat", "upload", "job", "ingest", "login_form", "login", "page", "logout")


@pytest.mark.slow
def test_the_load_runs_clean(tmp_path):
    accounts = load.prepare_users(tmp_path, USERS, "load", browser_share=0.5)
    assert sum(a.browser for a in accounts) == 2 and all(a.key for a in accounts if not a.browser)
    server = launch_server(tmp_path, "", "")
    try:
        report = load.run(
            server.url,
            accounts,
            duration=DURATION_S,
            pid=server.process.pid,
            seed_files=SEED,
            drain=60,
            log_path=server.log_path,
        )
        server.assert_alive()
    finally:
        stop_server(server)

    totals, uploads, kinds = report["totals"], report["uploads"], report["kinds"]
    assert report["clean"], (report["problems"], report["failures"], report["server_tracebacks"])
    assert totals["server_errors"] == 0 and totals["transport_errors"] == 0 and totals["broken_streams"] == 0
    assert uploads["lost"] == 0 and uploads["accepted"] >= 1 and uploads["indexed"] == uploads["accepted"]
    for kind in EVERY_KIND:
        assert kinds.get(kind, {}).get("ok", 0) >= 1, f"no successful {kind}: {kinds.get(kind)}"
    assert kinds["ask"]["p50_ms"] is not None and totals["requests_per_s"] > 0

    memory = report["memory"]
    server_rss, with_children = memory["server"], memory["with_children"]
    assert server_rss["peak_mib"] <= server_rss["start_mib"] + 400, server_rss
    assert with_children["peak_mib"] <= with_children["start_mib"] + 800, with_children
