"""Access control: groups, collections, grants and walls, and the one policy that decides who reads what.

`access_for` turns a caller into an `Access`: the collections and ACL principals they hold. Pages, API
routes, CLI commands and the retrieval filter all ask the same `Access` — `may(action, collection)`, a
few named checks built on it, `can_read` and its SQL and Chroma forms (`read_rule_sql`,
`read_rule_where`) — so they cannot disagree. It is computed from the database on every call, never cached,
so a grant revoked with the CLI takes effect on a running server's next request.

Rules: the global role says what kind of thing a user may do (admin: manage users and policy; editor:
upload and delete; reader: ask and read); grants say where. The admin role reads nothing by itself.
A wall (deny) beats every grant and every document ACL.

Break-glass: an admin may take a time-limited reader grant on a collection for themself, with a
reason (`break_glass`; the CLI and the admin page audit it). It counts only until it expires (checked
on every request, as every grant is), and a wall beats it like any other grant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import String, bindparam, or_
from sqlalchemy import text as sql
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from appliance.access.users import Principal, get_user
from appliance.db import Collection, Document, Grant, Group, GroupMember, User, Wall, acl_names_any, session, utcnow
from appliance.errors import BadRequest, Conflict, Forbidden, NotFound

COLLECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
GRANT_ROLES = ("reader", "editor")
SUBJECT_KINDS = ("user", "group")
BREAK_GLASS_MINUTES = 60  # how long a break-glass grant lasts unless asked otherwise
BREAK_GLASS_MIN_REASON = 10  # characters: a reason someone reading the audit log can follow
BREAK_GLASS_MAX_REASON = 500

# What each global role may do anywhere, and what each grant role allows in its collection.
ROLE_ACTIONS = {
    "admin": frozenset({"manage_users", "manage_policy", "manage_models", "read_metrics", "edit"}),
    "editor": frozenset({"edit"}),
    "reader": frozenset(),
}
GRANT_ACTIONS = {"reader": frozenset({"read"}), "editor": frozenset({"read", "edit"})}


@dataclass(frozen=True)
class Access:
    """What one caller may read. Retrieval filters with it inside the queries."""

    everything: bool  # the local operator (CLI token / CLI commands): reads all
    collections: frozenset[str]  # collections the caller may read (granted reader/editor, minus walls)
    principals: frozenset[str]  # "user:NAME", "group:G" per group, "collection:C" per readable collection
    walled: frozenset[str]  # collections the caller is walled off from (never visible, whatever the ACL)
    editable: frozenset[str]  # collections the caller may upload to / delete from (editor grants; walls apply)
    actions: frozenset[str] = frozenset()  # what the global role allows (ROLE_ACTIONS)
    break_glass: tuple[tuple[str, datetime], ...] = ()  # (collection, expiry) of the caller's live break-glass grants

    @property
    def requester(self) -> str:
        """Who asks, as the inference queue counts requests for fair turns ("user:NAME")."""
        return next((p for p in sorted(self.principals) if p.startswith("user:")), "operator")

    def may(self, action: str, collection: str | None = None) -> bool:
        """The one decision: may this caller do `action`?

        `read` and `edit` are about a collection (an editor grant gives `edit` there; walls apply); the
        others (manage_users, manage_policy, manage_models, read_metrics) are global and come from the role.
        """
        if self.everything:
            return True
        if action == "read":
            return collection is not None and collection in self.collections
        if action == "edit":
            return collection is not None and collection in self.editable
        return action in self.actions

    def unrestricted(self) -> bool:
        """The local operator: every check passes, and searches need no read filter at all."""
        return self.everything

    def may_read_nothing(self) -> bool:
        """No principal at all: nothing any ACL names can be reached."""
        return not self.everything and not self.principals

    def can_read_collection(self, name: str) -> bool:
        return self.may("read", name)

    def can_read(self, collection: str, acl: list[str]) -> bool:
        """One document: its collection is not walled off and its ACL names a principal the caller holds."""
        if self.everything:
            return True
        return collection not in self.walled and not self.principals.isdisjoint(acl)

    def may_upload_by_role(self) -> bool:
        """Whether the global role lets the caller upload at all (the editor or admin role, or the operator);
        where to is then up to `may("edit", collection)` and `may_create_collection`."""
        return self.everything or "edit" in self.actions

    def may_create_collection(self) -> bool:
        """Whether naming a collection that does not exist yet in an upload creates it (the operator; an admin,
        who then gets an editor grant on it). An editor may not: see `appliance.documents.authorize_upload`."""
        return self.may("manage_policy")

    def may_upload_somewhere(self) -> bool:
        """Whether uploading is offered to the caller: an editor grant on some collection, or the right to
        create one."""
        return bool(self.editable) or self.may_create_collection()

    def may_administer(self) -> bool:
        """Whether the administration page is offered: managing users or policy."""
        return self.may("manage_users") or self.may("manage_policy")

    def may_delete(self, document: Document) -> bool:
        """Whether the caller may delete the document, or replace it with an upload: they read it and may edit
        its collection."""
        return self.may("edit", document.collection) and self.can_read(document.collection, document.acl)


OPERATOR = Access(
    everything=True,
    collections=frozenset(),
    principals=frozenset(),
    walled=frozenset(),
    editable=frozenset(),
    actions=ROLE_ACTIONS["admin"],
)
NOBODY = Access(False, frozenset(), frozenset(), frozenset(), frozenset())


def read_rule_sql(access: Access, dialect: str, table: str = "d") -> tuple[list[str], dict, list]:
    """`Access.can_read` as SQL conditions on the document table (named `table` in the query): the
    document's collection is not walled off and its ACL names a principal the caller holds. Returns
    (conditions, parameters, expanding bind parameters); no conditions for a caller who reads everything."""
    if access.everything:
        return [], {}, []
    conditions = [acl_names_any(dialect, f"{table}.acl", "principals")]
    params: dict = {"principals": sorted(access.principals)}
    binds = [bindparam("principals", expanding=True, type_=String)]
    if access.walled:
        conditions.append(f"{table}.collection NOT IN :walled")
        params["walled"] = sorted(access.walled)
        binds.append(bindparam("walled", expanding=True, type_=String))
    return conditions, params, binds


def read_rule_where(access: Access) -> list[dict]:
    """`Access.can_read` as Chroma `where` clauses on a chunk's metadata (its collection and ACL principals), to
    be joined by `$and`; none for a caller who reads everything. The caller must hold a principal."""
    if access.everything:
        return []
    clauses: list[dict] = [{"collection": {"$nin": sorted(access.walled)}}] if access.walled else []
    principals = [{"acl": {"$contains": p}} for p in sorted(access.principals)]
    return clauses + [principals[0] if len(principals) == 1 else {"$or": principals}]


def access_for(engine: Engine, principal: Principal) -> Access:
    """The access of an authenticated caller; user id 0 is the local CLI token (the operator)."""
    if principal.user_id == 0:
        return OPERATOR
    with session(engine) as db:
        user = db.get(User, principal.user_id)
        return NOBODY if user is None else _compute(db, user)


def access_for_user(engine: Engine, user_name: str) -> Access:
    """What the named user would see (`--as USER`); NotFound if there is no such user."""
    user = get_user(engine, user_name)
    with session(engine) as db:
        return _compute(db, user)


def _compute(db: Session, user: User) -> Access:
    if user.disabled:
        return NOBODY
    assert user.id is not None
    groups = db.exec(
        select(Group.id, Group.name)
        .join(GroupMember, GroupMember.group_id == Group.id)
        .where(GroupMember.user_id == user.id)
    ).all()
    group_ids = [gid for gid, _ in groups]
    walled = set(_subject_rows(db, select(Collection.name), Wall, user.id, group_ids))  # single column: names
    granted: dict[str, set[str]] = {}
    live = select(Collection.name, Grant.role, Grant.expires_at).where(_live_grant(utcnow()))
    break_glass = []
    for name, role, expires_at in _subject_rows(db, live, Grant, user.id, group_ids):
        granted.setdefault(name, set()).update(GRANT_ACTIONS.get(role, ()))
        if expires_at is not None and name not in walled:
            break_glass.append((name, expires_at))
    readable = {name for name, actions in granted.items() if "read" in actions} - walled
    role_actions = ROLE_ACTIONS.get(user.role, frozenset())
    editable = (
        {name for name, actions in granted.items() if "edit" in actions} - walled if "edit" in role_actions else set()
    )
    direct = {f"user:{user.name}", *(f"group:{name}" for _, name in groups)}
    reached = _reached_through_document_acls(db, direct, readable | walled)
    return Access(
        everything=False,
        collections=frozenset(readable | reached),
        principals=frozenset(direct | {f"collection:{name}" for name in readable}),
        walled=frozenset(walled),
        editable=frozenset(editable),
        actions=role_actions,
        break_glass=tuple(sorted(break_glass)),
    )


def _live_grant(now: datetime):
    """Grants that count now: permanent ones, and break-glass ones not yet expired."""
    return or_(Grant.expires_at.is_(None), Grant.expires_at > now)  # type: ignore[union-attr,operator]


def _reached_through_document_acls(db: Session, direct: set[str], skip: set[str]) -> set[str]:
    """Collections (outside `skip`) the user reads only through a document ACL naming them or their group."""
    if not direct:
        return set()
    # In SQL, so that this costs little however many documents there are.
    statement = sql(
        "SELECT DISTINCT d.collection FROM document AS d WHERE d.collection NOT IN :skip "  # noqa: S608
        f"AND {acl_names_any(db.get_bind().dialect.name, 'd.acl', 'direct')}"
    ).bindparams(bindparam("skip", expanding=True, type_=String), bindparam("direct", expanding=True, type_=String))
    return {row[0] for row in db.exec(statement, params={"skip": sorted(skip), "direct": sorted(direct)})}


def _subject_rows(db: Session, query, table, user_id: int, group_ids: list[int]):
    """Rows of grants or walls naming the user or one of their groups, joined to the collection."""
    subject = (table.subject_kind == "user") & (table.subject_id == user_id)
    if group_ids:
        subject = subject | ((table.subject_kind == "group") & table.subject_id.in_(group_ids))
    return db.exec(query.join(table, table.collection_id == Collection.id).where(subject)).all()


# --- groups --------------------------------------------------------------------------------------
def add_group(engine: Engine, name: str) -> Group:
    if not GROUP_NAME.match(name):
        raise BadRequest("group name must be 1-64 letters, digits or _.@- and start with a letter or digit")
    with session(engine) as db:
        if db.exec(select(Group).where(Group.name == name)).first():
            raise Conflict(f"group '{name}' already exists")
        group = Group(name=name)
        db.add(group)
        db.commit()
        db.refresh(group)
        return group


def get_group(engine: Engine, name: str) -> Group:
    with session(engine) as db:
        group = db.exec(select(Group).where(Group.name == name)).first()
    if group is None:
        raise NotFound(f"group '{name}' not found (create it with `appliance groups add {name}`)")
    return group


def add_member(engine: Engine, group_name: str, user_name: str) -> None:
    group, user = get_group(engine, group_name), get_user(engine, user_name)
    with session(engine) as db:
        if db.get(GroupMember, (group.id, user.id)):
            raise Conflict(f"user '{user_name}' is already a member of group '{group_name}'")
        db.add(GroupMember(group_id=group.id, user_id=user.id))
        db.commit()


def remove_member(engine: Engine, group_name: str, user_name: str) -> None:
    group, user = get_group(engine, group_name), get_user(engine, user_name)
    with session(engine) as db:
        member = db.get(GroupMember, (group.id, user.id))
        if member is None:
            raise NotFound(f"user '{user_name}' is not a member of group '{group_name}'")
        db.delete(member)
        db.commit()


def list_groups(engine: Engine) -> list[dict]:
    """Each group with its members' names."""
    with session(engine) as db:
        groups = list(db.exec(select(Group).order_by(Group.name)))
        members = db.exec(
            select(GroupMember.group_id, User.name).join(User, User.id == GroupMember.user_id).order_by(User.name)
        ).all()
    by_group: dict[int, list[str]] = {}
    for group_id, user_name in members:
        by_group.setdefault(group_id, []).append(user_name)
    return [{"name": g.name, "members": by_group.get(g.id or 0, [])} for g in groups]


def sync_mapped_groups(engine: Engine, user_id: int, wanted: set[str], mapped: set[str]) -> tuple[list[str], list[str]]:
    """Make the user a member of exactly the `wanted` groups among the `mapped` ones (groups an identity
    provider's claim decides); groups outside `mapped` are left alone. A wanted group that does not exist
    yet is created. Returns (joined, left) group names."""
    wanted = {name for name in wanted & mapped if GROUP_NAME.match(name)}
    joined: list[str] = []
    left: list[str] = []
    with session(engine) as db:
        groups = {g.name: g for g in db.exec(select(Group).where(Group.name.in_(sorted(mapped))))}  # type: ignore[attr-defined]
        for name in sorted(wanted - set(groups)):
            group = Group(name=name)
            db.add(group)
            db.flush()
            groups[name] = group
        member_of = set(db.exec(select(GroupMember.group_id).where(GroupMember.user_id == user_id)))
        for name, group in sorted(groups.items()):
            if name in wanted and group.id not in member_of:
                db.add(GroupMember(group_id=group.id, user_id=user_id))
                joined.append(name)
            elif name not in wanted and group.id in member_of:
                member = db.get(GroupMember, (group.id, user_id))
                db.delete(member)
                left.append(name)
        db.commit()
    return joined, left


# --- collections ---------------------------------------------------------------------------------
def check_collection_name(name: str) -> str:
    if not COLLECTION_NAME.match(name):
        raise BadRequest("collection name must be 1-128 letters, digits or _.- starting with a letter or digit")
    return name


def add_collection(engine: Engine, name: str, description: str | None = None) -> Collection:
    check_collection_name(name)
    with session(engine) as db:
        if db.exec(select(Collection).where(Collection.name == name)).first():
            raise Conflict(f"collection '{name}' already exists")
        collection = Collection(name=name, description=description)
        db.add(collection)
        db.commit()
        db.refresh(collection)
        return collection


def ensure_collection(engine: Engine, name: str) -> Collection:
    """The named collection, created if it does not exist yet (ingestion and uploads call this)."""
    check_collection_name(name)
    with session(engine) as db:
        existing = db.exec(select(Collection).where(Collection.name == name)).first()
    if existing is not None:
        return existing
    try:
        return add_collection(engine, name)
    except Conflict:  # created meanwhile by another process
        return get_collection(engine, name)


def get_collection(engine: Engine, name: str) -> Collection:
    with session(engine) as db:
        collection = db.exec(select(Collection).where(Collection.name == name)).first()
    if collection is None:
        raise NotFound(f"collection '{name}' not found (create it with `appliance collections add {name}`)")
    return collection


def list_collections(engine: Engine) -> list[dict]:
    """Each collection with its description and document count."""
    from sqlalchemy import func

    with session(engine) as db:
        collections = list(db.exec(select(Collection).order_by(Collection.name)))
        counts = dict(db.exec(select(Document.collection, func.count()).group_by(Document.collection)).all())
    return [
        {
            "name": c.name,
            "description": c.description,
            "documents": counts.get(c.name, 0),
            "created_at": c.created_at.isoformat(),
        }
        for c in collections
    ]


def check_acl_subjects(engine: Engine, acl: list[str], own_collection: str) -> None:
    """Refuse a document ACL naming a user, group or collection that does not exist.

    ACL entries are names: an entry for a name nobody holds yet would be inherited by whoever is given
    that name later (an account created at an OIDC first sign-in, a new group). The document's own
    collection may be new: it is created with the upload.
    """
    wanted: dict[str, set[str]] = {"user": set(), "group": set(), "collection": set()}
    for entry in acl:
        kind, _, name = entry.partition(":")
        if kind in wanted and not (kind == "collection" and name == own_collection):
            wanted[kind].add(name)
    with session(engine) as db:
        found = {
            "user": set(db.exec(select(User.name).where(User.name.in_(wanted["user"])))),  # type: ignore[attr-defined]
            "group": set(db.exec(select(Group.name).where(Group.name.in_(wanted["group"])))),  # type: ignore[attr-defined]
            "collection": set(
                db.exec(select(Collection.name).where(Collection.name.in_(wanted["collection"])))  # type: ignore[attr-defined]
            ),
        }
    unknown = sorted(f"{kind}:{name}" for kind, names in wanted.items() for name in names - found[kind])
    if unknown:
        raise BadRequest(
            f"the access list names no such {'entries' if len(unknown) > 1 else 'entry'}: {', '.join(unknown)}"
        )


# --- grants and walls ----------------------------------------------------------------------------
def _subject(engine: Engine, user: str | None, group: str | None) -> tuple[str, int]:
    if (user is None) == (group is None):
        raise BadRequest("name exactly one of a user or a group")
    found = get_user(engine, user) if user is not None else get_group(engine, group or "")
    assert found.id is not None
    return ("user" if user is not None else "group"), found.id


def add_grant(
    engine: Engine, collection: str, *, user: str | None = None, group: str | None = None, role: str = "reader"
) -> Grant:
    """Grant a user or group read (reader) or read and edit (editor) on a collection; a second grant
    to the same subject replaces the role (and makes a break-glass grant a permanent one)."""
    if role not in GRANT_ROLES:
        raise BadRequest(f"grant role must be one of {', '.join(GRANT_ROLES)}")
    target = get_collection(engine, collection)
    kind, subject_id = _subject(engine, user, group)
    with session(engine) as db:
        grant = db.exec(_same_subject(Grant, target.id, kind, subject_id)).first()
        if grant is None:
            grant = Grant(collection_id=target.id, subject_kind=kind, subject_id=subject_id, role=role)
        grant.role = role
        grant.expires_at = grant.reason = None
        db.add(grant)
        db.commit()
        db.refresh(grant)
        return grant


def break_glass(
    engine: Engine,
    user: str,
    collection: str,
    reason: str,
    minutes: int = BREAK_GLASS_MINUTES,
    *,
    max_minutes: int,
) -> Grant:
    """An admin's own reader grant on a collection for `minutes`, with the reason (the callers audit it).

    Refused (Forbidden) for anyone but an enabled admin, and for an admin walled off the collection: a
    wall beats break-glass. A permanent grant of theirs on the collection is left alone (Conflict); a
    break-glass grant taken before, expired or not, is replaced (new reason, new expiry).
    """
    reason = " ".join(str(reason).split())
    if len(reason) < BREAK_GLASS_MIN_REASON:
        raise BadRequest(
            f"break-glass needs a reason of at least {BREAK_GLASS_MIN_REASON} characters (who asked for what, and why)"
        )
    if len(reason) > BREAK_GLASS_MAX_REASON:
        raise BadRequest(f"the reason may be at most {BREAK_GLASS_MAX_REASON} characters")
    if not 1 <= minutes <= max_minutes:
        raise BadRequest(f"break-glass lasts 1 to {max_minutes} minutes (APPLIANCE_BREAK_GLASS_MAX_MINUTES)")
    admin = get_user(engine, user)
    if admin.role != "admin" or admin.disabled:
        raise Forbidden("only an administrator may break the glass, and only for themself")
    target = get_collection(engine, collection)
    assert admin.id is not None
    with session(engine) as db:
        group_ids = list(db.exec(select(GroupMember.group_id).where(GroupMember.user_id == admin.id)))
        if collection in set(_subject_rows(db, select(Collection.name), Wall, admin.id, group_ids)):
            raise Forbidden(f"'{user}' is walled off '{collection}': a wall beats break-glass")
        grant = db.exec(_same_subject(Grant, target.id, "user", admin.id)).first()
        if grant is not None and grant.expires_at is None:
            raise Conflict(f"'{user}' already holds a {grant.role} grant on '{collection}'")
        now = utcnow()
        if grant is None:
            grant = Grant(collection_id=target.id, subject_kind="user", subject_id=admin.id, role="reader")
        grant.role, grant.reason = "reader", reason
        grant.created_at, grant.expires_at = now, now + timedelta(minutes=minutes)
        db.add(grant)
        db.commit()
        db.refresh(grant)
        return grant


def remove_grant(
    engine: Engine, collection: str, *, user: str | None = None, group: str | None = None, role: str | None = None
) -> None:
    """Revoke a grant; with `role`, only if the grant has that role."""
    target = get_collection(engine, collection)
    kind, subject_id = _subject(engine, user, group)
    with session(engine) as db:
        grant = db.exec(_same_subject(Grant, target.id, kind, subject_id)).first()
        if grant is None or (role is not None and grant.role != role):
            which = f"{role} grant" if role else "grant"
            raise NotFound(f"no {which} on '{collection}' for {kind} '{user or group}'")
        db.delete(grant)
        db.commit()


def add_wall(engine: Engine, collection: str, *, user: str | None = None, group: str | None = None) -> Wall:
    """Wall a user or group off a collection (idempotent)."""
    target = get_collection(engine, collection)
    kind, subject_id = _subject(engine, user, group)
    with session(engine) as db:
        wall = db.exec(_same_subject(Wall, target.id, kind, subject_id)).first()
        if wall is None:
            wall = Wall(collection_id=target.id, subject_kind=kind, subject_id=subject_id)
            db.add(wall)
            db.commit()
            db.refresh(wall)
        return wall


def remove_wall(engine: Engine, collection: str, *, user: str | None = None, group: str | None = None) -> None:
    target = get_collection(engine, collection)
    kind, subject_id = _subject(engine, user, group)
    with session(engine) as db:
        wall = db.exec(_same_subject(Wall, target.id, kind, subject_id)).first()
        if wall is None:
            raise NotFound(f"no wall on '{collection}' for {kind} '{user or group}'")
        db.delete(wall)
        db.commit()


def _same_subject(table, collection_id, kind: str, subject_id: int):
    return select(table).where(
        table.collection_id == collection_id, table.subject_kind == kind, table.subject_id == subject_id
    )


def list_grants(engine: Engine, collection: str | None = None) -> list[dict]:
    """Grants with their role; break-glass ones also with their expiry, whether it has passed, and the reason."""
    now = utcnow()
    rows = []
    for row, grant in _listing(engine, Grant, collection):
        row = {**row, "role": grant.role}
        if grant.expires_at is not None:
            row.update(expires_at=grant.expires_at.isoformat(), expired=grant.expires_at <= now, reason=grant.reason)
        rows.append(row)
    return rows


def list_walls(engine: Engine, collection: str | None = None) -> list[dict]:
    return [row for row, _ in _listing(engine, Wall, collection)]


def _listing(engine: Engine, table, collection: str | None) -> list[tuple[dict, Grant | Wall]]:
    """Grants or walls as {collection, kind, subject} rows (subject by name), each with its table row."""
    with session(engine) as db:
        query = select(table, Collection.name).join(Collection, Collection.id == table.collection_id)
        if collection is not None:
            query = query.where(Collection.name == collection)
        rows = db.exec(query).all()
        users = dict(db.exec(select(User.id, User.name)).all())
        groups = dict(db.exec(select(Group.id, Group.name)).all())
    listing = []
    for item, collection_name in rows:
        names = users if item.subject_kind == "user" else groups
        subject = names.get(item.subject_id, f"#{item.subject_id}")
        listing.append(({"collection": collection_name, "kind": item.subject_kind, "subject": subject}, item))
    return sorted(listing, key=lambda entry: (entry[0]["collection"], entry[0]["kind"], entry[0]["subject"]))
