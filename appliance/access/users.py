"""Users and API keys: creation, password hashing (argon2id), key issue, lookup and revocation.

API keys are 256-bit random tokens; only their SHA-256 is stored (a slow hash buys nothing for a
random secret of that size and would slow every request).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import String, bindparam, delete, func
from sqlalchemy import text as sql
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from appliance.db import ApiKey, User, WebSession, acl_names_any, session, utcnow
from appliance.errors import BadRequest, Conflict, NotFound, Unauthorized

ROLES = ("admin", "editor", "reader")
OPERATOR_NAMES = frozenset({"local-operator", "local-cli"})  # how the audit log and the CLI token name the operator
KEY_PREFIX = "apk_"
_USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters


@dataclass(frozen=True)
class Principal:
    """Who is calling: the user behind an API key (or the local CLI token)."""

    user_id: int
    name: str
    role: str


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_user(name: str, role: str, password: str | None = None) -> User:
    """A user checked and with its password hashed, not yet stored (BadRequest for a bad name, role or password)."""
    if not _USER_NAME.match(name):
        raise BadRequest("user name must be 1-64 letters, digits or _.@- and start with a letter or digit")
    if name.lower() in OPERATOR_NAMES:
        raise BadRequest(f"'{name}' is reserved: the audit log names the local operator so")
    if role not in ROLES:
        raise BadRequest(f"role must be one of {', '.join(ROLES)}")
    if password is not None and len(password) < 8:
        raise BadRequest("password must be at least 8 characters")
    return User(name=name, role=role, password_hash=_hasher.hash(password) if password else None)


def add_user(engine: Engine, name: str, role: str, password: str | None = None) -> User:
    user = new_user(name, role, password)
    with session(engine) as db:
        if db.exec(select(User).where(User.name == name)).first():
            raise Conflict(f"user '{name}' already exists")
        db.add(user)
        db.commit()
        db.refresh(user)
        return user


def get_user(engine: Engine, name: str) -> User:
    with session(engine) as db:
        user = db.exec(select(User).where(User.name == name)).first()
    if user is None:
        raise NotFound(f"user '{name}' not found")
    return user


def list_users(engine: Engine) -> list[User]:
    with session(engine) as db:
        return list(db.exec(select(User).order_by(User.name)))


def disable_user(engine: Engine, name: str) -> int:
    """Disable a user, end their browser sessions and revoke all their live API keys at once; returns how
    many keys were revoked."""
    user = get_user(engine, name)
    with session(engine) as db:
        user.disabled = True
        db.add(user)
        db.execute(delete(WebSession).where(WebSession.user_id == user.id))
        keys = db.exec(select(ApiKey).where(ApiKey.user_id == user.id, ApiKey.revoked_at == None)).all()  # noqa: E711
        for key in keys:
            key.revoked_at = utcnow()
            db.add(key)
        db.commit()
    return len(keys)


def set_role(engine: Engine, name: str, role: str) -> str:
    """Change a user's global role; returns the old one. Sessions and keys stay: the role is read per request."""
    if role not in ROLES:
        raise BadRequest(f"role must be one of {', '.join(ROLES)}")
    user = get_user(engine, name)
    old = user.role
    with session(engine) as db:
        if old == "admin" and role != "admin":
            admins = db.exec(select(User.id).where(User.role == "admin", User.disabled == False)).all()  # noqa: E712
            if len(admins) <= 1:
                raise BadRequest("the last administrator cannot lose the admin role")
        user.role = role
        db.add(user)
        db.commit()
    return old


def create_key(engine: Engine, user_name: str, label: str = "") -> str:
    """Issue a key for a user and return it; it is shown this once and stored only hashed."""
    user = get_user(engine, user_name)
    if user.disabled:
        raise BadRequest(f"user '{user_name}' is disabled")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    assert user.id is not None
    with session(engine) as db:
        db.add(ApiKey(user_id=user.id, prefix=key[:12], key_hash=_hash_key(key), label=label[:128]))
        db.commit()
    return key


def list_keys(engine: Engine, user_name: str | None = None) -> list[tuple[ApiKey, str]]:
    with session(engine) as db:
        query = select(ApiKey, User.name).join(User, ApiKey.user_id == User.id)
        if user_name:
            query = query.where(User.name == user_name)
        return [(key, name) for key, name in db.exec(query.order_by(ApiKey.id))]


def revoke_key(engine: Engine, prefix: str) -> int:
    """Revoke every live key whose prefix matches; returns how many were revoked."""
    with session(engine) as db:
        keys = db.exec(select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at == None)).all()  # noqa: E711
        for key in keys:
            key.revoked_at = utcnow()
            db.add(key)
        db.commit()
    if not keys:
        raise NotFound(f"no live key with prefix '{prefix}'")
    return len(keys)


def authenticate_key(engine: Engine, key: str) -> Principal:
    if not key.startswith(KEY_PREFIX) or len(key) > 128:
        raise Unauthorized("invalid API key")
    with session(engine) as db:
        row = db.exec(
            select(ApiKey, User).join(User, ApiKey.user_id == User.id).where(ApiKey.key_hash == _hash_key(key))
        ).first()
        if row is None:
            raise Unauthorized("invalid API key")
        api_key, user = row
        if api_key.revoked_at is not None or user.disabled:
            raise Unauthorized("API key revoked or user disabled")
        assert user.id is not None
        return Principal(user.id, user.name, user.role)


MIN_PASSWORD = 8
# Verified against when the user does not exist, so that a wrong name costs as much time as a wrong password.
_DUMMY_HASH = _hasher.hash("not-a-real-password-" + secrets.token_hex(8))


def check_password_strength(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise BadRequest(f"password must be at least {MIN_PASSWORD} characters")
    if len(password) > 1024:
        raise BadRequest("password must be at most 1024 characters")


def verify_password(engine: Engine, name: str, password: str) -> User | None:
    """The enabled user with this name and password, or None (always one argon2 verification)."""
    with session(engine) as db:
        user = db.exec(select(User).where(User.name == name)).first() if _USER_NAME.match(name) else None
    stored = user.password_hash if user is not None and user.password_hash else _DUMMY_HASH
    try:
        _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return None
    if user is None or not user.password_hash or user.disabled:
        return None
    if _hasher.check_needs_rehash(stored):
        with session(engine) as db:
            user.password_hash = _hasher.hash(password)
            db.add(user)
            db.commit()
    return user


def set_password(engine: Engine, name: str, password: str) -> None:
    """Set (or reset) a user's password; their browser sessions end (they sign in again)."""
    check_password_strength(password)
    user = get_user(engine, name)
    with session(engine) as db:
        user.password_hash = _hasher.hash(password)
        db.add(user)
        db.execute(delete(WebSession).where(WebSession.user_id == user.id))
        db.commit()


def enable_user(engine: Engine, name: str) -> None:
    """Enable a disabled user again (their revoked keys stay revoked)."""
    user = get_user(engine, name)
    with session(engine) as db:
        user.disabled = False
        db.add(user)
        db.commit()


def set_totp(engine: Engine, user_id: int, secret: str | None, last_step: int | None = None) -> None:
    """Confirm a TOTP enrolment (secret) or remove the second factor (None)."""
    with session(engine) as db:
        user = db.get(User, user_id)
        if user is None:
            raise NotFound("user not found")
        user.totp_secret = secret
        user.totp_last_step = last_step
        db.add(user)
        db.commit()


def reset_mfa(engine: Engine, name: str) -> None:
    """Remove a user's second factor (a lost phone); an admin must enrol again at the next sign-in,
    and their browser sessions end now."""
    user = get_user(engine, name)
    assert user.id is not None
    set_totp(engine, user.id, None)
    with session(engine) as db:
        db.execute(delete(WebSession).where(WebSession.user_id == user.id))
        db.commit()


def count_admins(engine: Engine) -> int:
    with session(engine) as db:
        return len(db.exec(select(User.id).where(User.role == "admin")).all())


def user_by_id(engine: Engine, user_id: int) -> User | None:
    with session(engine) as db:
        return db.get(User, user_id)


# Names that read as the local operator (audit log, CLI token) or a built-in administrator: never given to a
# provider account.
_RESERVED_FOR_OIDC = OPERATOR_NAMES | {"admin", "root"}


def _name_from_claim(preferred: str) -> str:
    """A valid user name made from what the provider calls the user (e.g. `j.smith@hospital.example`)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.@-]+", "-", preferred.strip()).strip("_.@-")[:64]
    return cleaned or "oidc-user"


def _named_in_document_acls(db, name: str) -> bool:
    """Whether a document's ACL names `user:NAME`: an entry left from before ACLs were checked against
    existing users (or from an import) must not hand its documents to a newcomer who gets that name."""
    statement = sql(
        f"SELECT 1 FROM document AS d WHERE {acl_names_any(db.get_bind().dialect.name, 'd.acl', 'names')} LIMIT 1"  # noqa: S608
    ).bindparams(bindparam("names", expanding=True, type_=String))
    return db.exec(statement, params={"names": [f"user:{name}"]}).first() is not None


def oidc_user(engine: Engine, issuer: str, subject: str, preferred_name: str, role: str) -> tuple[User, bool]:
    """The user with this OIDC identity (issuer + subject), created on first sign-in; (user, created).

    Never found by name or e-mail: a provider account whose name equals a local account's gets a name
    of its own (`name-2`, ...; names equal but for case count as taken), so it cannot take the local
    account over. The new user has no password.
    """
    if not issuer or not subject:
        raise BadRequest("an OIDC identity needs an issuer and a subject")
    if role not in ROLES:
        raise BadRequest(f"role must be one of {', '.join(ROLES)}")
    base = _name_from_claim(preferred_name)
    with session(engine) as db:
        for attempt in range(1, 1000):
            found = db.exec(select(User).where(User.oidc_issuer == issuer, User.oidc_subject == subject)).first()
            if found is not None:
                return found, False
            suffix = "" if attempt == 1 else f"-{attempt}"
            name = base[: 64 - len(suffix)] + suffix
            if (
                name.lower() in _RESERVED_FOR_OIDC
                or db.exec(select(User.id).where(func.lower(User.name) == name.lower())).first()
                or _named_in_document_acls(db, name)
            ):
                continue  # not even a name differing only in case: it would read as the same person
            user = User(name=name, role=role, oidc_issuer=issuer, oidc_subject=subject)
            db.add(user)
            try:
                db.commit()
            except IntegrityError:  # another sign-in took the name or created this identity just now
                db.rollback()
                continue
            db.refresh(user)
            return user, True
    raise Conflict("could not find a free user name for this OIDC identity")
