"""`Services(settings)`: the core of one home, wired once, for the server and the CLI alike.

Each part is built on first use, with what it needs built first: the database (migrated), the model
store (with the bundled default model on its first opening), the hardware, the scheduler, the vector
store, the chunk index, the embedder (checked against the vectors the index holds), the engine, the
retriever, the answerer and the ingestor. A command that lists users so never loads Chroma or torch, and
the heavy libraries are imported only by the parts that need them.

`aclose()` stops what was started: the ingestor's parser processes, then the scheduler's runners (in the
event loop that started them). `close()` stops the parser processes only, for callers without a loop.

A part built elsewhere can be handed in by name (`Services(settings, embedder=shared)`: a test sharing one
embedder, an evaluation answering from a model store of its own); it is used as it is, and the caller closes
it. `read_only=True` inspects a home as it is (the doctor): the database is opened without being created or
migrated, no default model is installed, and the home's folders are not made (the model store and an embedded
Chroma still make their own when opened: open them only where they exist).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING

from appliance.config import Settings
from appliance.errors import ApplianceError

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine as DatabaseEngine

    from appliance.answers.rag import Answerer
    from appliance.cluster.coordinator import Cluster
    from appliance.inference.engine import Engine
    from appliance.inference.hardware import Hardware
    from appliance.inference.scheduler import Scheduler
    from appliance.models.store import ModelStore
    from appliance.retrieval.embeddings import SentenceEmbedder
    from appliance.retrieval.index import ChunkIndex
    from appliance.retrieval.retrieve import Retriever
    from ingest.pipeline import Ingestor

log = logging.getLogger(__name__)


def _log_error(message: str) -> None:
    log.error("%s (see `appliance doctor`)", message)


class Services:
    def __init__(
        self, settings: Settings, *, warn: Callable[[str], None] = _log_error, read_only: bool = False, **parts: object
    ):
        """`warn`: how a problem that must not stop anything is reported (a damaged default-model package);
        logged by default. `read_only`: the database, store, vectors and index opened as they are, for reading
        (see above). `parts`: parts already built (db, store, embedder, retriever, ...), used instead of
        building them; their caller closes them."""
        self.settings = settings
        self.warn = warn
        self.read_only = read_only
        for name, part in parts.items():
            if not isinstance(getattr(type(self), name, None), cached_property):
                raise TypeError(f"Services has no part named {name!r}")
            self.__dict__[name] = part  # where cached_property looks first
        self._given = frozenset(parts)

    @cached_property
    def db(self) -> DatabaseEngine:
        """The database engine, its schema migrated to this version."""
        if self.read_only:  # as it is, not migrated (connecting makes a SQLite file that is not there: check first)
            from sqlalchemy import create_engine

            return create_engine(self.settings.resolved_database_url)
        from appliance.db import create_db_engine

        self.settings.ensure_dirs()
        return create_db_engine(self.settings.resolved_database_url)

    @cached_property
    def store(self) -> ModelStore:
        """The model store; the bundled default model is installed on its first opening."""
        from appliance.models.default_model import ensure_default_model
        from appliance.models.store import ModelStore

        if self.read_only:
            return ModelStore(self.settings.models_dir)  # (the store itself makes its two folders)
        self.settings.ensure_dirs()
        store = ModelStore(self.settings.models_dir)
        try:
            ensure_default_model(store, self.settings.scheduler.default_model)
        except ApplianceError as exc:  # a damaged package must not stop the server, `rm`, `create` or `doctor`
            self.warn(exc.message)
        return store

    @cached_property
    def hardware(self) -> Hardware:
        from appliance.inference import hardware

        return hardware.detect()

    @cached_property
    def cluster(self) -> Cluster:
        """The paired workers (none until `appliance cluster pair`)."""
        from appliance.cluster.coordinator import Cluster

        return Cluster(self.settings.home / "cluster")

    @cached_property
    def scheduler(self) -> Scheduler:
        from appliance.inference.scheduler import Scheduler

        return Scheduler(self.settings.scheduler, self.store, self.hardware, cluster=self.cluster)

    @cached_property
    def vectors(self):
        """The Chroma client (embedded in the home, or the server at APPLIANCE_CHROMA_URL)."""
        from appliance.retrieval.index import open_vector_store

        if not self.read_only:
            self.settings.ensure_dirs()
        return open_vector_store(self.settings)

    @cached_property
    def index(self) -> ChunkIndex:
        from appliance.retrieval.index import ChunkIndex

        return ChunkIndex(self.db, self.vectors)

    @cached_property
    def embedder(self) -> SentenceEmbedder:
        """'auto' resolved against the index; raises Conflict when a named backend's vectors differ from it."""
        from appliance.retrieval.embeddings import open_embedder

        return open_embedder(self.settings, self.index)

    @cached_property
    def engine(self) -> Engine:
        from appliance.inference.engine import Engine

        return Engine(self.store, self.scheduler, self.embedder)

    @cached_property
    def retriever(self) -> Retriever:
        from appliance.retrieval.retrieve import Retriever

        return Retriever(self.index, self.embedder, self.settings.retrieval)

    @cached_property
    def answerer(self) -> Answerer:
        from appliance.answers.rag import Answerer

        return Answerer(self.retriever, self.engine, self.settings.retrieval, self.settings.scheduler.num_ctx)

    @cached_property
    def ingestor(self) -> Ingestor:
        from ingest.pipeline import Ingestor

        return Ingestor(self.settings, self.index, self.embedder)

    def _built(self, name: str) -> bool:
        return name in self.__dict__ and name not in self._given  # where cached_property keeps what it built

    def close(self) -> None:
        """Stop the ingestor's parser processes, if it was built (safe to call again)."""
        if self._built("ingestor"):
            self.ingestor.close()

    async def aclose(self) -> None:
        """Stop the parser processes, then the scheduler's runners, if they were built."""
        self.close()
        if self._built("scheduler"):
            await self.scheduler.shutdown()

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    async def __aenter__(self) -> Services:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()
