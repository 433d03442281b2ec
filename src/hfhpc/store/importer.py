"""Import a local folder (a git-lfs clone, or any plain folder) into the store as a Hub repository.

This is the page's first method ("git clone the model on the login node") made safe: the files land in
the same cache layout a download produces, under a commit id derived from their contents (or the
clone's own commit when it is a git checkout), so loading code cannot tell the difference.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from hfhpc.errors import UsageError
from hfhpc.store.cache import copy_to_blob, link_snapshot, write_ref, write_tree
from hfhpc.store.layout import FileEntry, git_sha1_file, is_lfs_path, lfs_pointer, git_blob_sha1, sha256_file
from hfhpc.store.validate import UnsafeInputError, commit_problem, repo_path_problem

SKIP_DIRS = {".git", ".cache", "__pycache__", ".ipynb_checkpoints"}
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"


def folder_files(src: Path) -> list[tuple[str, Path]]:
    """Every file under ``src`` with its repository path; links that lead out of ``src`` are refused.

    A link inside a clone (``tokenizer_config.json -> ~/secret``) would otherwise copy whatever it
    points at into the store, where ``hfhpc serve`` hands it to anybody who asks.
    """
    files: list[tuple[str, Path]] = []
    real_src = os.path.realpath(src)
    for root, dirs, names in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in sorted(names) + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            full = Path(root) / name
            rel = full.relative_to(src).as_posix()
            if full.is_symlink():
                real = os.path.realpath(full)
                if not os.path.exists(real):
                    raise UnsafeInputError(
                        f"the folder {src}", "link", rel, f"it points at nothing ({os.readlink(full)})",
                        "remove the link or put the file it should hold there, and import again",
                    )
                if not real.startswith(real_src + os.sep):
                    raise UnsafeInputError(
                        f"the folder {src}", "link", rel, f"it leads out of the folder (to {os.readlink(full)})",
                        "replace the link by the file it should hold (cp -L), or remove it, and import again",
                    )
                if full.is_dir():
                    continue  # os.walk does not follow it; its files are imported where they really are
            problem = repo_path_problem(rel)
            if problem:
                raise UnsafeInputError(f"the folder {src}", "file name", rel, problem, "rename the file and import again")
            files.append((rel, full))
    return files


def describe_file(rel: str, full: Path, sha256: Callable[[Path], str] = sha256_file) -> FileEntry:
    size = full.stat().st_size
    if size < 1024:
        head = full.read_bytes()
        if head.startswith(LFS_POINTER_PREFIX):
            raise UsageError(
                f"{full} is a git-lfs pointer, not the file's contents",
                f"run `git lfs pull` in {full.parent} (or clone with git-lfs installed) and import again",
            )
    if is_lfs_path(rel, size):
        sha = sha256(full)
        return FileEntry(path=rel, size=size, blob_id=git_blob_sha1(lfs_pointer(sha, size)), lfs_sha256=sha)
    return FileEntry(path=rel, size=size, blob_id=git_sha1_file(full))


def _git_head(src: Path) -> str | None:
    if not (src / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return None if commit_problem(sha) else sha


def content_commit(entries: list[FileEntry]) -> str:
    h = hashlib.sha1()
    for e in sorted(entries, key=lambda e: e.path):
        h.update(f"{e.path}\0{e.size}\0{e.blob_id}\n".encode())
    return h.hexdigest()


def import_folder(
    store: Path, repo_type: str, repo_id: str, src: Path, revision: str = "main"
) -> tuple[str, list[FileEntry]]:
    """Copy ``src`` into the store as ``repo_id`` at ``revision``; return the commit and its files."""
    src = Path(src)
    if not src.is_dir():
        raise UsageError(f"{src} is not a folder", "pass --from the folder of a git-lfs clone or of plain files")
    files = folder_files(src)
    if not files:
        raise UsageError(f"{src} has no files to import", "pass --from a folder that holds the repository's files")
    entries = [describe_file(rel, full) for rel, full in files]
    # A dirty checkout is not its HEAD: use HEAD only when the contents are exactly what git has.
    commit = _git_head(src) if _is_clean_checkout(src) else None
    commit = commit or content_commit(entries)
    for entry, (_, full) in zip(entries, files):
        copy_to_blob(full, store, repo_type, repo_id, entry)
        link_snapshot(store, repo_type, repo_id, commit, entry)
    write_tree(store, repo_type, repo_id, commit, entries)
    write_ref(store, repo_type, repo_id, revision, commit)
    return commit, entries


def _is_clean_checkout(src: Path) -> bool:
    if not (src / ".git").exists():
        return False
    try:
        out = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and not out.stdout.strip()
