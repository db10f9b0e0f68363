"""A loopback-only, in-memory stand-in for the Hugging Face Hub HTTP API, for tests.

It speaks the subset of the Hub API that ``huggingface_hub``'s client (checked against 2.4.0) and ``transformers``
use to create model repositories, commit files, resolve revisions and download files:

==========  ===========================================================  ============================================
Method      Path                                                         Used by
==========  ===========================================================  ============================================
GET         ``/api/whoami-v2``                                           ``whoami`` (who the token belongs to)
POST        ``/api/repos/create``                                        ``create_repo``
POST        ``/api/validate-yaml``                                       ``create_commit`` when it uploads a README.md
GET         ``/api/models/{repo_id}[/revision/{revision}]``              ``repo_info`` / ``model_info``
GET         ``/api/models/{repo_id}/tree/{revision}[/{path}]``           ``list_repo_tree``, ``snapshot_download``
POST        ``/api/models/{repo_id}/preupload/{revision}``               every upload (answers "regular" for all files)
POST        ``/api/models/{repo_id}/commit/{revision}``                  every upload (NDJSON, base64 "file" lines)
POST        ``/api/models/{repo_id}/branch/{branch}``                    ``create_branch``; ``push_to_hub(revision=)``
GET, HEAD   ``/{repo_id}/resolve/{revision}/{path}``                     ``hf_hub_download`` and everything above it
==========  ===========================================================  ============================================

How uploads are steered to the simplest path: the client asks ``preupload`` how to send each file and only uses
Git LFS (or Xet, when ``hf_xet`` is installed) for files answered ``"lfs"``. This server answers ``"regular"`` for
every file, so the file bytes travel base64-encoded inside the commit's NDJSON payload and no LFS batch, storage or
Xet endpoint is ever needed. Downloads never carry Xet headers either, so the client uses a plain ``GET``. Files are
served directly (200, no redirect), as the real Hub does for files that are not in LFS.

Errors carry the ``X-Error-Code`` values that ``huggingface_hub.utils.hf_raise_for_status`` maps to exceptions:
``RepoNotFound`` -> ``RepositoryNotFoundError``, ``RevisionNotFound`` -> ``RevisionNotFoundError``,
``EntryNotFound`` -> ``RemoteEntryNotFoundError``, ``GatedRepo`` -> ``GatedRepoError``. Access rules:

* any token is accepted, except those in :attr:`LocalHub.rejected_tokens` (401, "Invalid credentials");
* writes (create, preupload, commit, branch) need a token;
* a private repository (``create_repo(private=True)`` or ``private_token=``) is only visible with its token:
  401 without a token, 404 with another one, both ``RepoNotFound`` as on the Hub;
* a gated repository (``gated_token=``) shows its metadata to everyone but serves files only with its token;
* a repository with ``write_token=`` refuses commits from other tokens with 403.

:class:`StaticFileServer` stands in for a raw-file host such as raw.githubusercontent.com (fixed files, byte ranges).

Each repository keeps its full commit history; ``revision=`` may be a branch name or a full commit sha. All state
lives in memory and is lost when the server stops. The server binds 127.0.0.1 on a free port.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

DEFAULT_BRANCH = "main"
"""Branch created with every repository, as on the Hub."""

USER_NAME = "cops-tester"
"""Namespace of repositories created without one; the name ``whoami`` reports for every accepted token."""

INITIAL_GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)
"""Content of the ``.gitattributes`` file committed when a repository is created (the Hub does the same)."""

_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(?:\n|\Z)", re.DOTALL)


def git_blob_id(content: bytes) -> str:
    """Return the git object id of a blob, which the Hub uses as the ETag of files that are not in LFS."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass(frozen=True)
class HubCommit:
    """One commit of a repository: its id, its parent and the complete file tree it points to."""

    sha: str
    parent_sha: str | None
    title: str
    files: Mapping[str, bytes]
    created_at: datetime


@dataclass
class HubRepository:
    """A model repository held by the :class:`LocalHub`: commits, branches and access rules."""

    repo_id: str
    private_token: str | None = None
    gated_token: str | None = None
    write_token: str | None = None
    commits: dict[str, HubCommit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> HubCommit:
        """Return the commit a branch name or a full commit sha points to."""
        sha = self.branches.get(revision, revision)
        if sha not in self.commits:
            raise HubErrorResponse(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return self.commits[sha]

    def commit(self, branch: str, title: str, files: Mapping[str, bytes]) -> HubCommit:
        """Record a new commit with the complete tree ``files`` on top of ``branch`` and move the branch to it."""
        parent_sha = self.branches.get(branch)
        created_at = datetime.now(timezone.utc)
        digest = hashlib.sha1(f"{self.repo_id}\n{parent_sha}\n{title}\n{created_at.isoformat()}".encode())
        for path in sorted(files):
            digest.update(f"\n{path}\n{git_blob_id(files[path])}".encode())
        new_commit = HubCommit(digest.hexdigest(), parent_sha, title, dict(files), created_at)
        self.commits[new_commit.sha] = new_commit
        self.branches[branch] = new_commit.sha
        return new_commit


class HubErrorResponse(Exception):
    """Raised by a route to answer with an error: status, the ``X-Error-Code`` the client maps to an exception, text.

    ``headers`` are added to the answer and ``details`` to its JSON body, next to ``"error": message``.
    """

    def __init__(
        self,
        status: int,
        error_code: str | None,
        message: str,
        headers: Mapping[str, str] | None = None,
        details: Mapping[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message
        self.headers = dict(headers or {})
        self.details = dict(details or {})


@dataclass
class HubRequest:
    """What a route handler needs from an HTTP request."""

    token: str | None
    query: dict[str, list[str]]
    body: bytes
    params: dict[str, str]

    def json(self) -> Any:
        """Decode the body as JSON; an empty body decodes to an empty object."""
        return json.loads(self.body) if self.body else {}


@dataclass
class HubResponse:
    """What a route handler answers: status, body and extra headers."""

    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200
    content_type: str = "application/json"


def _json_response(payload: Any, status: int = 200) -> HubResponse:
    return HubResponse(json.dumps(payload).encode(), status=status)


_REPO = r"(?P<repo_id>[^/]+/[^/]+)"
_REV = r"(?P<revision>[^/]+)"


_Server = TypeVar("_Server", bound="LoopbackServer")


class LoopbackServer:
    """An HTTP/1.1 server on a free 127.0.0.1 port, served from a daemon thread; use it as a context manager.

    Subclasses give the request handler class (:meth:`_handler_class`).
    """

    def __init__(self) -> None:
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The root URL to give the client, e.g. ``http://127.0.0.1:54321``."""
        if self._httpd is None:
            raise RuntimeError(f"The {type(self).__name__} is not running; call start() first.")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    def start(self: _Server) -> _Server:
        """Bind a free loopback port and serve requests from a daemon thread."""
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=type(self).__name__, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._httpd is None or self._thread is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self._httpd = None
        self._thread = None

    def __enter__(self: _Server) -> _Server:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


class LocalHub(LoopbackServer):
    """A Hub-compatible HTTP server on 127.0.0.1 with in-memory repositories; use it as a context manager.

    Attributes:
        repositories: the repositories by id, for test set-up and inspection.
        rejected_tokens: tokens answered with 401 "Invalid credentials in Authorization header".
        requests: ``"METHOD /path"`` of every request served, in order.
        unhandled_requests: the requests no route matched (answered 404 without an error code).
    """

    def __init__(self) -> None:
        super().__init__()
        self.repositories: dict[str, HubRepository] = {}
        self.rejected_tokens: set[str] = set()
        self.requests: list[str] = []
        self.unhandled_requests: list[str] = []
        self._lock = threading.Lock()
        self._routes: list[tuple[str, re.Pattern[str], Callable[[HubRequest], HubResponse]]] = [
            ("GET", re.compile(r"/api/whoami-v2"), self._whoami),
            ("POST", re.compile(r"/api/repos/create"), self._create_repo),
            ("POST", re.compile(r"/api/validate-yaml"), self._validate_yaml),
            ("GET", re.compile(rf"/api/models/{_REPO}(?:/revision/{_REV})?"), self._repo_info),
            ("GET", re.compile(rf"/api/models/{_REPO}/tree/{_REV}(?:/(?P<path>.+))?"), self._tree),
            ("POST", re.compile(rf"/api/models/{_REPO}/preupload/{_REV}"), self._preupload),
            ("POST", re.compile(rf"/api/models/{_REPO}/commit/{_REV}"), self._commit),
            ("POST", re.compile(rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)"), self._create_branch),
            ("GET", re.compile(rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)"), self._resolve),
            ("HEAD", re.compile(rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)"), self._resolve),
        ]

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        return _make_handler(self)

    # ------------------------------------------------------------------ test set-up

    def create_repository(
        self,
        repo_id: str,
        *,
        private_token: str | None = None,
        gated_token: str | None = None,
        write_token: str | None = None,
    ) -> HubRepository:
        """Create a repository with its initial commit on ``main``, optionally private, gated or write-protected."""
        with self._lock:
            if repo_id in self.repositories:
                raise ValueError(f"Repository {repo_id} already exists on the local hub.")
            return self._add_repository(HubRepository(repo_id, private_token, gated_token, write_token))

    def upload_files(self, repo_id: str, files: Mapping[str, bytes], title: str = "Upload files") -> HubCommit:
        """Commit ``files`` on top of ``main`` of ``repo_id`` (created public if needed), as a push would."""
        with self._lock:
            repository = self.repositories.get(repo_id) or self._add_repository(HubRepository(repo_id))
            head = repository.resolve(DEFAULT_BRANCH)
            return repository.commit(DEFAULT_BRANCH, title, {**head.files, **files})

    def _add_repository(self, repository: HubRepository) -> HubRepository:
        """Give a new repository its initial commit on ``main`` and store it (the caller holds the lock)."""
        repository.commit(DEFAULT_BRANCH, "initial commit", {".gitattributes": INITIAL_GITATTRIBUTES})
        self.repositories[repository.repo_id] = repository
        return repository

    # ------------------------------------------------------------------ dispatch

    def handle(self, method: str, raw_path: str, headers: Mapping[str, str], body: bytes) -> HubResponse:
        """Route one request and turn :class:`HubErrorResponse` into an error answer."""
        split = urlsplit(raw_path)
        self.requests.append(f"{method} {split.path}")
        for route_method, pattern, handler in self._routes:
            match = pattern.fullmatch(split.path)
            if route_method == method and match is not None:
                params = {name: unquote(value) for name, value in match.groupdict().items() if value is not None}
                authorization = headers.get("Authorization", "")
                token = authorization.removeprefix("Bearer ").strip() if authorization.startswith("Bearer ") else None
                request = HubRequest(token, parse_qs(split.query), body, params)
                try:
                    if token is not None and token in self.rejected_tokens:
                        raise HubErrorResponse(401, None, "Invalid credentials in Authorization header")
                    with self._lock:
                        return handler(request)
                except HubErrorResponse as error:
                    answer = _json_response({"error": error.message, **error.details}, error.status)
                    answer.headers.update(error.headers)
                    answer.headers["X-Error-Message"] = error.message
                    if error.error_code is not None:
                        answer.headers["X-Error-Code"] = error.error_code
                    return answer
        self.unhandled_requests.append(f"{method} {split.path}")
        return _json_response({"error": f"{method} {split.path} is not implemented by the local hub"}, 404)

    def _readable_repository(self, request: HubRequest) -> HubRepository:
        """The repository named in the path, if the request's token may see it."""
        repository = self.repositories.get(request.params["repo_id"])
        if repository is None or (repository.private_token is not None and request.token != repository.private_token):
            status = 401 if request.token is None else 404
            raise HubErrorResponse(status, "RepoNotFound", "Repository not found")
        return repository

    def _writable_repository(self, request: HubRequest) -> HubRepository:
        """The repository named in the path, if the request's token may commit to it."""
        if request.token is None:
            raise HubErrorResponse(401, "RepoNotFound", "Repository not found")
        repository = self._readable_repository(request)
        if repository.write_token is not None and request.token != repository.write_token:
            raise HubErrorResponse(403, None, f"You don't have the rights to create a commit in {repository.repo_id}")
        return repository

    def _commit_url(self, repo_id: str, sha: str) -> str:
        return f"{self.url}/{repo_id}/commit/{sha}"

    # ------------------------------------------------------------------ routes

    def _whoami(self, request: HubRequest) -> HubResponse:
        if request.token is None:
            raise HubErrorResponse(401, None, "Invalid username or password.")
        return _json_response(
            {
                "type": "user",
                "name": USER_NAME,
                "fullname": "CoPS tester",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": "write"}},
            }
        )

    def _create_repo(self, request: HubRequest) -> HubResponse:
        if request.token is None:
            raise HubErrorResponse(401, None, "Invalid username or password.")
        payload = request.json()
        if payload.get("type", "model") != "model":
            raise HubErrorResponse(400, None, "The local hub only hosts model repositories")
        repo_id = f"{payload.get('organization') or USER_NAME}/{payload['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repositories:
            # The client reads the url of the existing repository from this answer when exist_ok=True.
            raise HubErrorResponse(409, None, "You already created this model repo", details={"url": url})
        private_token = request.token if payload.get("visibility") == "private" else None
        self._add_repository(HubRepository(repo_id, private_token=private_token))
        return _json_response({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _validate_yaml(self, request: HubRequest) -> HubResponse:
        try:
            _front_matter(request.json()["content"].encode())
        except yaml.YAMLError as error:
            return _json_response({"errors": [{"message": f"Invalid YAML: {error}"}], "warnings": []}, 400)
        return _json_response({"errors": [], "warnings": []})

    def _repo_info(self, request: HubRequest) -> HubResponse:
        repository = self._readable_repository(request)
        current = repository.resolve(request.params.get("revision", DEFAULT_BRANCH))
        card_data = _front_matter(current.files.get("README.md", b""))
        return _json_response(
            {
                "id": repository.repo_id,
                "modelId": repository.repo_id,
                "author": repository.repo_id.split("/")[0],
                "sha": current.sha,
                "lastModified": current.created_at.isoformat().replace("+00:00", "Z"),
                "private": repository.private_token is not None,
                "gated": "manual" if repository.gated_token is not None else False,
                "disabled": False,
                "tags": card_data.get("tags", []),
                "pipeline_tag": card_data.get("pipeline_tag"),
                "library_name": card_data.get("library_name"),
                "cardData": card_data or None,
                "siblings": [
                    {"rfilename": path, "size": len(content), "blobId": git_blob_id(content)}
                    for path, content in sorted(current.files.items())
                ],
            }
        )

    def _tree(self, request: HubRequest) -> HubResponse:
        repository = self._readable_repository(request)
        current = repository.resolve(request.params["revision"])
        folder = request.params.get("path", "").strip("/")
        recursive = request.query.get("recursive", ["false"])[0].lower() == "true"
        entries = list(_tree_entries(current, folder, recursive))
        if folder and not entries:
            raise HubErrorResponse(404, "EntryNotFound", f"{folder} does not exist on {request.params['revision']}")
        return _json_response(entries)

    def _preupload(self, request: HubRequest) -> HubResponse:
        repository = self._writable_repository(request)
        current = repository.resolve(request.params["revision"])
        answers = []
        for file in request.json()["files"]:
            existing = current.files.get(file["path"])
            answers.append(
                {
                    "path": file["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_id(existing) if existing is not None else None,
                }
            )
        return _json_response({"files": answers, "commitOid": current.sha})

    def _commit(self, request: HubRequest) -> HubResponse:
        repository = self._writable_repository(request)
        if "create_pr" in request.query:
            raise HubErrorResponse(400, None, "The local hub does not support pull requests")
        branch = request.params["revision"]
        if branch not in repository.branches:
            raise HubErrorResponse(404, "RevisionNotFound", f"Invalid rev id: {branch} is not a branch")
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubErrorResponse(400, None, "The commit payload must start with a header line")
        header = lines[0]["value"]
        head_sha = repository.branches[branch]
        if header.get("parentCommit") not in (None, head_sha):
            raise HubErrorResponse(412, None, f"The branch {branch} has moved: its head is {head_sha}")
        files = dict(repository.commits[head_sha].files)
        for line in lines[1:]:
            _apply_commit_operation(files, line["key"], line["value"])
        new_commit = repository.commit(branch, header["summary"], files)
        return _json_response(
            {
                "success": True,
                "commitOid": new_commit.sha,
                "commitUrl": self._commit_url(repository.repo_id, new_commit.sha),
                "pullRequestUrl": None,
                "hookOutput": "",
            }
        )

    def _create_branch(self, request: HubRequest) -> HubResponse:
        repository = self._writable_repository(request)
        branch = request.params["branch"]
        if branch in repository.branches:
            raise HubErrorResponse(409, None, f"Branch {branch} already exists")
        starting_point = repository.resolve(request.json().get("startingPoint") or DEFAULT_BRANCH)
        repository.branches[branch] = starting_point.sha
        return _json_response({})

    def _resolve(self, request: HubRequest) -> HubResponse:
        repository = self._readable_repository(request)
        if repository.gated_token is not None and request.token != repository.gated_token:
            status = 401 if request.token is None else 403
            message = f"Access to model {repository.repo_id} is restricted and you are not in the authorized list."
            raise HubErrorResponse(status, "GatedRepo", message)
        current = repository.resolve(request.params["revision"])
        path = request.params["path"]
        if path not in current.files:
            raise HubErrorResponse(404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": current.sha})
        content = current.files[path]
        headers = {"ETag": f'"{git_blob_id(content)}"', "X-Repo-Commit": current.sha, "Accept-Ranges": "none"}
        return HubResponse(content, headers, content_type="application/octet-stream")


def _front_matter(readme: bytes) -> dict[str, Any]:
    """The YAML metadata block at the top of a README.md, as a dict (empty when there is none)."""
    match = _FRONT_MATTER.match(readme.decode("utf-8"))
    metadata = yaml.safe_load(match.group(1)) if match else None
    return metadata if isinstance(metadata, dict) else {}


def _tree_entries(current: HubCommit, folder: str, recursive: bool) -> Iterator[dict[str, Any]]:
    """Tree listing entries under ``folder`` (``""`` for the root), folders before the files they contain."""
    prefix = f"{folder}/" if folder else ""
    listed_folders: set[str] = set()
    for path in sorted(current.files):
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        for depth in range(1, len(parts) if recursive else min(2, len(parts))):
            sub_folder = prefix + "/".join(parts[:depth])
            if sub_folder not in listed_folders:
                listed_folders.add(sub_folder)
                oid = hashlib.sha1(f"{current.sha}:{sub_folder}".encode()).hexdigest()
                yield {"type": "directory", "path": sub_folder, "oid": oid, "size": 0}
        if recursive or len(parts) == 1:
            content = current.files[path]
            yield {"type": "file", "path": path, "oid": git_blob_id(content), "size": len(content)}


def _apply_commit_operation(files: dict[str, bytes], key: str, value: Mapping[str, Any]) -> None:
    """Apply one NDJSON line of a commit payload to the file tree being built."""
    path = value["path"]
    if key == "file":
        if value.get("encoding") != "base64":
            raise HubErrorResponse(400, None, f"Unsupported encoding for {path}: {value.get('encoding')}")
        files[path] = base64.b64decode(value["content"])
    elif key == "deletedFile":
        if files.pop(path, None) is None:
            raise HubErrorResponse(404, "EntryNotFound", f"A file with this name doesn't exist: {path}")
    elif key == "deletedFolder":
        prefix = path.rstrip("/") + "/"
        for existing in [name for name in files if name.startswith(prefix)]:
            del files[existing]
    else:
        raise HubErrorResponse(
            400, None, f"Unsupported commit operation {key!r}: the local hub only takes regular files"
        )


def _make_handler(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    """An HTTP/1.1 request handler class bound to ``hub``."""

    class LocalHubRequestHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            answer = hub.handle(self.command, self.path, self.headers, body)
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(answer.body)))
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(answer.body)

        do_GET = do_HEAD = do_POST = _serve

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
            """Stay quiet: :attr:`LocalHub.requests` records what was served."""

    return LocalHubRequestHandler


_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


class StaticFileServer(LoopbackServer):
    """A raw-file host on 127.0.0.1 (like raw.githubusercontent.com) for tests.

    It answers ``GET``/``HEAD`` of the paths in :attr:`files` with their bytes: the whole file (200), or one byte
    range ``Range: bytes=START-[END]`` (206, with ``Content-Range``); anything else is a 404.

    Attributes:
        files: ``"/path/in/the/repository"`` -> content.
        requests: ``(method, path, Range header or None)`` of every request, in order.
        stall_after: when set, a ``GET`` answer stops after sending this many bytes of the file, sets
            :attr:`stalled` and waits for :attr:`resume` before sending the rest: a download caught in mid-flight.
    """

    def __init__(self, files: Mapping[str, bytes] | None = None) -> None:
        super().__init__()
        self.files: dict[str, bytes] = dict(files or {})
        self.requests: list[tuple[str, str, str | None]] = []
        self.stall_after: int | None = None
        self.stalled = threading.Event()
        self.resume = threading.Event()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        return _make_static_handler(self)

    def stop(self) -> None:
        """Stop serving and release the port (a stalled answer is released first)."""
        self.resume.set()
        super().stop()


def _make_static_handler(server: StaticFileServer) -> type[BaseHTTPRequestHandler]:
    """An HTTP/1.1 request handler class bound to ``server``."""

    class StaticFileHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            path = urlsplit(self.path).path
            requested_range = self.headers.get("Range")
            server.requests.append((self.command, path, requested_range))
            content = server.files.get(path)
            if content is None:
                self._answer(404, b"Not Found", {})
                return
            start, end = 0, len(content) - 1
            match = _RANGE.fullmatch(requested_range.strip()) if requested_range else None
            if match:
                start, end = int(match.group(1)), min(int(match.group(2) or end), end)
                if start > end:
                    self._answer(416, b"", {"Content-Range": f"bytes */{len(content)}"})
                    return
            headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            if match:
                headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            self._answer(206 if match else 200, content[start : end + 1], headers)

        def _answer(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command == "HEAD":
                return
            try:
                if server.stall_after is not None and status in (200, 206) and len(body) > server.stall_after:
                    self.wfile.write(body[: server.stall_after])
                    self.wfile.flush()
                    server.stalled.set()
                    server.resume.wait(timeout=60)
                    body = body[server.stall_after :]
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        do_GET = do_HEAD = _serve

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
            """Stay quiet: :attr:`StaticFileServer.requests` records what was served."""

    return StaticFileHandler
