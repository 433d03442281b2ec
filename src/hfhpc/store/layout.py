"""The store's on-disk layout: a Hugging Face cache (``HF_HOME``) that the libraries read unchanged.

``<store>/hub/{models,datasets,spaces}--org--name/``
    ``blobs/<etag>``                file contents; etag = sha256 for LFS files, git blob sha1 otherwise
    ``snapshots/<commit>/<path>``   relative symlinks into ``blobs/``
    ``refs/<revision>``             the commit a branch or tag resolved to
    ``trees/<commit>.json``         the repository's file list at that commit (huggingface_hub's tree cache)
``<store>/datasets/``               the datasets library's Arrow cache
``<store>/modules/``                evaluate's module cache
``<store>/hfhpc/``                  hfhpc's own state (verification cache, locks)
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

KINDS = ("model", "dataset", "metric")
# A metric lives in a Hub space; everything else maps one to one.
REPO_TYPE = {"model": "model", "dataset": "dataset", "metric": "space", "space": "space"}
FOLDER_PREFIX = {"model": "models", "dataset": "datasets", "space": "spaces"}

# Files that the Hub stores in LFS whatever their size (the usual .gitattributes of a Hub repo).
LFS_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".ot", ".pb", ".tflite",
    ".gguf", ".parquet", ".arrow", ".npy", ".npz", ".pkl", ".pickle", ".model", ".zip", ".gz", ".tar",
    ".tgz", ".zst", ".xz", ".bz2", ".7z", ".png", ".jpg", ".jpeg", ".wav", ".mp3", ".flac",
)
LFS_MIN_SIZE = 10 * 1024 * 1024

_ID_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?$|^[A-Za-z0-9]$")
SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def repo_id_problem(repo_id: str) -> str | None:
    """Why ``repo_id`` is not a valid Hub id, or None. Guards every path built from an id."""
    if not repo_id or not repo_id.strip():
        return "it is empty"
    if repo_id != repo_id.strip() or any(c.isspace() for c in repo_id):
        return "it contains whitespace"
    parts = repo_id.split("/")
    if len(parts) > 2:
        return "it has more than one '/'"
    for part in parts:
        if part in {"", ".", ".."} or ".." in part or part.startswith(".") or "--" in part:
            return f"{part!r} is not allowed as a name part"
        if not _ID_PART.match(part):
            return f"{part!r} may only use letters, digits, '-', '_' and '.'"
    return None


def repo_folder_name(repo_type: str, repo_id: str) -> str:
    return "--".join([FOLDER_PREFIX[repo_type], *repo_id.split("/")])


def hub_dir(store: Path) -> Path:
    return Path(store) / "hub"


def repo_dir(store: Path, repo_type: str, repo_id: str) -> Path:
    return hub_dir(store) / repo_folder_name(repo_type, repo_id)


def state_dir(store: Path) -> Path:
    return Path(store) / "hfhpc"


def dataset_arrow_root(store: Path, repo_id: str) -> Path:
    """The datasets library's Arrow cache of ``repo_id``, every configuration (``org___name``)."""
    return Path(store) / "datasets" / repo_id.replace("/", "___")


def dataset_arrow_dir(store: Path, repo_id: str, config: str | None) -> Path:
    """The Arrow cache of one configuration; below it ``<version>/<commit>/`` as datasets writes it."""
    return dataset_arrow_root(store, repo_id) / (config or "default")


MODULES_NAMESPACE = "evaluate_modules"


def metric_module_dir(store: Path, repo_id: str) -> Path:
    """Where evaluate's module cache keeps the scripts of metric ``repo_id`` (one folder per hash)."""
    return Path(store) / "modules" / MODULES_NAMESPACE / "metrics" / repo_id.replace("/", "--")


def revision_problem(revision: str) -> str | None:
    if not revision or revision.strip() != revision or any(c.isspace() for c in revision):
        return "it is empty or contains whitespace"
    if ".." in revision.split("/") or revision.startswith("/") or "\\" in revision or "\0" in revision:
        return "it is not a valid git reference"
    return None


def is_lfs_path(path: str, size: int) -> bool:
    return size >= LFS_MIN_SIZE or path.lower().endswith(LFS_SUFFIXES)


def git_blob_sha1(data: bytes) -> str:
    h = hashlib.sha1(f"blob {len(data)}\0".encode())
    h.update(data)
    return h.hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def sha256_file(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_sha1_file(path: Path) -> str:
    size = os.path.getsize(path)
    h = hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(8 * 1024 * 1024):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    """One file of a repository at a commit, as the Hub's tree endpoint describes it."""

    path: str
    size: int
    blob_id: str  # git blob sha1 (of the LFS pointer for LFS files)
    lfs_sha256: str | None = None

    @property
    def etag(self) -> str:
        """The name of the file's blob in the cache."""
        return self.lfs_sha256 or self.blob_id

    def to_tree_cache(self) -> dict:
        info: dict = {"size": self.size, "blob_id": self.blob_id}
        if self.lfs_sha256:
            info["lfs_sha256"] = self.lfs_sha256
            info["lfs_size"] = self.size
        return info


def snapshot_dir(store: Path, repo_type: str, repo_id: str, commit: str) -> Path:
    return repo_dir(store, repo_type, repo_id) / "snapshots" / commit


def read_ref(store: Path, repo_type: str, repo_id: str, revision: str) -> str | None:
    """The commit ``revision`` points to in the store (a sha is its own answer when its snapshot exists)."""
    if SHA1_RE.match(revision):
        return revision if snapshot_dir(store, repo_type, repo_id, revision).is_dir() else None
    ref = repo_dir(store, repo_type, repo_id) / "refs" / revision
    try:
        return ref.read_text().strip() or None
    except OSError:  # missing, or a folder of nested refs (refs/pr/…)
        return None


def link_target(snapshot_file: Path, blob: Path) -> str:
    """Relative symlink target from a snapshot file to its blob (what huggingface_hub writes)."""
    return os.path.relpath(blob, snapshot_file.parent)
