"""The job environment: what the scheduler tells a process about its job, read in one place.

submitit's ``JobEnvironment`` idea: the scheduler's variables (``SLURM_*``) are read here and
nowhere else. The node agent reads them once (:meth:`JobEnvironment.from_environ`) and hands them
to the ranks as ``HFHPC_*`` variables (:meth:`JobEnvironment.rank_variables`); a rank, a checkpoint
marker or the network seal then reads the same object back, whether it was started by the agent
(``HFHPC_*``) or by a hand-written ``srun`` (``SLURM_*``).

A second scheduler adds one reader (a function from the environment to a :class:`JobEnvironment`)
to :data:`READERS`. The network seal loads this module in children that may not import hfhpc, so it
imports only the standard library, :mod:`hfhpc.env` (names) and :mod:`hfhpc.scheduler.hostlist`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from hfhpc import env as hfenv
from hfhpc.scheduler.hostlist import expand_hostlist

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class JobEnvironment:
    """This process's job, as its scheduler describes it. Outside a job: one node, this machine."""

    scheduler: str | None = None  # "slurm"; None outside a job
    job_id: str | None = None
    node_rank: int = 0
    nodes: tuple[str, ...] = ()  # the job's host names in the scheduler's order (the head first)
    num_nodes: int = 1
    restart_count: int = 0  # how often the job was requeued
    tmpdir: str | None = None  # node-local disk, gone with the job
    cpus_per_task: int | None = None
    gpus_on_node: int | None = None
    node_name: str | None = None  # this node, as the scheduler names it
    launch_host: str | None = None  # where the job step was launched from (an address)
    step_nodes: tuple[str, ...] = ()  # the current step's nodes, where they differ from the job's

    @property
    def in_job(self) -> bool:
        return self.job_id is not None

    @property
    def head(self) -> str:
        """The first node (the rendezvous host); loopback outside a job."""
        return self.nodes[0] if self.nodes else LOOPBACK

    def peer_hosts(self) -> list[str]:
        """Every host name or address of the job that a sealed process may reach."""
        names = [*self.nodes, *self.step_nodes]
        names += [n for n in (self.node_name, self.launch_host) if n]
        return list(dict.fromkeys(names))

    def rank_variables(self) -> dict[str, str]:
        """The ``HFHPC_*`` variables the node agent gives its ranks (empty outside a job)."""
        if not self.in_job:
            return {}
        values = {
            hfenv.HFHPC_SCHEDULER: self.scheduler,
            hfenv.HFHPC_JOB_ID: self.job_id,
            hfenv.HFHPC_NODE_RANK: str(self.node_rank),
            hfenv.HFHPC_NODELIST: ",".join(self.nodes),
            hfenv.HFHPC_NUM_NODES: str(self.num_nodes),
            hfenv.HFHPC_HEAD_NODE: self.head,
            hfenv.HFHPC_RESTART_COUNT: str(self.restart_count),
            hfenv.HFHPC_TMPDIR: self.tmpdir,
            hfenv.HFHPC_CPUS_PER_TASK: None if self.cpus_per_task is None else str(self.cpus_per_task),
            hfenv.HFHPC_GPUS_ON_NODE: None if self.gpus_on_node is None else str(self.gpus_on_node),
            hfenv.HFHPC_NODE_NAME: self.node_name,
            hfenv.HFHPC_LAUNCH_HOST: self.launch_host,
        }
        return {k: v for k, v in values.items() if v is not None}

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], *, strict: bool = False,
                     handed_down: bool = True) -> JobEnvironment:
        """The job of ``environ``: what a node agent handed down (``HFHPC_*``), else what the first
        scheduler that recognizes the environment says, else "no job".

        The node agent itself passes ``handed_down=False``: it reads the scheduler, never variables
        an earlier job may have left in the environment it was submitted from. A malformed node list
        raises ``ValueError`` when ``strict`` (the agent: a wrong head node would hang the
        rendezvous) and is ignored otherwise (the seal must never break a process's start-up).
        """
        readers = (_from_hfhpc, *READERS.values()) if handed_down else tuple(READERS.values())
        for reader in readers:
            found = reader(environ, strict)
            if found is not None:
                return found
        return cls()


def without_handed_down(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` less the variables a node agent hands down: a job submitted from inside another
    job (sbatch copies the environment) or a local run there must not inherit that job's."""
    return {k: v for k, v in environ.items() if k not in HANDED_DOWN}


def variables_read(environ: Mapping[str, str]) -> tuple[str | None, ...]:
    """The values of every variable :meth:`JobEnvironment.from_environ` reads: a key that changes
    when the job environment may have."""
    return tuple(environ.get(name) for name in VARIABLES)


# -- readers ----------------------------------------------------------------------------------

def _int(value: str | None, default: int | None) -> int | None:
    value = (value or "").strip()
    # SLURM_CPUS_PER_TASK and SLURM_GPUS_ON_NODE are plain counts; anything else is not ours to guess.
    return int(value) if value.isdigit() else default


def _hosts(value: str | None, strict: bool) -> tuple[str, ...]:
    try:
        return tuple(expand_hostlist(value or ""))
    except ValueError:
        if strict:
            raise
        return ()


def _from_hfhpc(environ: Mapping[str, str], strict: bool) -> JobEnvironment | None:
    scheduler, job_id = environ.get(hfenv.HFHPC_SCHEDULER), environ.get(hfenv.HFHPC_JOB_ID)
    if not scheduler or not job_id:
        return None
    nodes = tuple(h for h in environ.get(hfenv.HFHPC_NODELIST, "").split(",") if h)
    return JobEnvironment(
        scheduler=scheduler, job_id=job_id,
        node_rank=_int(environ.get(hfenv.HFHPC_NODE_RANK), 0) or 0,
        nodes=nodes, num_nodes=_int(environ.get(hfenv.HFHPC_NUM_NODES), None) or len(nodes) or 1,
        restart_count=_int(environ.get(hfenv.HFHPC_RESTART_COUNT), 0) or 0,
        tmpdir=environ.get(hfenv.HFHPC_TMPDIR) or None,
        cpus_per_task=_int(environ.get(hfenv.HFHPC_CPUS_PER_TASK), None),
        gpus_on_node=_int(environ.get(hfenv.HFHPC_GPUS_ON_NODE), None),
        node_name=environ.get(hfenv.HFHPC_NODE_NAME) or None,
        launch_host=environ.get(hfenv.HFHPC_LAUNCH_HOST) or None,
    )


def _from_slurm(environ: Mapping[str, str], strict: bool) -> JobEnvironment | None:
    # A job always has its id; a node list alone (a test, a hand-built environment) still names
    # the hosts a sealed process may reach.
    if not any(environ.get(name) for name in _SLURM_MARKERS):
        return None
    job_id = environ.get(hfenv.SLURM_JOB_ID) or None
    nodes = _hosts(environ.get(hfenv.SLURM_JOB_NODELIST) or environ.get(hfenv.SLURM_NODELIST), strict)
    step = _hosts(environ.get(hfenv.SLURM_STEP_NODELIST), strict)
    count = environ.get(hfenv.SLURM_JOB_NUM_NODES) or environ.get(hfenv.SLURM_NNODES)
    return JobEnvironment(
        scheduler="slurm", job_id=job_id,
        node_rank=_int(environ.get(hfenv.SLURM_NODEID), 0) or 0,
        nodes=nodes, num_nodes=_int(count, None) or len(nodes) or 1,
        restart_count=_int(environ.get(hfenv.SLURM_RESTART_COUNT), 0) or 0,
        tmpdir=environ.get(hfenv.SLURM_TMPDIR) or None,
        cpus_per_task=_int(environ.get(hfenv.SLURM_CPUS_PER_TASK), None),
        gpus_on_node=_int(environ.get(hfenv.SLURM_GPUS_ON_NODE), None),
        node_name=environ.get(hfenv.SLURMD_NODENAME) or None,
        launch_host=environ.get(hfenv.SLURM_LAUNCH_NODE_IPADDR) or None,
        step_nodes=tuple(h for h in step if h not in nodes),
    )


_SLURM_MARKERS = (hfenv.SLURM_JOB_ID, hfenv.SLURM_JOB_NODELIST, hfenv.SLURM_NODELIST, hfenv.SLURM_STEP_NODELIST,
                  hfenv.SLURMD_NODENAME)
Reader = Callable[[Mapping[str, str], bool], "JobEnvironment | None"]
# One reader per scheduler, tried in order after the variables a node agent handed down.
READERS: dict[str, Reader] = {"slurm": _from_slurm}
# What rank_variables() writes.
HANDED_DOWN = (
    hfenv.HFHPC_SCHEDULER, hfenv.HFHPC_JOB_ID, hfenv.HFHPC_NODE_RANK, hfenv.HFHPC_NODELIST, hfenv.HFHPC_NUM_NODES,
    hfenv.HFHPC_HEAD_NODE, hfenv.HFHPC_RESTART_COUNT, hfenv.HFHPC_TMPDIR, hfenv.HFHPC_CPUS_PER_TASK,
    hfenv.HFHPC_GPUS_ON_NODE, hfenv.HFHPC_NODE_NAME, hfenv.HFHPC_LAUNCH_HOST,
)
# Every variable the readers look at.
VARIABLES = (
    *HANDED_DOWN,
    hfenv.SLURM_JOB_ID, hfenv.SLURM_JOB_NODELIST, hfenv.SLURM_NODELIST, hfenv.SLURM_STEP_NODELIST,
    hfenv.SLURM_JOB_NUM_NODES, hfenv.SLURM_NNODES, hfenv.SLURM_NODEID, hfenv.SLURM_RESTART_COUNT, hfenv.SLURM_TMPDIR,
    hfenv.SLURM_CPUS_PER_TASK, hfenv.SLURM_GPUS_ON_NODE, hfenv.SLURMD_NODENAME, hfenv.SLURM_LAUNCH_NODE_IPADDR,
)  # fmt: skip
