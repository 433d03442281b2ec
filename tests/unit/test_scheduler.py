"""The scheduler layer without a cluster: host lists, the job environment, partitions, pending reasons."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hfhpc import env as hfenv
from hfhpc.launch.executor import Executor, SchedulerState, SlurmExecutor, slurm_request
from hfhpc.offline.seal import SealPolicy
from hfhpc.scheduler.environment import JobEnvironment, variables_read
from hfhpc.scheduler.hostlist import expand_hostlist
from hfhpc.scheduler.partitions import (
    JobCannotRunError,
    NodeGroup,
    Request,
    check_request,
    parse_gres,
    parse_sinfo,
)
from hfhpc.scheduler.reasons import explain

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


# --- partitions: sinfo, and requests that can never run --------------------------------------------

# `sinfo --noheader --format=%P|%a|%l|%D|%c|%m|%G` in SLURM 22.05's output format: the test cluster's
# (2 CPUs a node, 2 GPUs, no time limit) and a site's with typed GPUs and heterogeneous nodes.
SINFO_TEST_CLUSTER = "debug*|up|infinite|2|2|6553|gpu:2\none|up|infinite|1|2|6553|gpu:2\n"
SINFO_SITE = """\
cpubase_bycore_b1*|up|3:00:00|100|64|257000|(null)
gpubase_bygpu_b1|up|1-00:00:00|20|48|498000|gpu:a100:4(S:0-1)
gpubase_bygpu_b1|up|1-00:00:00|4|32|187000|gpu:v100l:4,shard:8
debug|down|30:00|2+|4+|1000+|gpu:1
"""


def _request(**over) -> Request:
    base = dict(nodes=1, cpus_per_node=2, mem_mb=0, gpus_per_node=0, gpu_type=None, time_s=600)
    return Request(**{**base, **over})


def test_parse_sinfo_groups_node_configurations_by_partition() -> None:
    parts = parse_sinfo(SINFO_SITE)
    assert set(parts) == {"cpubase_bycore_b1", "gpubase_bygpu_b1", "debug"}
    cpu, gpu, debug = parts["cpubase_bycore_b1"], parts["gpubase_bygpu_b1"], parts["debug"]
    assert cpu.default and cpu.up and cpu.time_limit_s == 3 * 3600 and cpu.nodes == 100
    assert cpu.groups[0] == NodeGroup(count=100, cpus=64, mem_mb=257000, gpus={})
    assert gpu.time_limit_s == 86400 and gpu.nodes == 24 and not gpu.default
    assert [g.gpus for g in gpu.groups] == [{"a100": 4}, {"v100l": 4}]
    assert not debug.up and debug.groups[0] == NodeGroup(count=2, cpus=4, mem_mb=1000, gpus={None: 1}, exact=False)
    assert parts["debug"].time_limit_s == 1800
    test = parse_sinfo(SINFO_TEST_CLUSTER)
    assert test["debug"].default and test["debug"].time_limit_s is None and test["one"].nodes == 1


def test_parse_gres() -> None:
    assert parse_gres("(null)") == {}
    assert parse_gres("gpu:2") == {None: 2}
    assert parse_gres("gpu:a100:4(S:0-1)") == {"a100": 4}
    assert parse_gres("gpu:a100:2(S:0),gpu:a100:2(S:1),mps:100") == {"a100": 4}


def test_eight_cpus_per_task_on_nodes_of_two_can_never_run() -> None:
    with pytest.raises(JobCannotRunError) as e:
        check_request(_request(cpus_per_node=8), parse_sinfo(SINFO_TEST_CLUSTER), None)
    assert e.value.partition == "debug"
    assert e.value.problems == ("8 CPUs per node asked, its nodes have 2",)
    assert e.value.exit_code == 1 and "cpus_per_gpu" in e.value.fix


def test_requests_the_partition_can_hold_pass() -> None:
    parts = parse_sinfo(SINFO_SITE)
    check_request(_request(cpus_per_node=64, mem_mb=250 * 1024, nodes=100, time_s=3 * 3600), parts, None)
    check_request(_request(cpus_per_node=32, gpus_per_node=4, gpu_type="a100", nodes=20), parts, ["gpubase_bygpu_b1"])
    check_request(_request(cpus_per_node=32, gpus_per_node=4, nodes=24), parts, ["gpubase_bygpu_b1"])  # any type
    check_request(_request(cpus_per_node=999), parts, ["no_such_partition"])  # sbatch's to refuse
    check_request(_request(cpus_per_node=999), parts, ["gpubase_bygpu_b1", "no_such_partition"])


@pytest.mark.parametrize(("over", "partitions", "said"), [
    ({"time_s": 4 * 3600}, None, "time limit 04:00:00 asked, the partition allows 03:00:00"),
    ({"mem_mb": 300 * 1024}, None, "300 GB of memory per node asked, its nodes have 251 GB"),
    ({"nodes": 101}, None, "101 nodes asked, 100 of the partition's 100 can hold the job"),
    ({"gpus_per_node": 1}, None, "1 GPUs per node asked, its nodes have 0"),
    ({"gpus_per_node": 4, "gpu_type": "h100"}, ["gpubase_bygpu_b1"], "4 h100 GPUs per node asked, its nodes have 0"),
    ({"gpus_per_node": 4, "gpu_type": "v100l", "nodes": 5}, ["gpubase_bygpu_b1"],
     "5 nodes asked, 4 of the partition's 24 can hold the job"),
])  # fmt: skip
def test_what_can_never_run_is_refused_with_the_numbers(over: dict, partitions, said: str) -> None:
    with pytest.raises(JobCannotRunError) as e:
        check_request(_request(**over), parse_sinfo(SINFO_SITE), partitions)
    assert said in e.value.problems


def test_a_summarized_node_size_gives_no_verdict() -> None:
    # "4+" CPUs: at least 4, maybe more on some node: only sbatch knows.
    check_request(_request(cpus_per_node=8), parse_sinfo(SINFO_SITE), ["debug"])


def test_a_job_sent_to_several_partitions_runs_if_one_can_hold_it() -> None:
    parts = parse_sinfo(SINFO_SITE)
    check_request(_request(cpus_per_node=48, gpus_per_node=4), parts, ["cpubase_bycore_b1", "gpubase_bygpu_b1"])
    with pytest.raises(JobCannotRunError, match="cpubase_bycore_b1,debug"):
        check_request(_request(cpus_per_node=128, time_s=4 * 3600), parts, ["cpubase_bycore_b1", "debug"])


def _job(tmp_path: Path, resources: dict):
    from hfhpc.launch.jobfile import JobFile
    from hfhpc.spec import parse_spec

    spec = parse_spec({"name": "cpu8", "recipe": "script", "script": "t.py", "resources": resources},
                      str(tmp_path / "job.yaml"))
    return JobFile(spec=spec, spec_path=str(tmp_path / "job.yaml"), assets=[], store=tmp_path / "store",
                   run_dir=tmp_path / "runs" / "cpu8", python=sys.executable, created="2026-12-03T12:00:00+00:00")


def test_the_request_is_what_the_batch_script_asks(tmp_path: Path) -> None:
    job = _job(tmp_path, {"nodes": 2, "gpus_per_node": 4, "gpu_type": "a100", "cpus_per_gpu": 12, "mem_gb": 100,
                          "time": "2:00:00"})
    assert slurm_request(job) == Request(nodes=2, cpus_per_node=48, mem_mb=102400, gpus_per_node=4,
                                         gpu_type="a100", time_s=7200)
    script = SlurmExecutor().script(job)
    assert "#SBATCH --cpus-per-task=48" in script and "#SBATCH --mem=100G" in script


def test_the_partition_is_read_as_sbatch_reads_it(tmp_path: Path) -> None:
    job = _job(tmp_path, {"gpus_per_node": 0, "partition": "a,b", "extra_sbatch": ["--partition=c"]})
    assert SlurmExecutor(env={}).partitions(job) == ["c"]  # the later #SBATCH line wins
    assert SlurmExecutor(env={"SBATCH_PARTITION": "one"}).partitions(job) == ["one"]  # the input variable wins
    assert SlurmExecutor(env={}).partitions(_job(tmp_path, {"gpus_per_node": 0, "partition": "a,b"})) == ["a", "b"]
    assert SlurmExecutor(env={}).partitions(_job(tmp_path, {"gpus_per_node": 0})) is None


def _fake_clients(folder: Path, sinfo_text: str) -> dict[str, str]:
    """A PATH with a `sinfo` that prints ``sinfo_text`` (the process boundary), and no other SLURM client."""
    folder.mkdir()
    sinfo = folder / "sinfo"
    sinfo.write_text(f"#!/bin/sh\nprintf '%s' '{sinfo_text}'\n")  # a builtin: nothing else is on PATH
    sinfo.chmod(0o755)
    return {"PATH": str(folder)}


def test_submit_refuses_a_job_that_can_never_start_before_writing_or_submitting(tmp_path: Path) -> None:
    from hfhpc.launch import jobs

    job = _job(tmp_path, {"gpus_per_node": 0, "cpus_per_gpu": 8, "time": "10"})
    executor = SlurmExecutor(env=_fake_clients(tmp_path / "bin", SINFO_TEST_CLUSTER))
    with pytest.raises(JobCannotRunError, match="8 CPUs per node asked, its nodes have 2"):
        executor.start(job)  # there is no sbatch on this PATH: the refusal comes before it
    assert not job.run_dir.exists() and jobs.list_jobs() == []


def test_submit_exits_1_with_the_numbers(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text("name: cpu8\nrecipe: script\nscript: t.py\n"
                                       "resources: {gpus_per_node: 0, cpus_per_gpu: 8, time: '10'}\n")
    (tmp_path / "job.lock").write_text('{"version": 1, "assets": []}')
    env = {**os.environ, **_fake_clients(tmp_path / "bin", SINFO_TEST_CLUSTER)}
    env["PATH"] += os.pathsep + os.path.dirname(sys.executable)
    proc = subprocess.run([sys.executable, "-m", "hfhpc", "--store", str(tmp_path / "store"), "submit",
                           str(tmp_path / "job.yaml")], env=env, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("hfhpc: error: the job can never start in partition debug: "
                                  "8 CPUs per node asked, its nodes have 2; lower the spec's resources")
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()


# --- pending reasons --------------------------------------------------------------------------------

@pytest.mark.parametrize("code", ["PartitionConfig", "Resources", "Priority", "QOSMaxWallDurationPerJobLimit",
                                  "AssocGrpGRES", "ReqNodeNotAvail", "Dependency", "BeginTime", "JobHeldUser",
                                  "PartitionTimeLimit", "InvalidAccount"])
def test_every_common_pending_reason_is_explained_in_words(code: str) -> None:
    reason = explain(code)
    assert reason is not None and reason.code == code
    assert "SLURM's reason" not in reason.meaning and len(reason.meaning.split()) >= 4


def test_reasons_that_need_a_change_say_what_to_change() -> None:
    assert explain("PartitionConfig").never_starts and "resources" in explain("PartitionConfig").fix
    assert "resources.time" in explain("QOSMaxWallDurationPerJobLimit").fix
    assert not explain("Priority").never_starts and explain("Priority").fix is None
    detailed = explain("ReqNodeNotAvail,_UnavailableNodes:n[1-2]")
    assert detailed.code.startswith("ReqNodeNotAvail,") and "reservation" in detailed.meaning
    assert "account" in explain("AssocGrpBillingMinutes").meaning  # a family the name gives away
    assert explain(None) is None and explain("None") is None
    assert "man squeue" in explain("SomethingNew").meaning


def test_status_explains_a_pending_job_in_words() -> None:
    from hfhpc.cli.status_cmd import detail_lines, render_table
    from hfhpc.launch.jobs import JobStatus

    st = JobStatus("7", "cpu8", Path("/r"), "PENDING", reason="PartitionConfig", elapsed_s=0, time_limit_s=600)
    text = "\n".join(detail_lines(st))
    assert "PENDING (PartitionConfig)" in text
    assert "waiting:  no node of the partition can hold the request" in text
    assert "to do:    lower the spec's resources" in text and "it will not start unless this changes" in text
    table = render_table([st, JobStatus("8", "other", Path("/s"), "PENDING", reason="PartitionConfig")])
    assert table.splitlines()[1].split()[2:4] == ["PENDING", "(PartitionConfig)"]
    assert table.splitlines()[-1].startswith("7, 8: PartitionConfig: no node of the partition can hold the request")
    done = JobStatus("9", "x", Path("/r"), "FAILED", reason="NonZeroExitCode")
    assert done.pending_reason is None and "waiting" not in "\n".join(detail_lines(done))


# --- status: progress of a finished run, and jobs that are not this cluster's ----------------------

def test_a_finished_run_shows_its_last_loss_and_throughput(tmp_path: Path) -> None:
    from hfhpc.cli.status_cmd import render_table
    from hfhpc.launch.jobs import JobStatus, read_progress

    lines = [
        {"step": 10, "epoch": 0.5, "max_steps": 20, "loss": 2.5, "tokens_per_s": 900.0, "elapsed_s": 5.0},
        {"step": 20, "epoch": 1.0, "max_steps": 20, "loss": 1.75, "tokens_per_s": 1000.0, "elapsed_s": 10.0},
        {"step": 20, "epoch": 1.0, "max_steps": 20, "eval_loss": 1.9, "elapsed_s": 11.0},  # the final evaluation
        {"step": 20, "epoch": 1.0, "max_steps": 20, "elapsed_s": 12.0},  # the Trainer's summary
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    p = read_progress(tmp_path)
    assert (p.step, p.loss, p.tokens_per_s, p.elapsed_s) == (20, 1.75, 1000.0, 12.0)
    row = render_table([JobStatus("5", "sft", tmp_path, "COMPLETED", progress=p)]).splitlines()[1].split()
    assert row[4:7] == ["20/20", "1.75", "1,000"]


class _Cluster(Executor):
    """A scheduler answering from a table, for the joining logic (the SLURM side is tested on a cluster)."""

    name = "slurm"

    def __init__(self, cluster: str | None, known: dict[str, SchedulerState]) -> None:
        super().__init__()
        self._cluster, self.known = cluster, known

    def start(self, job):
        raise AssertionError("not submitting here")

    def query(self, job_ids):
        return {j: self.known[j] for j in job_ids if j in self.known}

    def cluster(self):
        return self._cluster


def _remember(job_id: str, run_dir: Path, cluster: str | None) -> None:
    from hfhpc.launch.jobs import JobRecord, remember

    remember(JobRecord(job_id, f"job{job_id}", str(run_dir), None, "2026-12-03T12:00:00+00:00", 1, 0, 1, "10",
                       cluster=cluster))


def test_status_lists_only_the_jobs_of_this_cluster(tmp_path: Path) -> None:
    from hfhpc.launch.jobs import jobs_of_this_cluster, list_jobs

    _remember("1", tmp_path / "a", "narval")
    _remember("2", tmp_path / "b", "hfhpc")
    _remember("3", tmp_path / "c", None)  # remembered before clusters were: nothing says it is another's
    here = _Cluster("hfhpc", {})
    assert [r.job_id for r in jobs_of_this_cluster(list_jobs(), here)] == ["2", "3"]
    assert [r.job_id for r in jobs_of_this_cluster(list_jobs(), _Cluster(None, {}))] == ["1", "2", "3"]


def test_a_reused_job_id_is_not_mistaken_for_the_remembered_job(tmp_path: Path) -> None:
    from hfhpc.launch.jobs import job_status, job_statuses, list_jobs

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    _remember("6", ours, "hfhpc")
    _remember("7", ours, "hfhpc")
    cluster = _Cluster("hfhpc", {
        "6": SchedulerState("RUNNING", work_dir=str(theirs), nodelist="n9"),  # the rebuilt cluster's job 6
        "7": SchedulerState("COMPLETED", work_dir=str(ours), nodelist="n1"),
    })
    states = {st.job_id: (st.state, st.nodelist) for st in job_statuses(list_jobs(), cluster)}
    assert states == {"6": ("UNKNOWN", None), "7": ("COMPLETED", "n1")}
    assert job_status("6", cluster).state == "UNKNOWN"


def test_status_table_hides_other_clusters_jobs_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    import argparse

    from hfhpc.cli import status_cmd
    from hfhpc.launch import executor

    _remember("1", tmp_path / "a", "narval")
    _remember("2", tmp_path / "b", "hfhpc")
    here = _Cluster("hfhpc", {"2": SchedulerState("COMPLETED", work_dir=str(tmp_path / "b"))})
    monkeypatch.setattr(executor, "scheduler", lambda *a, **k: here)
    assert status_cmd.run(argparse.Namespace(job=None, all=False)) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[1:-1]] == ["2"]
    assert out[-1] == "(1 remembered job(s) of other clusters not shown)"


def test_a_job_submitted_from_inside_a_job_reads_its_own_variables() -> None:
    from hfhpc.launch import slurm

    # sbatch copies the submitting environment into the new job: the old job's HFHPC_* come along.
    old = JobEnvironment.from_environ({**SLURM_JOB, "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "cpu1"}).rank_variables()
    inherited = {**old, **SLURM_JOB}
    assert JobEnvironment.from_environ(inherited, handed_down=False).job_id == "4242"  # what the node agent reads
    assert not any(name in slurm._command_env(inherited) for name in old)  # never handed to sbatch


def test_the_ranks_get_this_jobs_variables_not_inherited_ones(tmp_path: Path) -> None:
    from hfhpc.launch import node

    job = _job(tmp_path, {"gpus_per_node": 0, "nodes": 2})
    stale = JobEnvironment.from_environ({"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "cpu1"}).rank_variables()
    jobenv = JobEnvironment.from_environ({**stale, **SLURM_JOB}, handed_down=False)
    topo = node.topology(job, jobenv, local=False)
    env = node.ranks_environ(job, topo, tmp_path / "store", {**stale, **SLURM_JOB}, jobenv)
    assert (env["HFHPC_JOB_ID"], env["HFHPC_NODELIST"], env["HFHPC_NODE_RANK"]) == ("4242", "gpu07,gpu08", "1")
    local = node.ranks_environ(job, node.topology(job, jobenv, local=True), tmp_path / "store", {**stale}, None)
    assert "HFHPC_JOB_ID" not in local and "HFHPC_NODELIST" not in local
