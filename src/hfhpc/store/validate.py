"""Every value from outside that ends up naming a path in the store passes through here first.

A Hub's answers (``sha``, tree ``path``/``oid``/``lfs.oid``/``size``), a lockfile (shared between lab
members, committed to git) and a folder given to ``stage --from`` are all untrusted: a tampered
``"sha": "../../x"`` or a listed path ``/etc/x`` must never reach ``mkdir``, ``symlink``, ``replace``
or ``unlink``. Two layers, both here:

1. the values: :func:`commit_problem`, :func:`blob_id_problem`, :func:`sha256_problem`,
   :func:`repo_path_problem`, :func:`size_problem` say why a value is refused (None when it is fine);
2. the place: :func:`contained` refuses a target whose resolved folder is not under the repository's
   folder, just before anything is written or removed, so a link planted inside the store (a
   snapshot sub-folder pointing at ``/etc``) cannot redirect a write either.

See docs/faults.md, "Hostile inputs", for what was tried and which test proves each refusal.
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path

from hfhpc.errors import HfhpcError

COMMIT_RE = re.compile(r"[0-9a-f]{40}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
BLOB_ID_RE = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
# Longer than any real repository path (the Hub caps a path far below this); a bound on what a
# hostile listing can make the store create.
MAX_PATH_CHARS = 4096
MAX_PART_CHARS = 255  # NAME_MAX of Linux filesystems


class UnsafeInputError(HfhpcError):
    """An endpoint, lockfile or folder gave a value that would name a path outside the store."""

    def __init__(self, source: str, what: str, value: object, problem: str, fix: str | None = None):
        self.source, self.what, self.value, self.problem = source, what, value, problem
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "...'"
        super().__init__(
            f"{source} gave an unsafe {what} {shown}: {problem}; nothing was written",
            fix or "use a trusted endpoint (HF_ENDPOINT or --endpoint)",
        )


def _hex_problem(value: object, pattern: re.Pattern[str], what: str) -> str | None:
    if not isinstance(value, str):
        return f"a {what} must be a string"
    if not pattern.fullmatch(value):
        return f"a {what} is lowercase hex digits"
    return None


def commit_problem(value: object) -> str | None:
    """Why ``value`` is not a git commit id (40 lowercase hex digits), or None."""
    return _hex_problem(value, COMMIT_RE, "commit id of 40")


def blob_id_problem(value: object) -> str | None:
    """Why ``value`` is not a blob id (git sha1: 40 hex; LFS sha256: 64 hex), or None."""
    return _hex_problem(value, BLOB_ID_RE, "blob id of 40 or 64")


def sha256_problem(value: object) -> str | None:
    return _hex_problem(value, SHA256_RE, "sha256 of 64")


def size_problem(value: object) -> str | None:
    """Why ``value`` is not a file size (a non-negative integer; JSON ``true`` is not one)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return "a size must be an integer"
    if value < 0:
        return "a size cannot be negative"
    return None


def repo_path_problem(value: object) -> str | None:
    """Why ``value`` is not a safe file path inside a repository, or None.

    Safe: a string of '/'-separated parts, relative, already normalised: no empty part (``a//b``,
    a trailing '/'), no ``.`` or ``..``, no NUL or other control character, no backslash (a
    separator on Windows and in some tools), and the same after Unicode normalisation (``．．``
    is not a way to spell ``..`` here).
    """
    if not isinstance(value, str):
        return "a path must be a string"
    if not value:
        return "the path is empty"
    if len(value) > MAX_PATH_CHARS:
        return f"the path is longer than {MAX_PATH_CHARS} characters"
    if value.startswith("/"):
        return "the path is absolute"
    if "\\" in value:
        return "the path contains a backslash"
    if any(unicodedata.category(c) == "Cc" for c in value):
        return "the path contains a control character"
    if unicodedata.normalize("NFKC", value) != value and _parts_problem(unicodedata.normalize("NFKC", value)):
        return "the path spells '.', '..' or '/' in other characters"
    return _parts_problem(value)


def _parts_problem(value: str) -> str | None:
    if value.startswith("/") or "\\" in value:
        return "the path is absolute"
    for part in value.split("/"):
        if part == "":
            return "the path has an empty part"
        if part in (".", ".."):
            return f"the path has a {part!r} part"
        if len(part.encode()) > MAX_PART_CHARS:
            return f"a part of the path is longer than {MAX_PART_CHARS} bytes"
    return None


def contained(target: Path, folder: Path) -> Path:
    """``target``, after checking that it lies under ``folder`` once every link above it is resolved.

    Called right before a write, a link, a rename or an unlink of ``target`` (the name itself is not
    followed: replacing or removing a link never touches what it points at). Raises
    :class:`UnsafeInputError` otherwise.
    """
    target, folder = Path(target), Path(folder)
    name = target.name
    real_folder = os.path.realpath(folder)
    real_parent = os.path.realpath(target.parent)
    inside = real_parent == real_folder or real_parent.startswith(real_folder.rstrip(os.sep) + os.sep)
    if not inside or name in ("", ".", ".."):
        raise UnsafeInputError(
            "the store", "target", str(target), f"it resolves outside {folder}",
            f"remove the links under {folder} that lead elsewhere, then stage again",
        )
    return target
