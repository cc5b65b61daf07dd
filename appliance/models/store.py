"""The model store, laid out like Ollama's: content-addressed blobs and one manifest per name:tag.

    <home>/models/blobs/sha256-<hex>                          GGUF files, templates, params, ...
    <home>/models/manifests/<host>/<namespace>/<model>/<tag>  JSON manifest naming the blobs

Blobs are written to a temporary file in the blob directory, hashed while written, and renamed
into place only when the digest matches; a GGUF is validated before any manifest points at it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from appliance.errors import ApplianceError, BadRequest, NotFound
from appliance.models.gguf_info import GGUFInfo, format_parameter_count, read_gguf
from appliance.models.names import ModelName, parse_digest, parse_name

log = logging.getLogger(__name__)

MEDIA_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_MODEL = "application/vnd.ollama.image.model"
MEDIA_TEMPLATE = "application/vnd.ollama.image.template"
MEDIA_SYSTEM = "application/vnd.ollama.image.system"
MEDIA_PARAMS = "application/vnd.ollama.image.params"
MEDIA_LICENSE = "application/vnd.ollama.image.license"
MEDIA_MESSAGES = "application/vnd.ollama.image.messages"
_CHUNK = 1 << 20


class DigestMismatch(BadRequest):
    """Uploaded bytes do not match the digest the client named."""


class CorruptBlob(ApplianceError):
    """A stored blob no longer matches its digest (disk damage or tampering): the server's fault."""

    status = 500


@dataclass
class ModelRecord:
    """A stored model: its manifest resolved into paths and values."""

    name: ModelName
    digest: str  # hex sha256 of the manifest, as Ollama reports it
    model_digest: str  # hex sha256 of the GGUF blob
    model_path: Path
    size: int
    modified_at: datetime
    config: dict[str, Any]
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    license: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    @property
    def details(self) -> dict[str, Any]:
        family = self.config.get("model_family", "")
        return {
            "parent_model": "",
            "format": self.config.get("model_format", "gguf"),
            "family": family,
            "families": self.config.get("model_families") or ([family] if family else None),
            "parameter_size": self.config.get("model_type", ""),
            "quantization_level": self.config.get("file_type", ""),
        }


class BlobWriter:
    """Receives a blob in chunks, hashing as it writes; `commit` checks the digest and renames."""

    def __init__(self, store: ModelStore, max_bytes: int):
        self._store = store
        self._max = max_bytes
        self._hash = hashlib.sha256()
        self.size = 0
        fd, name = tempfile.mkstemp(prefix=".partial-", dir=store.blobs_dir)
        self._path = Path(name)
        self._file: BinaryIO = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self._max:
            self.abort()
            raise BadRequest(f"blob is larger than the allowed {self._max} bytes")
        self._hash.update(chunk)
        self._file.write(chunk)

    def commit(self, expected_hex: str | None = None) -> str:
        self._file.close()
        actual = self._hash.hexdigest()
        if expected_hex is not None and actual != expected_hex:
            self._path.unlink(missing_ok=True)
            raise DigestMismatch(f"digest mismatch: body has sha256:{actual}, expected sha256:{expected_hex}")
        target = self._store.blob_path(actual)
        if target.exists():
            self._path.unlink(missing_ok=True)
        else:
            os.replace(self._path, target)
        return actual

    def abort(self) -> None:
        self._file.close()
        self._path.unlink(missing_ok=True)


class ModelStore:
    def __init__(self, root: Path):
        self.root = root
        self.blobs_dir = root / "blobs"
        self.manifests_dir = root / "manifests"
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        self.manifests_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._verified: dict[str, tuple[int, int]] = {}  # hex -> (size, mtime_ns) hashed this process
        self._info_cache: dict[str, GGUFInfo] = {}

    # --- blobs -----------------------------------------------------------------------------------
    def blob_path(self, hex_digest: str) -> Path:
        return self.blobs_dir / f"sha256-{parse_digest('sha256:' + hex_digest)}"

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(parse_digest(digest)).is_file()

    def blob_writer(self, max_bytes: int = 1 << 40) -> BlobWriter:
        return BlobWriter(self, max_bytes)

    def import_file(self, source: Path, on_bytes: Callable[[int], None] | None = None) -> str:
        """Copy a file into the blob store (hashing as it goes); returns the hex digest.

        `on_bytes` is called with the size of each chunk copied (for a progress bar).
        """
        if not source.is_file():
            raise BadRequest(f"no such file: {source}")
        writer = self.blob_writer()
        try:
            with source.open("rb") as handle:
                while chunk := handle.read(_CHUNK):
                    writer.write(chunk)
                    if on_bytes:
                        on_bytes(len(chunk))
        except BaseException:
            writer.abort()
            raise
        return writer.commit()

    def _put_bytes(self, data: bytes) -> str:
        writer = self.blob_writer()
        writer.write(data)
        return writer.commit()

    def verify_blob(self, hex_digest: str) -> Path:
        """Check a blob's bytes against its name (once per process unless the file changes)."""
        path = self.blob_path(hex_digest)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise NotFound(f"model blob sha256:{hex_digest} is missing from the store") from None
        stamp = (stat.st_size, stat.st_mtime_ns)
        if self._verified.get(hex_digest) != stamp:
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                while chunk := handle.read(_CHUNK * 8):
                    digest.update(chunk)
            if digest.hexdigest() != hex_digest:
                raise CorruptBlob(
                    f"model blob sha256:{hex_digest} is corrupt (its bytes hash to sha256:{digest.hexdigest()}); "
                    "restore it from a backup or create the model again"
                )
            self._verified[hex_digest] = stamp
        return path

    def gguf_info(self, hex_digest: str) -> GGUFInfo:
        if hex_digest not in self._info_cache:
            self._info_cache[hex_digest] = read_gguf(self.blob_path(hex_digest))
        return self._info_cache[hex_digest]

    def chat_template(self, record: ModelRecord) -> str | None:
        """The template a model renders chats with: its Modelfile TEMPLATE, else the GGUF's own."""
        return record.template or self.gguf_info(record.model_digest).chat_template

    # --- manifests -------------------------------------------------------------------------------
    def _manifest_path(self, name: ModelName) -> Path:
        path = self.manifests_dir.joinpath(*name.parts())
        if not path.resolve().is_relative_to(self.manifests_dir.resolve()):
            raise BadRequest("invalid model name")
        return path

    def create(
        self,
        name: str,
        *,
        model_digest: str,
        template: str | None = None,
        system: str | None = None,
        parameters: dict[str, Any] | None = None,
        license_text: str | None = None,
        messages: list[dict[str, str]] | None = None,
    ) -> ModelRecord:
        """Write a manifest for `name` pointing at a validated GGUF blob plus its text layers."""
        parsed = parse_name(name)
        model_hex = parse_digest("sha256:" + model_digest) if ":" not in model_digest else parse_digest(model_digest)
        if not self.blob_path(model_hex).is_file():
            raise BadRequest(f"blob sha256:{model_hex} not found; upload it first")
        info = read_gguf(self.blob_path(model_hex))
        layers = [self._layer(MEDIA_MODEL, model_hex)]
        for media, text in ((MEDIA_TEMPLATE, template), (MEDIA_SYSTEM, system), (MEDIA_LICENSE, license_text)):
            if text:
                layers.append(self._layer(media, self._put_bytes(text.encode())))
        if parameters:
            layers.append(self._layer(MEDIA_PARAMS, self._put_bytes(json.dumps(parameters).encode())))
        if messages:
            layers.append(self._layer(MEDIA_MESSAGES, self._put_bytes(json.dumps(messages).encode())))
        config = {
            "model_format": "gguf",
            "model_family": info.architecture,
            "model_families": [info.architecture],
            "model_type": format_parameter_count(info.parameter_count),
            "file_type": info.quantization,
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]},
        }
        config_hex = self._put_bytes(json.dumps(config).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": self._layer(MEDIA_CONFIG, config_hex),
            "layers": layers,
        }
        path = self._manifest_path(parsed)
        with self._lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(manifest))
            os.replace(tmp, path)
        return self.resolve(parsed.display)

    def _layer(self, media_type: str, hex_digest: str) -> dict[str, Any]:
        return {
            "mediaType": media_type,
            "digest": f"sha256:{hex_digest}",
            "size": self.blob_path(hex_digest).stat().st_size,
        }

    def resolve(self, name: str) -> ModelRecord:
        parsed = parse_name(name)
        path = self._manifest_path(parsed)
        try:
            raw = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"model '{parsed.display}' not found") from None
        return self._record(parsed, raw, path.stat().st_mtime)

    def _record(self, parsed: ModelName, raw: bytes, mtime: float) -> ModelRecord:
        manifest = json.loads(raw)
        config = json.loads(self.blob_path(parse_digest(manifest["config"]["digest"])).read_text())
        texts: dict[str, str] = {}
        model_hex = ""
        for layer in manifest["layers"]:
            hex_digest = parse_digest(layer["digest"])
            if layer["mediaType"] == MEDIA_MODEL:
                model_hex = hex_digest
            else:
                texts[layer["mediaType"]] = self.blob_path(hex_digest).read_text()
        if not model_hex:
            raise NotFound(f"model '{parsed.display}' has no model layer")
        size = sum(int(layer["size"]) for layer in manifest["layers"])
        return ModelRecord(
            name=parsed,
            digest=hashlib.sha256(raw).hexdigest(),
            model_digest=model_hex,
            model_path=self.blob_path(model_hex),
            size=size,
            modified_at=datetime.fromtimestamp(mtime, UTC),
            config=config,
            template=texts.get(MEDIA_TEMPLATE),
            system=texts.get(MEDIA_SYSTEM),
            parameters=json.loads(texts[MEDIA_PARAMS]) if MEDIA_PARAMS in texts else {},
            license=texts.get(MEDIA_LICENSE),
            messages=json.loads(texts[MEDIA_MESSAGES]) if MEDIA_MESSAGES in texts else [],
        )

    def list(self) -> list[ModelRecord]:
        records = []
        for path in sorted(self.manifests_dir.glob("*/*/*/*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            host, namespace, model, tag = path.relative_to(self.manifests_dir).parts
            try:
                records.append(
                    self._record(ModelName(host, namespace, model, tag), path.read_bytes(), path.stat().st_mtime)
                )
            except (OSError, ValueError, KeyError, NotFound, BadRequest) as exc:
                log.warning("skipping unreadable manifest %s: %s", path, exc)
        return records

    def copy(self, source: str, destination: str) -> ModelRecord:
        record = self.resolve(source)
        target = parse_name(destination)
        src_path = self._manifest_path(record.name)
        dst_path = self._manifest_path(target)
        with self._lock:
            dst_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src_path, dst_path)
        return self.resolve(target.display)

    def remove(self, name: str) -> None:
        """Delete a manifest, then every blob no remaining manifest refers to."""
        record = self.resolve(name)
        path = self._manifest_path(record.name)
        with self._lock:
            candidates = self._digests_of(path)
            path.unlink()
            for parent in list(path.parents)[:3]:
                try:
                    parent.rmdir()
                except OSError:
                    break
            for hex_digest in candidates - self._referenced():
                self.blob_path(hex_digest).unlink(missing_ok=True)
                self._info_cache.pop(hex_digest, None)
                self._verified.pop(hex_digest, None)

    @staticmethod
    def _digests_of(manifest_path: Path) -> set[str]:
        try:
            manifest = json.loads(manifest_path.read_bytes())
            layers = [manifest["config"], *manifest["layers"]]
            return {parse_digest(layer["digest"]) for layer in layers}
        except (OSError, ValueError, KeyError, BadRequest):
            return set()

    def _referenced(self) -> set[str]:
        """Blobs some manifest still names (blobs uploaded for a create to come are never pruned here)."""
        digests: set[str] = set()
        for path in self.manifests_dir.glob("*/*/*/*"):
            digests |= self._digests_of(path)
        return digests
