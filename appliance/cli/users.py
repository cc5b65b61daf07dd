"""Users and their API keys: add, list, change a role, disable; issue, list and revoke keys (changes through
`appliance.access.policy`, which audits them)."""

from __future__ import annotations

import sys

from appliance.access import policy
from appliance.access.actors import Actor
from appliance.cli.common import print_json
from appliance.services import Services

ROLES = ["admin", "editor", "reader"]


def cmd_users_add(services: Services, args) -> int:
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else None
    user = policy.add_user(services.db, Actor.operator(), args.name, args.role, password)
    print(f"created user '{user.name}' with role {user.role}")
    return 0


def cmd_users_list(services: Services, args) -> int:
    from appliance.access.users import list_users

    users = [
        {"name": u.name, "role": u.role, "disabled": u.disabled, "created_at": u.created_at.isoformat()}
        for u in list_users(services.db)
    ]
    if args.json:
        print_json(users)
    else:
        for u in users:
            print(f"{u['name']:<32} {u['role']:<8} {'disabled' if u['disabled'] else ''}")
    return 0


def cmd_users_role(services: Services, args) -> int:
    old = policy.set_role(services.db, Actor.operator(), args.name, args.role)
    print(f"user '{args.name}': role {old} -> {args.role}")
    return 0


def cmd_users_disable(services: Services, args) -> int:
    count = policy.disable_user(services.db, Actor.operator(), args.name)
    print(f"disabled user '{args.name}' and revoked {count} key(s)")
    return 0


def cmd_keys_create(services: Services, args) -> int:
    key = policy.create_key(services.db, Actor.operator(), args.user, args.label or "")
    print(key)
    return 0


def cmd_keys_list(services: Services, args) -> int:
    from appliance.access.users import list_keys

    for key, user in list_keys(services.db, args.user):
        state = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "active"
        print(f"{key.prefix:<14} {user:<24} {state:<20} {key.label}")
    return 0


def cmd_keys_revoke(services: Services, args) -> int:
    count = policy.revoke_key(services.db, Actor.operator(), args.prefix)
    print(f"revoked {count} key(s)")
    return 0


def register(sub) -> None:
    users = sub.add_parser("users", help="manage users").add_subparsers(dest="action", required=True)
    p = users.add_parser("add")
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--password-stdin", action="store_true", help="read a password from the first stdin line")
    p.set_defaults(func=cmd_users_add)
    p = users.add_parser("list")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_users_list)
    p = users.add_parser("role", help="change a user's role (effective on their next request)")
    p.add_argument("name")
    p.add_argument("role", choices=ROLES)
    p.set_defaults(func=cmd_users_role)
    p = users.add_parser("disable", help="disable a user and revoke all their keys")
    p.add_argument("name")
    p.set_defaults(func=cmd_users_disable)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    p = keys.add_parser("create", help="issue a key (printed once, stored hashed)")
    p.add_argument("--user", required=True)
    p.add_argument("--label")
    p.set_defaults(func=cmd_keys_create)
    p = keys.add_parser("list")
    p.add_argument("--user")
    p.set_defaults(func=cmd_keys_list)
    p = keys.add_parser("revoke")
    p.add_argument("prefix", help="the key's prefix as `keys list` shows it")
    p.set_defaults(func=cmd_keys_revoke)
