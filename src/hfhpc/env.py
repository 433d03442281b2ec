"""Every environment variable hfhpc reads or writes, in one place.

The Hugging Face libraries read their variables when they are imported, so hfhpc never sets them in
its own process to change a library's behaviour: it builds the environment of the child processes
it starts (built by :mod:`hfhpc.offline.environ`). This module holds names and readers only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

# hfhpc's own variables
HFHPC_STORE = "HFHPC_STORE"
HFHPC_DEBUG = "HFHPC_DEBUG"
HFHPC_STATE_DIR = "HFHPC_STATE_DIR"  # where submitted jobs are remembered
HFHPC_SEAL = "HFHPC_SEAL"  # "1" inside a sealed process
HFHPC_SEAL_ALLOW = "HFHPC_SEAL_ALLOW"  # comma-separated hosts a sealed process may reach
HFHPC_RUN_DIR = "HFHPC_RUN_DIR"  # the run folder, set for the ranks by the node agent
HFHPC_NODE_STARTED = "HFHPC_NODE_STARTED"  # when the node agent started (Unix time)

# The job environment as the node agent hands it to the ranks (written and read only by
# hfhpc.scheduler.environment): the scheduler's variables, read once, under names of hfhpc's own.
HFHPC_SCHEDULER = "HFHPC_SCHEDULER"  # "slurm"; absent outside a job
HFHPC_JOB_ID = "HFHPC_JOB_ID"
HFHPC_NODE_RANK = "HFHPC_NODE_RANK"
HFHPC_NODELIST = "HFHPC_NODELIST"  # every node's host name, expanded, comma-separated, head first
HFHPC_NUM_NODES = "HFHPC_NUM_NODES"
HFHPC_HEAD_NODE = "HFHPC_HEAD_NODE"
HFHPC_RESTART_COUNT = "HFHPC_RESTART_COUNT"
HFHPC_TMPDIR = "HFHPC_TMPDIR"  # node-local disk that vanishes with the job
HFHPC_CPUS_PER_TASK = "HFHPC_CPUS_PER_TASK"
HFHPC_GPUS_ON_NODE = "HFHPC_GPUS_ON_NODE"
HFHPC_NODE_NAME = "HFHPC_NODE_NAME"
HFHPC_LAUNCH_HOST = "HFHPC_LAUNCH_HOST"  # where the job step was launched from (an address)
HFHPC_DECODE_ATTENTION = "HFHPC_DECODE_ATTENTION"  # the infer engine's decode attention: auto, varlen, sdpa, matmul
HFHPC_PROFILE_STEPS = "HFHPC_PROFILE_STEPS"  # "A-B": profile steps A to B of each rank (logs/profile-rank*.txt)

# SLURM's variables in a job (read only by hfhpc.scheduler.environment). SLURM_JOB_NODELIST and
# SLURM_NODELIST name the same nodes (the second is the older name); a step has its own.
SLURM_JOB_ID = "SLURM_JOB_ID"
SLURM_JOB_NODELIST = "SLURM_JOB_NODELIST"
SLURM_NODELIST = "SLURM_NODELIST"
SLURM_STEP_NODELIST = "SLURM_STEP_NODELIST"
SLURM_JOB_NUM_NODES = "SLURM_JOB_NUM_NODES"
SLURM_NNODES = "SLURM_NNODES"
SLURM_NODEID = "SLURM_NODEID"
SLURM_RESTART_COUNT = "SLURM_RESTART_COUNT"
SLURM_TMPDIR = "SLURM_TMPDIR"  # set by sites (the Alliance's), not by SLURM itself
SLURM_CPUS_PER_TASK = "SLURM_CPUS_PER_TASK"
SLURM_GPUS_ON_NODE = "SLURM_GPUS_ON_NODE"
SLURMD_NODENAME = "SLURMD_NODENAME"
SLURM_LAUNCH_NODE_IPADDR = "SLURM_LAUNCH_NODE_IPADDR"
SLURM_CONF = "SLURM_CONF"  # which cluster the SLURM clients talk to
SBATCH_PARTITION = "SBATCH_PARTITION"  # sbatch's input variable: it overrides #SBATCH --partition

# torch.distributed's rendezvous host, which a script may set itself.
MASTER_ADDR = "MASTER_ADDR"

# Hugging Face variables
HF_HOME = "HF_HOME"
HF_HUB_CACHE = "HF_HUB_CACHE"
HF_ENDPOINT = "HF_ENDPOINT"
HF_TOKEN = "HF_TOKEN"
HF_HUB_DISABLE_XET = "HF_HUB_DISABLE_XET"
HF_HUB_OFFLINE = "HF_HUB_OFFLINE"
HF_DATASETS_CACHE = "HF_DATASETS_CACHE"
HF_METRICS_CACHE = "HF_METRICS_CACHE"  # evaluate's working files

DEFAULT_ENDPOINT = "https://huggingface.co"

# Variables that make every library of the stack work from the cache alone, and keep it quiet.
OFFLINE_VARS: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "HF_UPDATE_DOWNLOAD_COUNTS": "false",
    "HF_HUB_DISABLE_XET": "1",
    "DO_NOT_TRACK": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
}

# Variables that would point a child somewhere other than the store; removed from sealed envs.
CACHE_OVERRIDES = (
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_DATASETS_CACHE",
    "TRANSFORMERS_CACHE",
    "HF_MODULES_CACHE",
    "HF_EVALUATE_CACHE",
    "XDG_CACHE_HOME",
)

SECRET_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN")


def debug_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get(HFHPC_DEBUG, "").lower() in {"1", "true", "yes", "on"}


def default_store(environ: Mapping[str, str] = os.environ) -> Path:
    """Store location: ``HFHPC_STORE`` > ``HF_HOME`` > ``~/.cache/huggingface``."""
    for var in (HFHPC_STORE, HF_HOME):
        value = environ.get(var)
        if value:
            return Path(value).expanduser()
    return Path("~/.cache/huggingface").expanduser()


def resolve_store(cli_value: str | os.PathLike[str] | None, environ: Mapping[str, str] = os.environ) -> Path:
    """``--store`` wins over every variable."""
    if cli_value:
        return Path(cli_value).expanduser().absolute()
    return default_store(environ).absolute()


def endpoint_problem(url: str) -> str | None:
    """Why ``url`` cannot be a Hub endpoint (an http or https URL with a host and nothing after the
    path), or None."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as e:
        return str(e)
    if parts.scheme not in ("http", "https"):
        return "it does not start with http:// or https://"
    if not parts.hostname:
        return "it names no host"
    if parts.query or parts.fragment or any(c.isspace() for c in url):
        return "it has a query, a fragment or whitespace"
    return None


def endpoint(environ: Mapping[str, str] = os.environ, given: str | None = None) -> str:
    """The Hub or mirror to download from: ``given`` (``--endpoint``), else ``HF_ENDPOINT``, else the Hub."""
    from hfhpc.errors import UsageError

    name = "--endpoint" if given else HF_ENDPOINT
    value = given if given else environ.get(HF_ENDPOINT, DEFAULT_ENDPOINT)
    problem = endpoint_problem(value)
    if problem:
        raise UsageError(f"{name} {value!r} is not a URL: {problem}", "give the Hub's or a mirror's address, e.g. https://huggingface.co")
    return value.rstrip("/")


def token(environ: Mapping[str, str] = os.environ) -> str | None:
    """The user's token, from the environment only. It is passed to HTTP calls and nowhere else."""
    for var in SECRET_VARS:
        value = environ.get(var)
        if value:
            return value
    return None


def state_dir(environ: Mapping[str, str] = os.environ) -> Path:
    value = environ.get(HFHPC_STATE_DIR)
    if value:
        return Path(value).expanduser()
    base = environ.get("XDG_STATE_HOME") or str(Path("~/.local/state").expanduser())
    return Path(base) / "hfhpc"


def store_environ(store: Path) -> dict[str, str]:
    """The variables that point every library at ``store`` (an ``HF_HOME`` layout)."""
    return {HF_HOME: str(store), HFHPC_STORE: str(store)}


def export_lines(variables: Mapping[str, str]) -> list[str]:
    import shlex

    return [f"export {name}={shlex.quote(value)}" for name, value in variables.items()]
