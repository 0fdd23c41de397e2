"""A small Hugging Face Hub server for the tests: a real HTTP server on 127.0.0.1 speaking the
endpoints huggingface_hub's client uses to create repos, commit files inline, read repo info and
trees, and resolve (download) files. Repos live in memory; every commit gets a sha.

Writes need `Authorization: Bearer <token>`; the token's user is `namespace` (default "tester").
`refuse_writes = <status>` makes every write answer that status (a server that refuses pushes);
`refuse_commits` and `hang_commits` fault only commits.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class Repo:
    def __init__(self, repo_id: str):
        self.repo_id = repo_id
        self.files: dict[str, bytes] = {}
        self.commits: list[str] = [hashlib.sha1(repo_id.encode()).hexdigest()]

    @property
    def sha(self) -> str:
        return self.commits[-1]

    def commit(self, message: str, added: dict[str, bytes], deleted: list[str]) -> str:
        for path in deleted:
            self.files.pop(path, None)
            for key in [k for k in self.files if k.startswith(path.rstrip("/") + "/")]:
                self.files.pop(key)
        self.files.update(added)
        digest = hashlib.sha1((self.sha + message + json.dumps(sorted(self.files))).encode())
        for path in sorted(added):
            digest.update(added[path])
        self.commits.append(digest.hexdigest())
        return self.sha


class HubState:
    def __init__(self, namespace: str = "tester"):
        self.namespace = namespace
        self.repos: dict[str, Repo] = {}
        self.refuse_writes: int | None = None
        # Faults of the commit endpoint only (repos can still be created): answer this status, or
        # answer only after this many seconds (a Hub that hangs).
        self.refuse_commits: int | None = None
        self.hang_commits: float | None = None
        self.lock = threading.Lock()


def _file_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState  # set per server

    def log_message(self, *args):  # quiet
        pass

    # ---- helpers ----------------------------------------------------------------------
    def _send(self, status: int, body: bytes | dict | list = b"", headers: dict | None = None, head: bool = False):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        # One request per connection: a stopped server must refuse the client's next request
        # instead of serving it on a kept-alive connection.
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str, head: bool = False):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers, head=head)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            return self.rfile.read(length)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return b""

    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "").startswith("Bearer ")

    def _repo_info(self, repo: Repo) -> dict:
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        return {
            "_id": repo.repo_id,
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": repo.sha,
            "private": False,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "createdAt": now,
            "lastModified": now,
            "siblings": [{"rfilename": path} for path in sorted(repo.files)],
        }

    # ---- routing ----------------------------------------------------------------------
    def do_HEAD(self):
        self._route("HEAD")

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def _route(self, method: str):
        path = unquote(urlparse(self.path).path)
        state = self.state
        if method == "POST" and state.refuse_writes is not None and path != "/api/validate-yaml":
            self._body()
            return self._error(state.refuse_writes, None, "This server refuses writes right now.")
        if path == "/api/whoami-v2":
            if not self._authorized():
                return self._error(401, None, "Invalid credentials in Authorization header")
            return self._send(
                200,
                {
                    "type": "user",
                    "name": state.namespace,
                    "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"role": "write"}},
                },
            )
        if path == "/api/validate-yaml" and method == "POST":
            self._body()
            return self._send(200, {"errors": [], "warnings": []})
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(json.loads(self._body() or b"{}"))
        if path.startswith("/api/models/"):
            return self._api_models(method, path[len("/api/models/") :])
        if "/resolve/" in path:
            return self._resolve(method, path)
        return self._error(404, None, f"No route for {method} {path}")

    def _create_repo(self, payload: dict):
        if not self._authorized():
            return self._error(401, None, "You must be logged in to create a repo (no token).")
        namespace = payload.get("organization") or self.state.namespace
        repo_id = f"{namespace}/{payload['name']}"
        host = f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"
        with self.state.lock:
            if repo_id in self.state.repos:
                # like the Hub: 409, and the existing repo's url (create_repo(exist_ok=True) reads it)
                return self._send(409, {"error": "You already created this model repo", "url": f"{host}/{repo_id}"})
            self.state.repos[repo_id] = Repo(repo_id)
        return self._send(200, {"url": f"{host}/{repo_id}", "name": repo_id})

    def _find_repo(self, repo_id: str, head: bool = False) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository Not Found for url: {repo_id}", head=head)
        return repo

    def _api_models(self, method: str, rest: str):
        for marker in ("/preupload/", "/commit/", "/revision/", "/tree/"):
            if marker in rest:
                repo_id, tail = rest.split(marker, 1)
                break
        else:
            repo_id, marker, tail = rest, "", ""
        repo = self._find_repo(repo_id)
        if repo is None:
            return None
        if marker == "/preupload/" and method == "POST":
            files = json.loads(self._body()).get("files", [])
            return self._send(
                200,
                {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
                    ],
                    "commitOid": repo.sha,
                },
            )
        if marker == "/commit/" and method == "POST":
            if self.state.hang_commits:
                self._body()
                time.sleep(self.state.hang_commits)
                return self._error(504, None, "The commit took too long.")
            if self.state.refuse_commits is not None:
                self._body()
                return self._error(self.state.refuse_commits, None, "This server refuses commits right now.")
            if not self._authorized():
                return self._error(401, None, "You must be logged in to commit.")
            added, deleted, message = {}, [], ""
            for line in self._body().decode().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                if item["key"] == "header":
                    message = item["value"].get("summary", "")
                elif item["key"] == "file":
                    added[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] in ("deletedFile", "deletedFolder"):
                    deleted.append(item["value"]["path"])
                else:
                    return self._error(400, None, f"Unsupported commit operation {item['key']}")
            with self.state.lock:
                sha = repo.commit(message, added, deleted)
            host = f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"
            return self._send(
                200,
                {
                    "commitUrl": f"{host}/{repo.repo_id}/commit/{sha}",
                    "commitOid": sha,
                    "pullRequestUrl": None,
                    "success": True,
                },
            )
        if marker == "/tree/":
            revision, _, prefix = tail.partition("/")
            entries = [
                {"type": "file", "oid": _file_sha(content), "size": len(content), "path": path}
                for path, content in sorted(repo.files.items())
                if not prefix or path.startswith(prefix.rstrip("/") + "/")
            ]
            return self._send(200, entries)
        return self._send(200, self._repo_info(repo))

    def _resolve(self, method: str, path: str):
        head = method == "HEAD"
        repo_id, tail = path.lstrip("/").split("/resolve/", 1)
        repo = self._find_repo(repo_id, head=head)
        if repo is None:
            return None
        revision, _, file_path = tail.partition("/")
        if revision not in ("main", repo.sha):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
        content = repo.files.get(file_path)
        if content is None:
            return self._error(404, "EntryNotFound", f"{file_path} does not exist on {revision}", head=head)
        etag = f'"{_file_sha(content)}"'
        return self._send(
            200,
            content,
            {"X-Repo-Commit": repo.sha, "ETag": etag, "Content-Type": "application/octet-stream"},
            head=head,
        )


class LocalHub:
    """Starts and stops the server on a fixed port (so a stopped server can come back)."""

    def __init__(self, port: int, state: HubState | None = None):
        self.port = port
        self.state = state or HubState()
        self.server: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalHub:
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.server.daemon_threads = True
        # A client that gave up (a timeout test) closes its connection: no traceback on stderr.
        self.server.handle_error = lambda request, client_address: None
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
