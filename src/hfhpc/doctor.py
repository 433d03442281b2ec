"""``hfhpc doctor``: what a support ticket needs, gathered without importing torch."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from hfhpc import __version__
from hfhpc import env as hfenv
from hfhpc.scheduler.environment import JobEnvironment

LIBRARIES = ("torch", "transformers", "datasets", "evaluate", "accelerate", "trl", "peft", "huggingface_hub", "hf_xet", "safetensors", "tokenizers")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str]) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def gather(store: Path) -> dict:
    info: dict = {"hfhpc": __version__, "python": f"{platform.python_version()} ({sys.executable})"}
    info["libraries"] = {name: _version(name.replace("_", "-")) or _version(name) for name in LIBRARIES}
    gpus = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
    info["gpus"] = gpus.splitlines() if gpus else []
    jobenv = JobEnvironment.from_environ(os.environ)
    info["slurm"] = {
        "version": _run(["sinfo", "--version"]),
        "in_job": jobenv.job_id,
        "tmpdir": jobenv.tmpdir,
    }
    where = _nearest_existing(store)
    st = os.statvfs(where)
    info["store"] = {
        "path": str(store),
        "exists": store.exists(),
        "free_gib": round(st.f_bavail * st.f_frsize / 2**30, 2),
        "free_inodes": st.f_favail,
        "assets": _count_assets(store),
        "under": _filesystems_under(store),
    }
    watched = (*hfenv.OFFLINE_VARS, hfenv.HF_HOME, hfenv.HFHPC_STORE, hfenv.HF_ENDPOINT, *hfenv.CACHE_OVERRIDES)
    info["environment"] = {name: os.environ.get(name) for name in watched if os.environ.get(name) is not None}
    info["token"] = "set (HF_TOKEN)" if hfenv.token() else "not set"
    info["endpoint"] = hfenv.endpoint()
    xet_off = os.environ.get("HF_HUB_DISABLE_XET", "").lower() in {"1", "true", "yes"}
    info["xet"] = {"installed": _version("hf-xet") is not None, "disabled": xet_off}
    return info


def _filesystems_under(store: Path, environ=os.environ) -> list[str]:
    """``HOME`` and ``SCRATCH`` when the store lies under them (after resolving links)."""
    real = Path(os.path.realpath(store))
    found = []
    for var in ("HOME", "SCRATCH"):
        value = environ.get(var)
        if value and value != "/" and real.is_relative_to(os.path.realpath(value)):
            found.append(var)
    return found


def _count_assets(store: Path) -> dict[str, int]:
    hub = store / "hub"
    counts = {"models": 0, "datasets": 0, "spaces": 0}
    if hub.is_dir():
        for child in hub.iterdir():
            prefix = child.name.split("--", 1)[0]
            if prefix in counts:
                counts[prefix] += 1
    return counts


def warnings(info: dict) -> list[str]:
    out = []
    if info["store"]["free_gib"] < 10:
        out.append(f"only {info['store']['free_gib']} GiB free where the store lives: a 7B model needs ~15 GiB")
    where = "put it in project space (a group's folder, group-readable: chmod -R g+rX; shared for writing: a setgid folder and umask 002) and export HFHPC_STORE there"
    if "HOME" in info["store"]["under"]:
        out.append(f"the store {info['store']['path']} is under $HOME: home quotas are small and others cannot read it; {where}")
    if "SCRATCH" in info["store"]["under"]:
        out.append(f"the store {info['store']['path']} is under $SCRATCH, which is purged: staged assets vanish; {where}")
    if info["xet"]["installed"] and not info["xet"]["disabled"]:
        out.append("hf_xet is installed and enabled: xet downloads hang on many login nodes (hfhpc stage disables it)")
    overrides = [v for v in hfenv.CACHE_OVERRIDES if v in info["environment"]]
    if overrides:
        out.append(f"{', '.join(overrides)} set: jobs started by hfhpc ignore it and use the store")
    return out


def render(info: dict) -> str:
    lines = [f"hfhpc        {info['hfhpc']}", f"python       {info['python']}"]
    for name, version in info["libraries"].items():
        lines.append(f"  {name:<16} {version or '-'}")
    lines.append(f"gpus         {'; '.join(info['gpus']) if info['gpus'] else 'none visible (nvidia-smi)'}")
    s = info["slurm"]
    lines.append(f"slurm        {s['version'] or 'not found'}" + (f", in job {s['in_job']}" if s["in_job"] else ""))
    st = info["store"]
    lines.append(f"store        {st['path']} ({'exists' if st['exists'] else 'not created yet'})")
    lines.append(f"  free       {st['free_gib']} GiB, {st['free_inodes']} inodes")
    lines.append(f"  assets     {st['assets']['models']} models, {st['assets']['datasets']} datasets, {st['assets']['spaces']} metrics/spaces")
    lines.append(f"endpoint     {info['endpoint']}")
    lines.append(f"token        {info['token']}")
    lines.append(f"xet          {'installed' if info['xet']['installed'] else 'not installed'}, {'disabled' if info['xet']['disabled'] else 'enabled'}")
    for name, value in info["environment"].items():
        lines.append(f"  {name}={value}")
    for w in warnings(info):
        lines.append(f"warning: {w}")
    return "\n".join(lines)
