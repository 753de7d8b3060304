"""A tiny in-memory Hugging Face Hub that serves the real `huggingface_hub` client on loopback, for tests.

`LoopbackHub()` is a context manager: it listens on 127.0.0.1 on an ephemeral port in a background thread and
`endpoint` is the URL to put in HF_ENDPOINT. It answers the slice of the Hub protocol that `push_to_hub` and
`from_pretrained` use, for model repos "namespace/name":

    POST /api/repos/create                         create a repo (409 with its url if it exists)
    POST /api/validate-yaml                        accept every README.md metadata block
    POST /api/models/{repo}/preupload/{rev}        "regular" upload mode for every file (no LFS, no Xet)
    POST /api/models/{repo}/commit/{rev}           NDJSON commit; file contents are base64
    GET  /api/models/{repo}[/revision/{rev}]       repo info: sha, siblings
    GET  /api/models/{repo}/tree/{rev}[/{path}]    directory listing (recursive=true lists everything below)
    GET|HEAD /{repo}/resolve/{rev}/{path}          file bytes, with X-Repo-Commit and ETag headers

Every commit is kept, so a revision is a branch name or any commit sha. Errors carry the `X-Error-Code` header
(RepoNotFound, RevisionNotFound, EntryNotFound) that the client maps to its exception classes. Nothing is stored on
disk, LFS and Xet are not implemented, and the server binds to loopback only.
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob, which the Hub uses as the oid and ETag of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    sha: str
    files: dict  # path -> bytes, the whole tree at this commit
    message: str
    date: str


@dataclass
class Repo:
    repo_id: str
    commits: dict = field(default_factory=dict)  # sha -> Commit
    branches: dict = field(default_factory=dict)  # branch name -> sha

    def resolve(self, revision: str):
        sha = self.branches.get(revision, revision)
        return self.commits.get(sha) if COMMIT_SHA.match(sha) else None

    def add_commit(self, branch: str, files: dict, message: str) -> Commit:
        parent = self.branches.get(branch, "")
        digest = hashlib.sha1(f"{self.repo_id}\0{parent}\0{message}\0{len(self.commits)}".encode())
        for path in sorted(files):
            digest.update(f"\0{path}\0{git_blob_oid(files[path])}".encode())
        date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        commit = Commit(digest.hexdigest(), dict(files), message, date)
        self.commits[commit.sha] = commit
        self.branches[branch] = commit.sha
        return commit


class HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str = None, commit: str = None):
        super().__init__(message)
        self.status, self.message, self.error_code, self.commit = status, message, error_code, commit


class _HubHandler(BaseHTTPRequestHandler):
    server_version = "LoopbackHub/1.0"

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    # ---- plumbing ---------------------------------------------------------------------------------------------
    def _dispatch(self, method: str):
        hub: "LoopbackHub" = self.server.hub
        url = urlsplit(self.path)
        segments = [unquote(part) for part in url.path.split("/")[1:]]
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else b""
        hub.requests.append((method, url.path))
        try:
            try:
                with hub.lock:
                    status, headers, payload = hub.route(method, segments, query, body, self.headers)
            except (KeyError, ValueError) as bug:  # a malformed request: answer instead of dropping the connection
                raise HubError(400, f"Bad request: {bug!r}") from bug
        except HubError as error:
            status, payload = error.status, json.dumps({"error": error.message}).encode()
            headers = {"Content-Type": "application/json", "X-Error-Message": error.message}
            if error.error_code:
                headers["X-Error-Code"] = error.error_code
            if error.commit:
                headers["X-Repo-Commit"] = error.commit
        if isinstance(payload, (dict, list)):
            payload, headers = json.dumps(payload).encode(), {"Content-Type": "application/json", **headers}
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(payload))}.items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")


class LoopbackHub:
    """An in-memory Hub on 127.0.0.1; use as `with LoopbackHub() as hub: ... hub.endpoint ...`."""

    def __init__(self, default_namespace: str = "user"):
        self.default_namespace = default_namespace
        self.repos: dict = {}  # repo_id -> Repo
        self.requests: list = []  # (method, path) of every request served, for assertions and debugging
        self.lock = threading.Lock()
        self._server = None
        self._thread = None

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "LoopbackHub":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler)
        self._server.daemon_threads = True
        self._server.hub = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="loopback-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = self._thread = None

    def __enter__(self) -> "LoopbackHub":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ---- protocol ---------------------------------------------------------------------------------------------
    def _repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return self.repos[repo_id]

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def route(self, method, segments, query, body, headers):
        """Return (status, headers, payload) for one request; payload is bytes or a JSON-able dict/list."""
        if segments[:1] == ["api"] and method != "HEAD":
            if method == "POST" and not headers.get("Authorization"):
                raise HubError(401, "Invalid credentials in Authorization header")
            if method == "POST" and segments == ["api", "repos", "create"]:
                return self._create_repo(json.loads(body))
            if method == "POST" and segments == ["api", "validate-yaml"]:
                return 200, {}, {"errors": [], "warnings": []}
            if len(segments) >= 4 and segments[1] == "models":
                repo = self._repo(f"{segments[2]}/{segments[3]}")
                action, rest = (segments[4], segments[5:]) if len(segments) > 4 else ("info", [])
                if method == "GET" and action == "info":
                    return self._repo_info(repo, "main")
                if method == "GET" and action == "revision" and rest:
                    return self._repo_info(repo, "/".join(rest))
                if method == "GET" and action == "tree" and rest:
                    recursive = query.get("recursive", "").lower() in ("1", "true")
                    return self._tree(repo, rest[0], "/".join(rest[1:]), recursive)
                if method == "POST" and action == "preupload" and rest:
                    return self._preupload(repo, rest[0], json.loads(body))
                if method == "POST" and action == "commit" and rest:
                    if query.get("create_pr"):
                        raise HubError(400, "Pull requests are not supported by this test server")
                    return self._create_commit(repo, rest[0], body)
        elif len(segments) >= 5 and segments[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(self._repo(f"{segments[0]}/{segments[1]}"), segments[3], "/".join(segments[4:]))
        raise HubError(404, f"{method} {'/'.join(segments)} is not served by this test server")

    def _create_repo(self, payload):
        repo_id = f"{payload.get('organization') or self.default_namespace}/{payload['name']}"
        url = {"url": f"{self.endpoint}/{repo_id}", "name": repo_id, "id": repo_id}
        if payload.get("type", "model") != "model":
            raise HubError(400, "Only model repos are supported by this test server")
        if repo_id in self.repos:
            return 409, {}, {"error": "You already created this model repo", **url}
        repo = self.repos[repo_id] = Repo(repo_id)
        repo.add_commit("main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "initial")
        return 200, {}, url

    def _repo_info(self, repo: Repo, revision: str):
        commit = self._commit(repo, revision)
        siblings = [{"rfilename": path} for path in sorted(commit.files)]
        info = {"id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": commit.sha}
        return 200, {}, {**info, "private": False, "lastModified": commit.date, "tags": [], "siblings": siblings}

    def _tree(self, repo: Repo, revision: str, folder: str, recursive: bool):
        files = self._commit(repo, revision).files
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        if prefix and not any(path.startswith(prefix) for path in files):
            raise HubError(404, f"{folder} does not exist", "EntryNotFound")
        entries = {}
        for path, content in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # folders on the way down
                if depth == 1 or recursive:
                    folder_path = prefix + "/".join(parts[:depth])
                    entries.setdefault(folder_path, {"type": "directory", "path": folder_path, "size": 0})
                    entries[folder_path]["oid"] = git_blob_oid(folder_path.encode())  # a stable stand-in tree id
            if len(parts) == 1 or recursive:
                entries[path] = {"type": "file", "path": path, "size": len(content), "oid": git_blob_oid(content)}
        return 200, {}, list(entries.values())

    def _preupload(self, repo: Repo, revision: str, payload):
        commit = repo.resolve(revision)
        existing = commit.files if commit else {}
        answers = []
        for entry in payload["files"]:
            remote = existing.get(entry["path"])
            oid = git_blob_oid(remote) if remote is not None else None  # the client skips files whose oid is unchanged
            answers.append({"path": entry["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        return 200, {}, {"files": answers, "commitOid": commit.sha if commit else None}

    def _create_commit(self, repo: Repo, branch: str, body: bytes):
        if COMMIT_SHA.match(branch) or (branch not in repo.branches and repo.branches):
            raise HubError(404, f"Invalid rev id: {branch} (commits go to an existing branch)", "RevisionNotFound")
        files = dict(repo.resolve(branch).files) if branch in repo.branches else {}
        message = ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary", "")
                parent = value.get("parentCommit")
                if parent and parent != repo.branches.get(branch):
                    raise HubError(412, f"parentCommit {parent} is not the head of {branch}")
            elif key == "file":
                content = value["content"].encode()
                files[value["path"]] = base64.b64decode(content) if value.get("encoding") == "base64" else content
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: content for path, content in files.items() if not path.startswith(prefix)}
            else:
                raise HubError(400, f"Commit operation {key!r} (LFS/Xet) is not supported by this test server")
        commit = repo.add_commit(branch, files, message)
        url = f"{self.endpoint}/{repo.repo_id}/commit/{commit.sha}"
        return 200, {}, {"success": True, "commitOid": commit.sha, "commitUrl": url, "pullRequestUrl": None}

    def _resolve(self, repo: Repo, revision: str, path: str):
        commit = self._commit(repo, revision)
        if path not in commit.files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit=commit.sha)
        content = commit.files[path]
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{git_blob_oid(content)}"',
            "Accept-Ranges": "none",
        }
        return 200, headers, content
