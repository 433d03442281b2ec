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
from hfhpc.store.atomic import DirLock, TMP_PREFIX, disk_errors, tmp_name
from hfhpc.store.cache import blob_path, install_blob_from, is_installed, link_snapshot, write_ref, write_tree
from hfhpc.store.layout import (
    REPO_TYPE,
    FileEntry,
    repo_folder_name,
    repo_id_problem,
    revision_problem,
    state_dir,
)

URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
CHUNK = 4 * 1024 * 1024
RETRIES = 5

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

def _api(endpoint: str, token: str | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token or False)


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
    from huggingface_hub.hf_api import RepoFile

    api = _api(endpoint, token)
    try:
        info = api.repo_info(req.repo_id, repo_type=req.repo_type, revision=req.revision)
        commit = info.sha
        entries = [
            FileEntry(
                path=f.path,
                size=int(f.size),
                blob_id=f.blob_id,
                lfs_sha256=f.lfs.sha256 if f.lfs is not None else None,
            )
            for f in api.list_repo_tree(req.repo_id, repo_type=req.repo_type, revision=commit, recursive=True)
            if isinstance(f, RepoFile)
        ]
    except _network_errors() as e:
        raise _translate(e, req, endpoint) from None
    if not commit:
        raise EndpointUnreachableError(endpoint, "the server did not say which commit the revision is")
    return RemoteRevision(commit=commit, entries=entries)


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


def download_file(
    client,
    url: str,
    headers: dict[str, str],
    dest: Path,
    req: AssetRequest,
    entry: FileEntry,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> str:
    """Stream ``url`` into ``dest`` (a temporary name), resuming with Range after a dropped
    connection; return the sha256 once size and hash match ``entry``."""
    import httpx2

    hasher = _Hasher(entry)
    written = 0
    attempt = 0
    with disk_errors(dest.parent), open(dest, "wb") as out:
        while True:
            h = dict(headers)
            if written:
                h["Range"] = f"bytes={written}-"
            try:
                with client.stream("GET", url, headers=h, follow_redirects=True) as resp:
                    if resp.status_code == 404:
                        raise EntryNotFoundError(req.kind, req.repo_id, req.revision, entry.path)
                    if resp.status_code in (401, 403):
                        raise AuthError(req.kind, req.repo_id)
                    if resp.status_code >= 400:
                        raise httpx2.HTTPStatusError(f"HTTP {resp.status_code}", request=resp.request, response=resp)
                    if written and resp.status_code != 206:
                        # The server ignored Range: start the file again.
                        out.seek(0)
                        out.truncate()
                        on_bytes(-written)
                        hasher, written = _Hasher(entry), 0
                    for chunk in resp.iter_bytes(CHUNK):
                        out.write(chunk)
                        hasher.update(chunk)
                        written += len(chunk)
                        on_bytes(len(chunk))
                break
            except (httpx2.TransportError, httpx2.HTTPStatusError) as e:
                attempt += 1
                if attempt >= RETRIES:
                    raise EndpointUnreachableError(url.split("/resolve/")[0], f"{type(e).__name__} on {entry.path}") from None
                time.sleep(min(2**attempt * 0.25, 5))
        out.flush()
        os.fsync(out.fileno())
    if written != entry.size:
        raise ChecksumError(req.repo_id, entry.path, f"{entry.size} bytes", f"{written} bytes")
    return hasher.check(req, entry)


def _clear_dead_tmp(folder: Path) -> None:
    """Under the asset lock every temporary file is a leftover of a killed stage."""
    with contextlib.suppress(FileNotFoundError):
        for child in folder.iterdir():
            if child.name.startswith(TMP_PREFIX):
                with contextlib.suppress(OSError):
                    child.unlink()


def asset_lock(store: Path, req: AssetRequest) -> DirLock:
    return DirLock(state_dir(store) / "locks" / f"{repo_folder_name(req.repo_type, req.repo_id)}.lock")


def ensure_space(store: Path, needed: int, margin: int = 64 * 1024 * 1024) -> None:
    store.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(store).free
    if needed and free < needed + margin:
        raise DiskFullError(str(store), needed)


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
    from huggingface_hub.utils import build_hf_headers, get_session

    missing = [e for e in files if not is_installed(store, req.repo_type, req.repo_id, commit, e)]
    # A blob may already be there (another revision shares it): then only the link is new.
    to_download = [e for e in missing if not _blob_ok(store, req, e)]
    ensure_space(store, sum(e.size for e in to_download))
    if xet:
        return _fetch_with_hub(store, req, commit, to_download, endpoint, token), sum(e.size for e in to_download), len(to_download)
    headers = build_hf_headers(token=token or False, library_name="hfhpc")
    client = get_session()
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
                client,
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
            Path(os.path.realpath(path)).unlink(missing_ok=True)
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
