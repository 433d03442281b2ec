"""The scheduler layer without a cluster: host lists, the job environment, partitions, pending reasons."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hfhpc import env as hfenv
from hfhpc.offline.seal import SealPolicy
from hfhpc.scheduler.environment import JobEnvironment, variables_read
from hfhpc.scheduler.hostlist import expand_hostlist

# --- hostlists --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hostlist", "expected"),
    [
        ("n[01-03,7],gpu5", ["n01", "n02", "n03", "n7", "gpu5"]),
        ("node1", ["node1"]),
        ("a[8-10]", ["a8", "a9", "a10"]),
        ("a[08-10]", ["a08", "a09", "a10"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("n[1-2]-ib,login", ["n1-ib", "n2-ib", "login"]),
        ("gpu[001-002], cpu1", ["gpu001", "gpu002", "cpu1"]),
        ("n[1-2],n2,n1", ["n1", "n2"]),
        ("n[3]", ["n3"]),
        ("", []),
    ],
)
def test_expand_hostlist(hostlist: str, expected: list[str]) -> None:
    assert expand_hostlist(hostlist) == expected


@pytest.mark.parametrize("bad", ["n[1-", "n]1", "n[3-1]", "n[a-b]", "n[1-2]]", "n[[1]]", "n[-2]", "n[0-99999999]"])
def test_expand_hostlist_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        expand_hostlist(bad)


# --- the job environment ----------------------------------------------------------------------------

SLURM_JOB = {
    "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NODELIST": "gpu[07-08]",
    "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_RESTART_COUNT": "3", "SLURM_TMPDIR": "/localscratch/u.4242.0",
    "SLURM_CPUS_PER_TASK": "16", "SLURM_GPUS_ON_NODE": "4", "SLURMD_NODENAME": "gpu08",
    "SLURM_LAUNCH_NODE_IPADDR": "10.1.0.7",
}


def test_slurm_variables_become_one_job_environment() -> None:
    jobenv = JobEnvironment.from_environ(SLURM_JOB)
    assert jobenv == JobEnvironment(
        scheduler="slurm", job_id="4242", node_rank=1, nodes=("gpu07", "gpu08"), num_nodes=2, restart_count=3,
        tmpdir="/localscratch/u.4242.0", cpus_per_task=16, gpus_on_node=4, node_name="gpu08", launch_host="10.1.0.7",
    )
    assert jobenv.head == "gpu07" and jobenv.in_job


def test_the_ranks_read_back_what_the_agent_handed_down_without_slurm_variables() -> None:
    handed = JobEnvironment.from_environ(SLURM_JOB).rank_variables()
    assert all(name.startswith("HFHPC_") for name in handed)
    assert handed[hfenv.HFHPC_NODELIST] == "gpu07,gpu08" and handed[hfenv.HFHPC_HEAD_NODE] == "gpu07"
    assert JobEnvironment.from_environ(handed) == JobEnvironment.from_environ(SLURM_JOB)


def test_handed_down_variables_win_over_the_schedulers() -> None:
    # A rank sees both; the agent's reading is the one every rank of the job shares.
    handed = JobEnvironment.from_environ(SLURM_JOB).rank_variables()
    mixed = {**SLURM_JOB, "SLURM_RESTART_COUNT": "9", **handed}
    assert JobEnvironment.from_environ(mixed).restart_count == 3


def test_outside_a_job_there_is_one_node_on_loopback() -> None:
    jobenv = JobEnvironment.from_environ({"PATH": "/usr/bin"})
    assert not jobenv.in_job and jobenv.head == "127.0.0.1" and jobenv.num_nodes == 1
    assert jobenv.rank_variables() == {}


def test_a_malformed_nodelist_raises_only_when_strict() -> None:
    bad = {**SLURM_JOB, "SLURM_JOB_NODELIST": "gpu[07-", "SLURM_NODELIST": "gpu[07-"}
    assert JobEnvironment.from_environ(bad).nodes == ()
    with pytest.raises(ValueError):
        JobEnvironment.from_environ(bad, strict=True)


def test_the_seal_allows_the_nodes_the_job_environment_names() -> None:
    handed = JobEnvironment.from_environ(SLURM_JOB).rank_variables()
    policy = SealPolicy.from_environ(handed, hostname="gpu08", resolve=lambda name: [], local_addresses=lambda: [])
    assert policy.lookup_allowed("gpu07") and policy.connect_allowed("10.1.0.7")
    assert not policy.lookup_allowed("gpu09")


def test_the_policy_key_changes_with_any_variable_the_job_environment_reads() -> None:
    before = variables_read(SLURM_JOB)
    assert variables_read({**SLURM_JOB, "SLURM_STEP_NODELIST": "gpu07"}) != before
    assert variables_read({**SLURM_JOB, "HFHPC_NODELIST": "gpu07"}) != before


def test_the_seal_finds_the_job_environment_in_a_python_that_cannot_import_hfhpc(tmp_path) -> None:
    # The guard loads seal.py by path in such children: seal must load the scheduler layer itself.
    seal_py = os.path.join(os.path.dirname(hfenv.__file__), "offline", "seal.py")
    code = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('hfhpc') is None\n"
        f"spec = importlib.util.spec_from_file_location('_policy', {seal_py!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(m.job_host_names({'SLURM_JOB_ID': '1', 'SLURM_JOB_NODELIST': 'n[1-2]'}))\n"
    )
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONNOUSERSITE": "1"}
    proc = subprocess.run([sys.executable, "-S", "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['n1', 'n2']"


def test_no_module_but_the_job_environment_reads_slurm_variables() -> None:
    import re
    from pathlib import Path

    src = Path(hfenv.__file__).parent
    allowed = {src / "env.py", src / "scheduler" / "environment.py"}
    # A quoted SLURM_ name outside the two owners (the batch script's shell text is SLURM's own).
    pattern = re.compile(r"""environ(?:\.get)?\(\s*["']SLURM|\[["']SLURM_""")
    offenders = [str(p.relative_to(src)) for p in src.rglob("*.py") if p not in allowed and pattern.search(p.read_text())]
    assert offenders == []
