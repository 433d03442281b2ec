"""What a partition offers, and whether a job's request can ever run there.

SLURM accepts a job that no node of its partition can hold and leaves it ``PENDING
(PartitionConfig)`` (or ``Resources``) for ever: 8 CPUs per task on nodes of 2 CPUs is queued, not
refused. ``hfhpc submit`` compares the request with ``sinfo``'s numbers first and refuses such a job
with them. A partition whose name ``sinfo`` does not list gets no verdict here: ``sbatch`` refuses it
with its own message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hfhpc.errors import HfhpcError
from hfhpc.slurmtime import parse_reported as parse_duration

# One line per partition, node state and node configuration. Without --exact, sinfo merges nodes of
# one partition and state that differ in CPUs or memory into one line showing the smallest value
# and "+" ("250+", `man sinfo`): a partition of 32- and 48-CPU nodes would seem to have none of 48.
# "|" never occurs in a partition name, a number or a gres string.
SINFO_FORMAT = "%P|%a|%l|%D|%c|%m|%G"
SINFO_ARGS = ("sinfo", "--noheader", "--exact", f"--format={SINFO_FORMAT}")

_LEADING_INT = re.compile(r"^(\d+)")


@dataclass(frozen=True)
class NodeGroup:
    """Nodes of one partition that look alike to the scheduler."""

    count: int
    cpus: int
    mem_mb: int
    gpus: Mapping[str | None, int]  # GPU type (None: untyped) → GPUs per node
    exact: bool = True  # False: sinfo printed a "+" (at least this much), so no verdict on size


@dataclass(frozen=True)
class Partition:
    name: str
    default: bool
    up: bool
    time_limit_s: int | None  # None: no limit
    groups: tuple[NodeGroup, ...]

    @property
    def nodes(self) -> int:
        return sum(g.count for g in self.groups)


@dataclass(frozen=True)
class Request:
    """What a job asks of every node (SLURM's per-node view of hfhpc's one task per node)."""

    nodes: int
    cpus_per_node: int
    mem_mb: int  # 0: the site's default, never a reason to refuse
    gpus_per_node: int
    gpu_type: str | None
    time_s: int


class JobCannotRunError(HfhpcError):
    """No node of the partition can ever hold the job: the numbers of the request and the partition."""

    def __init__(self, partition: str, problems: Sequence[str], fix: str):
        self.partition = partition
        self.problems = tuple(problems)
        super().__init__(f"the job can never start in partition {partition}: {'; '.join(problems)}", fix)


def _count(text: str) -> int:
    # sinfo prints "2+" where it summarizes differing values; the smaller bound is what every node has.
    m = _LEADING_INT.match(text.strip())
    return int(m.group(1)) if m else 0


def parse_gres(text: str) -> dict[str | None, int]:
    """GPUs per node by type from ``%G``: ``gpu:2``, ``gpu:a100:4(S:0-1)``, ``gpu:a100:4,gpu:v100:2``,
    ``(null)``. Other generic resources are ignored."""
    gpus: dict[str | None, int] = {}
    for item in re.split(r",(?![^()]*\))", text.strip()):
        fields = re.sub(r"\(.*?\)", "", item).split(":")
        if fields[0] != "gpu" or len(fields) < 2:
            continue
        kind, count = (None, fields[1]) if len(fields) == 2 else (fields[1], fields[2])
        if count.isdigit():
            gpus[kind] = gpus.get(kind, 0) + int(count)
    return gpus


def parse_sinfo(text: str) -> dict[str, Partition]:
    """Partitions by name from ``sinfo --noheader --format=`` :data:`SINFO_FORMAT`; the default
    partition is the one ``sinfo`` marks with ``*``."""
    found: dict[str, dict] = {}
    for line in text.splitlines():
        cols = line.strip().split("|")
        if len(cols) != 7:
            continue
        name, avail, limit, count, cpus, mem, gres = cols
        default = name.endswith("*")
        name = name.rstrip("*")
        entry = found.setdefault(name, {"default": False, "up": False, "limit": parse_duration(limit), "groups": []})
        entry["default"] |= default
        entry["up"] |= avail.strip() == "up"
        entry["groups"].append(NodeGroup(count=_count(count), cpus=_count(cpus), mem_mb=_count(mem), gpus=parse_gres(gres),
                                         exact="+" not in cpus + mem))
    return {name: Partition(name, e["default"], e["up"], e["limit"], tuple(e["groups"])) for name, e in found.items()}


def _gpus(group: NodeGroup, gpu_type: str | None) -> int:
    if gpu_type is None:
        return sum(group.gpus.values())
    return group.gpus.get(gpu_type, 0)


def problems(request: Request, partition: Partition) -> list[str]:
    """Why ``request`` can never run in ``partition``, with the numbers; empty when it can."""
    found: list[str] = []
    if partition.time_limit_s is not None and request.time_s > partition.time_limit_s:
        found.append(f"time limit {_hms(request.time_s)} asked, the partition allows {_hms(partition.time_limit_s)}")
    fitting = [g for g in partition.groups if not g.exact or _node_problems(request, g) == []]
    if sum(g.count for g in fitting) >= request.nodes:
        return found
    if not fitting:
        # Say what the largest nodes lack: the closest the partition comes.
        found += _node_problems(request, max(partition.groups, key=lambda g: (g.cpus, _gpus(g, request.gpu_type), g.mem_mb)))
    else:
        found.append(f"{request.nodes} nodes asked, {sum(g.count for g in fitting)} of the partition's "
                     f"{partition.nodes} can hold the job")
    return found


def _node_problems(request: Request, group: NodeGroup) -> list[str]:
    found = []
    if request.cpus_per_node > group.cpus:
        found.append(f"{request.cpus_per_node} CPUs per node asked, its nodes have {group.cpus}")
    if request.mem_mb and request.mem_mb > group.mem_mb:
        found.append(f"{request.mem_mb // 1024} GB of memory per node asked, its nodes have {group.mem_mb / 1024:.0f} GB")
    have = _gpus(group, request.gpu_type)
    if request.gpus_per_node > have:
        kind = f"{request.gpu_type} " if request.gpu_type else ""
        found.append(f"{request.gpus_per_node} {kind}GPUs per node asked, its nodes have {have}")
    return found


def _hms(seconds: int) -> str:
    days, s = divmod(seconds, 86400)
    text = f"{s // 3600:02}:{s % 3600 // 60:02}:{s % 60:02}"
    return f"{days}-{text}" if days else text


def check_request(request: Request, partitions: Mapping[str, Partition], names: Sequence[str] | None) -> None:
    """Raise :class:`JobCannotRunError` when no partition of ``names`` (None: the default one) can
    ever run ``request``. Partitions ``sinfo`` does not list give no verdict."""
    if names:
        known = [partitions[n] for n in names if n in partitions]
    else:
        known = [p for p in partitions.values() if p.default]
    if not known or len(known) < len(names or [None]):
        return  # sbatch knows best about a partition sinfo does not show (hidden, or a typo)
    verdicts = {p.name: problems(request, p) for p in known}
    if all(verdicts.values()):
        name = ",".join(verdicts)
        said = [f"{p}: {msg}" if len(verdicts) > 1 else msg for p, msgs in verdicts.items() for msg in msgs]
        raise JobCannotRunError(name, said, "lower the spec's resources (cpus_per_gpu, mem_gb, gpus_per_node, nodes, "
                                "time) or choose another resources.partition; `sinfo -s` lists them")
