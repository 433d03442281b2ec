"""The environment of the child processes hfhpc starts: offline, pointed at the store, and sealed.

The names of the variables live in :mod:`hfhpc.env`; the policy the guard enforces lives in
:mod:`hfhpc.offline.seal`. This module puts them together into the variables of a child.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from hfhpc import env as hfenv
from hfhpc.errors import UsageError
from hfhpc.offline.guard_path import guard_dir
from hfhpc.offline.seal import (
    NO_PROXY_VARS,
    PROXY_VARS,
    SEALED_PROXY,
    job_host_names,
    no_proxy_value,
    normalize_host_entry,
)

# git reads ``http.proxy`` from its configuration before the proxy variables: a user's
# ``~/.gitconfig`` could name a working proxy. ``GIT_CONFIG_COUNT``/``KEY_n``/``VALUE_n`` (git >= 2.31)
# is configuration of the highest rank, above every file.
GIT_PROXY_KEY = "http.proxy"


def offline_environ(
    store: Path,
    base: Mapping[str, str] | None = None,
    *,
    allow_hosts: Iterable[str] = (),
    seal: bool = True,
) -> dict[str, str]:
    """The environment for a child process that must run from ``store`` with no network.

    Secrets are dropped: a sealed process has nothing to authenticate to.
    """
    env = dict(os.environ if base is None else base)
    for var in (*hfenv.CACHE_OVERRIDES, *hfenv.SECRET_VARS, hfenv.HF_ENDPOINT):
        env.pop(var, None)
    env.update(hfenv.store_environ(store))
    env.update(hfenv.OFFLINE_VARS)
    if seal:
        env.update(seal_environ(env, allow_hosts=allow_hosts))
    return env


def allowed_entries(allow_hosts: Iterable[str]) -> list[str]:
    """The allow list, normalised and without duplicates; ``UsageError`` for an entry that is not a host."""
    allowed: list[str] = []
    for entry in allow_hosts:
        try:
            value = normalize_host_entry(entry)
        except ValueError as exc:
            raise UsageError(str(exc), "allow a host name, '*.domain', an IP address or a CIDR network") from exc
        if value not in allowed:
            allowed.append(value)
    return allowed


def proxy_environ(allowed: Iterable[str], job_hosts: Iterable[str] = ()) -> dict[str, str]:
    """The proxy variables of a sealed environment: every protocol to :data:`SEALED_PROXY`, except
    loopback, the job's nodes and the allowed hosts. Set in full: a caller's ``no_proxy=*`` or
    working proxy must not survive."""
    bypass = no_proxy_value(allowed, job_hosts)
    return {**{var: SEALED_PROXY for var in PROXY_VARS}, **{var: bypass for var in NO_PROXY_VARS}}


def git_proxy_environ(env: Mapping[str, str]) -> dict[str, str]:
    """``GIT_CONFIG_*`` entries that set git's ``http.proxy`` to :data:`SEALED_PROXY`, after those
    ``env`` already holds (none added when one already does)."""
    try:
        count = max(0, int(env.get("GIT_CONFIG_COUNT", "0")))
    except ValueError:
        count = 0  # git itself refuses to run with such a value: ours replaces it
    for index in range(count):
        if env.get(f"GIT_CONFIG_KEY_{index}") == GIT_PROXY_KEY and env.get(f"GIT_CONFIG_VALUE_{index}") == SEALED_PROXY:
            return {}
    return {
        "GIT_CONFIG_COUNT": str(count + 1),
        f"GIT_CONFIG_KEY_{count}": GIT_PROXY_KEY,
        f"GIT_CONFIG_VALUE_{count}": SEALED_PROXY,
    }


def seal_environ(env: Mapping[str, str], allow_hosts: Iterable[str] = ()) -> dict[str, str]:
    """The variables to add to ``env`` so that the child and everything it starts run sealed.

    ``PYTHONPATH`` gets the guard folder first (the existing value is kept after it; a guard folder
    already there is not repeated). ``HFHPC_SEAL_ALLOW`` is the normalised ``allow_hosts``: it
    replaces any value in ``env``, because the allow list comes from the spec and nowhere else. The
    proxy variables send every other client (curl, wget, git) to a proxy that refuses at once,
    except for loopback, the job's nodes (those ``env``'s SLURM variables name) and the allow list.
    Raises ``hfhpc.errors.UsageError`` for an entry that is not a host, IP or network, and
    ``SealNotActiveError`` when the guard's files are missing from this installation.
    """
    allowed = allowed_entries(allow_hosts)
    guard = guard_dir()
    existing = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and not _same_path(p, guard)]
    return {
        "PYTHONPATH": os.pathsep.join([guard, *existing]),
        hfenv.HFHPC_SEAL: "1",
        hfenv.HFHPC_SEAL_ALLOW: ",".join(allowed),
        **proxy_environ(allowed, job_host_names(env)),
        **git_proxy_environ(env),
    }


def _same_path(a: str, b: str) -> bool:
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))
