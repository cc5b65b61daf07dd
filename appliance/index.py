"""The vector index: an embedded Chroma (default) or a Chroma server, never with its own embedder.

Chroma is told not to send telemetry and is always given embeddings explicitly, so it never tries
to download an embedding function. Ingestion and retrieval build on this.
"""

from __future__ import annotations

from pathlib import Path


def open_vector_store(path: Path):
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    path.mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(
        path=str(path), settings=ChromaSettings(anonymized_telemetry=False, allow_reset=False)
    )
