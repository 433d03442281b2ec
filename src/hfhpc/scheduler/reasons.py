"""Why a job waits, in words, with what to change (SLURM's reason codes, ``man squeue``: JOB REASON CODES).

``scontrol`` reports a pending job's reason as a bare code (``PartitionConfig``); some carry details
after a comma (``ReqNodeNotAvail,_UnavailableNodes:n[1-2]``). :func:`explain` turns one into a
sentence and a fix, and says whether the job can start at all without a change.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PendingReason:
    code: str  # as SLURM wrote it, details included
    meaning: str
    fix: str | None  # None: nothing to do but wait
    never_starts: bool = False  # True: it waits for ever unless something changes

    def render(self) -> str:
        text = f"{self.code}: {self.meaning}"
        return f"{text}; {self.fix}" if self.fix else text


_SPEC = "the spec's resources"
_LIMITS = "`sacctmgr show assoc user=$USER` and `sacctmgr show qos` list the limits"
# code → (meaning, fix, never starts)
_KNOWN: dict[str, tuple[str, str | None, bool]] = {
    "Priority": ("jobs of higher priority are ahead of it in the queue", None, False),
    "Resources": ("it waits for nodes with the CPUs, memory and GPUs it asks to become free", None, False),
    "None": ("the scheduler has not looked at it yet", None, False),
    "BeginTime": ("it may not start before the begin time it was given", "`scontrol update job=ID StartTime=now` starts it sooner", False),
    "Dependency": ("it waits for the jobs it depends on to end", None, False),
    "DependencyNeverSatisfied": ("a job it depends on ended in a way that never satisfies the dependency",
                                 "cancel it (`hfhpc cancel JOB`) and submit again without the dependency", True),
    "PartitionConfig": ("no node of the partition can hold the request (more CPUs, memory or GPUs per node, or "
                        "more nodes, than the partition has)", f"lower {_SPEC} or pick another resources.partition; "
                        "`sinfo -o '%P %c %m %G %D'` shows what each partition offers", True),
    "PartitionTimeLimit": ("the time limit asked exceeds the partition's", "lower resources.time or pick a partition "
                           "that allows it (`sinfo -o '%P %l'`)", True),
    "PartitionNodeLimit": ("the number of nodes asked is outside the partition's limits",
                           "change resources.nodes or resources.partition (`sinfo -s`)", True),
    "PartitionDown": ("the partition is down", "wait for the administrators, or pick another resources.partition", False),
    "PartitionInactive": ("the partition is inactive", "wait for the administrators, or pick another resources.partition", False),
    "ReqNodeNotAvail": ("a node it needs is down, drained or reserved (often a maintenance reservation that would "
                        "overlap the job's time limit)", "a shorter resources.time may fit before the reservation; "
                        "`scontrol show reservation` lists them", False),
    "NodeDown": ("a node it needs is down", "wait, or ask the cluster's support", False),
    "BadConstraints": ("its constraints (--constraint, GPU type) match no node", "fix resources.gpu_type or the "
                       "--constraint in resources.extra_sbatch (`sinfo -o '%P %f %G'`)", True),
    "Reservation": ("it waits for its advanced reservation to start", None, False),
    "Licenses": ("it waits for a license", None, False),
    "JobHeldUser": ("it is held by its owner (scontrol hold)", "`scontrol release ID` lets it start", True),
    "JobHeldAdmin": ("an administrator held it", "ask the cluster's support", True),
    "launch_failed_requeued_held": ("its launch failed and SLURM held it", "read its log, then `scontrol release ID`", True),
    "InvalidAccount": ("its account is invalid", "set resources.account to one of `sacctmgr show assoc user=$USER`", True),
    "InvalidQOS": ("its QOS is invalid", "set resources.qos to one your account may use (`sacctmgr show assoc user=$USER`)", True),
    "QOSMaxWallDurationPerJobLimit": ("its time limit exceeds the longest its QOS allows", "lower resources.time or "
                                      f"choose another resources.qos; {_LIMITS}", True),
    "AssocMaxWallDurationPerJobLimit": ("its time limit exceeds the longest its account allows",
                                        f"lower resources.time; {_LIMITS}", True),
    "AssocGrpGRES": ("your account's group is using all the GPUs (GRES) it may use at once",
                     "it starts when the group's other jobs end; fewer GPUs start sooner", False),
    "AssocGrpCpuLimit": ("your account's group is using all the CPUs it may use at once", None, False),
    "AssocGrpMemLimit": ("your account's group is using all the memory it may use at once", None, False),
    "AssocGrpGRESMinutes": ("your account's group has used its GPU minutes", "ask for more allocation or use another "
                            "resources.account", True),
    "AssocGrpCPUMinutesLimit": ("your account's group has used its CPU minutes", "ask for more allocation or use another "
                                "resources.account", True),
    "AssocMaxJobsLimit": ("you have as many running jobs as your account allows", None, False),
    "QOSMaxJobsPerUserLimit": ("you have as many running jobs as the QOS allows", None, False),
    "QOSMaxGRESPerUser": ("your running jobs use all the GPUs the QOS allows one user", None, False),
    "QOSMaxCpuPerUserLimit": ("your running jobs use all the CPUs the QOS allows one user", None, False),
    "QOSGrpGRES": ("the QOS's jobs use all the GPUs it allows at once", None, False),
    "QOSMaxGRESPerJob": ("it asks more GPUs than the QOS allows one job", f"lower resources.gpus_per_node or nodes; {_LIMITS}", True),
    "QOSMaxCpuPerJobLimit": ("it asks more CPUs than the QOS allows one job", f"lower resources.cpus_per_gpu; {_LIMITS}", True),
    "QOSMaxNodePerJobLimit": ("it asks more nodes than the QOS allows one job", f"lower resources.nodes; {_LIMITS}", True),
    "QOSMinGRES": ("it asks fewer GPUs than the QOS requires", f"raise resources.gpus_per_node or change resources.qos; {_LIMITS}", True),
    "MaxRequeue": ("it was requeued as often as SLURM allows", "submit it again: it resumes from its last checkpoint", True),
    "SystemFailure": ("SLURM, the file system or the network failed", "ask the cluster's support", False),
}


def explain(code: str | None) -> PendingReason | None:
    """The reason ``code`` in words (None for no reason). Unknown codes keep their name, with the
    family they belong to where the name says it (``Assoc…``, ``QOS…`` limits)."""
    if not code or code == "None":
        return None
    base = code.split(",", 1)[0]
    if base in _KNOWN:
        meaning, fix, never = _KNOWN[base]
        return PendingReason(code, meaning, fix, never)
    if base.startswith(("Assoc", "QOS")) and ("Limit" in base or "Grp" in base or "Max" in base):
        owner = "your account" if base.startswith("Assoc") else "the QOS"
        return PendingReason(code, f"a limit of {owner} holds it back", _LIMITS)
    return PendingReason(code, "SLURM's reason (see `man squeue`, JOB REASON CODES)", None)
