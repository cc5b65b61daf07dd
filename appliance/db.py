"""The metadata database: engine creation (SQLite in WAL mode by default), the tables, migrations.

The schema is owned by Alembic migrations in `appliance/migrations`; every start upgrades the
database to the newest revision, so an appliance upgraded in place keeps its data. A test checks
that the migrations produce exactly the tables declared here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import JSON, Column, Index, UniqueConstraint, event
from sqlalchemy.engine import Engine
from sqlmodel import Field, Session, SQLModel, create_engine


def utcnow() -> datetime:
    return datetime.now(UTC)


class User(SQLModel, table=True):
    # An OIDC identity (issuer + subject) belongs to at most one user; local users have neither.
    __table_args__ = (Index("ix_user_oidc_identity", "oidc_issuer", "oidc_subject", unique=True),)
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=64)
    role: str = Field(max_length=16)  # admin | editor | reader (grows into full RBAC)
    password_hash: str | None = None
    disabled: bool = False
    created_at: datetime = Field(default_factory=utcnow)
    totp_secret: str | None = Field(default=None, max_length=64)  # base32; set once enrolment is confirmed
    totp_last_step: int | None = None  # the last accepted TOTP time step (a code is never accepted twice)
    oidc_issuer: str | None = Field(default=None, max_length=512)  # set for users who sign in through OIDC
    oidc_subject: str | None = Field(default=None, max_length=255)  # the provider's `sub` for them


class ApiKey(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="user.id", index=True)
    prefix: str = Field(max_length=16, index=True)  # shown in listings; never the whole key
    key_hash: str = Field(unique=True, max_length=64)
    label: str = Field(default="", max_length=128)
    created_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None


class Document(SQLModel, table=True):
    """One ingested file version. The id is the sha256 of its collection and content (`ingest.pipeline`);
    documents ingested before that change keep the sha256 of their bytes."""

    id: str = Field(primary_key=True, max_length=64)
    collection: str = Field(index=True, max_length=128)
    source: str = Field(index=True, max_length=1024)  # where it came from (path or upload name), for replacement
    filename: str = Field(max_length=255)  # display name; files on disk use server-generated names
    kind: str = Field(max_length=16)
    size: int
    acl: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    status: str = Field(default="indexing", max_length=16)  # indexing | indexed
    chunk_count: int = 0
    created_at: datetime = Field(default_factory=utcnow)

    def summary(self) -> dict:
        """What listings show of a document (the CLI and the API alike)."""
        return {
            "id": self.id,
            "collection": self.collection,
            "filename": self.filename,
            "kind": self.kind,
            "size": self.size,
            "chunks": self.chunk_count,
            "status": self.status,
            "acl": self.acl,
            "created_at": self.created_at.isoformat(),
        }


class DocumentText(SQLModel, table=True):
    """The extracted full text, kept so that citations can be shown and verified."""

    document_id: str = Field(primary_key=True, foreign_key="document.id", max_length=64)
    text: str


class Chunk(SQLModel, table=True):
    id: str = Field(primary_key=True, max_length=80)  # "<document id>:<n>"
    document_id: str = Field(foreign_key="document.id", index=True, max_length=64)
    position: int
    start: int
    end: int
    page: int | None = None
    headings: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    text: str


class ChunkVector(SQLModel, table=True):
    """A chunk's embedding (float32 bytes), kept beside the chunk so that every process reads the vectors
    through the database (the in-memory search copy; rebuilding Chroma) rather than through embedded Chroma,
    which one process cannot see another's writes through."""

    chunk_id: str = Field(primary_key=True, foreign_key="chunk.id", max_length=80)
    vector: bytes


class Job(SQLModel, table=True):
    """A persistent unit of ingestion work; survives restarts (running jobs are re-run after a crash)."""

    id: str = Field(primary_key=True, max_length=32)
    kind: str = Field(default="ingest", max_length=16)
    state: str = Field(default="queued", index=True, max_length=16)  # queued | running | done | failed
    collection: str = Field(max_length=128)
    acl: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    filename: str = Field(max_length=255)  # as the uploader named it (display only)
    upload_path: str = Field(max_length=1024)  # server-generated path of the received bytes
    user_id: int | None = None
    result: str | None = Field(default=None, max_length=16)  # added | unchanged | updated
    document_id: str | None = Field(default=None, max_length=64)
    reason: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)

    def summary(self) -> dict:
        """What GET /api/jobs/{id} shows (the upload path stays private)."""
        return {
            "id": self.id,
            "state": self.state,
            "filename": self.filename,
            "collection": self.collection,
            "result": self.result,
            "document_id": self.document_id,
            "reason": self.reason,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


class Group(SQLModel, table=True):
    """A named set of users; grants and walls may name a group instead of each user."""

    __tablename__ = "user_group"  # "group" is an SQL keyword
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=64)
    created_at: datetime = Field(default_factory=utcnow)


class GroupMember(SQLModel, table=True):
    __tablename__ = "group_member"
    group_id: int = Field(foreign_key="user_group.id", primary_key=True)
    user_id: int = Field(foreign_key="user.id", primary_key=True, index=True)


class Collection(SQLModel, table=True):
    """A named set of documents; the unit that grants and walls apply to (Document.collection names one)."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=128)
    description: str | None = Field(default=None, max_length=1024)
    created_at: datetime = Field(default_factory=utcnow)


class Grant(SQLModel, table=True):
    """A user or group may read (reader) or also upload to and delete from (editor) a collection.

    A break-glass grant (an admin's own, time-limited reader grant) has `expires_at` and `reason`; once
    expired it no longer counts (it stays as history until replaced or revoked).
    """

    __tablename__ = "collection_grant"  # "grant" is an SQL keyword
    __table_args__ = (UniqueConstraint("collection_id", "subject_kind", "subject_id", name="uq_grant_subject"),)
    id: int | None = Field(default=None, primary_key=True)
    collection_id: int = Field(foreign_key="collection.id", index=True)
    subject_kind: str = Field(max_length=8)  # user | group
    subject_id: int  # User.id or Group.id, as subject_kind says
    role: str = Field(max_length=16)  # reader | editor
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime | None = None  # set on break-glass grants only
    reason: str | None = Field(default=None, max_length=500)  # why the break-glass grant was taken


class Wall(SQLModel, table=True):
    """An ethical wall: the user or group never sees the collection, whatever grants or ACLs say."""

    __tablename__ = "collection_wall"
    __table_args__ = (UniqueConstraint("collection_id", "subject_kind", "subject_id", name="uq_wall_subject"),)
    id: int | None = Field(default=None, primary_key=True)
    collection_id: int = Field(foreign_key="collection.id", index=True)
    subject_kind: str = Field(max_length=8)  # user | group
    subject_id: int
    created_at: datetime = Field(default_factory=utcnow)


class Conversation(SQLModel, table=True):
    """A user's conversation with the documents; only its owner sees it."""

    id: str = Field(primary_key=True, max_length=32)
    user_id: int = Field(index=True)  # 0 is the local operator
    title: str = Field(max_length=200)
    collections: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class ConversationMessage(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    conversation_id: str = Field(foreign_key="conversation.id", index=True, max_length=32)
    role: str = Field(max_length=16)  # user | assistant
    content: str
    citations: list[dict] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    grounded: bool | None = None
    created_at: datetime = Field(default_factory=utcnow)


class WebSession(SQLModel, table=True):
    """A browser session. Only the SHA-256 of the random session id is stored.

    stage: `full` (signed in), `mfa` (password checked, TOTP code pending), `enrol` (password checked,
    an admin who must enrol TOTP first).
    """

    __tablename__ = "web_session"
    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(unique=True, max_length=64)
    user_id: int = Field(foreign_key="user.id", index=True)
    stage: str = Field(default="full", max_length=8)
    csrf_token: str = Field(max_length=64)  # the synchronizer token of the session's forms and fetch calls
    pending_totp: str | None = Field(default=None, max_length=64)  # secret being enrolled, not yet confirmed
    created_at: datetime = Field(default_factory=utcnow)
    last_seen_at: datetime = Field(default_factory=utcnow)


class OidcLogin(SQLModel, table=True):
    """An OIDC sign-in under way: what the callback must find (single use, for a few minutes).

    Keyed by the SHA-256 of `state`; `binding_hash` is the SHA-256 of the random cookie the browser got
    when it started, so a callback from another browser (login CSRF) finds nothing to complete.
    """

    __tablename__ = "oidc_login"
    state_hash: str = Field(primary_key=True, max_length=64)
    binding_hash: str = Field(max_length=64)
    nonce: str = Field(max_length=128)
    code_verifier: str = Field(max_length=128)
    next_path: str = Field(default="/", max_length=1000)
    created_at: datetime = Field(default_factory=utcnow, index=True)


class LoginThrottle(SQLModel, table=True):
    """Failed sign-ins per account name from a client address ("pair:IP|NAME"), per client address ("addr:IP")
    or, for TOTP codes, per account ("totp:NAME"), and the lockout (appliance.access.signin)."""

    __tablename__ = "login_throttle"
    key: str = Field(primary_key=True, max_length=200)
    failures: int = 0
    locked_until: datetime | None = None
    updated_at: datetime = Field(default_factory=utcnow)


class IndexState(SQLModel, table=True):
    """One row (id 1): `generation` grows with every write to the chunk index, so that a process holding
    a copy of it (the in-memory vectors) sees writes made by another process (a CLI ingest)."""

    id: int = Field(default=1, primary_key=True)
    generation: int = 0
    rebuilds: int = 0  # `index rebuild` re-embeds everything: a holder of a copy reads it all again
    # Which embedder built the vectors (JSON: backend, model digest, kind of vectors); see index.require_embedder.
    embedder: str | None = Field(default=None, max_length=1000)


# The FTS5 table for BM25 lives beside these (created by migration 0002, outside the ORM).
FTS_TABLE = "chunk_fts"


def acl_names_any(dialect: str, acl_column: str, parameter: str) -> str:
    """SQL that is true when the JSON list in `acl_column` holds any of the names bound (expanding) to
    `parameter`: SQLite's json_each, PostgreSQL's json_array_elements_text."""
    elements = {
        "sqlite": f"json_each({acl_column}) AS p",
        "postgresql": f"json_array_elements_text({acl_column}) AS p(value)",
    }[dialect]
    # Only fixed column and parameter names are formatted in; the names themselves are bound.
    return f"EXISTS (SELECT 1 FROM {elements} WHERE p.value IN :{parameter})"  # noqa: S608


def include_name(name: str | None, type_: str, parent_names: dict) -> bool:
    """For Alembic's comparisons: the FTS5 table and its shadow tables are managed by hand."""
    return not (type_ == "table" and name and name.startswith(FTS_TABLE))


def database_url(url: str) -> str:
    """The URL SQLAlchemy should open: `postgresql://` (as administrators write it) means psycopg 3, which the
    appliance ships, rather than SQLAlchemy's default driver for it (psycopg2, not installed)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def create_db_engine(url: str) -> Engine:
    """Create the engine and the tables; SQLite gets WAL and foreign keys, PostgreSQL a checked pool."""
    url = database_url(url)
    is_sqlite = url.startswith("sqlite")
    if is_sqlite:
        engine = create_engine(url, connect_args={"check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.close()

    else:
        # pre_ping: a connection the database server closed (restart, idle timeout) is replaced, not used.
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    migrate(engine)
    return engine


MIGRATIONS = Path(__file__).parent / "migrations"
MIGRATION_LOCK = 0x4150504C  # PostgreSQL advisory lock key held while migrating ("APPL")


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(engine: Engine) -> None:
    """Upgrade the database to the newest schema revision."""
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            # Several server processes may start at once against one database: one migrates, the others wait.
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def session(engine: Engine) -> Session:
    return Session(engine, expire_on_commit=False)


@contextmanager
def serialized(engine: Engine, key: int) -> Iterator[Session]:
    """A session whose one transaction holds a lock that every server process sharing the database respects:
    on SQLite the database's write lock (BEGIN IMMEDIATE), on PostgreSQL the transaction advisory lock `key`.
    For a check-then-write that must not interleave with another process's (a thread lock covers one process).
    Commits when the block ends, rolls back if it raises."""
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        elif engine.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({int(key)})")
        with Session(bind=connection, expire_on_commit=False) as db:
            try:
                yield db
                db.flush()
            except BaseException:
                connection.rollback()
                raise
            connection.commit()


class AuditRecord(SQLModel, table=True):
    """One append-only, hash-chained audit event (`appliance.access.audit` writes and verifies them).

    `details` holds identifiers only (collections, chunk ids, model, job id...), never document text,
    passwords or keys. On SQLite, triggers from migration 0007 refuse UPDATE and DELETE.
    """

    __tablename__ = "audit_record"
    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, index=True)
    actor: str = Field(index=True, max_length=64)  # the user's name; "local-operator" for the CLI
    actor_id: int | None = None  # User.id; 0 for the local operator; None when no user is known
    action: str = Field(index=True, max_length=32)
    target: str | None = Field(default=None, max_length=1024)
    outcome: str = Field(default="ok", max_length=8)  # ok | denied | failed
    details: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    prev_hash: str = Field(max_length=64)
    hash: str = Field(unique=True, max_length=64)
