"""Download one repository revision from a Hub endpoint into the store.

huggingface_hub resolves the revision and lists the files; the bytes come over plain HTTP from the
``resolve`` endpoint (xet off: it hangs on cluster login nodes), hashed while they stream, written
under a temporary name and renamed into ``blobs/`` only once their size and hash match the listing.
A per-asset ``mkdir`` lock makes concurrent stages of the same asset wait for each other instead of
racing; huggingface_hub's own ``flock`` is not used, since Lustre and some NFS mounts lack it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from hfhpc import env as hfenv
from hfhpc.errors import (
    AuthError,
    ChecksumError,
    DiskFullError,
    EndpointUnreachableError,
    EntryNotFoundError,
    HfhpcError,
    InvalidRepoIdError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UsageError,
)
from hfhpc.atomic import DirLock, TMP_PREFIX, disk_errors, tmp_name
from hfhpc.store.cache import blob_path, install_blob_from, is_installed, link_snapshot, write_ref, write_tree
from hfhpc.store.layout import (
    REPO_TYPE,
    FileEntry,
    repo_dir,
    repo_folder_name,
    repo_id_problem,
    revision_problem,
    state_dir,
)
from hfhpc.store.validate import contained

URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
CHUNK = 4 * 1024 * 1024
RETRIES = 5  # attempts in a row without progress before a download gives up
MAX_CONNECTIONS = 50  # requests for one file in all, however each of them ended

# Files a model never needs for PyTorch loading; staged only when an include pattern asks for them.
MODEL_SKIP = (
    "*.onnx", "*.onnx_data", "onnx/*", "*.h5", "tf_model*", "*.msgpack", "flax_model*", "*.tflite",
    "*.gguf", "*.ot", "openvino/*", "*.mlmodel", "*.mlpackage/*", "coreml/*", "*.engine", "original/*",
)
# Weight formats superseded by safetensors when the repository has both.
LEGACY_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


@dataclass(frozen=True)
class AssetRequest:
    """What the user asked for: kind (model, dataset, metric), id, revision, include patterns."""

    kind: str
    repo_id: str
    revision: str = "main"
    include: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problem = repo_id_problem(self.repo_id)
        if problem:
            raise InvalidRepoIdError(self.repo_id, problem)
        problem = revision_problem(self.revision)
        if problem:
            raise UsageError(f"invalid revision {self.revision!r} for {self.repo_id}: {problem}")

    @property
    def repo_type(self) -> str:
        return REPO_TYPE[self.kind]

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.repo_id)


@dataclass
class StagedAsset:
    request: AssetRequest
    commit: str
    files: list[FileEntry]  # the staged subset
    sha256: dict[str, str] = field(default_factory=dict)  # path → sha256 of every staged file
    downloaded_bytes: int = 0
    downloaded_files: int = 0


@dataclass
class RemoteRevision:
    commit: str
    entries: list[FileEntry]


# -- talking to the endpoint -----------------------------------------------------------------

def _translate(exc: Exception, req: AssetRequest, endpoint: str) -> HfhpcError:
    """Map huggingface_hub / HTTP errors to typed errors (by type, never by message)."""
    from huggingface_hub import errors as hf_errors

    if isinstance(exc, hf_errors.GatedRepoError):
        return AuthError(req.kind, req.repo_id)
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return RevisionNotFoundError(req.kind, req.repo_id, req.revision)
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return RepoNotFoundError(req.kind, req.repo_id, endpoint)
    if isinstance(exc, hf_errors.EntryNotFoundError):
        return EntryNotFoundError(req.kind, req.repo_id, req.revision, "")
    if isinstance(exc, hf_errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return AuthError(req.kind, req.repo_id)
        return EndpointUnreachableError(endpoint, f"HTTP {status}")
    return EndpointUnreachableError(endpoint, type(exc).__name__ + (f": {exc}" if str(exc) else ""))


def _network_errors() -> tuple[type[BaseException], ...]:
    import httpx2

    from huggingface_hub import errors as hf_errors

    return (hf_errors.HfHubHTTPError, httpx2.HTTPError, OSError)


def resolve_remote(req: AssetRequest, endpoint: str, token: str | None) -> RemoteRevision:
    """The commit ``req.revision`` points to, and every file of the repository at that commit."""
    from hfhpc.store import hubapi

    commit = hubapi.resolve_commit(endpoint, req.repo_type, req.repo_id, req.revision, token)
    return RemoteRevision(commit=commit, entries=hubapi.list_files(endpoint, req.repo_type, req.repo_id, commit, token))


# -- choosing files --------------------------------------------------------------------------

def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, p.rstrip("/") + "/*") for p in patterns)


def select_files(kind: str, entries: list[FileEntry], include: Iterable[str] = ()) -> list[FileEntry]:
    """The files loading needs, or exactly those matching ``include``.

    Models skip other frameworks' weights and, when safetensors weights exist, the legacy pickles.
    """
    include = list(include)
    if include:
        chosen = [e for e in entries if _matches(e.path, include)]
        for pattern in include:
            if not any(_matches(e.path, [pattern]) for e in entries):
                raise EntryNotFoundError(kind, "", "", pattern)
        return chosen
    if kind != "model":
        return list(entries)
    chosen = [e for e in entries if not _matches(e.path, MODEL_SKIP)]
    # Decide per folder: a sentence-transformers repo may keep safetensors at the top and .bin elsewhere.
    folders_with_safetensors = {os.path.dirname(e.path) for e in chosen if e.path.endswith(".safetensors")}
    return [
        e
        for e in chosen
        if not (_matches(os.path.basename(e.path), LEGACY_WEIGHTS) and os.path.dirname(e.path) in folders_with_safetensors)
    ]


# -- downloading -----------------------------------------------------------------------------

class _Hasher:
    """sha256 always; the git blob sha1 too for files the listing identifies that way."""

    def __init__(self, entry: FileEntry):
        self.sha256 = hashlib.sha256()
        self.sha1 = None if entry.lfs_sha256 else hashlib.sha1(f"blob {entry.size}\0".encode())

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        if self.sha1 is not None:
            self.sha1.update(data)

    def check(self, req: AssetRequest, entry: FileEntry) -> str:
        digest = self.sha256.hexdigest()
        if entry.lfs_sha256 and digest != entry.lfs_sha256:
            raise ChecksumError(req.repo_id, entry.path, entry.lfs_sha256, digest)
        if self.sha1 is not None:
            got = self.sha1.hexdigest()
            if got != entry.blob_id:
                raise ChecksumError(req.repo_id, entry.path, entry.blob_id, got)
        return digest


def file_url(endpoint: str, req: AssetRequest, commit: str, path: str) -> str:
    return f"{endpoint}/{URL_PREFIX[req.repo_type]}{req.repo_id}/resolve/{commit}/{quote(path)}"


class _Sink:
    """Hashes on one thread and writes on another while the caller reads the next chunk.

    hashlib and file writes release the GIL, so on a fast network the download runs at the speed
    of the slowest of read, hash and write instead of their sum.
    """

    def __init__(self, out, entry: FileEntry, on_bytes: Callable[[int], None]):
        import queue
        import threading

        self.out, self.entry, self.on_bytes = out, entry, on_bytes
        self.hasher = _Hasher(entry)
        self.written = 0
        self.error: BaseException | None = None
        self._queues: list[queue.Queue] = [queue.Queue(maxsize=8), queue.Queue(maxsize=8)]
        self._threads = [
            threading.Thread(target=self._run, args=(self._queues[0], self._hash), daemon=True),
            threading.Thread(target=self._run, args=(self._queues[1], self._write), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _hash(self, chunk: bytes) -> None:
        self.hasher.update(chunk)

    def _write(self, chunk: bytes) -> None:
        self.out.write(chunk)
        self.written += len(chunk)
        self.on_bytes(len(chunk))

    def _run(self, q, work: Callable[[bytes], None]) -> None:
        while True:
            item = q.get()
            try:
                if item is None:
                    return
                if self.error is None:
                    work(item)
            except BaseException as e:  # noqa: BLE001 - handed over to the reading thread
                self.error = e
            finally:
                q.task_done()

    def put(self, chunk: bytes) -> None:
        if self.error is not None:
            raise self.error
        for q in self._queues:
            q.put(chunk)

    def flush(self) -> None:
        """Wait until everything queued is hashed and written; re-raise a write error."""
        for q in self._queues:
            q.join()
        if self.error is not None:
            raise self.error

    def reset(self) -> None:
        """The server ignored Range: throw away what was written and start the file again."""
        self.flush()
        self.out.seek(0)
        self.out.truncate()
        self.on_bytes(-self.written)
        self.hasher, self.written = _Hasher(self.entry), 0

    def close(self) -> None:
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()


class _NoRedirect:
    """urllib handler that hands redirects back to us: we follow them ourselves so that the token
    never travels to another host (the Hub redirects large files to a CDN)."""

    def __new__(cls):
        import urllib.request

        class Handler(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):
                return None

        return Handler()


def _opener():
    import urllib.request

    # The environment's proxies (http_proxy, https_proxy, no_proxy) apply, as for every HTTP client here.
    return urllib.request.build_opener(_NoRedirect())


def _open(opener, url: str, headers: dict[str, str], timeout: float = 60.0):
    """GET ``url`` following up to 10 redirects; ``Authorization`` only goes to the first host."""
    import urllib.error
    import urllib.request
    from urllib.parse import urljoin, urlsplit

    origin = urlsplit(url).netloc
    for _ in range(10):
        h = headers if urlsplit(url).netloc == origin else {k: v for k, v in headers.items() if k.lower() != "authorization"}
        try:
            return opener.open(urllib.request.Request(url, headers=h), timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code in (301, 302, 303, 307, 308) and e.headers.get("Location"):
                url = urljoin(url, e.headers["Location"])
                e.close()
                continue
            raise
    raise EndpointUnreachableError(origin, "too many redirects")


class _ShortBody(Exception):
    """The connection ended before the listed size: a drop (server, proxy), to be resumed."""


class _LongBody(Exception):
    """The server sent more bytes than the listing says the file has."""


def download_file(
    opener,
    url: str,
    headers: dict[str, str],
    dest: Path,
    req: AssetRequest,
    entry: FileEntry,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> str:
    """Stream ``url`` into ``dest`` (a temporary name), resuming with Range after a dropped
    connection; return the sha256 once size and hash match ``entry``.

    A body that ends before the listed size is a dropped connection, not a wrong file: it is resumed
    like any other drop. Only a complete body is hashed, so only it can be a checksum mismatch. At
    most ``RETRIES`` attempts in a row may end without a byte of progress; one that brought bytes
    starts the count again, up to ``MAX_CONNECTIONS`` requests for one file.
    """
    import http.client
    import urllib.error

    endpoint = url.split("/resolve/")[0]
    failures = connections = 0
    with disk_errors(dest.parent), open(dest, "wb", buffering=0) as out:
        sink = _Sink(out, entry, on_bytes)
        try:
            while True:
                h = dict(headers)
                sink.flush()
                before = sink.written
                if before:
                    h["Range"] = f"bytes={before}-"
                connections += 1
                try:
                    with _open(opener, url, h) as resp:
                        if before and resp.status != 206:
                            sink.reset()
                            before = 0
                        received = sink.written
                        while chunk := resp.read(CHUNK):
                            received += len(chunk)
                            if received > entry.size:
                                raise _LongBody()
                            sink.put(chunk)
                    sink.flush()
                    if sink.written < entry.size:
                        raise _ShortBody()
                    break
                except _LongBody:
                    raise ChecksumError(
                        req.repo_id, entry.path, f"{entry.size} bytes", f"more than {entry.size} bytes"
                    ) from None
                except urllib.error.HTTPError as e:
                    if e.code == 404:
                        raise EntryNotFoundError(req.kind, req.repo_id, req.revision, entry.path) from None
                    if e.code in (401, 403):
                        raise AuthError(req.kind, req.repo_id) from None
                    if e.code < 500 and e.code != 429:
                        raise EndpointUnreachableError(endpoint, f"HTTP {e.code} on {entry.path}") from None
                    error = f"HTTP {e.code}"
                except _ShortBody:
                    error = "the connection closed early"
                except (OSError, http.client.HTTPException) as e:
                    if isinstance(e, OSError) and e.errno in (28, 122):  # ENOSPC, EDQUOT: not the network
                        raise
                    error = type(e).__name__
                sink.flush()
                failures = 0 if sink.written > before else failures + 1
                if failures >= RETRIES or connections >= MAX_CONNECTIONS:
                    raise EndpointUnreachableError(
                        endpoint, f"{error} on {entry.path} after {sink.written} of {entry.size} bytes, {connections} attempts"
                    ) from None
                time.sleep(min(2**failures * 0.25, 5))
        finally:
            sink.close()
    # No fsync per blob (as huggingface_hub, pip and curl): the rename makes it atomic, and
    # `hfhpc check --full` re-hashes everything after a crash of the login node itself.
    return sink.hasher.check(req, entry)


def _clear_dead_tmp(folder: Path) -> None:
    """Under the asset lock every temporary file is a leftover of a killed stage."""
    with contextlib.suppress(FileNotFoundError):
        for child in folder.iterdir():
            if child.name.startswith(TMP_PREFIX):
                with contextlib.suppress(OSError):
                    child.unlink()


def asset_lock(store: Path, req: AssetRequest) -> DirLock:
    return DirLock(state_dir(store) / "locks" / f"{repo_folder_name(req.repo_type, req.repo_id)}.lock")


MIN_MARGIN = 1024 * 1024
MAX_MARGIN = 1024**3


def space_margin(needed: int) -> int:
    """Room kept free beyond the files themselves: the tree listing, refs, locks, the verification
    cache and filesystem block rounding grow with the download, so 5 % of it, at least 1 MiB (a
    few small files), at most 1 GiB (a 1 TB model does not need 50 GB of slack)."""
    return min(max(needed // 20, MIN_MARGIN), MAX_MARGIN)


def space_shortfall(needed: int, free: int) -> int:
    """How many bytes are missing to download ``needed`` bytes with ``free`` bytes free (0: enough)."""
    if needed <= 0:
        return 0
    return max(0, needed + space_margin(needed) - free)


def ensure_space(store: Path, needed: int) -> None:
    from hfhpc.store.stage import human_bytes

    store.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(store).free
    if space_shortfall(needed, free):
        margin = space_margin(needed)
        detail = (
            f"{human_bytes(needed + margin)} needed: {human_bytes(needed)} of files and "
            f"{human_bytes(margin)} to spare; {human_bytes(free)} free"
        )
        raise DiskFullError(str(store), needed, detail)


def fetch_files(
    store: Path,
    req: AssetRequest,
    commit: str,
    files: list[FileEntry],
    *,
    endpoint: str,
    token: str | None,
    workers: int = 1,
    progress: Progress | None = None,
    xet: bool = False,
) -> tuple[dict[str, str], int, int]:
    """Download the ``files`` not yet in the store; return (sha256 of downloaded files, bytes, count)."""
    from hfhpc.store.hubapi import headers as hub_headers

    missing = [e for e in files if not is_installed(store, req.repo_type, req.repo_id, commit, e)]
    # A blob may already be there (another revision shares it): then only the link is new.
    to_download = [e for e in missing if not _blob_ok(store, req, e)]
    ensure_space(store, sum(e.size for e in to_download))
    if xet:
        return _fetch_with_hub(store, req, commit, to_download, endpoint, token), sum(e.size for e in to_download), len(to_download)
    headers = hub_headers(token)
    headers.pop("Accept")
    opener = _opener()
    digests: dict[str, str] = {}
    if progress:
        progress.add_total(sum(e.size for e in to_download))

    def one(entry: FileEntry) -> None:
        blob = blob_path(store, req.repo_type, req.repo_id, entry.etag)
        blob.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_name(blob)
        try:
            bar = progress.file(entry.path, entry.size) if progress else None
            digests[entry.path] = download_file(
                opener,
                file_url(endpoint, req, commit, entry.path),
                headers,
                tmp,
                req,
                entry,
                on_bytes=(bar.update if bar else lambda n: None),
            )
            if bar:
                bar.close()
            install_blob_from(tmp, store, req.repo_type, req.repo_id, entry)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    if workers <= 1 or len(to_download) <= 1:
        for entry in to_download:
            one(entry)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for f in [pool.submit(one, e) for e in to_download]:
                f.result()
    for entry in missing:
        link_snapshot(store, req.repo_type, req.repo_id, commit, entry)
    return digests, sum(e.size for e in to_download), len(to_download)


def _fetch_with_hub(
    store: Path, req: AssetRequest, commit: str, files: list[FileEntry], endpoint: str, token: str | None
) -> dict[str, str]:
    """``--xet``: let huggingface_hub download (it uses xet when the server offers it), then check
    every file against the listing like our own downloads."""
    from huggingface_hub import hf_hub_download

    from hfhpc.store.layout import sha256_file, git_sha1_file

    digests = {}
    for entry in files:
        try:
            path = Path(
                hf_hub_download(
                    req.repo_id, entry.path, repo_type=req.repo_type, revision=commit,
                    cache_dir=store / "hub", endpoint=endpoint, token=token or False,
                )
            )
        except _network_errors() as e:
            raise _translate(e, req, endpoint) from None
        digest = sha256_file(path)
        expected = entry.lfs_sha256 or entry.blob_id
        actual = digest if entry.lfs_sha256 else git_sha1_file(path)
        if actual != expected:
            contained(Path(os.path.realpath(path)), repo_dir(store, req.repo_type, req.repo_id)).unlink(missing_ok=True)
            raise ChecksumError(req.repo_id, entry.path, expected, actual)
        digests[entry.path] = digest
    return digests


def _blob_ok(store: Path, req: AssetRequest, entry: FileEntry) -> bool:
    try:
        return blob_path(store, req.repo_type, req.repo_id, entry.etag).stat().st_size == entry.size
    except OSError:
        return False


def stage_revision(
    store: Path,
    req: AssetRequest,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    workers: int = 1,
    progress: Progress | None = None,
    pinned: tuple[str, list[FileEntry], list[FileEntry]] | None = None,
    xet: bool = False,
) -> StagedAsset:
    """Stage ``req`` into ``store``.

    ``pinned`` = (commit, selected files, every file) from a lockfile: nothing is asked of the
    endpoint unless a file is missing, so re-staging an unchanged spec costs no network.
    """
    endpoint = endpoint or hfenv.endpoint()
    token = token if token is not None else hfenv.token()
    with asset_lock(store, req) as lock:
        if pinned is not None:
            commit, files, everything = pinned
        else:
            remote = resolve_remote(req, endpoint, token)
            commit, everything = remote.commit, remote.entries
            try:
                files = select_files(req.kind, everything, req.include)
            except EntryNotFoundError as e:
                raise EntryNotFoundError(req.kind, req.repo_id, req.revision, e.pattern) from None
        _clear_dead_tmp(blob_path(store, req.repo_type, req.repo_id, "x").parent)
        lock.heartbeat()
        digests, nbytes, nfiles = fetch_files(
            store, req, commit, files, endpoint=endpoint, token=token, workers=workers, progress=progress, xet=xet
        )
        # The tree listing and the ref go last: they tell readers the snapshot is there.
        write_tree(store, req.repo_type, req.repo_id, commit, everything)
        write_ref(store, req.repo_type, req.repo_id, req.revision, commit)
    return StagedAsset(req, commit, files, digests, nbytes, nfiles)


class Progress:
    """Progress bars on stderr: one for the total, one per file being downloaded."""

    def __init__(self, enabled: bool = True, desc: str = "total"):
        self.enabled = enabled
        self._total = None
        self._desc = desc

    def add_total(self, nbytes: int) -> None:
        if not self.enabled or nbytes == 0:
            return
        from tqdm import tqdm

        if self._total is None:
            self._total = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=self._desc, position=0, leave=False)
        self._total.total += nbytes
        self._total.refresh()

    def file(self, name: str, size: int):
        if not self.enabled:
            return None
        from tqdm import tqdm

        total = self._total
        bar = tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=name[-40:], leave=False, position=1)

        class _Both:
            def update(self, n: int) -> None:
                bar.update(n)
                if total is not None:
                    total.update(n)

            def close(self) -> None:
                bar.close()

        return _Both()

    def close(self) -> None:
        if self._total is not None:
            self._total.close()
            self._total = None
