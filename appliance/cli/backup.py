"""Backup and restore of a home."""

from __future__ import annotations

from pathlib import Path

from appliance.access.actors import Actor
from appliance.cli import index
from appliance.operations.backup import backup, restore
from appliance.services import Services


def cmd_backup(services: Services, args) -> int:
    report = backup(services, Actor.operator(), Path(args.out), include_models=not args.no_models)
    print(
        f"backed up {report.documents} documents, {report.files} files ({report.bytes / 2**20:.1f} MiB"
        f"{'' if report.models_included else ', models left out'}) to {report.path}"
    )
    return 0


def cmd_restore(services: Services, args) -> int:
    # Nothing of the home is opened before the restore: the database and the index are read after it.
    report = restore(services, Actor.operator(), Path(args.archive))
    print(f"restored {report.documents} documents, {report.files} files; vector index reloaded: {report.chunks} chunks")
    return index.check(services)


def register(sub) -> None:
    p = sub.add_parser("backup", help="a consistent archive of the home while the server runs")
    p.add_argument("--out", required=True, help="archive to write (.tar, or .tar.gz to compress)")
    p.add_argument("--no-models", action="store_true", help="leave the model store out (models can be imported again)")
    p.set_defaults(func=cmd_backup)
    p = sub.add_parser("restore", help="restore a backup archive onto an empty home, then check the index")
    p.add_argument("archive")
    p.set_defaults(func=cmd_restore)
