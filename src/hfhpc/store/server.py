"""A read-only, Hub-compatible HTTP server of a store, so that unchanged client code stages from it.

Compute nodes of an air-gapped cluster cannot reach huggingface.co, but they can often reach a login
node. Pointing ``HF_ENDPOINT`` at this server lets ``snapshot_download``, ``hf_hub_download``,
``from_pretrained`` and ``load_dataset`` fetch what the store holds as if it were the Hub.

Only what the clients use is answered (docs/hub-protocol.md says what each client needs and why):

``GET  /api/{models|datasets|spaces}/{id}[/revision/{rev}]``    repository info with ``sha`` and siblings
``GET  /api/{t}/{id}/tree/{rev}[/{path}]?recursive=``           the files and folders of a snapshot
``POST /api/{t}/{id}/paths-info/{rev}``                         a read (HfFileSystem.info uses it)
``HEAD|GET /[datasets/|spaces/]{id}/resolve/{rev}/{path}``      file bytes, with Range support

Everything is served from ``hub/`` of the store; nothing is ever written. The standard library is the
only dependency: a login node may have nothing else installed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import mimetypes
import os
import re
import signal
import socket
import socketserver
import stat
import sys
import threading
import types
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from hfhpc.errors import UsageError
from hfhpc.atomic import TMP_PREFIX
from hfhpc.store.cache import read_tree
from hfhpc.store.layout import (
    SHA1_RE,
    SHA256_RE,
    FileEntry,
    git_blob_sha1,
    git_sha1_file,
    is_lfs_path,
    lfs_pointer,
    read_ref,
    repo_dir,
    repo_id_problem,
    revision_problem,
    sha256_file,
)

DEFAULT_REVISION = "main"
API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
# The first path segment that marks a non-model repository in a resolve URL.
RESOLVE_PREFIXES = {"datasets": "dataset", "spaces": "space"}
API_ACTIONS = ("revision", "tree", "paths-info")
MAX_POST_BODY = 1024 * 1024
# Idle keep-alive connections give their thread back after this long.
CONNECTION_TIMEOUT_S = 120.0
# ASCII digits only: str.isdigit() also accepts digits int() refuses ("²").
_RANGE_RE = re.compile(r"bytes\s*=\s*([0-9]*)\s*-\s*([0-9]*)\s*", re.IGNORECASE)
_DIGITS_RE = re.compile(r"[0-9]+")


class HubError(Exception):
    """An answer other than 2xx, in the Hub's shape: JSON ``{"error": ...}`` plus ``X-Error-Code``.

    huggingface_hub maps the code to its exception classes, and transformers and datasets rely on
    ``EntryNotFound`` when they probe optional files; ``commit`` goes out as ``X-Repo-Commit`` so the
    client can remember the missing file for that commit.
    """

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        commit: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.commit = commit
        self.headers = headers or {}


def _repo_not_found(repo_type: str, repo_id: str) -> HubError:
    return HubError(404, f"{repo_type} {repo_id} is not in this store", "RepoNotFound")


def _revision_not_found(repo_type: str, repo_id: str, revision: str) -> HubError:
    return HubError(404, f"revision {revision} of {repo_type} {repo_id} is not in this store", "RevisionNotFound")


def _entry_not_found(path: str, commit: str) -> HubError:
    return HubError(404, f"{path} does not exist at commit {commit}", "EntryNotFound", commit)


def hub_date(timestamp: float) -> str:
    """The Hub's date format (milliseconds, ``Z``), which huggingface_hub's ``parse_datetime`` expects."""
    moment = _dt.datetime.fromtimestamp(timestamp, tz=_dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def git_tree_sha1(children: list[tuple[str, bool, str]]) -> str:
    """The git tree object id of a folder from its ``(name, is_dir, oid)`` children.

    This is the id the Hub reports for a folder when the store holds the whole folder; for a subset
    it is still stable, which is all the clients need.
    """
    # Git sorts entries by name, comparing a folder as if its name ended with "/".
    ordered = sorted(children, key=lambda c: (c[0] + "/" if c[1] else c[0]).encode())
    body = b"".join(
        (b"40000 " if is_dir else b"100644 ") + name.encode() + b"\0" + bytes.fromhex(oid)
        for name, is_dir, oid in ordered
    )
    return hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()


def safe_parts(path: str) -> list[str] | None:
    """The segments of a repository path, or None when it could leave its folder.

    Refuses absolute paths, ``.``/``..``, empty segments, backslashes (a Windows separator) and NUL.
    """
    if not path:
        return []
    if path.startswith("/") or "\\" in path or "\0" in path:
        return None
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return None
    return parts


def _is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@dataclass(frozen=True)
class Repo:
    repo_type: str
    repo_id: str
    folder: Path


@dataclass(frozen=True)
class StoredFile:
    """A file of a snapshot as served: its metadata and where its bytes are."""

    entry: FileEntry
    real_path: str

    def tree_json(self) -> dict:
        info: dict = {"type": "file", "oid": self.entry.blob_id, "size": self.entry.size, "path": self.entry.path}
        if self.entry.lfs_sha256:
            pointer = lfs_pointer(self.entry.lfs_sha256, self.entry.size)
            info["lfs"] = {"oid": self.entry.lfs_sha256, "size": self.entry.size, "pointerSize": len(pointer)}
        return info

    def sibling_json(self) -> dict:
        # Siblings name the LFS hash "sha256" where tree entries name it "oid": both as the Hub does.
        info: dict = {"rfilename": self.entry.path, "size": self.entry.size, "blobId": self.entry.blob_id}
        if self.entry.lfs_sha256:
            pointer = lfs_pointer(self.entry.lfs_sha256, self.entry.size)
            info["lfs"] = {"sha256": self.entry.lfs_sha256, "size": self.entry.size, "pointerSize": len(pointer)}
        return info


class StoreReader:
    """Read-only queries on a store: repositories, revisions, snapshot files and their metadata.

    Thread-safe; the two caches only avoid repeated work (parsing a large tree listing on every file
    request, hashing a snapshot file that is a plain copy instead of a link to a named blob).
    """

    def __init__(self, store: Path, *, cache_size: int = 64):
        self.store = Path(store)
        self._lock = threading.Lock()
        self._cache_size = cache_size
        self._trees: OrderedDict[tuple, dict[str, FileEntry]] = OrderedDict()
        self._hashed: OrderedDict[tuple, FileEntry] = OrderedDict()

    # -- repositories and revisions ---------------------------------------------------------------

    def repo(self, repo_type: str, repo_id: str) -> Repo | None:
        if repo_id_problem(repo_id) is not None:
            return None
        folder = repo_dir(self.store, repo_type, repo_id)
        return Repo(repo_type, repo_id, folder) if (folder / "snapshots").is_dir() else None

    def commit(self, repo: Repo, revision: str) -> str | None:
        """The commit ``revision`` names in the store, only if its snapshot folder is there."""
        if revision_problem(revision) is not None:
            return None
        if not SHA1_RE.match(revision):
            # A ref file must stay inside refs/ (revision_problem refuses "..", this also refuses links).
            ref = os.path.realpath(repo.folder / "refs" / revision)
            if not _is_within(ref, os.path.realpath(repo.folder / "refs")):
                return None
        try:
            commit = read_ref(self.store, repo.repo_type, repo.repo_id, revision)
        except OSError:  # e.g. the revision names a folder of refs/ ("refs" when refs/refs/pr/1 exists)
            return None
        if commit is None or not SHA1_RE.match(commit):
            return None
        return commit if (repo.folder / "snapshots" / commit).is_dir() else None

    def snapshot_time(self, repo: Repo, commit: str) -> float:
        return (repo.folder / "snapshots" / commit).stat().st_mtime

    # -- files ------------------------------------------------------------------------------------

    def file(self, repo: Repo, commit: str, path: str) -> StoredFile | None:
        """The snapshot file at ``path``, or None when absent, not a regular file, or outside the repo."""
        parts = safe_parts(path)
        if not parts:
            return None
        snapshot = repo.folder / "snapshots" / commit
        return self._stored_file(repo, commit, snapshot.joinpath(*parts), "/".join(parts))

    def files(self, repo: Repo, commit: str) -> list[StoredFile]:
        """Every file the snapshot really holds, sorted by path (a store may hold a subset of a repo)."""
        snapshot = repo.folder / "snapshots" / commit
        found: list[StoredFile] = []
        for root, dirs, names in os.walk(snapshot, followlinks=False):
            # os.walk does not descend into linked folders but still names them: drop them, as well as
            # anything a writer has not finished (hfhpc's temporary names).
            dirs[:] = sorted(
                d for d in dirs if not d.startswith(TMP_PREFIX) and not os.path.islink(os.path.join(root, d))
            )
            rel_root = os.path.relpath(root, snapshot)
            for name in sorted(names):
                if name.startswith(TMP_PREFIX):
                    continue
                rel = name if rel_root == "." else f"{rel_root.replace(os.sep, '/')}/{name}"
                stored = self._stored_file(repo, commit, Path(root) / name, rel)
                if stored is not None:
                    found.append(stored)
        found.sort(key=lambda f: f.entry.path)
        return found

    def _stored_file(self, repo: Repo, commit: str, location: Path, rel: str) -> StoredFile | None:
        real = os.path.realpath(location)
        # The link must land inside this repository's folder (normally in blobs/): never serve a file a
        # crafted or stray link points at elsewhere on the machine.
        if not _is_within(real, os.path.realpath(repo.folder)):
            return None
        try:
            st = os.stat(real)
        except OSError:
            return None  # a link whose blob is gone: not part of the snapshot
        if not stat.S_ISREG(st.st_mode):
            return None
        return StoredFile(self._entry(repo, commit, location, rel, st), real)

    def _entry(self, repo: Repo, commit: str, location: Path, rel: str, st: os.stat_result) -> FileEntry:
        # The blob's name is the file's etag: 64 hex digits is an LFS sha256, 40 a git blob sha1. It
        # describes the very bytes being served, so it wins over a tree listing that disagrees.
        name_etag: str | None = None
        with contextlib.suppress(OSError):
            name = os.path.basename(os.readlink(location))
            if SHA256_RE.match(name) or SHA1_RE.match(name):
                name_etag = name
        listed = self._tree(repo, commit).get(rel)
        if listed is not None and listed.size == st.st_size and name_etag in (None, listed.etag):
            return listed
        if name_etag is not None and SHA256_RE.match(name_etag):
            pointer = lfs_pointer(name_etag, st.st_size)
            return FileEntry(rel, st.st_size, git_blob_sha1(pointer), name_etag)
        if name_etag is not None:
            return FileEntry(rel, st.st_size, name_etag)
        return self._hash(rel, location, st)

    def _tree(self, repo: Repo, commit: str) -> dict[str, FileEntry]:
        path = repo.folder / "trees" / f"{commit}.json"
        try:
            st = path.stat()
        except OSError:
            return {}
        key = (str(path), st.st_mtime_ns, st.st_size)
        with self._lock:
            cached = self._trees.get(key)
            if cached is not None:
                self._trees.move_to_end(key)
                return cached
        entries = read_tree(self.store, repo.repo_type, repo.repo_id, commit) or []
        table = {e.path: e for e in entries}
        with self._lock:
            self._trees[key] = table
            while len(self._trees) > self._cache_size:
                self._trees.popitem(last=False)
        return table

    def _hash(self, rel: str, location: Path, st: os.stat_result) -> FileEntry:
        """Metadata of a snapshot file that is a plain copy (no named blob, no listing): hash it once."""
        key = (os.path.realpath(location), st.st_size, st.st_mtime_ns, rel)
        with self._lock:
            cached = self._hashed.get(key)
        if cached is not None:
            return cached
        if is_lfs_path(rel, st.st_size):
            sha = sha256_file(Path(key[0]))
            entry = FileEntry(rel, st.st_size, git_blob_sha1(lfs_pointer(sha, st.st_size)), sha)
        else:
            entry = FileEntry(rel, st.st_size, git_sha1_file(Path(key[0])))
        with self._lock:
            self._hashed[key] = entry
            while len(self._hashed) > 4096:
                self._hashed.popitem(last=False)
        return entry


def tree_listing(files: list[StoredFile], folder: str, recursive: bool) -> list[dict] | None:
    """The Hub's tree answer for ``folder`` ("" is the root), or None when no file lies under it."""
    prefix = f"{folder}/" if folder else ""
    under = [f for f in files if f.entry.path.startswith(prefix)]
    if folder and not under:
        return None
    # Folder ids are git tree ids, computed bottom-up from every file under the folder.
    children: dict[str, dict[str, tuple[bool, str]]] = {}
    for f in under:
        parts = f.entry.path.split("/")
        for depth in range(len(parts) - 1):
            children.setdefault("/".join(parts[:depth]), {})
        children.setdefault("/".join(parts[:-1]), {})[parts[-1]] = (False, f.entry.blob_id)
    tree_ids: dict[str, str] = {}
    for dir_path in sorted(children, key=lambda p: p.count("/") + bool(p), reverse=True):
        entries = [(name, is_dir, oid) for name, (is_dir, oid) in children[dir_path].items()]
        tree_ids[dir_path] = git_tree_sha1(entries)
        if dir_path:
            parent, _, name = dir_path.rpartition("/")
            children.setdefault(parent, {})[name] = (True, tree_ids[dir_path])

    listing: list[dict] = []
    for dir_path in sorted(tree_ids):
        if dir_path.startswith(prefix) and dir_path != folder:
            if recursive or "/" not in dir_path[len(prefix) :]:
                listing.append({"type": "directory", "oid": tree_ids[dir_path], "size": 0, "path": dir_path})
    for f in under:
        if recursive or "/" not in f.entry.path[len(prefix) :]:
            listing.append(f.tree_json())
    return listing


def _unsatisfiable(header: str, size: int) -> HubError:
    message = f"range {header} is not satisfiable for a file of {size} bytes"
    return HubError(416, message, headers={"Content-Range": f"bytes */{size}"})


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)`` inclusive for a single ``Range: bytes=`` header, None to send the whole file.

    Raises :class:`HubError` 416 when the range starts past the end. Headers this server does not
    handle (several ranges, other units, bad syntax) are ignored, which RFC 9110 allows.
    """
    match = _RANGE_RE.fullmatch(header.strip()) if header else None
    if match is None:
        return None
    first, last = match.groups()
    if first == "":
        if last == "":
            return None
        suffix = int(last)  # the last N bytes
        if suffix == 0 or size == 0:
            raise _unsatisfiable(header, size)
        return max(size - suffix, 0), size - 1
    start = int(first)
    if last and int(last) < start:
        return None  # "bytes=5-2" is invalid, not unsatisfiable
    if start >= size:
        raise _unsatisfiable(header, size)
    end = int(last) if last else size - 1
    return start, min(end, size - 1)


@dataclass(frozen=True)
class Route:
    """A parsed request path: which repository, which endpoint, and the segments after it."""

    kind: str  # "api" (repo info), "revision", "tree", "paths-info" or "resolve"
    repo_type: str
    repo_id: str
    rest: list[str]  # unquoted segments after the endpoint name


class _NoRoute(Exception):
    pass


def split_path(raw_path: str) -> list[str]:
    """Split the raw path first, then unquote each segment: ``refs%2Fpr%2F1`` stays one segment."""
    try:
        return [unquote(part, errors="strict") for part in raw_path.split("/")[1:]]
    except UnicodeDecodeError as e:
        raise HubError(400, "the request path is not valid UTF-8") from e


def route(segments: list[str], repo_exists: Callable[[str, str], bool]) -> Route:
    """Find the repository and endpoint in ``segments``.

    An id is "name" or "org/name", so ``/api/models/a/tree/main`` could be model "a" or "a/tree":
    both readings are tried and one whose repository exists wins, else the first well-formed one.
    """
    api = len(segments) >= 3 and segments[0] == "api" and segments[1] in API_TYPES
    if api:
        repo_type, parts = API_TYPES[segments[1]], segments[2:]
    elif segments and segments[0] in RESOLVE_PREFIXES:
        repo_type, parts = RESOLVE_PREFIXES[segments[0]], segments[1:]
    else:
        repo_type, parts = "model", segments

    candidates: list[Route] = []
    for n in (2, 1):
        if len(parts) < n:
            continue
        kind = _endpoint(parts[n:], api)
        repo_id = "/".join(parts[:n])
        if kind is not None and all("/" not in p for p in parts[:n]) and repo_id_problem(repo_id) is None:
            rest = parts[n:] if kind == "api" else parts[n + 1 :]
            candidates.append(Route(kind, repo_type, repo_id, rest))
    if not candidates:
        raise _NoRoute
    for candidate in candidates:
        if repo_exists(candidate.repo_type, candidate.repo_id):
            return candidate
    return candidates[0]


def _endpoint(tail: list[str], api: bool) -> str | None:
    """Which endpoint the segments after a repository id name, if they are well formed."""
    if api:
        if not tail:
            return "api"
        return tail[0] if tail[0] in API_ACTIONS and len(tail) >= 2 else None
    return "resolve" if len(tail) >= 3 and tail[0] == "resolve" else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every answer carries Content-Length
    server_version = "hfhpc-store"
    timeout = CONNECTION_TIMEOUT_S
    server: _StoreHTTPServer
    _headers_sent = False

    def setup(self) -> None:
        super().setup()
        # Headers and a small body go out in separate writes: without TCP_NODELAY, Nagle plus delayed
        # ACKs add ~40 ms to each small answer, which dominates when staging many small files.
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # -- methods ----------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_POST(self) -> None:
        self._answer(head=False)

    def do_PUT(self) -> None:
        self._answer(head=False)

    def do_DELETE(self) -> None:
        self._answer(head=False)

    def do_PATCH(self) -> None:
        self._answer(head=False)

    def _write_refused(self) -> HubError:
        # The body is left unread: close the connection rather than parse it as the next request.
        self.close_connection = True
        return HubError(405, f"{self.command} is not allowed: this server is a read-only store")

    def log_message(self, format: str, *args: object) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    # -- dispatch ---------------------------------------------------------------------------------

    def end_headers(self) -> None:
        self._headers_sent = True
        super().end_headers()

    def _answer(self, head: bool) -> None:
        self._headers_sent = False
        try:
            try:
                self._dispatch(head)
            except HubError as e:
                if self._headers_sent:
                    raise
                self._send_error(e, head)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client went away mid-answer
        except Exception as e:  # a bug or a broken store: answer 500 and say why on the server's side
            self.close_connection = True
            sys.stderr.write(f"hfhpc store server: error answering {self.command} {self.path}: {e!r}\n")
            if not self._headers_sent:  # else the client sees a short body and the connection close
                with contextlib.suppress(OSError):
                    self._send_error(HubError(500, "internal error of the store server"), head)

    def _dispatch(self, head: bool) -> None:
        split = urlsplit(self.path)
        if not split.path.startswith("/"):
            raise HubError(400, "the request path must start with '/'")
        segments = split_path(split.path)
        query = parse_qs(split.query)
        reader = self.server.reader

        if segments in (["api", "whoami-v2"], ["api", "agent-harnesses"]) and self.command not in ("GET", "HEAD"):
            raise self._write_refused()
        if segments == ["api", "whoami-v2"]:
            # No accounts here: answer like the Hub does without a valid token.
            raise HubError(401, "Invalid username or password.")
        if segments == ["api", "agent-harnesses"]:
            # huggingface_hub fetches this registry for its user agent at most once a day when it gets
            # an answer; an empty one spares every new process the request.
            self._send_json(200, {"standardEnvVars": [], "harnesses": {}}, head)
            return
        try:
            found = route(segments, lambda t, i: reader.repo(t, i) is not None)
        except _NoRoute:
            if self.command not in ("GET", "HEAD"):
                raise self._write_refused() from None
            raise HubError(404, f"{split.path} is not an endpoint of this server") from None
        # paths-info is the one read that takes POST; every other method but GET/HEAD is a write.
        form: dict = {}
        if found.kind == "paths-info":
            if self.command != "POST":
                raise HubError(405, "paths-info takes POST")
            form = self._read_form()
        elif self.command not in ("GET", "HEAD"):
            raise self._write_refused()

        repo = reader.repo(found.repo_type, found.repo_id)
        if repo is None:
            raise _repo_not_found(found.repo_type, found.repo_id)

        if found.kind == "api":
            self._repo_info(repo, DEFAULT_REVISION, head)
        elif found.kind == "revision":
            self._repo_info(repo, "/".join(found.rest), head)
        elif found.kind == "tree":
            commit, tail = self._resolve_revision(repo, found.rest, min_tail=0)
            recursive = query.get("recursive", ["false"])[-1].lower() in ("true", "1")
            expand = query.get("expand", ["false"])[-1].lower() in ("true", "1")
            self._tree(repo, commit, "/".join(tail), recursive, expand, head)
        elif found.kind == "paths-info":
            commit, _ = self._resolve_revision(repo, found.rest, min_tail=0)
            self._paths_info(repo, commit, form)
        else:
            commit, tail = self._resolve_revision(repo, found.rest, min_tail=1)
            self._resolve(repo, commit, "/".join(tail), head)

    def _resolve_revision(self, repo: Repo, rest: list[str], min_tail: int) -> tuple[str, list[str]]:
        """Split ``rest`` into a revision and what follows, and resolve the revision to a commit.

        Clients percent-encode the revision into one segment; one typed by hand (``refs/pr/1``
        unencoded) spans several, so longer revisions are tried when the shortest does not resolve.
        """
        for k in range(1, len(rest) - min_tail + 1):
            commit = self.server.reader.commit(repo, "/".join(rest[:k]))
            if commit is not None:
                return commit, rest[k:]
        raise _revision_not_found(repo.repo_type, repo.repo_id, rest[0])

    # -- endpoints --------------------------------------------------------------------------------

    def _repo_info(self, repo: Repo, revision: str, head: bool) -> None:
        reader = self.server.reader
        commit = reader.commit(repo, revision)
        if commit is None:
            raise _revision_not_found(repo.repo_type, repo.repo_id, revision)
        date = hub_date(reader.snapshot_time(repo, commit))
        author = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
        info: dict = {
            "_id": commit,
            "id": repo.repo_id,
            "author": author,
            "sha": commit,
            "lastModified": date,
            "createdAt": date,
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [f.sibling_json() for f in reader.files(repo, commit)],
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        self._send_json(200, info, head, commit=commit)

    def _tree(self, repo: Repo, commit: str, folder: str, recursive: bool, expand: bool, head: bool) -> None:
        parts = safe_parts(folder.strip("/"))
        if parts is None:
            raise HubError(400, f"invalid path {folder!r}")
        folder = "/".join(parts)
        listing = tree_listing(self.server.reader.files(repo, commit), folder, recursive)
        if listing is None:
            raise _entry_not_found(folder, commit)
        if expand:
            self._add_last_commit(repo, commit, listing)
        self._send_json(200, listing, head, commit=commit)

    def _paths_info(self, repo: Repo, commit: str, form: dict) -> None:
        paths = form.get("paths", [])
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise HubError(400, "paths must be a list of strings")
        expand = str(form.get("expand", "false")).lower() in ("true", "1")
        files = self.server.reader.files(repo, commit)
        answer: list[dict] = []
        for raw in paths:
            parts = safe_parts(str(raw).strip("/"))
            if not parts:
                continue  # missing or invalid paths are left out, as the Hub leaves out missing ones
            path = "/".join(parts)
            parent = "/".join(parts[:-1])
            siblings = tree_listing(files, parent, recursive=False) or []
            answer.extend(e for e in siblings if e["path"] == path)
        if expand:
            self._add_last_commit(repo, commit, answer)
        self._send_json(200, answer, False, commit=commit)

    def _read_form(self) -> dict:
        """The body of a paths-info POST: form-encoded (huggingface_hub) or JSON (other clients)."""
        length = self.headers.get("Content-Length")
        if length is None or not _DIGITS_RE.fullmatch(length.strip()):
            self.close_connection = True
            raise HubError(411, "a Content-Length is required")
        if int(length) > MAX_POST_BODY:
            self.close_connection = True
            raise HubError(413, "the request body is too large")
        body = self.rfile.read(int(length))
        if "json" in self.headers.get("Content-Type", ""):
            try:
                data = json.loads(body or b"{}")
            except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser goes
                raise HubError(400, "the request body is not valid JSON") from e
            if not isinstance(data, dict):
                raise HubError(400, "the request body must be a JSON object")
            return data
        form = parse_qs(body.decode("utf-8", errors="replace"))
        return {"paths": form.get("paths", []), "expand": form.get("expand", ["false"])[-1]}

    def _add_last_commit(self, repo: Repo, commit: str, listing: list[dict]) -> None:
        # The store keeps no history: the snapshot's own commit is the last one anybody can know.
        date = hub_date(self.server.reader.snapshot_time(repo, commit))
        for entry in listing:
            entry["lastCommit"] = {"id": commit, "title": "", "date": date}

    def _resolve(self, repo: Repo, commit: str, path: str, head: bool) -> None:
        if safe_parts(path) is None:
            raise HubError(400, f"invalid path {path!r}")
        stored = self.server.reader.file(repo, commit, path)
        if stored is None:
            raise _entry_not_found(path, commit)
        entry = stored.entry
        # Open first, then take the size from the open file: it is what will be sent.
        with open(stored.real_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            span = parse_range(self.headers.get("Range"), size)
            start, end = span if span is not None else (0, size - 1)
            length = end - start + 1 if size else 0
            self.send_response(206 if span is not None else 200)
            self.send_header("Content-Type", mimetypes.guess_type(entry.path)[0] or "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{entry.etag}"')
            if entry.lfs_sha256:
                self.send_header("X-Linked-Etag", f'"{entry.lfs_sha256}"')
                self.send_header("X-Linked-Size", str(entry.size))
            if span is not None:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if head or length == 0:
                return
            # socket.sendfile uses the kernel's sendfile (no copy through Python) and falls back to
            # reads and sends where that is unavailable.
            sent = self.connection.sendfile(f, offset=start, count=length)
            if sent != length:
                self.close_connection = True  # the file shrank under us: the length promised is wrong

    # -- answers ----------------------------------------------------------------------------------

    def _send_json(self, status: int, payload: object, head: bool, commit: str | None = None) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _send_error(self, error: HubError, head: bool = False) -> None:
        body = json.dumps({"error": error.message}).encode()
        self.send_response(error.status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if error.code:
            self.send_header("X-Error-Code", error.code)
        if error.commit:
            self.send_header("X-Repo-Commit", error.commit)
        if error.status == 405:
            self.send_header("Allow", "GET, HEAD")
        for name, value in error.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)


class _StoreHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never keeps the process alive
    allow_reuse_address = True
    request_queue_size = 128  # snapshot_download opens several connections at once

    def __init__(self, address: tuple[str, int], reader: StoreReader, verbose: bool):
        self.reader = reader
        self.verbose = verbose
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn, which can hang for minutes where DNS is not
        # answered (an air-gapped cluster); the name is only used for logging.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class _StoreHTTPServer6(_StoreHTTPServer):
    address_family = socket.AF_INET6


class StoreServer:
    """Serve ``store`` read-only over HTTP as a Hugging Face Hub endpoint.

    ``port=0`` picks a free port; :attr:`url` tells which. Use :meth:`start`/:meth:`stop` (or ``with``)
    to serve from a background thread, :meth:`serve_forever` to serve from the calling thread.
    """

    def __init__(self, store: Path, host: str = "127.0.0.1", port: int = 0, *, verbose: bool = False):
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise UsageError(f"port {port!r} is not a TCP port", "choose a port from 0 (any free one) to 65535")
        self.store = Path(store)
        if not self.store.is_dir():
            raise UsageError(f"{self.store} is not a folder", "pass the store folder (HFHPC_STORE or --store)")
        server_class = _StoreHTTPServer6 if ":" in host else _StoreHTTPServer
        try:
            self._httpd = server_class((host, port), StoreReader(self.store), verbose)
        except (OSError, UnicodeError) as e:  # UnicodeError: a host name no resolver accepts
            problem = f"cannot listen on {host}:{port} ({e.strerror or e})"
            raise UsageError(problem, "choose another --port or --host") from e
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> StoreServer:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.1},
                name="hfhpc-store-server",
                daemon=True,
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        try:
            self._httpd.serve_forever(poll_interval=0.2)
        finally:
            self._httpd.server_close()

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> StoreServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(store: Path, host: str = "127.0.0.1", port: int = 8080, *, verbose: bool = False) -> None:
    """Serve ``store`` until SIGINT or SIGTERM (the CLI's ``serve`` command)."""
    server = StoreServer(store, host, port, verbose=verbose)

    def _stop(signum: int, frame: types.FrameType | None) -> None:
        raise KeyboardInterrupt

    # SIGTERM (what SLURM and kill send) stops the server like Ctrl-C; only the main thread may set it.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop) if in_main else None
    print(f"serving {server.store} at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
