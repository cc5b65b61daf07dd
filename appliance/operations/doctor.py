"""`appliance doctor`: configuration problems of an installation, and the facts about its network use.

Each check answers ok, warn or fail with one line of what was found and one of advice. The doctor only
reads: it never creates the home or the database, and never upgrades the schema; it makes no network
connection of its own (not even a DNS lookup), so configured peers are reported as written.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import SecretStr
from pydantic_settings import BaseSettings
from sqlalchemy.engine import Engine, make_url

from appliance.config import ENV_PREFIX, Settings
from appliance.services import Services

log = logging.getLogger(__name__)

OK, WARN, FAIL = "ok", "warn", "fail"
GIB = 2**30
DISK_WARN_BYTES = 10 * GIB
DISK_FAIL_BYTES = 1 * GIB
MIN_SECRET_LENGTH = 16
MIN_SECRET_DISTINCT = 8
COMMON_SECRETS = {"secret", "password", "changeme", "change-me", "admin", "appliance", "client-secret", "default"}
FALSE_WORDS = {"0", "false", "no", "off", ""}
OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
OCR_TOOLS = ("tesseract", "pdftoppm")
REBUILD = "see `appliance index check`; `appliance index rebuild` rebuilds the keyword index and vectors"


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    message: str
    advice: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


# --- the database, opened without creating or upgrading it ------------------------------------------
def _inspect(settings: Settings, engine: Engine | None = None) -> Services:
    """The home's core parts opened as they are (`Services(read_only=True)`): nothing made, migrated or
    installed; on the doctor's own database engine when it has one."""
    return Services(settings, read_only=True, **({"db": engine} if engine is not None else {}))


def _open_database(settings: Settings) -> Engine | None:
    """An engine on the metadata database, or None when its SQLite file does not exist yet."""
    url = make_url(settings.resolved_database_url)
    if url.get_backend_name() == "sqlite":
        if not url.database or not Path(url.database).is_file():
            return None
    return _inspect(settings).db


def _schema_state(engine: Engine, url: str) -> tuple[set[str], set[str], set[str]]:
    """(revisions the database is at, the newest revisions this version knows, every revision it knows)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from appliance.db import alembic_config

    script = ScriptDirectory.from_config(alembic_config(url))
    with engine.connect() as connection:
        current = set(MigrationContext.configure(connection).get_current_heads())
    return current, set(script.get_heads()), {rev.revision for rev in script.walk_revisions()}


# --- checks ------------------------------------------------------------------------------------------
def _secret_settings(settings: Settings) -> list[tuple[str, str]]:
    """(environment variable, value) of every secret that is set: SecretStr settings and the database password."""
    found: list[tuple[str, str]] = []

    def walk(model: BaseSettings) -> None:
        for name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, BaseSettings):
                walk(value)
            elif isinstance(value, SecretStr) and value.get_secret_value():
                found.append((f"{ENV_PREFIX}{name.upper()}", value.get_secret_value()))

    walk(settings)
    if settings.database_url:
        password = make_url(settings.database_url).password
        if password:
            found.append((f"{ENV_PREFIX}DATABASE_URL (password)", str(password)))
    return found


def _weakness(secret: str) -> str | None:
    if secret.lower() in COMMON_SECRETS:
        return "a common word"
    if len(secret) < MIN_SECRET_LENGTH:
        return f"shorter than {MIN_SECRET_LENGTH} characters"
    if len(set(secret)) < MIN_SECRET_DISTINCT:
        return f"fewer than {MIN_SECRET_DISTINCT} different characters"
    return None


def check_secrets(settings: Settings, engine: Engine | None) -> Check:
    secrets = _secret_settings(settings)
    weak = [f"{name} is {why}" for name, value in secrets if (why := _weakness(value))]
    if weak:
        return Check(
            "secrets",
            FAIL,
            "; ".join(weak),
            "use a random value of 32 characters or more (`python -c 'import secrets; print(secrets.token_hex(32))'`)",
        )
    if not secrets:
        return Check("secrets", OK, "no secret setting is set (public OIDC client or none; no database password)")
    return Check("secrets", OK, f"{len(secrets)} secret setting(s) set, none weak")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_tls(settings: Settings, engine: Engine | None) -> Check:
    host = settings.server.host
    if _is_loopback(host):
        return Check("tls", OK, f"bound to loopback ({host}): only this machine (or a proxy on it) can connect")
    if not settings.web.cookie_secure:
        return Check(
            "tls",
            WARN,
            f"bound to {host} without TLS: passwords, sessions and documents would cross the LAN in clear",
            "bind to 127.0.0.1 and put nginx with TLS in front (deploy/nginx/appliance.conf), then set "
            "APPLIANCE_COOKIE_SECURE=true",
        )
    return Check(
        "tls",
        OK,
        f"bound to {host} with APPLIANCE_COOKIE_SECURE set: TLS is taken to end at a proxy in front",
        "make sure clients can reach only the proxy's TLS port, not this one",
    )


def check_admins(settings: Settings, engine: Engine | None) -> Check:
    create = "create one with `appliance users add NAME --role admin` (or on the web page /setup)"
    if engine is None:
        return Check("admins", FAIL, "no database yet, so no administrator", create)
    from sqlmodel import col, select

    from appliance.db import User, session

    with session(engine) as db:
        admins = list(db.exec(select(User).where(User.role == "admin", col(User.disabled).is_(False))))
    if not admins:
        return Check("admins", FAIL, "no enabled administrator", create)
    enrolled = [a.name for a in admins if a.totp_secret]
    enrol = "each administrator enrols an authenticator app at their first web sign-in (/mfa/enrol)"
    if not enrolled:
        return Check(
            "admins", FAIL, f"no administrator has a second factor (TOTP) enrolled ({len(admins)} admin(s))", enrol
        )
    missing = sorted(a.name for a in admins if not a.totp_secret)
    if missing:
        return Check("admins", WARN, f"administrators without TOTP yet: {', '.join(missing)}", enrol)
    return Check("admins", OK, f"{len(admins)} administrator(s), all with TOTP enrolled")


def check_parsing(settings: Settings, engine: Engine | None) -> Check:
    from importlib.util import find_spec

    missing = [tool for tool in OCR_TOOLS if shutil.which(tool) is None]
    if find_spec("en_core_web_sm") is None:
        return Check(
            "parsing",
            FAIL,
            "spaCy's en_core_web_sm is missing: ingestion refuses to run (unstructured would try to download it)",
            "install the offline stand-in with `python -m ingest.spacy_standin`",
        )
    if missing:
        return Check(
            "parsing",
            WARN,
            f"OCR tools missing: {', '.join(missing)}; scanned PDFs are reported as having no extractable text",
            "install them (Debian: `apt-get install tesseract-ocr tesseract-ocr-eng poppler-utils`)",
        )
    return Check("parsing", OK, "offline spaCy stand-in present; OCR tools found: " + ", ".join(OCR_TOOLS))


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(settings: Settings, engine: Engine | None) -> Check:
    where = _existing(settings.home)
    free = shutil.disk_usage(where).free
    message = f"{free / GIB:.1f} GiB free on the file system of {where}"
    advice = "free space or move APPLIANCE_HOME: uploads, the index and models need room to grow"
    if free < DISK_FAIL_BYTES:
        return Check("disk", FAIL, message, advice)
    if free < DISK_WARN_BYTES:
        return Check("disk", WARN, message, advice)
    return Check("disk", OK, message)


def check_permissions(settings: Settings, engine: Engine | None) -> Check:
    home = settings.home
    if not home.exists():
        return Check(
            "permissions", WARN, f"{home} does not exist yet", "any `appliance` command creates it (mode 0700)"
        )
    mode = stat.S_IMODE(home.stat().st_mode)
    fix = f"`chmod 700 {home}`: the database, originals and models are there"
    if mode & 0o007:
        return Check("permissions", FAIL, f"{home} is open to every user of this machine (mode {mode:04o})", fix)
    if mode & 0o070:
        return Check("permissions", WARN, f"{home} is open to its group (mode {mode:04o})", fix)
    return Check("permissions", OK, f"{home} is readable only by its owner (mode {mode:04o})")


def check_migrations(settings: Settings, engine: Engine | None) -> Check:
    if engine is None:
        return Check("migrations", WARN, "no database yet", "any `appliance` command or the server creates it")
    current, heads, known = _schema_state(engine, settings.resolved_database_url)
    if current == heads:
        return Check("migrations", OK, f"schema at the newest revision ({', '.join(sorted(heads))})")
    unknown = current - known
    if unknown:
        return Check(
            "migrations",
            FAIL,
            f"schema at revision {', '.join(sorted(unknown))}, which this version does not know",
            "the database was written by a newer appliance: run that version (or restore a backup)",
        )
    return Check(
        "migrations",
        WARN,
        f"schema at {', '.join(sorted(current)) or 'no revision'}, newest is {', '.join(sorted(heads))}",
        "start the server or run any `appliance` command: it upgrades the schema (take a backup first)",
    )


def check_index(settings: Settings, engine: Engine | None) -> Check:
    if engine is None:
        return Check("index", OK, "no database yet: nothing indexed")
    current, heads, _known = _schema_state(engine, settings.resolved_database_url)
    if current != heads:
        return Check("index", WARN, "not checked: the schema is not at the newest revision")
    if not settings.chroma_url and not settings.chroma_dir.is_dir():
        return Check("index", FAIL, f"the vector store {settings.chroma_dir} is missing", REBUILD)
    with _inspect(settings, engine) as services:
        report = services.index.check()
    summary = f"{report.documents} documents, {report.chunks} chunks"
    if report.clean:
        return Check("index", OK, f"{summary}: database, keyword index and vectors agree")
    problems = [f"{name.replace('_', ' ')}: {len(v)}" for name, v in vars(report).items() if isinstance(v, list) and v]
    return Check(
        "index",
        FAIL,
        f"{summary}: " + "; ".join(problems),
        REBUILD,
    )


def check_offline(settings: Settings, engine: Engine | None) -> Check:
    off = [name for name in OFFLINE_SWITCHES if os.environ.get(name, "1").strip().lower() in FALSE_WORDS]
    if off:
        return Check(
            "offline",
            WARN,
            f"{', '.join(f'{name}={os.environ[name]!r}' for name in off)} in the environment: the server keeps "
            "it (the appliance sets these only when unset), so a missing embedding model would be looked up on "
            "the model hub",
            f"unset {' and '.join(off)} (runner and parser processes force them to 1 anyway)",
        )
    telemetry = "off (set in code)"
    if settings.chroma_url or settings.chroma_dir.is_dir():
        with _inspect(settings) as services:
            telemetry = "on" if services.vectors.get_settings().anonymized_telemetry else "off"
    if telemetry == "on":
        return Check("offline", FAIL, "Chroma's anonymized telemetry is on", "report this: the code turns it off")
    return Check(
        "offline",
        OK,
        "model hub access off (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE: 1 in the server, runners and parsers); "
        f"Chroma anonymized telemetry {telemetry}; unstructured's analytics off (SCARF_NO_ANALYTICS, DO_NOT_TRACK)",
    )


def _peers(settings: Settings) -> list[tuple[str, str, int | None]]:
    """(what, host, port) of every outbound destination the settings name."""
    peers = []
    url = make_url(settings.resolved_database_url)
    if url.get_backend_name() != "sqlite" and url.host:
        peers.append(("database", url.host, url.port))
    if settings.oidc.enabled:
        issuer = urlsplit(settings.oidc.oidc_issuer)
        peers.append(("OIDC provider", issuer.hostname or "", issuer.port or (443 if issuer.scheme == "https" else 80)))
    from appliance.cluster.coordinator import Cluster
    from appliance.cluster.worker import split_address

    for node in Cluster(settings.home / "cluster").nodes():  # paired workers (read from disk, not probed)
        host, port = split_address(node.address)
        peers.append(("cluster worker", host, port))
    return peers


def check_peers(settings: Settings, engine: Engine | None) -> Check:
    peers = _peers(settings)
    if not peers:
        return Check("peers", OK, "none configured: the appliance needs no outbound connection")
    listed = ", ".join(f"{what} at {host}{f':{port}' if port else ''}" for what, host, port in peers)
    public = [host for _what, host, _port in peers if _is_public(host)]
    if public:
        return Check(
            "peers",
            WARN,
            f"configured outbound connections: {listed}; {', '.join(public)} is a public address",
            "on an air-gapped LAN every peer should be a LAN address",
        )
    return Check("peers", OK, f"configured outbound connections only: {listed}")


def _is_public(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_global
    except ValueError:
        return False  # a name: not resolved here (the doctor looks nothing up)


def _server_processes(port: int):
    """The process listening on `port` (the running server) and its children (runners, parsers), or []."""
    import psutil

    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
            server = psutil.Process(connection.pid)
            return [server, *server.children(recursive=True)]
    return []


def check_connections(settings: Settings, engine: Engine | None) -> Check:
    import psutil

    port = settings.server.port
    try:
        processes = _server_processes(port)
    except psutil.AccessDenied:
        return Check("connections", WARN, "not checked: listing sockets needs more rights", "run as the service user")
    if not processes:
        return Check("connections", OK, f"no server listening on port {port}: no live connections to inspect")
    if not any("appliance" in part for part in processes[0].cmdline()):
        return Check(
            "connections",
            WARN,
            f"port {port} is held by another program ({processes[0].name()}, pid {processes[0].pid})",
            "start the appliance on a free port (APPLIANCE_PORT), then run the doctor again",
        )
    expected = {(host, port) for _what, host, port in _peers(settings)}
    outbound = set()
    for process in processes:
        try:
            connections = process.net_connections(kind="inet")
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        for connection in connections:
            if not connection.raddr or connection.laddr.port == port or _is_loopback(connection.raddr.ip):
                continue  # not connected, a client connected to us, or this machine
            if (connection.raddr.ip, connection.raddr.port) not in expected:
                outbound.add(f"{connection.raddr.ip}:{connection.raddr.port} (pid {process.pid})")
    pid = processes[0].pid
    if outbound:
        return Check(
            "connections",
            WARN,
            f"the server (pid {pid}) or its children hold outbound connections: {', '.join(sorted(outbound))}",
            "compare them with the configured peers (database, OIDC provider); anything else is unexpected",
        )
    return Check(
        "connections",
        OK,
        f"the server (pid {pid}) and its {len(processes) - 1} child process(es) hold no outbound connection "
        "except to configured peers",
    )


def check_cpu_path(settings: Settings, engine: Engine | None) -> Check:
    from appliance.inference import cpu_path

    path = cpu_path.current(settings.scheduler.cpu_extra_buffers)
    if path.amx and path.extra_buffers:
        return Check(
            "cpu_path",
            FAIL,
            path.describe() + ": real quantized models crash at their first decode (llama.cpp #20824)",
            "unset APPLIANCE_CPU_EXTRA_BUFFERS (auto) or set it to off",
        )
    return Check("cpu_path", OK, path.describe())


def check_models(settings: Settings, engine: Engine | None) -> Check:
    from appliance.errors import ApplianceError
    from appliance.models import default_model

    configured = settings.retrieval.rag_model
    if not (settings.models_dir / "manifests").is_dir():
        store = None
        record = None
    else:
        with _inspect(settings) as services:
            store = services.store  # as it is: the default model is not installed here
        try:
            record = default_model.generation_model(store, configured)
        except ApplianceError as exc:
            return Check("models", FAIL, exc.message, "check APPLIANCE_RAG_MODEL against `appliance list`")
    if record is not None and store is not None:
        try:
            store.verify_blob(record.model_digest)
        except ApplianceError as exc:
            advice = "remove and create it again (`appliance rm`, `appliance create`)"
            if record.name.display == default_model.DEFAULT_MODEL_NAME:
                advice = f"`appliance rm {record.name.display}`, then `appliance models install-default`"
            return Check("models", FAIL, f"answers would come from {record.name.display}, but {exc.message}", advice)
        return Check("models", OK, f"answers are written by {record.name.display} (its blob matches its digest)")
    if settings.scheduler.default_model and (store is None or not default_model.installed_before(store)):
        try:
            path = default_model.check_packaged_file()
        except ApplianceError as exc:
            return Check("models", FAIL, exc.message, "reinstall with deploy/install.sh")
        return Check("models", OK, f"{default_model.DEFAULT_MODEL_NAME} will be installed from {path} at first start")
    return Check(
        "models",
        WARN,
        "no generation model is installed: answers are extractive (quoted passages)",
        f"`appliance models install-default` installs {default_model.DEFAULT_MODEL_NAME}; "
        "`appliance create` adds another GGUF",
    )


CHECKS: tuple[Callable[[Settings, Engine | None], Check], ...] = (
    check_secrets,
    check_tls,
    check_admins,
    check_parsing,
    check_disk,
    check_permissions,
    check_migrations,
    check_index,
    check_offline,
    check_peers,
    check_connections,
    check_cpu_path,
    check_models,
)
NEEDS_DATABASE = {check_admins, check_migrations, check_index}


def run(settings: Settings) -> list[Check]:
    """Every check; one that raises is itself reported as failed (the doctor must not stop halfway)."""
    results: list[Check] = []
    engine = None
    try:
        engine = _open_database(settings)
        opened = True
    except Exception as exc:
        results.append(Check("database", FAIL, f"cannot open the database: {exc}", "check APPLIANCE_DATABASE_URL"))
        opened = False
    for check in CHECKS:
        name = check.__name__.removeprefix("check_")
        if check in NEEDS_DATABASE and not opened:
            results.append(Check(name, WARN, "not checked: the database cannot be opened"))
            continue
        try:
            results.append(check(settings, engine))
        except Exception as exc:
            log.debug("doctor check %s failed", name, exc_info=True)
            results.append(Check(name, FAIL, f"the check itself failed: {type(exc).__name__}: {exc}"))
    if engine is not None:
        engine.dispose()
    return results
