"""A small local stand-in for the Hugging Face Hub's upload endpoints, for tests.

``LocalHub`` runs a ``ThreadingHTTPServer`` on 127.0.0.1 (OS-chosen port) in a daemon thread and
answers the calls that ``huggingface_hub`` 2.4 makes for ``create_repo``, ``upload_folder``,
``upload_file``, ``create_commit``, ``model.push_to_hub`` and ``Trainer.push_to_hub``. Each repo's
current files are real files under ``root``::

    with LocalHub(tmp_path / "hub") as hub:
        env = hub.client_env(hf_home=tmp_path / "hf_home")   # env for a client *subprocess*
        subprocess.run([sys.executable, "train.py"], env=env, check=True)
        assert (hub.repo_dir("user/demo") / "config.json").is_file()
        print(hub.commits("user/demo")[-1].message)

The client must be a separate process: ``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``,
``HF_HUB_DISABLE_XET``... once, at import time (see ``client_env``).

Protocol notes (huggingface_hub 2.4, read from its source):

* Upload mode is decided by the server: ``POST /api/{type}s/{repo}/preupload/{rev}`` answers
  ``uploadMode`` per file. The client obeys ``"regular"`` whatever the size or extension (only empty
  files are forced to regular client-side), and then sends the content base64-encoded inside the
  ndjson body of ``POST /api/{type}s/{repo}/commit/{rev}``. So no LFS batch / Xet endpoint is needed
  and none is implemented. The preupload answer must carry ``shouldIgnore`` for every file (the
  client indexes it unconditionally) and may carry ``oid`` (git blob sha1 of the remote file): when
  it equals the local file's sha1 the client drops that file from the commit as unchanged.
* With ``hf_xet`` installed (it is) and ``HF_HUB_DISABLE_XET`` unset, ``upload_folder`` goes through
  a pipelined, possibly multi-commit uploader (``_upload_pipeline``); with ``HF_HUB_DISABLE_XET=1`` it
  makes one ``create_commit``. Both work against this server (regular mode never touches Xet).
* ``create_repo(exist_ok=True)`` treats a 409 as "exists" but still parses the 409 body and needs its
  ``"url"`` key. On 401/403 with ``exist_ok`` it falls back to ``repo_info``.
* ``model.push_to_hub`` first downloads the remote ``README.md`` (HEAD+GET
  ``/{repo}/resolve/main/README.md``) to update it; a missing file is answered 404 with
  ``X-Error-Code: EntryNotFound`` (-> ``RemoteEntryNotFoundError``), a found one needs the
  ``X-Repo-Commit`` and ``ETag`` headers or the client refuses it.
* ``create_commit`` (not the Xet pipeline) validates a committed ``README.md`` via
  ``POST /api/validate-yaml``.

* A 401 on a repo endpoint becomes ``RepositoryNotFoundError`` client-side only for ``https://``
  endpoints; against this ``http://`` server it stays a plain ``HfHubHTTPError`` (status 401) whose
  text includes the server's message.

Not supported: LFS/Xet transfers, ``lfsFile`` commit lines, pull requests (``create_pr=1``), branches,
tags and history endpoints all get the 404 "endpoint not implemented" answer naming method and path
(and are listed in ``LocalHub.unhandled``); revisions other than ``main`` (or the head sha, for
reads) get 404 ``RevisionNotFound``; ``.gitignore`` is not applied (``shouldIgnore`` is always false).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubCommit", "LocalHub"]

_URL_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_REPO_TYPES = ("model", "dataset", "space")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Env vars that would make a client subprocess talk to (or authenticate against) something else.
_INTERFERING_ENV = (
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_OIDC_RESOURCE",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    "HUGGINGFACE_CO_STAGING",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_XET_CACHE",
    "HF_XET_HIGH_PERFORMANCE",
)


@dataclass(frozen=True)
class HubCommit:
    """One commit as recorded by ``LocalHub``: ``added`` are the files written (new or overwritten),
    ``deleted`` the files removed (folders are expanded to the files they held)."""

    oid: str
    message: str
    description: str
    added: tuple[str, ...]
    deleted: tuple[str, ...]


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: list[HubCommit]
    last_modified: str = ""

    @property
    def head(self) -> str:
        return self.commits[-1].oid


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.extra = extra


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _clean_repo_path(path: Any) -> str:
    """Validate a path inside a repo (posix, relative, no '..', not under .git)."""
    if not isinstance(path, str) or not path.strip("/"):
        raise _HTTPError(400, f"LocalHub: invalid path in repo: {path!r}")
    if path.startswith("/") or "\\" in path or "\0" in path:
        raise _HTTPError(400, f"LocalHub: invalid path in repo: {path!r}")
    parts = PurePosixPath(path.rstrip("/")).parts
    if any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise _HTTPError(400, f"LocalHub: invalid path in repo: {path!r}")
    return "/".join(parts)


class LocalHub:
    """Local Hub stand-in. See the module docstring.

    Args:
        root: directory holding the repos' current files (``<root>/<namespace>/<name>/<path>`` for
            models, ``<root>/datasets/<namespace>/<name>/...`` and ``<root>/spaces/...`` otherwise).
            Created if missing. Repo metadata (commits, visibility) lives in memory only.
        username: the user every accepted token belongs to (``whoami``; the namespace of
            ``create_repo("name")`` without a namespace).
        token: the only accepted ``Authorization: Bearer`` token; ``None`` accepts any non-empty
            token. Write endpoints answer 401 without a (valid) token.
        host: interface to bind.

    Attributes: ``url``, ``root``, ``username``, ``token``, ``requests`` (list of ``(method, path)``,
    path without query string, in arrival order), ``log`` (list of ``(method, path, status)``),
    ``unhandled`` (``(method, path)`` answered "not implemented").
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        username: str = "user",
        token: str | None = "hf_dummy",
        host: str = "127.0.0.1",
    ) -> None:
        self.root = Path(root).absolute()
        self.username = username
        self.token = token
        self.host = host
        self.requests: list[tuple[str, str]] = []
        self.log: list[tuple[str, str, int]] = []
        self.unhandled: list[tuple[str, str]] = []
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LocalHub:
        if self._server is not None:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        handler = type("_BoundHubHandler", (_HubHandler,), {"hub": self})
        server = ThreadingHTTPServer((self.host, 0), handler)
        server.daemon_threads = True
        self._server = server
        self.url = f"http://{self.host}:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="LocalHub", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ test helpers

    def repo_dir(self, repo_id: str, repo_type: str = "model") -> Path:
        """Directory holding the current files of ``repo_id`` (exists once the repo is created)."""
        namespace, name = self._split_repo_id(repo_id)
        base = self.root if repo_type == "model" else self.root / f"{repo_type}s"
        return base / namespace / name

    def commits(self, repo_id: str, repo_type: str = "model") -> list[HubCommit]:
        """Commits of ``repo_id``, oldest first. The first one is the empty "initial commit" made
        by repo creation. Raises ``KeyError`` if the repo does not exist."""
        repo_id = "/".join(self._split_repo_id(repo_id))
        with self._lock:
            return list(self._repos[(repo_type, repo_id)].commits)

    def repos(self) -> list[tuple[str, str]]:
        """``(repo_type, repo_id)`` of every repo created so far."""
        with self._lock:
            return sorted(self._repos)

    def client_env(
        self,
        hf_home: str | os.PathLike,
        *,
        token: str | None = None,
        disable_xet: bool = True,
        base: dict[str, str] | None = None,
    ) -> dict[str, str]:
        """Environment for a client subprocess (``huggingface_hub``/``transformers``) talking to
        this hub. ``hf_home`` isolates the client's cache and token file from the user's. ``token``
        defaults to ``self.token`` (or ``"hf_dummy"``); pass ``token=""`` for a client without token.
        ``disable_xet=False`` leaves hf_xet active (``upload_folder`` then uses the pipelined
        uploader, which may split large folders into several commits)."""
        env = dict(os.environ if base is None else base)
        for key in _INTERFERING_ENV:
            env.pop(key, None)
        token = (self.token or "hf_dummy") if token is None else token
        env.update(
            {
                "HF_ENDPOINT": self.url,
                "HF_HOME": str(hf_home),
                # tests/conftest.py sets HF_HUB_OFFLINE=1 in the pytest process; a child would inherit it.
                "HF_HUB_OFFLINE": "0",
                "TRANSFORMERS_OFFLINE": "0",
                "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_ENABLE_HF_TRANSFER": "0",
                "HF_HUB_DISABLE_UPDATE_CHECK": "1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "NO_PROXY": ",".join(filter(None, ["127.0.0.1", "localhost", env.get("NO_PROXY", "")])),
            }
        )
        env["no_proxy"] = env["NO_PROXY"]
        if token:
            env["HF_TOKEN"] = token
        else:
            env.pop("HF_TOKEN", None)
        if disable_xet:
            env["HF_HUB_DISABLE_XET"] = "1"
        else:
            env.pop("HF_HUB_DISABLE_XET", None)
        return env

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _split_repo_id(repo_id: str) -> tuple[str, str]:
        parts = repo_id.split("/")
        if len(parts) != 2 or not all(_NAME_RE.match(p) for p in parts):
            raise ValueError(f"LocalHub: repo_id must be 'namespace/name', got {repo_id!r}")
        return parts[0], parts[1]

    def _repo_url(self, repo: _Repo) -> str:
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return f"{self.url}/{prefix}{repo.repo_id}"

    def _get_repo(self, repo_type: str, repo_id: str, authed: bool) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authed):
            raise _HTTPError(
                404,
                f"LocalHub: {repo_type} repository {repo_id!r} not found",
                {"X-Error-Code": "RepoNotFound"},
            )
        return repo

    def _check_revision(self, repo: _Repo, revision: str, *, write: bool) -> None:
        if revision == "main":
            return
        if not write and len(revision) >= 7 and repo.head.startswith(revision.lower()):
            return
        raise _HTTPError(
            404,
            f"LocalHub: revision {revision!r} not found in {repo.repo_id!r} (only 'main'"
            + ("" if write else " and the head commit sha")
            + " are supported)",
            {"X-Error-Code": "RevisionNotFound"},
        )

    def _files(self, repo: _Repo) -> dict[str, Path]:
        base = self.repo_dir(repo.repo_id, repo.repo_type)
        out: dict[str, Path] = {}
        if base.is_dir():
            for p in sorted(base.rglob("*")):
                if p.is_file():
                    out[p.relative_to(base).as_posix()] = p
        return out

    def _new_commit(self, repo: _Repo | None, message: str, description: str, added, deleted) -> HubCommit:
        seed = json.dumps(
            [repo.head if repo else None, message, description, sorted(added), sorted(deleted), time.time_ns()]
        )
        return HubCommit(
            oid=hashlib.sha1(seed.encode()).hexdigest(),
            message=message,
            description=description,
            added=tuple(sorted(added)),
            deleted=tuple(sorted(deleted)),
        )


class _HubHandler(BaseHTTPRequestHandler):
    hub: LocalHub  # set on the bound subclass
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    # ------------------------------------------------------------------ plumbing

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None, content_type: str | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type or "application/json")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.hub.log.append((self.command, self._path, status))

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _dispatch(self, method: str) -> None:
        hub = self.hub
        split = urlsplit(self.path)
        self._path = split.path
        self._query = parse_qs(split.query)
        hub.requests.append((method, split.path))
        try:
            self._body = self._read_body()
            for route_method, regex, func_name in _ROUTES:
                if method not in route_method:
                    continue
                match = regex.match(split.path)
                if match:
                    groups = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
                    getattr(self, func_name)(**groups)
                    return
            self._not_implemented()
        except _HTTPError as err:
            self._send_json(err.status, {"error": err.message, **err.extra}, err.headers)
        except Exception:  # pragma: no cover - surfaced to the client as a 500 with the traceback
            error = f"LocalHub internal error on {method} {split.path}:\n{traceback.format_exc()}"
            self._send_json(500, {"error": error})

    def _not_implemented(self, detail: str = "") -> None:
        self.hub.unhandled.append((self.command, self._path))
        msg = f"LocalHub: endpoint not implemented: {self.command} {self._path}{detail}"
        raise _HTTPError(404, msg)

    def _token(self) -> str | None:
        """The bearer token if present and valid, None if absent; 401 if present but invalid."""
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or (self.hub.token is not None and token != self.hub.token):
            raise _HTTPError(
                401,
                f"LocalHub: invalid credentials in Authorization header on {self.command} {self._path}",
                {"X-Error-Message": "Invalid credentials in Authorization header"},
            )
        return token

    def _require_token(self) -> str:
        token = self._token()
        if token is None:
            raise _HTTPError(
                401,
                f"LocalHub: missing 'Authorization: Bearer <token>' header on write endpoint "
                f"{self.command} {self._path}",
            )
        return token

    def _json_body(self) -> Any:
        try:
            return json.loads(self._body or b"null")
        except ValueError as err:
            raise _HTTPError(400, f"LocalHub: body of {self.command} {self._path} is not JSON: {err}") from err

    def _reject_create_pr(self) -> None:
        if self._query.get("create_pr", ["0"])[0] not in ("", "0", "false", "False"):
            self._not_implemented(" (create_pr=1: pull requests are not supported)")

    # ------------------------------------------------------------------ endpoints

    def whoami(self) -> None:
        self._require_token()
        hub = self.hub
        self._send_json(
            200,
            {
                "type": "user",
                "id": hashlib.sha1(hub.username.encode()).hexdigest()[:24],
                "name": hub.username,
                "fullname": hub.username,
                "isPro": False,
                "canPay": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
            },
        )

    def create_repo(self) -> None:
        self._require_token()
        hub = self.hub
        payload = self._json_body()
        if not isinstance(payload, dict):
            raise _HTTPError(400, "LocalHub: create repo payload must be a JSON object")
        name, namespace = payload.get("name"), payload.get("organization") or hub.username
        repo_type = payload.get("type") or "model"
        if repo_type not in _REPO_TYPES:
            raise _HTTPError(400, f"LocalHub: unsupported repo type {repo_type!r}")
        if not isinstance(name, str) or not _NAME_RE.match(name) or not _NAME_RE.match(namespace):
            raise _HTTPError(400, f"LocalHub: invalid repo name {namespace!r}/{name!r}")
        repo_id = f"{namespace}/{name}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        with hub._lock:
            existing = hub._repos.get((repo_type, repo_id))
            if existing is not None:
                # `create_repo(exist_ok=True)` accepts the 409 but still reads `url` from this body.
                self._send_json(
                    409,
                    {"error": f"You already created this {repo_type} repo", "url": hub._repo_url(existing)},
                )
                return
            repo = _Repo(repo_type, repo_id, private, _now_iso(), [])
            repo.commits.append(hub._new_commit(None, "initial commit", "", [], []))
            hub._repos[(repo_type, repo_id)] = repo
            hub.repo_dir(repo_id, repo_type).mkdir(parents=True, exist_ok=True)
        self._send_json(200, {"url": hub._repo_url(repo), "name": repo_id, "id": repo.head[:24]})

    def delete_repo(self) -> None:
        self._require_token()
        hub = self.hub
        payload = self._json_body() or {}
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or hub.username}/{payload.get('name')}"
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id, authed=True)
            del hub._repos[(repo_type, repo_id)]
            shutil.rmtree(hub.repo_dir(repo.repo_id, repo_type), ignore_errors=True)
        self._send(200, b"", content_type="text/plain")

    def validate_yaml(self) -> None:
        payload = self._json_body() or {}
        content = payload.get("content") or ""
        errors = []
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, flags=re.S)
        if match:
            try:
                import yaml

                meta = yaml.safe_load(match.group(1))
                if meta is not None and not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except ImportError:  # pragma: no cover
                pass
            except Exception as err:
                errors.append({"message": f"invalid YAML metadata: {err}"})
        self._send_json(400 if errors else 200, {"errors": errors, "warnings": []})

    def repo_info(self, rtype: str, repo: str, revision: str | None = None) -> None:
        hub = self.hub
        repo_type = _URL_TYPES[rtype]
        with hub._lock:
            r = hub._get_repo(repo_type, repo, authed=self._token() is not None)
            if revision is not None:
                hub._check_revision(r, revision, write=False)
            files = hub._files(r)
            blobs = self._query.get("blobs", ["false"])[0].lower() in ("1", "true")
            siblings = []
            for path, fp in files.items():
                sib: dict[str, Any] = {"rfilename": path}
                if blobs:
                    data = fp.read_bytes()
                    sib.update(size=len(data), blobId=_git_blob_sha1(data))
                siblings.append(sib)
            info = {
                "_id": r.commits[0].oid[:24],
                "id": r.repo_id,
                "author": r.repo_id.split("/")[0],
                "sha": r.head,
                "lastModified": r.last_modified or r.created_at,
                "createdAt": r.created_at,
                "private": r.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            }
            if repo_type == "model":
                info["modelId"] = r.repo_id
        self._send_json(200, info)

    def _entry(self, base: Path, path: str) -> dict[str, Any]:
        fp = base / path
        if fp.is_dir():
            return {"type": "directory", "oid": hashlib.sha1(f"tree {path}".encode()).hexdigest(), "path": path}
        data = fp.read_bytes()
        return {"type": "file", "oid": _git_blob_sha1(data), "size": len(data), "path": path}

    def tree(self, rtype: str, repo: str, revision: str, path: str | None = None) -> None:
        hub = self.hub
        recursive = self._query.get("recursive", ["false"])[0].lower() in ("1", "true")
        with hub._lock:
            r = hub._get_repo(_URL_TYPES[rtype], repo, authed=self._token() is not None)
            hub._check_revision(r, revision, write=False)
            base = hub.repo_dir(r.repo_id, r.repo_type)
            start = base
            if path:
                path = _clean_repo_path(path)
                start = base / path
                if not start.is_dir():
                    raise _HTTPError(
                        404, f"LocalHub: folder {path!r} not found in {repo!r}", {"X-Error-Code": "EntryNotFound"}
                    )
            children = sorted(start.rglob("*") if recursive else start.iterdir())
            entries = [self._entry(base, c.relative_to(base).as_posix()) for c in children]
        self._send_json(200, entries)

    def paths_info(self, rtype: str, repo: str, revision: str) -> None:
        hub = self.hub
        form = parse_qs(self._body.decode())
        if not form and self._body:
            form = {"paths": (self._json_body() or {}).get("paths", [])}
        with hub._lock:
            r = hub._get_repo(_URL_TYPES[rtype], repo, authed=self._token() is not None)
            hub._check_revision(r, revision, write=False)
            base = hub.repo_dir(r.repo_id, r.repo_type)
            entries = []
            for raw in form.get("paths", []):
                path = _clean_repo_path(raw)
                if (base / path).exists():
                    entries.append(self._entry(base, path))
        self._send_json(200, entries)

    def preupload(self, rtype: str, repo: str, revision: str) -> None:
        self._require_token()
        self._reject_create_pr()
        hub = self.hub
        payload = self._json_body()
        if not isinstance(payload, dict) or not isinstance(payload.get("files"), list):
            raise _HTTPError(400, "LocalHub: preupload payload must be {'files': [...]}")
        with hub._lock:
            r = hub._get_repo(_URL_TYPES[rtype], repo, authed=True)
            hub._check_revision(r, revision, write=True)
            base = hub.repo_dir(r.repo_id, r.repo_type)
            files = []
            for item in payload["files"]:
                path = _clean_repo_path(item.get("path"))
                fp = base / path
                files.append(
                    {
                        "path": item["path"],
                        # "regular": the client then inlines the content in the commit call (no LFS/Xet).
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": _git_blob_sha1(fp.read_bytes()) if fp.is_file() else None,
                    }
                )
            head = r.head
        self._send_json(200, {"files": files, "commitOid": head})

    def commit(self, rtype: str, repo: str, revision: str) -> None:
        self._require_token()
        self._reject_create_pr()
        hub = self.hub
        header: dict[str, Any] | None = None
        ops: list[tuple[str, str, bytes | None]] = []
        for n, line in enumerate(self._body.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError) as err:
                raise _HTTPError(400, f"LocalHub: commit ndjson line {n} is malformed: {err}") from err
            if key == "header":
                header = value
            elif key == "file":
                path = _clean_repo_path(value.get("path"))
                encoding = value.get("encoding", "utf-8")
                try:
                    if encoding == "base64":
                        content = base64.b64decode(value["content"], validate=True)
                    else:
                        content = value["content"].encode("utf-8")
                except Exception as err:
                    raise _HTTPError(400, f"LocalHub: bad content for {path!r}: {err}") from err
                ops.append(("add", path, content))
            elif key == "deletedFile":
                ops.append(("delete", _clean_repo_path(value.get("path")), None))
            elif key == "deletedFolder":
                ops.append(("delete_folder", _clean_repo_path(value.get("path")), None))
            elif key == "lfsFile":
                self._not_implemented(
                    f" (lfsFile {value.get('path')!r}: LocalHub answers uploadMode='regular' and stores no LFS blobs)"
                )
            else:
                raise _HTTPError(400, f"LocalHub: unknown commit operation key {key!r} on line {n}")
        if header is None or not str(header.get("summary") or "").strip():
            raise _HTTPError(400, "LocalHub: commit payload has no header with a non-empty 'summary'")

        with hub._lock:
            r = hub._get_repo(_URL_TYPES[rtype], repo, authed=True)
            hub._check_revision(r, revision, write=True)
            parent = header.get("parentCommit")
            if parent and not r.head.startswith(str(parent).lower()):
                raise _HTTPError(412, f"LocalHub: parentCommit {parent} is not the head of main ({r.head})")
            base = hub.repo_dir(r.repo_id, r.repo_type)
            initial = set(hub._files(r))
            final = set(initial)
            writes: dict[str, bytes] = {}
            # Simulate first so that an invalid commit changes nothing.
            for kind, path, content in ops:
                if kind == "add":
                    final.add(path)
                    writes[path] = content  # type: ignore[assignment]
                elif kind == "delete":
                    if path not in final:
                        raise _HTTPError(
                            404,
                            f"LocalHub: cannot delete {path!r}: file not found in {repo!r}",
                            {"X-Error-Code": "EntryNotFound"},
                        )
                    final.discard(path)
                    writes.pop(path, None)
                else:
                    inside = {p for p in final if p.startswith(path + "/")}
                    if not inside:
                        raise _HTTPError(
                            404,
                            f"LocalHub: cannot delete folder {path!r}: not found in {repo!r}",
                            {"X-Error-Code": "EntryNotFound"},
                        )
                    final -= inside
                    for p in inside:
                        writes.pop(p, None)
            for p in final:
                parents = PurePosixPath(p).parents
                clash = [str(q) for q in parents if str(q) != "." and str(q) in final]
                if clash:
                    raise _HTTPError(400, f"LocalHub: {p!r} would live under file {clash[0]!r}")
            deleted = initial - final
            for p in deleted:
                (base / p).unlink()
            for p in deleted:
                d = (base / p).parent
                while d != base and d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
                    d = d.parent
            for p, content in writes.items():
                fp = base / p
                fp.parent.mkdir(parents=True, exist_ok=True)
                tmp = fp.with_name(f".{fp.name}.localhub-tmp")
                tmp.write_bytes(content)
                os.replace(tmp, fp)
            c = hub._new_commit(r, str(header["summary"]), str(header.get("description") or ""), writes, deleted)
            r.commits.append(c)
            r.last_modified = _now_iso()
        prefix = "" if r.repo_type == "model" else f"{r.repo_type}s/"
        self._send_json(
            200,
            {
                "success": True,
                "commitOid": c.oid,
                "commitUrl": f"{hub.url}/{prefix}{r.repo_id}/commit/{c.oid}",
                "hookOutput": "",
                "pullRequestUrl": None,
            },
        )

    def resolve(self, rtype: str | None, repo: str, revision: str, path: str) -> None:
        hub = self.hub
        with hub._lock:
            r = hub._get_repo(_URL_TYPES[rtype] if rtype else "model", repo, authed=self._token() is not None)
            hub._check_revision(r, revision, write=False)
            head = r.head
            fp = hub.repo_dir(r.repo_id, r.repo_type) / _clean_repo_path(path)
            if not fp.is_file():
                raise _HTTPError(
                    404,
                    f"LocalHub: entry {path!r} not found in {repo!r}",
                    {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": head},
                )
            data = fp.read_bytes()
        headers = {"X-Repo-Commit": head, "ETag": f'"{_git_blob_sha1(data)}"', "Accept-Ranges": "bytes"}
        status = 200
        rng = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if rng and rng.group(1):
            start = int(rng.group(1))
            end = min(int(rng.group(2)) if rng.group(2) else len(data) - 1, len(data) - 1)
            if start >= len(data):
                raise _HTTPError(416, "LocalHub: range not satisfiable", {"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        self._send(status, data, headers, content_type="application/octet-stream")


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_TYPE = r"(?P<rtype>models|datasets|spaces)"
_REV = r"(?P<revision>[^/]+)"
_ROUTES: list[tuple[tuple[str, ...], re.Pattern[str], str]] = [
    (("GET",), re.compile(r"^/api/whoami-v2$"), "whoami"),
    (("POST",), re.compile(r"^/api/repos/create$"), "create_repo"),
    (("DELETE",), re.compile(r"^/api/repos/delete$"), "delete_repo"),
    (("POST",), re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    (("GET",), re.compile(rf"^/api/{_TYPE}/{_REPO}$"), "repo_info"),
    (("GET",), re.compile(rf"^/api/{_TYPE}/{_REPO}/revision/{_REV}$"), "repo_info"),
    (("GET",), re.compile(rf"^/api/{_TYPE}/{_REPO}/tree/{_REV}(?:/(?P<path>.+))?$"), "tree"),
    (("POST",), re.compile(rf"^/api/{_TYPE}/{_REPO}/paths-info/{_REV}$"), "paths_info"),
    (("POST",), re.compile(rf"^/api/{_TYPE}/{_REPO}/preupload/{_REV}$"), "preupload"),
    (("POST",), re.compile(rf"^/api/{_TYPE}/{_REPO}/commit/{_REV}$"), "commit"),
    (
        ("GET", "HEAD"),
        re.compile(r"^/(?:(?P<rtype>datasets|spaces)/)?" + _REPO + rf"/resolve/{_REV}/(?P<path>.+)$"),
        "resolve",
    ),
]
