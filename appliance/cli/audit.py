"""The audit log: verify its hash chain, export its records."""

from __future__ import annotations

import json
import sys

from appliance.services import Services


def cmd_audit_verify(services: Services, args) -> int:
    from appliance.access import audit

    result = audit.check(services.db)
    if result.ok:
        print(f"OK: {result.records} records, the chain is intact (head {result.head})")
        return 0
    print(f"BROKEN: record {result.first_bad_id}: {result.reason} ({result.records} records before it verify)")
    return 1


def cmd_audit_export(services: Services, args) -> int:
    from appliance.access import audit

    for item in audit.export(services.db, since=args.since, actor=args.user, action=args.only_action):
        sys.stdout.write(json.dumps(item, ensure_ascii=False) + "\n")
    return 0


def register(sub) -> None:
    audit = sub.add_parser("audit", help="the audit log").add_subparsers(dest="action", required=True)
    p = audit.add_parser("verify", help="recompute the hash chain (exit 1 when a record was edited or removed)")
    p.set_defaults(func=cmd_audit_verify)
    p = audit.add_parser("export", help="records as JSON lines, oldest first")
    p.add_argument("--since", help="only records at or after this ISO date or time (UTC unless a zone is given)")
    p.add_argument("--user", help="only records of this user (local-operator for the CLI)")
    p.add_argument("--action", dest="only_action", help="only this action (upload, delete, ask, grant_add, ...)")
    p.set_defaults(func=cmd_audit_export)
