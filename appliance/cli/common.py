"""What every command shares: the services it opens, the audit record it leaves, its JSON output."""

from __future__ import annotations

import json
import sys
from typing import Any

from appliance.config import Settings
from appliance.services import Services


def open_services(settings: Settings) -> Services:
    """The core of the home as the CLI opens it; a problem that must not stop a command is a warning on stderr."""
    return Services(settings, warn=lambda message: print(f"warning: {message}", file=sys.stderr))


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def record_audit(services: Services, action: str, target: str | None = None, *, outcome: str = "ok", **details) -> None:
    """An audit record of something the local operator did (the CLI acts as the local operator)."""
    from appliance import audit

    audit.record(services.db, audit.LOCAL_OPERATOR, action, actor_id=0, target=target, outcome=outcome, details=details)
