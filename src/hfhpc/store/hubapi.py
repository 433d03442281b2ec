"""The two Hub API calls staging needs: which commit a revision is, and the files at that commit.

Spoken over urllib rather than through ``HfApi``: importing ``huggingface_hub.hf_api`` costs ~0.5 s,
paid by every ``hfhpc stage`` on a login node, for two GET requests. The answers are read exactly
as huggingface_hub reads them (``sha``; tree entries ``{type, path, size, oid, lfs: {oid, size}}``;
``Link: <…>; rel="next"`` pagination; ``X-Error-Code`` for not-found errors).
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from urllib.parse import quote, urljoin, urlsplit

from hfhpc import __version__
from hfhpc.errors import AuthError, EndpointUnreachableError, RepoNotFoundError, RevisionNotFoundError
from hfhpc.store.layout import FileEntry
from hfhpc.store.validate import (
    UnsafeInputError,
    blob_id_problem,
    commit_problem,
    repo_path_problem,
    sha256_problem,
    size_problem,
)

API_PREFIX = {"model": "models", "dataset": "datasets", "space": "spaces"}
KIND_OF = {"model": "model", "dataset": "dataset", "space": "metric"}
_NEXT = re.compile(r'<([^>]+)>;\s*rel="next"')


def headers(token: str | None) -> dict[str, str]:
    h = {"User-Agent": f"hfhpc/{__version__}; hf_hub-compatible", "Accept": "application/json"}
    if token:
        h["Authorization"] = f"Bearer {token}"
    return h


def _get(url: str, token: str | None, repo_type: str, repo_id: str, revision: str, endpoint: str):
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers(token)), timeout=60)
    except urllib.error.HTTPError as e:
        code = e.headers.get("X-Error-Code", "")
        kind = KIND_OF[repo_type]
        if code == "RevisionNotFound":
            raise RevisionNotFoundError(kind, repo_id, revision) from None
        if code == "RepoNotFound" or e.code == 404:
            # The Hub answers 401 for a private or missing repo without a token: same advice.
            raise RepoNotFoundError(kind, repo_id, endpoint) from None
        if e.code == 401 and not token:
            raise RepoNotFoundError(kind, repo_id, endpoint) from None
        if e.code in (401, 403) or code == "GatedRepo":
            raise AuthError(kind, repo_id) from None
        raise EndpointUnreachableError(endpoint, f"HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise EndpointUnreachableError(endpoint, f"{type(reason).__name__}: {reason}".rstrip(": ")) from None


def _base(endpoint: str, repo_type: str, repo_id: str) -> str:
    return f"{endpoint}/api/{API_PREFIX[repo_type]}/{repo_id}"


def resolve_commit(endpoint: str, repo_type: str, repo_id: str, revision: str, token: str | None) -> str:
    url = f"{_base(endpoint, repo_type, repo_id)}/revision/{quote(revision, safe='')}"
    with _get(url, token, repo_type, repo_id, revision, endpoint) as resp:
        info = _json(resp, endpoint)
    sha = info.get("sha") if isinstance(info, dict) else None
    if sha is None:
        raise EndpointUnreachableError(endpoint, "the server did not say which commit the revision is")
    problem = commit_problem(sha)
    if problem:
        raise UnsafeInputError(endpoint, f"commit for {repo_id}@{revision}", sha, problem)
    return sha


def _json(resp, endpoint: str):
    try:
        return json.loads(resp.read())
    except (ValueError, RecursionError):
        raise EndpointUnreachableError(endpoint, "the answer is not JSON: not a Hub endpoint?") from None


def tree_entry(item: object, endpoint: str, repo_id: str) -> FileEntry | None:
    """One tree entry of the Hub's listing as a :class:`FileEntry` (None for a folder), every field checked."""
    if not isinstance(item, dict):
        raise UnsafeInputError(endpoint, f"tree entry of {repo_id}", item, "an entry must be a JSON object")
    if item.get("type") != "file":
        return None
    path = item.get("path")
    lfs = item.get("lfs") or None
    checks = [("file path", path, repo_path_problem(path)), ("oid", item.get("oid"), blob_id_problem(item.get("oid")))]
    if lfs is not None:
        if not isinstance(lfs, dict):
            raise UnsafeInputError(endpoint, f"lfs of {path!r}", lfs, "lfs must be a JSON object")
        checks += [("lfs.oid", lfs.get("oid"), sha256_problem(lfs.get("oid"))), ("lfs.size", lfs.get("size"), size_problem(lfs.get("size")))]
    else:
        checks.append(("size", item.get("size"), size_problem(item.get("size"))))
    for what, value, problem in checks:
        if problem:
            shown = what if what == "file path" else f"{what} of {path!r}"
            raise UnsafeInputError(endpoint, f"{shown} in {repo_id}", value, problem)
    return FileEntry(path=path, size=lfs["size"] if lfs else item["size"], blob_id=item["oid"], lfs_sha256=lfs["oid"] if lfs else None)


def list_files(endpoint: str, repo_type: str, repo_id: str, commit: str, token: str | None) -> list[FileEntry]:
    url: str | None = f"{_base(endpoint, repo_type, repo_id)}/tree/{commit}?recursive=true&expand=false"
    entries: list[FileEntry] = []
    while url:
        with _get(url, token, repo_type, repo_id, commit, endpoint) as resp:
            page = _json(resp, endpoint)
            link = resp.headers.get("Link", "")
        if not isinstance(page, list):
            raise EndpointUnreachableError(endpoint, "the tree listing is not a JSON list: not a Hub endpoint?")
        for item in page:
            entry = tree_entry(item, endpoint, repo_id)
            if entry is not None:
                entries.append(entry)
        m = _NEXT.search(link)
        url = _same_origin(url, m.group(1), endpoint) if m else None
    _check_layout(entries, endpoint, repo_id)
    return entries


def _same_origin(current: str, link: str, endpoint: str) -> str:
    """The next page, only on the endpoint's own host: the token goes with every page request."""
    nxt = urljoin(current, link)
    if urlsplit(nxt)[:2] != urlsplit(endpoint)[:2]:
        raise UnsafeInputError(endpoint, "next-page link", link, "it leads to another host")
    return nxt


def _check_layout(entries: list[FileEntry], endpoint: str, repo_id: str) -> None:
    """No path listed twice, and no file listed where another entry needs a folder (``a`` and ``a/b``)."""
    seen: set[str] = set()
    for e in entries:
        if e.path in seen:
            raise UnsafeInputError(endpoint, f"tree listing of {repo_id}", e.path, "the path is listed twice")
        seen.add(e.path)
    for e in entries:
        parts = e.path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in seen:
                raise UnsafeInputError(endpoint, f"tree listing of {repo_id}", e.path, "a file is listed where it needs a folder")
