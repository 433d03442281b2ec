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
from urllib.parse import quote

from hfhpc import __version__
from hfhpc.errors import AuthError, EndpointUnreachableError, RepoNotFoundError, RevisionNotFoundError
from hfhpc.store.layout import FileEntry

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
        info = json.loads(resp.read())
    sha = info.get("sha")
    if not isinstance(sha, str) or len(sha) != 40:
        raise EndpointUnreachableError(endpoint, "the server did not say which commit the revision is")
    return sha


def list_files(endpoint: str, repo_type: str, repo_id: str, commit: str, token: str | None) -> list[FileEntry]:
    url: str | None = f"{_base(endpoint, repo_type, repo_id)}/tree/{commit}?recursive=true&expand=false"
    entries: list[FileEntry] = []
    while url:
        with _get(url, token, repo_type, repo_id, commit, endpoint) as resp:
            page = json.loads(resp.read())
            link = resp.headers.get("Link", "")
        for item in page:
            if item.get("type") != "file":
                continue
            lfs = item.get("lfs") or None
            entries.append(FileEntry(
                path=item["path"],
                size=int(lfs["size"] if lfs else item["size"]),
                blob_id=item["oid"],
                lfs_sha256=lfs["oid"] if lfs else None,
            ))
        m = _NEXT.search(link)
        url = m.group(1) if m else None
    return entries
