"""Backup and restore of an appliance home: one tar archive with a manifest of checksums.

In the archive: a consistent copy of the database made with SQLite's online backup API (so a running
server keeps serving; the copy holds the metadata, the keyword index, every chunk's vector and the
audit log), the original of every document that copy knows, the uploads its queued jobs still wait
on, the model store (blobs and manifests) unless left out, and `manifest.json` (sha256 and size of
every other member). The Chroma directory is not copied: it is derived from the database, and
restore rebuilds it from the stored vectors (no re-embedding), so it cannot disagree with the copy.

Both are use cases: they take the home's `Services` and the acting `Actor`, and write their own audit record
(the backup's in the home it copies, the restore's in the home it fills).

Restore goes only onto an empty home. Every member is checked before anything lands there: a
regular file under a known folder, no absolute path, no `..`, no link, and its checksum as the
manifest says; one bad member refuses the whole archive and leaves the home empty.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO

from appliance import __version__
from appliance.config import Settings
from appliance.errors import BadRequest, Conflict

if TYPE_CHECKING:
    from appliance.access.actors import Actor
    from appliance.services import Services

FORMAT = 1
MANIFEST = "manifest.json"
DATABASE_MEMBER = "database/appliance.db"
FOLDERS = ("originals", "incoming", "models")  # home sub-folders an archive may carry
_CHUNK = 1 << 20


@dataclass
class BackupReport:
    path: Path
    files: int
    bytes: int
    documents: int
    models_included: bool


@dataclass
class RestoreReport:
    files: int
    documents: int
    chunks: int
    source_version: str


class _HashingReader(io.RawIOBase):
    """Reads a file for tarfile while computing its sha256."""

    def __init__(self, handle: BinaryIO):
        self.handle = handle
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.handle.read(len(buffer))
        self.digest.update(data)
        buffer[: len(data)] = data
        return len(data)


def _sqlite_path(settings: Settings) -> Path:
    url = settings.resolved_database_url
    if not url.startswith("sqlite:///"):
        raise BadRequest(
            "the database is not SQLite: back it up with the database's own tools (pg_dump for PostgreSQL); "
            "`appliance backup` covers the default SQLite installation"
        )
    return Path(url.removeprefix("sqlite:///"))


def _snapshot_database(source: Path, target: Path) -> None:
    """A consistent copy while other processes write (SQLite's online backup API, WAL included)."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()


def _referenced_files(database: Path) -> tuple[list[str], list[str]]:
    """Document ids (for their originals) and queued jobs' upload paths, as the snapshot records them."""
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        documents = [row[0] for row in connection.execute("SELECT id FROM document")]
        uploads = [
            row[0] for row in connection.execute("SELECT upload_path FROM job WHERE state IN ('queued', 'running')")
        ]
    finally:
        connection.close()
    return documents, uploads


def backup(services: Services, actor: Actor, out: Path, *, include_models: bool = True) -> BackupReport:
    """Write the archive to `out` (".tar", or ".tar.gz"/".tgz" compressed); the server may keep running."""
    report = _write_archive(services.settings, out, include_models)
    actor.record(services.db, "backup", target=report.path.name, files=report.files, bytes=report.bytes)
    return report


def _write_archive(settings: Settings, out: Path, include_models: bool) -> BackupReport:
    database = _sqlite_path(settings)
    if not database.is_file():
        raise BadRequest(f"no database at {database}: nothing to back up")
    out = out.resolve()
    if out.is_relative_to(settings.home):
        raise BadRequest("write the backup outside the appliance home (it would include itself)")
    mode = "w:gz" if out.name.endswith((".tar.gz", ".tgz")) else "w"
    entries: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="appliance-backup-") as scratch:
        snapshot = Path(scratch) / "appliance.db"
        _snapshot_database(database, snapshot)
        document_ids, uploads = _referenced_files(snapshot)
        files: list[tuple[str, Path]] = [(DATABASE_MEMBER, snapshot)]
        originals = settings.home / "originals"
        wanted = set(document_ids)
        if originals.is_dir():
            files += [
                (f"originals/{p.name}", p) for p in sorted(originals.iterdir()) if p.is_file() and p.stem in wanted
            ]
        incoming = (settings.home / "incoming").resolve()
        for upload in uploads:
            path = Path(upload)
            if path.is_file() and path.resolve().is_relative_to(incoming):
                files.append((f"incoming/{path.resolve().relative_to(incoming).as_posix()}", path))
        if include_models and settings.models_dir.is_dir():
            for path in sorted(settings.models_dir.rglob("*")):
                if path.is_file() and not path.is_symlink() and not path.name.endswith(".partial"):
                    files.append((f"models/{path.relative_to(settings.models_dir).as_posix()}", path))
        partial = out.with_name(out.name + ".partial")
        total = 0
        with tarfile.open(partial, mode) as archive:
            for name, path in files:
                try:
                    handle = path.open("rb")
                except FileNotFoundError:
                    continue  # removed since the snapshot (a deleted document): nothing to keep
                with handle:
                    info = tarfile.TarInfo(name)
                    info.size = os.fstat(handle.fileno()).st_size
                    info.mtime = int(time.time())
                    info.mode = 0o600
                    reader = _HashingReader(handle)
                    archive.addfile(info, io.BufferedReader(reader, _CHUNK))
                entries[name] = {"sha256": reader.digest.hexdigest(), "size": info.size}
                total += info.size
            manifest = {
                "format": FORMAT,
                "appliance_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "home": str(settings.home),
                "documents": len(document_ids),
                "models_included": include_models,
                "files": entries,
            }
            data = json.dumps(manifest, indent=1, sort_keys=True).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
            archive.addfile(info, io.BytesIO(data))
        os.chmod(partial, 0o600)
        partial.replace(out)
    return BackupReport(out, len(entries), total, len(document_ids), include_models)


# --- restore ---------------------------------------------------------------------------------------
def _home_is_empty(home: Path) -> bool:
    return not home.exists() or not any(p.is_file() or p.is_symlink() for p in home.rglob("*"))


def _member_path(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts or name != path.as_posix():
        raise BadRequest(f"refused: archive member {name!r} is not a plain relative path")
    if name != MANIFEST and name != DATABASE_MEMBER and path.parts[0] not in FOLDERS:
        raise BadRequest(f"refused: archive member {name!r} is not part of an appliance backup")
    return path


def _unpack(archive_path: Path, staging: Path) -> tuple[dict, dict[str, tuple[str, int]]]:
    """Extract regular files into `staging`, hashing as they land; returns the manifest and what was found."""
    found: dict[str, tuple[str, int]] = {}
    manifest = None
    try:
        archive = tarfile.open(archive_path, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise BadRequest(f"refused: {archive_path} is not a readable tar archive ({exc})") from None
    with archive:
        for member in archive:
            if member.isdir():
                continue
            if not member.isfile():
                raise BadRequest(f"refused: archive member {member.name!r} is a link or a special file")
            path = _member_path(member.name)
            if member.name in found or (member.name == MANIFEST and manifest is not None):
                raise BadRequest(f"refused: archive member {member.name!r} appears twice")
            source = archive.extractfile(member)
            assert source is not None
            if member.name == MANIFEST:
                try:
                    manifest = json.loads(source.read(16 * _CHUNK))
                except ValueError:
                    raise BadRequest("refused: the archive's manifest is not valid JSON") from None
                continue
            target = staging.joinpath(*path.parts)
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            digest = hashlib.sha256()
            with target.open("wb") as handle:
                while chunk := source.read(_CHUNK):
                    digest.update(chunk)
                    handle.write(chunk)
            found[member.name] = (digest.hexdigest(), member.size)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise BadRequest("refused: the archive has no manifest.json (not an appliance backup)")
    return manifest, found


def _verify(manifest: dict, found: dict[str, tuple[str, int]]) -> None:
    if manifest.get("format") != FORMAT:
        raise BadRequest(f"refused: backup format {manifest.get('format')!r} is not one this version reads")
    listed = manifest["files"]
    if DATABASE_MEMBER not in listed:
        raise BadRequest("refused: the archive holds no database")
    missing = sorted(set(listed) - set(found))
    extra = sorted(set(found) - set(listed))
    if missing or extra:
        raise BadRequest(f"refused: the archive does not match its manifest (missing {missing[:3]}, extra {extra[:3]})")
    for name, (digest, size) in found.items():
        entry = listed[name]
        if not isinstance(entry, dict) or entry.get("sha256") != digest or entry.get("size") != size:
            raise BadRequest(f"refused: checksum mismatch for {name}: the archive is damaged or was altered")


def _relocate_jobs(database: Path, old_home: str, new_home: Path) -> None:
    """Queued uploads now live under the new home's incoming/ folder."""
    old_prefix = str(Path(old_home) / "incoming") + os.sep
    connection = sqlite3.connect(database)
    try:
        rows = connection.execute("SELECT id, upload_path FROM job").fetchall()
        for job_id, upload in rows:
            if upload.startswith(old_prefix):
                moved = new_home / "incoming" / upload[len(old_prefix) :]
                connection.execute("UPDATE job SET upload_path = ? WHERE id = ?", (str(moved), job_id))
        connection.commit()
    finally:
        connection.close()


def restore(services: Services, actor: Actor, archive_path: Path) -> RestoreReport:
    """Unpack and verify `archive_path` onto the (empty) home, then rebuild the vector index from the database.
    Nothing of the home may have been opened through `services` before: it is read after the restore."""
    settings = services.settings
    home = settings.home
    if not archive_path.is_file():
        raise BadRequest(f"no backup archive at {archive_path}")
    if not _home_is_empty(home):
        raise Conflict(f"refused: {home} is not empty; restore goes onto an empty home (move the old one aside)")
    try:
        database = _sqlite_path(settings)
    except BadRequest:
        raise BadRequest("restore needs the default SQLite database (APPLIANCE_DATABASE_URL unset)") from None
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    staging = Path(tempfile.mkdtemp(prefix=".restore-", dir=home))
    try:
        manifest, found = _unpack(archive_path, staging)
        _verify(manifest, found)
        database.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        (staging / DATABASE_MEMBER).replace(database)
        for folder in FOLDERS:
            if (staging / folder).is_dir():
                target = settings.models_dir if folder == "models" else home / folder
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                (staging / folder).replace(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for leftover in (database, settings.models_dir, home / "originals", home / "incoming"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    _relocate_jobs(database, str(manifest.get("home", "")), home)
    chunks = services.index.reload_vectors()  # opening the database brings an older backup's schema up to date
    version = str(manifest.get("appliance_version"))
    report = RestoreReport(len(found), int(manifest.get("documents", 0)), chunks, version)
    actor.record(services.db, "restore", target=archive_path.name, files=report.files, version=report.source_version)
    return report
