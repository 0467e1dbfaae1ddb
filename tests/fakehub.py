"""A fake Hugging Face Hub: a real HTTP server on 127.0.0.1, reached through ``HF_ENDPOINT``.

It implements what ``huggingface_hub`` (2.x, checked against 2.4) calls for ``create_repo`` and
``create_commit`` with small files:

    GET  /api/whoami-v2                                  the token's user
    POST /api/repos/create                               200 {"url"} or 409 (exists, with "url")
    POST /api/validate-yaml                              README metadata check: no errors
    POST /api/models/{ns}/{name}/preupload/{revision}    every file "regular" (inline base64), with
                                                         the stored file's git oid so unchanged
                                                         files are dropped client-side
    POST /api/models/{ns}/{name}/commit/{revision}       NDJSON: header, then "file" lines
    GET  /api/models/{ns}/{name}[/revision/{revision}]   repo info (the no-op commit path)

Everything received is recorded: ``requests`` (method, path, headers, body), ``commits`` (repo,
summary, paths in order); ``repos`` holds each repo's files. ``token`` is the only accepted bearer
token (401 otherwise); repos outside ``user``'s namespace get 403. ``fail_next`` injects errors.

The ``fake_hub`` fixture (import it into a test module) starts one, points ``HF_ENDPOINT`` at it
and turns off the conftest's ``HF_HUB_OFFLINE`` and huggingface_hub's telemetry calls.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

FAKE_TOKEN = "hf_fake_token_123456"


def git_oid(data: bytes) -> str:
    """What git (and the Hub) call a regular file's oid: sha1 of ``blob <len>\\0`` + data."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    shas: list[str] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.shas[-1] if self.shas else "0" * 40


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Commit:
    repo_id: str
    summary: str
    paths: list[str]


class FakeHub:
    def __init__(self, *, token: str = FAKE_TOKEN, user: str = "alice") -> None:
        self.token = token
        self.user = user
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[Recorded] = []
        self.commits: list[Commit] = []
        self.repo_creates = 0
        self._faults: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def fail_next(self, method: str, path_prefix: str, status: int, body: Any = None, times: int = 1) -> None:
        self._faults.append({"method": method, "prefix": path_prefix, "status": status,
                             "body": body if body is not None else {"error": "injected"}, "times": times})

    def paths(self, method: str | None = None) -> list[str]:
        return [r.path for r in self.requests if method is None or r.method == method]

    # --- request handling (called from the server threads) ---

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        with self._lock:
            self.requests.append(Recorded(method, path, headers, body))
            fault = self._take_fault(method, path)
            if fault is not None:
                return fault
            if headers.get("authorization") != f"Bearer {self.token}":
                return 401, {"error": "Invalid credentials in Authorization header"}
            return self._route(method, path, body)

    def _take_fault(self, method: str, path: str) -> tuple[int, Any] | None:
        for fault in self._faults:
            if fault["method"] == method and path.startswith(fault["prefix"]) and fault["times"] > 0:
                fault["times"] -= 1
                return fault["status"], fault["body"]
        return None

    def _route(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        if method == "GET" and path == "/api/whoami-v2":
            return 200, {"type": "user", "name": self.user, "orgs": []}
        if method == "POST" and path == "/api/repos/create":
            return self._create(json.loads(body or b"{}"))
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        parts = path.split("/")
        if len(parts) >= 5 and parts[:3] == ["", "api", "models"]:
            repo_id = f"{parts[3]}/{parts[4]}"
            repo = self.repos.get(repo_id)
            if repo is None:
                return 404, {"error": "Repository not found"}
            action = parts[5] if len(parts) > 5 else "info"
            if method == "POST" and action == "preupload":
                return 200, self._preupload(repo, json.loads(body))
            if method == "POST" and action == "commit":
                return 200, self._commit(repo, body)
            if method == "GET" and action in ("info", "revision"):
                return 200, {"id": repo.repo_id, "sha": repo.sha, "private": repo.private,
                             "siblings": [{"rfilename": name} for name in repo.files]}
        return 404, {"error": f"fake hub does not serve {method} {path}"}

    def _create(self, payload: dict[str, Any]) -> tuple[int, Any]:
        namespace = payload.get("organization") or self.user
        if namespace != self.user:
            return 403, {"error": f"You don't have the rights to create a model under {namespace}"}
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": url}
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.repos[repo_id] = FakeRepo(repo_id=repo_id, private=private)
        self.repo_creates += 1
        return 200, {"url": url, "name": repo_id}

    def _preupload(self, repo: FakeRepo, payload: dict[str, Any]) -> dict[str, Any]:
        files = []
        for item in payload["files"]:
            stored = repo.files.get(item["path"])
            files.append({"path": item["path"], "uploadMode": "regular", "shouldIgnore": False,
                          "oid": git_oid(stored) if stored is not None else None})
        return {"files": files, "commitOid": repo.sha}

    def _commit(self, repo: FakeRepo, body: bytes) -> dict[str, Any]:
        summary, paths = "", []
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                summary = item["value"]["summary"]
            elif item["key"] == "file":
                value = item["value"]
                repo.files[value["path"]] = base64.b64decode(value["content"])
                paths.append(value["path"])
        sha = hashlib.sha1(f"{repo.repo_id}:{len(repo.shas)}:{summary}".encode()).hexdigest()
        repo.shas.append(sha)
        self.commits.append(Commit(repo.repo_id, summary, paths))
        return {"success": True, "commitOid": sha, "commitUrl": f"{self.url}/{repo.repo_id}/commit/{sha}",
                "pullRequestUrl": None}


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {key.lower(): value for key, value in self.headers.items()}
            path = unquote(urlsplit(self.path).path)
            status, payload = hub.handle(self.command, path, headers, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 404 and "Repository" in str(payload):
                self.send_header("X-Error-Code", "RepoNotFound")
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            return None

    return Handler


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A running FakeHub that huggingface_hub talks to (online mode, no telemetry requests)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads these once at import; the conftest set HF_HUB_OFFLINE=1 before that.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub
