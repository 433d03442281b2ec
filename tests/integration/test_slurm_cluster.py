"""The throwaway SLURM cluster does what the launch code relies on, for real.

Each test submits real jobs through sbatch; nothing is mocked. The slowest is the signal
test (slurmctld checks time limits, and so sends --signal warnings, only every 30 s).
"""

from __future__ import annotations

import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else f"<{path.name} missing>"


def _wait_until(what: str, predicate, timeout: float = 30, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def test_sbatch_wrap_runs_on_the_single_node(slurm_cluster, tmp_path):
    out = tmp_path / "out.txt"
    job = slurm_cluster.sbatch(
        "-o", str(out), "--wrap", 'echo "hello from $(srun hostname) in $SLURM_JOB_PARTITION"'
    )
    assert slurm_cluster.wait_job(job, timeout=30) == "COMPLETED", _read(out)
    assert out.read_text() == f"hello from {slurm_cluster.nodes[0]} in one\n"
    assert slurm_cluster.nodes == ["hfhpc-n1"]


def test_two_node_job_reaches_node1_from_node2_by_name(slurm_cluster2, tmp_path):
    assert len(slurm_cluster2.nodes) == 2
    port = 29500 + int(time.time()) % 1000  # nothing else listens inside the namespaces
    # The torch.distributed pattern: rank 0 listens on its node, rank 1 connects to the
    # first host of SLURM_JOB_NODELIST by name (MASTER_ADDR), across network namespaces.
    (tmp_path / "server.py").write_text(textwrap.dedent(f"""
        import socket
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", {port}))
        s.listen(1)
        s.settimeout(30)
        conn, (peer, _) = s.accept()
        conn.sendall(socket.gethostname().encode())
        print("server", socket.gethostname(), "accepted", peer)
    """))
    (tmp_path / "client.py").write_text(textwrap.dedent(f"""
        import socket, sys, time
        deadline = time.time() + 30
        while True:
            try:
                c = socket.create_connection((sys.argv[1], {port}), timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        print("client", socket.gethostname(), "got", c.recv(100).decode())
    """))
    script = textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --nodes=2 --ntasks-per-node=1 --time=2
        #SBATCH -o {tmp_path}/job.out
        set -euo pipefail
        cd {tmp_path}
        srun hostname > hosts.txt
        scontrol show hostnames "$SLURM_JOB_NODELIST" > nodelist.txt
        MASTER_ADDR=$(head -n 1 nodelist.txt)
        OTHER=$(tail -n 1 nodelist.txt)
        srun -N1 -n1 -w "$MASTER_ADDR" {sys.executable} server.py > server.txt &
        srun -N1 -n1 -w "$OTHER" {sys.executable} client.py "$MASTER_ADDR" > client.txt
        wait
    """)
    job = slurm_cluster2.sbatch(script=script)
    state = slurm_cluster2.wait_job(job, timeout=60)
    assert state == "COMPLETED", _read(tmp_path / "job.out")

    hosts = (tmp_path / "hosts.txt").read_text().split()
    assert sorted(hosts) == sorted(slurm_cluster2.nodes)  # two different host names
    assert (tmp_path / "nodelist.txt").read_text().split() == slurm_cluster2.nodes
    n1, n2 = slurm_cluster2.nodes
    assert (tmp_path / "client.txt").read_text().split() == ["client", n2, "got", n1]
    server = (tmp_path / "server.txt").read_text().split()
    assert server[:3] == ["server", n1, "accepted"]
    assert server[3] == socket.gethostbyname(n2)  # the connection came from node 2's address


def test_torch_distributed_gloo_across_two_nodes(slurm_cluster2, tmp_path):
    pytest.importorskip("torch")
    (tmp_path / "allreduce.py").write_text(textwrap.dedent("""
        import os, socket, torch, torch.distributed as dist
        dist.init_process_group(
            "gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:29512",
            rank=int(os.environ["SLURM_PROCID"]), world_size=int(os.environ["SLURM_NTASKS"]),
        )
        t = torch.tensor([dist.get_rank() + 1.0])
        dist.all_reduce(t)
        print(socket.gethostname(), dist.get_rank(), int(t.item()), flush=True)
        dist.destroy_process_group()
    """))
    script = textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --nodes=2 --ntasks-per-node=1 --time=2 -o {tmp_path}/job.out -e {tmp_path}/job.err
        export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
        srun {sys.executable} {tmp_path}/allreduce.py
    """)
    job = slurm_cluster2.sbatch(script=script)
    assert slurm_cluster2.wait_job(job, timeout=90) == "COMPLETED", _read(tmp_path / "job.err")
    lines = sorted((tmp_path / "job.out").read_text().splitlines())
    n1, n2 = slurm_cluster2.nodes
    assert lines == [f"{n1} 0 3", f"{n2} 1 3"]


def test_gres_gpu_sets_cuda_visible_devices(slurm_cluster, tmp_path):
    one = slurm_cluster.sbatch(
        "--gres=gpu:1", "-o", str(tmp_path / "one.out"), "--wrap", 'echo "$CUDA_VISIBLE_DEVICES"'
    )
    both = slurm_cluster.sbatch(
        "--gres=gpu:2", "--cpus-per-task=2", "-o", str(tmp_path / "both.out"),
        "--wrap", 'echo "$CUDA_VISIBLE_DEVICES $SLURM_CPUS_PER_TASK $SLURM_JOB_GPUS"',
    )  # fmt: skip
    assert slurm_cluster.wait_job(one, timeout=30) == "COMPLETED", _read(tmp_path / "one.out")
    assert slurm_cluster.wait_job(both, timeout=30) == "COMPLETED", _read(tmp_path / "both.out")
    assert (tmp_path / "one.out").read_text().strip() in {"0", "1"}
    assert (tmp_path / "both.out").read_text().split() == ["0,1", "2", "0,1"]


def test_sinfo_output_parses_into_the_configured_partitions(slurm_cluster2):
    import os

    from hfhpc.scheduler.partitions import SINFO_ARGS, NodeGroup, parse_sinfo

    parts = parse_sinfo(slurm_cluster2.run(*SINFO_ARGS).stdout)
    assert set(parts) == {"debug", "one"}
    debug, one = parts["debug"], parts["one"]
    assert debug.default and not one.default and debug.up
    assert debug.time_limit_s is None and debug.nodes == 2 and one.nodes == 1  # MaxTime=INFINITE
    group = debug.groups[0]
    # slurm.conf: CPUs = this machine's, RealMemory = 80 % of it, Gres=gpu:2 on every node.
    assert (group.cpus, dict(group.gpus)) == (os.cpu_count(), {None: 2}) and group.mem_mb >= 1024
    assert all(isinstance(g, NodeGroup) for g in one.groups)


def test_sacct_reports_completed(slurm_cluster):
    job = slurm_cluster.sbatch("-o", "/dev/null", "--wrap", "true")
    assert slurm_cluster.wait_job(job, timeout=30) == "COMPLETED"

    def recorded():
        # slurmdbd records a finished job 0.4-3 s after slurmctld knows it ended.
        proc = slurm_cluster.run("sacct", "-j", job, "--parsable2", "--noheader", "-o", "State")
        states = proc.stdout.split()
        return states if states and states[0] == "COMPLETED" else None

    states = _wait_until(f"sacct to record job {job} as COMPLETED", recorded, timeout=20)
    assert set(states) == {"COMPLETED"}  # the job and its batch step


def test_requeued_job_runs_again_with_restart_count(slurm_cluster, tmp_path):
    log = tmp_path / "runs.txt"
    script = textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --requeue --open-mode=append -o {tmp_path}/job.out
        echo "run restart_count=${{SLURM_RESTART_COUNT:-0}}" >> {log}
        # The first run waits to be requeued; the second finishes at once.
        if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then sleep 120; fi
    """)
    job = slurm_cluster.sbatch(script=script)
    try:
        _wait_until("the first run", lambda: log.exists() and "restart_count=0" in log.read_text())
        # `scontrol requeue`, then `scontrol update StartTime=now` once the job is pending
        # and the second of the requeue is over: a restart within 2 s instead of 2 minutes.
        slurm_cluster.requeue(job)
        state = slurm_cluster.wait_job(job, timeout=60)
    finally:
        slurm_cluster.run("scancel", job, check=False)  # never leave a 2-minute job behind
    assert state == "COMPLETED", _read(tmp_path / "job.out")
    assert log.read_text().split("\n") == ["run restart_count=0", "run restart_count=1", ""]


def test_signal_reaches_batch_shell_before_time_limit(slurm_cluster, tmp_path):
    out = tmp_path / "job.out"
    # --signal=B:USR1@58 on a 1-minute job is due 2 s in, but slurmctld checks time limits
    # (and sends these warnings) only every 30 s: expect it 2-32 s in, and the time limit
    # to kill the job at 60-90 s if it never comes.
    script = textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --time=1 --signal=B:USR1@58 -o {out}
        trap 'echo "USR1 after $SECONDS s"; exit 0' USR1
        # `wait` on a background sleep returns as soon as a trapped signal arrives.
        sleep 120 &
        wait
        echo "no signal"
    """)
    start = time.monotonic()
    job = slurm_cluster.sbatch(script=script)
    try:
        state = slurm_cluster.wait_job(job, timeout=100)
    finally:
        slurm_cluster.run("scancel", job, check=False)
    assert state == "COMPLETED", f"{state}: {_read(out)}"
    assert _read(out).startswith("USR1 after "), _read(out)
    assert time.monotonic() - start < 45
