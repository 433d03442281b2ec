"""Writing a repository into the store's Hugging Face cache layout, atomically.

A blob appears under its final name only when complete and checked; the snapshot link appears only
after its blob; the ref and the tree listing appear last, so a reader never sees a half-staged commit
as complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from hfhpc.atomic import atomic_symlink, atomic_write_json, atomic_write_text, disk_errors, tmp_name
from hfhpc.store.layout import FileEntry, link_target, repo_dir, snapshot_dir
from hfhpc.store.validate import blob_id_problem, commit_problem, contained, repo_path_problem, size_problem

TREE_FORMAT_VERSION = 1


def blob_path(store: Path, repo_type: str, repo_id: str, etag: str) -> Path:
    return repo_dir(store, repo_type, repo_id) / "blobs" / etag


def snapshot_file(store: Path, repo_type: str, repo_id: str, commit: str, path: str) -> Path:
    return snapshot_dir(store, repo_type, repo_id, commit) / path


def is_installed(store: Path, repo_type: str, repo_id: str, commit: str, entry: FileEntry) -> bool:
    """The snapshot link exists and its blob has the expected size (contents are verified elsewhere)."""
    link = snapshot_file(store, repo_type, repo_id, commit, entry.path)
    try:
        return os.stat(link).st_size == entry.size
    except OSError:
        return False


def install_blob_from(tmp: Path, store: Path, repo_type: str, repo_id: str, entry: FileEntry) -> Path:
    """Move a complete, verified temporary file to its blob name (a concurrent writer may win: same bytes)."""
    blob = contained(blob_path(store, repo_type, repo_id, entry.etag), repo_dir(store, repo_type, repo_id))
    blob.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, blob)
    return blob


def copy_to_blob(src: Path, store: Path, repo_type: str, repo_id: str, entry: FileEntry) -> Path:
    blob = contained(blob_path(store, repo_type, repo_id, entry.etag), repo_dir(store, repo_type, repo_id))
    if blob.exists() and blob.stat().st_size == entry.size:
        return blob
    blob.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(blob)
    try:
        with disk_errors(blob.parent):
            shutil.copyfile(src, tmp)
        return install_blob_from(tmp, store, repo_type, repo_id, entry)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def link_snapshot(store: Path, repo_type: str, repo_id: str, commit: str, entry: FileEntry) -> Path:
    folder = repo_dir(store, repo_type, repo_id)
    link = contained(snapshot_file(store, repo_type, repo_id, commit, entry.path), folder)
    blob = contained(blob_path(store, repo_type, repo_id, entry.etag), folder)
    target = link_target(link, blob)
    with contextlib.suppress(OSError):
        if os.readlink(link) == target:
            return link
    atomic_symlink(target, link)
    return link


def write_tree(store: Path, repo_type: str, repo_id: str, commit: str, entries: Iterable[FileEntry]) -> None:
    """huggingface_hub's tree cache: lets ``snapshot_download`` work offline and know what is complete."""
    path = contained(repo_dir(store, repo_type, repo_id) / "trees" / f"{commit}.json", repo_dir(store, repo_type, repo_id))
    files = {e.path: e.to_tree_cache() for e in sorted(entries, key=lambda e: e.path)}
    atomic_write_json(path, {"format_version": TREE_FORMAT_VERSION, "files": files})


def read_tree(store: Path, repo_type: str, repo_id: str, commit: str) -> list[FileEntry] | None:
    path = repo_dir(store, repo_type, repo_id) / "trees" / f"{commit}.json"
    try:
        data = json.loads(path.read_text())
        entries = [
            FileEntry(path=p, size=info["size"], blob_id=info["blob_id"], lfs_sha256=info.get("lfs_sha256"))
            for p, info in data["files"].items()
        ]
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
        return None
    # The store may be shared and written by others: a listing with one unsafe entry counts as absent
    # (staging then asks the endpoint again), never as a list of paths to create.
    for e in entries:
        if repo_path_problem(e.path) or size_problem(e.size) or blob_id_problem(e.blob_id) or (
            e.lfs_sha256 is not None and blob_id_problem(e.lfs_sha256)
        ):
            return None
    return entries


def write_ref(store: Path, repo_type: str, repo_id: str, revision: str, commit: str) -> None:
    if revision == commit:
        return
    if commit_problem(commit):
        raise ValueError(f"not a commit id: {commit!r}")  # callers validate first; this is the last guard
    folder = repo_dir(store, repo_type, repo_id)
    atomic_write_text(contained(folder / "refs" / revision, folder), commit)
