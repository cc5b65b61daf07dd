"""Load test: N simulated users against a running appliance server for a fixed time.

    .venv/bin/python bench/load.py [--users 8] [--duration 60] [--json bench/out/load.json]
    .venv/bin/python bench/load.py --url http://127.0.0.1:11434 --home ~/.appliance [--pid PID]
    .venv/bin/python bench/load.py --url http://host:11434 --accounts accounts.json

Without --url it starts `appliance serve` in a temporary APPLIANCE_HOME on a free port (a GGUF given with
--gguf becomes the model --model names) and stops it at the end. Each simulated user is a real account with
the editor role, member of a group that holds an editor grant on the load collection. The accounts are made
in the server's home (--home) with the services `appliance users add`, `groups add-member`, `grants add` and
`keys create` call, audited as the local operator: the server has no HTTP API for managing users. Against a
server whose home is out of reach, --accounts names a JSON list of {"name", "key"} or {"name", "password"}.

Most users call the API with their own key. A share of them (--browser-share) sign in as a browser does:
GET /login for the form's CSRF token, POST the form, read the session's CSRF token from the page's
<meta name="csrf-token">, then call the API with the session cookie and the X-CSRF-Token header, as the pages'
scripts do. Before the clock starts the collection is seeded through the upload API when it is empty (a few
sample_corpus files), and one search and one ask load the embedding model.

Each user then loops until the time is up over a weighted mix: ask (POST /api/rag/ask, streamed to the
end; extractive without a generation model), search, list documents, chat (/api/chat with --model, or the
`rag/<collection>` model), and upload a small unique text file, follow its job until done and check that the
document is listed; browser users also open the documents page, sign out and in again, and sign out at the
end. An upload that was accepted but whose job fails, does not finish within --drain seconds after the end,
or whose document is not listed is a lost upload.

Reports per request kind: count, status codes, latency p50/p95/p99 of the successful ones, requests/s; the
non-503 5xx, the deliberate 503s, the 429s, transport errors, broken streams, lost uploads; the server's RSS
(the process, and with its child processes) at the start, half-way, peak and end; tracebacks the server
logged meanwhile (when its log is known). Exit status 1 unless the run is clean: no 5xx other than 503, no
lost upload, no transport error, no broken stream, no 4xx other than 429.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

APPLIANCE = str(Path(sys.executable).with_name("appliance"))
CORPUS = ROOT / "sample_corpus"
SEED_FILES = (
    "hospital/records-retention-policy.md",
    "hospital/sepsis-escalation-pathway.md",
    "hospital/fire-safety-procedures.txt",
    "hospital/visiting-hours.html",
    "lawfirm/engagement-letter-template.md",
    "lawfirm/client-intake-checklist.txt",
    "lawfirm/document-retention-policy.html",
)
MIX = {"ask": 30, "search": 25, "list": 15, "chat": 10, "upload": 10, "page": 5, "relogin": 2}
BROWSER_ONLY = ("page", "relogin")
HTML = {"accept": "text/html"}
FORM_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
META_CSRF = re.compile(r'<meta name="csrf-token" content="([^"]+)"')
FAILURES = ("transport", "stream", "bad", "lost")  # statuses that are not HTTP codes, all failures
POLL_S = 0.5
MIB = 2**20


@dataclass
class Account:
    """A load user: API users carry a key, browser users a password."""

    name: str
    key: str | None = None
    password: str | None = None

    @property
    def browser(self) -> bool:
        return self.key is None


# --- accounts and the server ---------------------------------------------------------------------
def _engine(home: Path):
    """The home's database, as the server opens it (migrated); the caller disposes of it."""
    from appliance.config import Settings
    from appliance.services import Services

    return Services(Settings(home=home)).db


def browser_count(users: int, share: float) -> int:
    """How many of the users sign in through the browser form (at least one when there are two users)."""
    count = round(users * share)
    return max(count, 1) if users >= 2 and share > 0 else count


def prepare_users(home: Path, users: int, collection: str = "load", browser_share: float = 0.25) -> list[Account]:
    """Create the load users in a home: editors in a new group with an editor grant on `collection`; a key
    for each API user, a password for each browser user. Browser users come first."""
    from appliance.access import audit
    from appliance.access.rbac import add_grant, add_group, add_member, ensure_collection
    from appliance.access.users import add_user, create_key

    engine = _engine(home)

    def note(action: str, target: str, **details) -> None:
        audit.record(engine, audit.LOCAL_OPERATOR, action, actor_id=0, target=target, details=details)

    run = secrets.token_hex(3)
    group = f"load-{run}"
    ensure_collection(engine, collection)
    add_group(engine, group)
    note("group_add", group)
    add_grant(engine, collection, group=group, role="editor")
    note("grant_add", collection, subject_kind="group", subject=group, role="editor")
    browsers = browser_count(users, browser_share)
    accounts = []
    for i in range(users):
        name = f"load-{run}-{i:02d}"
        if i < browsers:
            account = Account(name, password=secrets.token_urlsafe(12))
            add_user(engine, name, "editor", account.password)
        else:
            add_user(engine, name, "editor")
            account = Account(name, key=create_key(engine, name, "load test"))
            note("key_create", name, prefix=account.key[:12], label="load test")
        note("user_add", name, role="editor", with_password=account.browser)
        add_member(engine, group, name)
        note("member_add", group, user=name)
        accounts.append(account)
    engine.dispose()
    return accounts


def retire_users(home: Path, accounts: list[Account]) -> None:
    """Disable the load users (ending their sessions and revoking their keys)."""
    from appliance.access import audit
    from appliance.access.users import disable_user

    engine = _engine(home)
    for account in accounts:
        revoked = disable_user(engine, account.name)
        audit.record(
            engine, audit.LOCAL_OPERATOR, "user_disable", actor_id=0, target=account.name, details={"keys": revoked}
        )
    engine.dispose()


def server_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a server or CLI on `home`: none of the caller's APPLIANCE_ settings leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "OLLAMA_"))}
    env.update(APPLIANCE_HOME=str(home), HF_HUB_OFFLINE="1", **extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(home: Path, **env: str) -> tuple[subprocess.Popen, str, Path]:
    """`appliance serve` on `home` and a free port; returns the process, its URL and its log file."""
    port = free_port()
    log_path = home / "server.log"
    process = subprocess.Popen(
        [APPLIANCE, "serve"],
        env=server_env(home, APPLIANCE_PORT=str(port), **env),
        stdout=log_path.open("ab"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/api/version", timeout=2).status_code == 200:
                return process, url, log_path
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError("the server did not start within 120 s")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def find_server_pid(url: str) -> int | None:
    """The process listening on the URL's port on this machine, when the system lets us see it."""
    port = urlparse(url).port
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid
    except (psutil.Error, OSError):
        return None
    return None


def questions(seeded: tuple[str, ...] | None = None) -> list[str]:
    """Questions from sample_corpus/questions.yaml: about the seeded files (and a few that nothing answers)
    when they are known, else all of them."""
    entries = yaml.safe_load((CORPUS / "questions.yaml").read_text())
    if seeded is None:
        return [e["question"] for e in entries]
    chosen = [e["question"] for e in entries if e["document"] in seeded]
    return chosen + [e["question"] for e in entries if e["document"] is None]


def upload_text(name: str, rng: random.Random) -> str:
    """A small document nobody uploaded before."""
    ward, batch = rng.randint(1, 40), secrets.token_hex(4)
    hour, minute = rng.randint(6, 20), rng.choice(("00", "15", "30", "45"))
    day = rng.choice(("Monday", "Tuesday", "Wednesday", "Thursday", "Friday"))
    return (
        f"Courier note {name}\n\n"
        f"The specimen courier for ward {ward} arrives at {hour}:{minute} every {day}. "
        f"Samples of batch {batch} travel to the laboratory in a sealed bag labelled {batch}, "
        "signed by the nurse in charge and counted again on arrival.\n\n"
        f"If the courier has not arrived by {hour + 1}:{minute}, the ward clerk telephones the laboratory "
        "reception and records the delay in the ward diary, with the time of the call.\n"
    )


def server_tracebacks(log_path: Path | None, offset: int) -> list[str]:
    """Tracebacks and error lines the server logged after `offset` (at most 5, each cut to 40 lines)."""
    if log_path is None or not log_path.is_file():
        return []
    with log_path.open("rb") as handle:
        handle.seek(offset)
        lines = handle.read().decode(errors="replace").splitlines()
    found: list[str] = []
    i = 0
    while i < len(lines) and len(found) < 5:
        if " ERROR " not in lines[i] and not lines[i].startswith(("Traceback", "ERROR:")):  # ours, uvicorn's
            i += 1
            continue
        block = [lines[i]]
        for follow in lines[i + 1 : i + 40]:
            inside = follow.startswith((" ", "Traceback"))
            if not inside and not block[-1].startswith(" "):
                break
            block.append(follow)
            if not inside:
                break  # the exception line after the frames closes the traceback
        found.append("\n".join(block))
        i += len(block)
    return found


# --- recording -----------------------------------------------------------------------------------
def is_failure(status: int | str) -> bool:
    """Anything but a success, a 429 or a deliberate 503."""
    if isinstance(status, str):
        return status in FAILURES
    return status >= 400 and status not in (429, 503)


@dataclass
class Recorder:
    """Every request's status and latency by kind, uploads and their fate, the first failures."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    uploads: Counter = field(default_factory=Counter)
    lost: list[dict] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)

    def add(self, kind: str, status: int | str, seconds: float, detail: str = "") -> None:
        self.statuses[kind][status] += 1
        if isinstance(status, int) and status < 400:
            self.latencies[kind].append(seconds)
        elif is_failure(status) and len(self.examples) < 20:
            self.examples.append({"kind": kind, "status": status, "detail": detail[:300]})


class MemorySampler:
    """The server's RSS (its own, and with its child processes) once a second."""

    def __init__(self, pid: int | None, every: float = 1.0):
        self.process = psutil.Process(pid) if pid else None
        self.every = every
        self.samples: list[tuple[float, int, int]] = []  # (perf_counter, own RSS, RSS with children)

    def sample(self) -> None:
        if self.process is None:
            return
        try:
            own = self.process.memory_info().rss
            total = own
            for child in self.process.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass  # a child that just ended
        except psutil.Error:
            self.process = None  # the server is gone: the report says so through the requests
            return
        self.samples.append((time.perf_counter(), own, total))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sample()
            try:
                await asyncio.wait_for(stop.wait(), self.every)
            except TimeoutError:
                pass

    def summary(self, started: float, duration: float) -> dict:
        if not self.samples:
            return {}
        before = self.samples[0]
        during = [s for s in self.samples if s[0] >= started]
        if not during:
            return {}
        half = min(during, key=lambda s: abs(s[0] - started - duration / 2))
        summary = {}
        for index, name in ((1, "server"), (2, "with_children")):
            summary[name] = {
                "before_warmup_mib": round(before[index] / MIB, 1),
                "start_mib": round(during[0][index] / MIB, 1),
                "half_mib": round(half[index] / MIB, 1),
                "peak_mib": round(max(s[index] for s in during) / MIB, 1),
                "end_mib": round(during[-1][index] / MIB, 1),
            }
        summary["samples"] = [
            [round(t - started, 1), round(own / MIB, 1), round(total / MIB, 1)] for t, own, total in self.samples
        ]
        return summary


# --- one simulated user --------------------------------------------------------------------------
Check = Callable[[httpx.Response], str]  # what is wrong with a successful response ("" when nothing)


def _has(pattern: re.Pattern, what: str) -> Check:
    return lambda response: "" if pattern.search(response.text) else f"no {what} in the page"


def _json_has(key: str) -> Check:
    def check(response: httpx.Response) -> str:
        try:
            return "" if key in response.json() else f"no '{key}' in the answer"
        except ValueError:
            return "not JSON"

    return check


def _signed_in(response: httpx.Response) -> str:
    location = response.headers.get("location")
    return "" if response.status_code == 303 and location == "/" else f"{response.status_code} to {location}, not /"


def _jobs_accepted(response: httpx.Response) -> str:
    try:
        jobs = response.json().get("jobs") or []
    except ValueError:
        return "not JSON"
    refused = [job for job in jobs if "job_id" not in job]
    return f"files refused: {refused}" if refused or not jobs else ""


@dataclass
class Plan:
    """What every user shares: the collection, the questions, the optional model, the clock."""

    collection: str
    questions: list[str]
    model: str | None
    think: float
    mix: dict[str, int] = field(default_factory=lambda: dict(MIX))
    deadline: float = 0.0  # perf_counter time when no new operation starts
    drain_deadline: float = 0.0  # perf_counter time after which an upload's job is no longer awaited


class SimUser:
    """One account with its own HTTP client, looping over the weighted mix until the deadline."""

    def __init__(self, account: Account, url: str, plan: Plan, recorder: Recorder, seed: int):
        self.account, self.plan, self.rec = account, plan, recorder
        self.rng = random.Random(seed)
        headers = {"Authorization": f"Bearer {account.key}"} if account.key else {}
        self.client = httpx.AsyncClient(
            base_url=url, headers=headers, timeout=httpx.Timeout(300, connect=10), follow_redirects=False
        )
        self.signed_in = not account.browser
        self.csrf = ""
        self.uploads = 0
        mix = {k: w for k, w in plan.mix.items() if w > 0 and (account.browser or k not in BROWSER_ONLY)}
        self.kinds, self.weights = list(mix), list(mix.values())

    async def close(self) -> None:
        await self.client.aclose()

    # requests
    async def _back_off(self, response: httpx.Response) -> None:
        if response.status_code in (429, 503):
            try:
                wait = float(response.headers.get("retry-after", "1"))
            except ValueError:
                wait = 1.0
            await asyncio.sleep(min(max(wait, 0.1), 10.0))
        elif response.status_code == 401 and self.account.browser:
            self.signed_in = False  # the session ended: sign in again

    async def request(
        self, kind: str, method: str, path: str, check: Check | None = None, **kwargs
    ) -> httpx.Response | None:
        """One request, recorded under `kind`; a success that `check` finds wrong is recorded as "bad"
        (and None returned)."""
        started = time.perf_counter()
        try:
            response = await self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            self.rec.add(kind, "transport", time.perf_counter() - started, f"{method} {path}: {exc!r}")
            return None
        seconds = time.perf_counter() - started
        if response.status_code >= 400:
            self.rec.add(kind, response.status_code, seconds, f"{method} {path}: {response.text}")
            await self._back_off(response)
            return response
        problem = check(response) if check else ""
        self.rec.add(kind, "bad" if problem else response.status_code, seconds, f"{method} {path}: {problem}")
        return None if problem else response

    async def stream(self, kind: str, path: str, body: dict, final_key: str) -> dict | None:
        """POST a streaming request, read its NDJSON to the end; the final item (done, with `final_key`),
        or None."""
        started = time.perf_counter()
        last: dict | None = None
        problem = ""
        try:
            async with self.client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    self.rec.add(kind, response.status_code, time.perf_counter() - started, f"POST {path}: {text}")
                    await self._back_off(response)
                    return None
                async for line in response.aiter_lines():
                    if line.strip():
                        last = json.loads(line)
                        if "error" in last:
                            problem = f"error in the stream: {last['error']}"
        except httpx.HTTPError as exc:
            self.rec.add(kind, "transport", time.perf_counter() - started, f"POST {path}: {exc!r}")
            return None
        except json.JSONDecodeError as exc:
            problem = f"not NDJSON: {exc}"
        if not problem and not (last and last.get("done")):
            problem = "the stream ended without its final item"
        elif not problem and final_key not in last:
            problem = f"the final item has no {final_key}"
        self.rec.add(kind, "stream" if problem else 200, time.perf_counter() - started, f"POST {path}: {problem}")
        return None if problem else last

    # browser sign-in, as a person at the sign-in page
    async def sign_in(self) -> bool:
        response = await self.request("login_form", "GET", "/login", _has(FORM_CSRF, "the form's CSRF"), headers=HTML)
        if response is None or response.status_code != 200:
            return False
        form = {
            "csrf": FORM_CSRF.search(response.text).group(1),
            "username": self.account.name,
            "password": self.account.password,
            "next": "/",
        }
        response = await self.request("login", "POST", "/login", _signed_in, headers=HTML, data=form)
        if response is None or response.status_code != 303:
            return False
        response = await self.request("page", "GET", "/", _has(META_CSRF, "the csrf-token meta tag"), headers=HTML)
        if response is None or response.status_code != 200:
            return False
        self.csrf = META_CSRF.search(response.text).group(1)
        self.client.headers["X-CSRF-Token"] = self.csrf  # as window.appliance.api sends it on every call
        self.signed_in = True
        return True

    # operations
    async def op_ask(self) -> None:
        body = {"question": self.rng.choice(self.plan.questions), "collections": [self.plan.collection]}
        if self.plan.model:
            body["model"] = self.plan.model
        await self.stream("ask", "/api/rag/ask", {**body, "stream": True}, "answer")

    async def op_search(self) -> None:
        body = {"query": self.rng.choice(self.plan.questions), "collections": [self.plan.collection]}
        await self.request("search", "POST", "/api/rag/search", _json_has("results"), json=body)

    async def listed(self, kind: str = "list") -> set[str] | None:
        params = {"collection": self.plan.collection}
        response = await self.request(kind, "GET", "/api/documents", _json_has("documents"), params=params)
        if response is None or response.status_code != 200:
            return None
        return {d["id"] for d in response.json()["documents"]}

    async def op_list(self) -> None:
        await self.listed()

    async def op_chat(self) -> None:
        model = self.plan.model or f"rag/{self.plan.collection}"
        body = {
            "model": model,
            "messages": [{"role": "user", "content": self.rng.choice(self.plan.questions)}],
            "stream": True,
            "options": {"num_predict": 64},
        }
        await self.stream("chat", "/api/chat", body, "message")

    async def op_page(self) -> None:
        await self.request("page", "GET", "/documents", headers=HTML)

    async def op_relogin(self) -> None:
        response = await self.request("logout", "POST", "/logout", headers=HTML, data={"csrf": self.csrf})
        self.client.headers.pop("X-CSRF-Token", None)
        self.client.cookies.clear()
        self.signed_in = False
        if response is not None and response.status_code == 303:
            await self.sign_in()

    async def op_upload(self) -> None:
        self.uploads += 1
        name = f"{self.account.name}-{self.uploads}-{secrets.token_hex(3)}.txt"
        data = upload_text(name, self.rng).encode()
        response = await self.request(
            "upload",
            "POST",
            "/api/documents",
            _jobs_accepted,
            data={"collection": self.plan.collection},
            files={"file": (name, data, "text/plain")},
        )
        if response is not None and response.status_code == 200:  # else refused (counted by its status), not lost
            await self.follow_upload(name, response.json()["jobs"][0]["job_id"], time.perf_counter())

    async def follow_upload(self, name: str, job_id: str, accepted: float) -> None:
        """Poll the job until done or failed, then check that the document is listed; else it is lost."""
        self.rec.uploads["accepted"] += 1
        summary: dict = {}
        while time.perf_counter() < self.plan.drain_deadline:
            response = await self.request("job", "GET", f"/api/jobs/{job_id}")
            if response is not None and response.status_code == 200:
                summary = response.json()
                if summary["state"] in ("done", "failed"):
                    break
            await asyncio.sleep(POLL_S)
        reason = ""
        if summary.get("state") == "failed":
            reason = f"job failed: {summary.get('reason')}"
        elif summary.get("state") != "done":
            reason = f"job still {summary.get('state', 'unknown')} at the end of the drain"
        else:
            ids = await self.listed()
            if ids is None:
                ids = await self.listed()  # one more try after a refused listing (429/503)
            if ids is None or summary.get("document_id") not in ids:
                reason = f"job done ({summary.get('result')}) but document {summary.get('document_id')} not listed"
        seconds = time.perf_counter() - accepted
        if reason:
            self.rec.uploads["lost"] += 1
            self.rec.lost.append({"user": self.account.name, "file": name, "job": job_id, "reason": reason})
            self.rec.add("ingest", "lost", seconds, f"{name}: {reason}")
        else:
            self.rec.uploads["indexed"] += 1
            self.rec.add("ingest", 200, seconds)

    async def loop(self) -> None:
        """Operations from the weighted mix until the deadline (an upload's job is followed past it)."""
        operations = {
            "ask": self.op_ask,
            "search": self.op_search,
            "list": self.op_list,
            "chat": self.op_chat,
            "upload": self.op_upload,
            "page": self.op_page,
            "relogin": self.op_relogin,
        }
        while time.perf_counter() < self.plan.deadline:
            if not self.signed_in:
                if not await self.sign_in():
                    await asyncio.sleep(1.0)
                continue
            if not self.kinds:
                break
            kind = self.rng.choices(self.kinds, self.weights)[0]
            await operations[kind]()
            if self.plan.think:
                await asyncio.sleep(self.rng.uniform(0, 2 * self.plan.think))
        if self.account.browser and self.signed_in:  # a person signs out when done
            await self.request("logout", "POST", "/logout", headers=HTML, data={"csrf": self.csrf})


# --- the run -------------------------------------------------------------------------------------
async def warm_up(url: str, account: Account, plan: Plan, seed_files: tuple[str, ...]) -> list[str]:
    """Seed the collection when it is empty, then one search and one ask; returns problems found."""
    recorder = Recorder()
    user = SimUser(account, url, plan, recorder, seed=0)
    plan.deadline = plan.drain_deadline = time.perf_counter() + 600
    try:
        if account.browser and not await user.sign_in():
            return [f"warm-up: {account.name} could not sign in: {recorder.examples}"]
        ids = await user.listed()
        if ids is not None and not ids and seed_files:
            files = [("file", (Path(p).name, (CORPUS / p).read_bytes())) for p in seed_files]
            response = await user.request(
                "upload", "POST", "/api/documents", _jobs_accepted, data={"collection": plan.collection}, files=files
            )
            if response is not None and response.status_code == 200:
                for job in response.json()["jobs"]:
                    await user.follow_upload(job["filename"], job["job_id"], time.perf_counter())
        await user.op_search()
        await user.op_ask()
    finally:
        await user.close()
    problems = [f"warm-up {e['kind']}: {e['status']} {e['detail']}" for e in recorder.examples]
    problems += [f"warm-up: seed upload lost: {lost}" for lost in recorder.lost]
    return problems


async def run_load(
    url: str,
    accounts: list[Account],
    *,
    duration: float,
    collection: str = "load",
    model: str | None = None,
    pid: int | None = None,
    think: float = 0.25,
    mix: dict[str, int] | None = None,
    drain: float = 180.0,
    seed_files: tuple[str, ...] = SEED_FILES,
    log_path: Path | None = None,
) -> dict:
    """Warm up, run every account's loop for `duration` seconds, and return the report."""
    asked = questions(seed_files) if seed_files else questions()
    plan = Plan(collection, asked, model, think, {**MIX, **(mix or {})})
    log_offset = log_path.stat().st_size if log_path is not None and log_path.is_file() else 0
    memory = MemorySampler(pid)
    stop = asyncio.Event()
    sampling = asyncio.create_task(memory.run(stop))
    warm_account = next((a for a in accounts if not a.browser), accounts[0])
    problems = await warm_up(url, warm_account, plan, seed_files)

    recorder = Recorder()
    users = [SimUser(a, url, plan, recorder, seed=i + 1) for i, a in enumerate(accounts)]
    started = time.perf_counter()
    memory.sample()
    plan.deadline = started + duration
    plan.drain_deadline = plan.deadline + drain
    try:
        await asyncio.gather(*(user.loop() for user in users))
    finally:
        for user in users:
            await user.close()
    elapsed = time.perf_counter() - started
    memory.sample()
    stop.set()
    await sampling
    config = {
        "url": url,
        "users": len(accounts),
        "browser_users": sum(a.browser for a in accounts),
        "duration_s": duration,
        "think_s": think,
        "mix": plan.mix,
        "collection": collection,
        "model": model,
        "server_pid": pid,
    }
    tracebacks = server_tracebacks(log_path, log_offset)
    return build_report(recorder, elapsed, config, memory.summary(started, duration), problems, tracebacks)


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks (q in 0..1)."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def build_report(
    recorder: Recorder, elapsed: float, config: dict, memory: dict, problems: list[str], tracebacks: list[str]
) -> dict:
    kinds = {}
    for kind in sorted(recorder.statuses):
        statuses = recorder.statuses[kind]
        latencies = recorder.latencies[kind]
        count = sum(statuses.values())
        kinds[kind] = {
            "count": count,
            "ok": len(latencies),
            "statuses": {str(s): n for s, n in sorted(statuses.items(), key=lambda item: str(item[0]))},
            "p50_ms": _ms(percentile(latencies, 0.50)),
            "p95_ms": _ms(percentile(latencies, 0.95)),
            "p99_ms": _ms(percentile(latencies, 0.99)),
            "max_ms": _ms(max(latencies) if latencies else None),
            "per_s": round(count / elapsed, 2),
        }
    requests = [s for kind, c in recorder.statuses.items() if kind != "ingest" for s in c.elements()]
    totals = {
        "requests": len(requests),
        "requests_per_s": round(len(requests) / elapsed, 2),
        "server_errors": sum(1 for s in requests if isinstance(s, int) and s >= 500 and s != 503),
        "deliberate_503": sum(1 for s in requests if s == 503),
        "rate_limited_429": sum(1 for s in requests if s == 429),
        "other_4xx": sum(1 for s in requests if isinstance(s, int) and 400 <= s < 500 and s != 429),
        "transport_errors": sum(1 for s in requests if s == "transport"),
        "broken_streams": sum(1 for s in requests if s == "stream"),
        "bad_answers": sum(1 for s in requests if s == "bad"),
    }
    uploads = {
        "accepted": recorder.uploads["accepted"],
        "indexed": recorder.uploads["indexed"],
        "lost": recorder.uploads["lost"],
    }
    problems = list(problems)
    for name, label in (
        ("server_errors", "5xx other than 503"),
        ("other_4xx", "4xx other than 429"),
        ("transport_errors", "transport errors"),
        ("broken_streams", "broken streams"),
        ("bad_answers", "malformed answers"),
    ):
        if totals[name]:
            problems.append(f"{totals[name]} {label}")
    if uploads["lost"]:
        problems.append(f"{uploads['lost']} lost uploads")
    return {
        "config": config,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "system": platform.platform()},
        "elapsed_s": round(elapsed, 1),
        "kinds": kinds,
        "totals": totals,
        "uploads": uploads,
        "lost_uploads": recorder.lost,
        "memory": memory,
        "failures": recorder.examples,
        "server_tracebacks": tracebacks,
        "problems": problems,
        "clean": not problems,
    }


def run(url: str, accounts: list[Account], **options) -> dict:
    """`run_load` for callers without an event loop (the test, the command line)."""
    return asyncio.run(run_load(url, accounts, **options))


def run_own_server(
    users: int,
    duration: float,
    *,
    browser_share: float = 0.25,
    collection: str = "load",
    gguf: Path | None = None,
    model: str | None = None,
    keep_home: bool = False,
    server_settings: dict[str, str] | None = None,
    **options,
) -> dict:
    """Start a server in a temporary home with `users` load users, run the load, stop the server."""
    home = Path(tempfile.mkdtemp(prefix="appliance-load-"))
    process = None
    try:
        if gguf is not None:
            model = model or "load-model"
            subprocess.run(
                [APPLIANCE, "create", model, "--from", str(gguf)], env=server_env(home), check=True, timeout=600
            )
        accounts = prepare_users(home, users, collection, browser_share)
        process, url, log_path = start_server(home, **(server_settings or {}))
        report = run(
            url, accounts, duration=duration, collection=collection, model=model, pid=process.pid, log_path=log_path,
            **options,
        )  # fmt: skip
        report["config"]["home"] = str(home)
        return report
    finally:
        if process is not None:
            stop_server(process)
        if not keep_home:
            shutil.rmtree(home, ignore_errors=True)


# --- output --------------------------------------------------------------------------------------
def _cell(value) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:,.1f}"


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 140)
    config = report["config"]
    title = (
        f"{config['users']} users ({config['browser_users']} signed in through the browser) for "
        f"{config['duration_s']:g} s, {report['elapsed_s']} s with the drain; model: {config['model'] or 'none'}"
    )
    table = Table(title=title)
    for name in ("kind", "requests", "ok", "429", "503", "failed", "p50 ms", "p95 ms", "p99 ms", "per s"):
        table.add_column(name, justify="left" if name == "kind" else "right")
    for kind, row in report["kinds"].items():
        statuses = row["statuses"]
        failed = sum(n for s, n in statuses.items() if is_failure(int(s) if s.isdigit() else s))
        table.add_row(
            kind,
            _cell(row["count"]),
            _cell(row["ok"]),
            _cell(statuses.get("429", 0)),
            _cell(statuses.get("503", 0)),
            _cell(failed),
            _cell(row["p50_ms"]),
            _cell(row["p95_ms"]),
            _cell(row["p99_ms"]),
            _cell(row["per_s"]),
        )
    console.print(table)
    totals, uploads = report["totals"], report["uploads"]
    console.print(
        f"requests {totals['requests']:,} ({totals['requests_per_s']}/s); 5xx other than 503: "
        f"{totals['server_errors']}; 503: {totals['deliberate_503']}; 429: {totals['rate_limited_429']}; "
        f"other 4xx: {totals['other_4xx']}; transport errors: {totals['transport_errors']}; broken streams: "
        f"{totals['broken_streams']}"
    )
    console.print(f"uploads accepted {uploads['accepted']}, indexed {uploads['indexed']}, lost {uploads['lost']}")
    memory = report["memory"]
    if memory:
        rss = Table(title="server RSS (MiB)")
        for name in ("process", "before warm-up", "start", "half-way", "peak", "end"):
            rss.add_column(name, justify="left" if name == "process" else "right")
        for name in ("server", "with_children"):
            m = memory[name]
            rss.add_row(
                name.replace("_", " "),
                *(
                    _cell(m[k])
                    for k in ("before_warmup_mib", "start_mib", "half_mib", "peak_mib", "end_mib")
                ),
            )  # fmt: skip
        console.print(rss)
    else:
        console.print("server RSS: not sampled (no --pid, and the listening process could not be found)")
    for trace in report["server_tracebacks"]:
        console.print(f"[red]server log:[/red]\n{trace}", highlight=False, markup=True)
    if report["clean"]:
        console.print("[green]clean run[/green]")
    else:
        console.print("[red]not clean:[/red] " + "; ".join(report["problems"]), highlight=False)
        for failure in report["failures"][:10]:
            line = f"  {failure['kind']} {failure['status']}: {failure['detail']}"
            console.print(line, highlight=False, markup=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server; without it, one is started in a temporary home")
    parser.add_argument("--home", type=Path, help="the running server's APPLIANCE_HOME, to create the load users in")
    parser.add_argument("--accounts", type=Path, help='JSON list of {"name", "key"} or {"name", "password"}')
    parser.add_argument("--pid", type=int, help="the server's process id, for its RSS (found by its port if omitted)")
    parser.add_argument("--server-log", type=Path, help="the server's log, to report tracebacks logged meanwhile")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--browser-share", type=float, default=0.25, help="share of users signing in as a browser")
    parser.add_argument("--collection", default="load")
    parser.add_argument("--model", help="a generation model for asks and chats (default: extractive, rag/<coll.>)")
    parser.add_argument("--gguf", type=Path, help="without --url: a GGUF file to install as --model first")
    parser.add_argument("--think", type=float, default=0.25, help="mean pause between a user's operations (s)")
    parser.add_argument("--mix", default="", help=f"weights to change, e.g. upload=0,ask=50 (default: {MIX})")
    parser.add_argument("--drain", type=float, default=180.0, help="how long to await upload jobs after the end")
    parser.add_argument("--no-seed", action="store_true", help="do not seed an empty collection with sample files")
    parser.add_argument("--server-env", action="append", default=[], help="KEY=VALUE for a server started here")
    parser.add_argument("--keep-home", action="store_true", help="keep the temporary home (it has the server log)")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args()

    mix = {}
    for item in filter(None, args.mix.split(",")):
        kind, _, weight = item.partition("=")
        if kind not in MIX or not weight.isdigit():
            parser.error(f"--mix: {item!r} is not KIND=WEIGHT with KIND one of {', '.join(MIX)}")
        mix[kind] = int(weight)
    options = {
        "think": args.think,
        "mix": mix,
        "drain": args.drain,
        "seed_files": () if args.no_seed else SEED_FILES,
    }
    if args.url is None:
        settings = dict(item.split("=", 1) for item in args.server_env)
        report = run_own_server(
            args.users,
            args.duration,
            browser_share=args.browser_share,
            collection=args.collection,
            gguf=args.gguf,
            model=args.model,
            keep_home=args.keep_home,
            server_settings=settings,
            **options,
        )
    else:
        if (args.home is None) == (args.accounts is None):
            parser.error("with --url, give either --home (to create the load users) or --accounts")
        if args.home is not None:
            accounts = prepare_users(args.home, args.users, args.collection, args.browser_share)
        else:
            accounts = [Account(**a) for a in json.loads(args.accounts.read_text())]
        pid = args.pid or find_server_pid(args.url)
        try:
            report = run(
                args.url.rstrip("/"), accounts, duration=args.duration, collection=args.collection, model=args.model,
                pid=pid, log_path=args.server_log, **options,
            )  # fmt: skip
        finally:
            if args.home is not None:
                retire_users(args.home, accounts)
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["clean"] else 1


if __name__ == "__main__":
    sys.exit(main())
