"""What every command shares: the services it opens and its JSON output (the use cases write the audit records)."""

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
