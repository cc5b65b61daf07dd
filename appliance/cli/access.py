"""Who may read what: groups, collections, grants, break-glass and ethical walls (changes through
`appliance.access.policy`, which audits them; listings straight from `appliance.access.rbac`)."""

from __future__ import annotations

from appliance.access import policy
from appliance.access.actors import Actor
from appliance.cli.common import print_json
from appliance.services import Services


def cmd_groups_add(services: Services, args) -> int:
    group = policy.add_group(services.db, Actor.operator(), args.name)
    print(f"created group '{group.name}'")
    return 0


def cmd_groups_add_member(services: Services, args) -> int:
    policy.add_member(services.db, Actor.operator(), args.group, args.user)
    print(f"added '{args.user}' to group '{args.group}'")
    return 0


def cmd_groups_rm_member(services: Services, args) -> int:
    policy.remove_member(services.db, Actor.operator(), args.group, args.user)
    print(f"removed '{args.user}' from group '{args.group}'")
    return 0


def cmd_groups_list(services: Services, args) -> int:
    from appliance.access.rbac import list_groups

    groups = list_groups(services.db)
    if args.json:
        print_json(groups)
    else:
        for group in groups:
            print(f"{group['name']:<32} {', '.join(group['members'])}")
    return 0


def cmd_collections_add(services: Services, args) -> int:
    collection = policy.add_collection(services.db, Actor.operator(), args.name, args.description)
    print(f"created collection '{collection.name}'")
    return 0


def cmd_collections_list(services: Services, args) -> int:
    from appliance.access.rbac import list_collections

    collections = list_collections(services.db)
    if args.json:
        print_json(collections)
    else:
        for c in collections:
            print(f"{c['name']:<32} {c['documents']:>6} documents  {c['description'] or ''}")
    return 0


def cmd_grants_add(services: Services, args) -> int:
    grant = policy.add_grant(
        services.db, Actor.operator(), args.collection, user=args.user, group=args.group, role=args.role or "reader"
    )
    print(f"granted {grant.role} on '{args.collection}' to {grant.subject_kind} '{args.user or args.group}'")
    return 0


def cmd_grants_rm(services: Services, args) -> int:
    policy.remove_grant(
        services.db, Actor.operator(), args.collection, user=args.user, group=args.group, role=args.role
    )
    print(f"revoked the grant on '{args.collection}' for '{args.user or args.group}'")
    return 0


def cmd_grants_list(services: Services, args) -> int:
    from appliance.access.rbac import list_grants

    grants = list_grants(services.db, args.collection)
    if args.json:
        print_json(grants)
    else:
        for g in grants:
            until = ""
            if "expires_at" in g:
                until = f"  break-glass {'expired' if g['expired'] else 'until'} {g['expires_at']}: {g['reason']}"
            print(f"{g['collection']:<32} {g['kind']:<6} {g['subject']:<32} {g['role']}{until}")
    return 0


def cmd_break_glass(services: Services, args) -> int:
    """An admin's own time-limited reader grant, with a reason; audited, refused attempts too."""
    grant = policy.break_glass(
        services.db,
        Actor.operator(),
        args.user,
        args.collection,
        args.reason,
        args.minutes,
        max_minutes=services.settings.break_glass_max_minutes,
    )
    assert grant.expires_at is not None
    print(f"'{args.user}' may read '{args.collection}' until {grant.expires_at.isoformat()} (break-glass, audited)")
    return 0


def cmd_walls_add(services: Services, args) -> int:
    policy.add_wall(services.db, Actor.operator(), args.collection, user=args.user, group=args.group)
    print(f"walled '{args.user or args.group}' off '{args.collection}'")
    return 0


def cmd_walls_rm(services: Services, args) -> int:
    policy.remove_wall(services.db, Actor.operator(), args.collection, user=args.user, group=args.group)
    print(f"removed the wall between '{args.user or args.group}' and '{args.collection}'")
    return 0


def cmd_walls_list(services: Services, args) -> int:
    from appliance.access.rbac import list_walls

    walls = list_walls(services.db, args.collection)
    if args.json:
        print_json(walls)
    else:
        for w in walls:
            print(f"{w['collection']:<32} {w['kind']:<6} {w['subject']}")
    return 0


def _subject(p, with_role: bool) -> None:
    """The arguments naming a collection and one user or group (and, for grants, a role)."""
    p.add_argument("--collection", required=True)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--user")
    who.add_argument("--group")
    if with_role:
        p.add_argument("--role", choices=["reader", "editor"], help="reader (default) or editor")


def register(sub) -> None:
    groups = sub.add_parser("groups", help="groups of users").add_subparsers(dest="action", required=True)
    p = groups.add_parser("add")
    p.add_argument("name")
    p.set_defaults(func=cmd_groups_add)
    p = groups.add_parser("add-member")
    p.add_argument("group")
    p.add_argument("user")
    p.set_defaults(func=cmd_groups_add_member)
    p = groups.add_parser("rm-member")
    p.add_argument("group")
    p.add_argument("user")
    p.set_defaults(func=cmd_groups_rm_member)
    p = groups.add_parser("list")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_groups_list)

    collections = sub.add_parser("collections", help="document collections").add_subparsers(
        dest="action", required=True
    )
    p = collections.add_parser("add")
    p.add_argument("name")
    p.add_argument("--description")
    p.set_defaults(func=cmd_collections_add)
    p = collections.add_parser("list")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_collections_list)

    grants = sub.add_parser("grants", help="who may read or edit a collection").add_subparsers(
        dest="action", required=True
    )
    p = grants.add_parser("add", help="grant a user or group reader (default) or editor on a collection")
    _subject(p, with_role=True)
    p.set_defaults(func=cmd_grants_add)
    p = grants.add_parser("rm", help="revoke a grant (effective on the server's next request)")
    _subject(p, with_role=True)
    p.set_defaults(func=cmd_grants_rm)
    p = grants.add_parser("list")
    p.add_argument("--collection")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_grants_list)

    p = sub.add_parser(
        "break-glass",
        help="an admin's own time-limited reader grant on a collection, with a reason (audited; walls still apply)",
    )
    p.add_argument("--user", required=True, help="the administrator who needs to read")
    p.add_argument("--collection", required=True)
    p.add_argument("--reason", required=True, help="why (at least 10 characters; kept in the audit log)")
    p.add_argument(
        "--minutes", type=int, default=60, help="how long (default 60, at most APPLIANCE_BREAK_GLASS_MAX_MINUTES)"
    )
    p.set_defaults(func=cmd_break_glass)

    walls = sub.add_parser("walls", help="ethical walls: who may never see a collection").add_subparsers(
        dest="action", required=True
    )
    p = walls.add_parser("add", help="wall a user or group off a collection, whatever else grants it")
    _subject(p, with_role=False)
    p.set_defaults(func=cmd_walls_add)
    p = walls.add_parser("rm")
    _subject(p, with_role=False)
    p.set_defaults(func=cmd_walls_rm)
    p = walls.add_parser("list")
    p.add_argument("--collection")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_walls_list)
