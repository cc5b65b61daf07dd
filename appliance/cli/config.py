"""The installation: its settings (`config show`), its checks (`doctor`) and its version."""

from __future__ import annotations

from appliance import __version__
from appliance.cli.common import print_json
from appliance.config import settings_report
from appliance.services import Services


def cmd_config_show(services: Services, args) -> int:
    rows = settings_report(services.settings)
    if args.json:
        print_json(rows)
        return 0
    for row in rows:
        changed = "" if row["value"] == row["default"] else f"   (default: {row['default']})"
        print(f"{row['env']}={row['value']}{changed}")
    return 0


def cmd_doctor(services: Services, args) -> int:
    from appliance.operations import doctor

    checks = doctor.run(services.settings)
    failed = any(check.status == doctor.FAIL for check in checks)
    if args.json:
        print_json({"ok": not failed, "checks": [check.as_dict() for check in checks]})
    else:
        width = max(len(check.name) for check in checks)
        for check in checks:
            label = "ok" if check.status == doctor.OK else check.status.upper()
            print(f"{label:<5} {check.name:<{width}}  {check.message}")
            if check.advice and check.status != doctor.OK:
                print(f"{'':<5} {'':<{width}}  -> {check.advice}")
    return 1 if failed else 0


def cmd_version(services: Services, args) -> int:
    print(f"appliance {__version__}")
    return 0


def register(sub) -> None:
    config = sub.add_parser("config", help="the settings").add_subparsers(dest="action", required=True)
    p = config.add_parser("show", help="every setting: current value (secrets masked), default, description")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_config_show)

    p = sub.add_parser("doctor", help="check the configuration and report network use (exit 1 on a failed check)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=cmd_version)
