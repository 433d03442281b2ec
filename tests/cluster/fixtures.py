"""pytest fixtures for the throwaway SLURM cluster (load with ``-p tests.cluster.fixtures``
or ``pytest_plugins = ["tests.cluster.fixtures"]`` in a conftest).

One real 2-node cluster serves the whole session, started on first use (a few seconds,
plus a one-time package install) and stopped at the end; a cluster that
``python -m tests.cluster.cli start`` left running is used instead and left running.

* ``slurm_cluster``: the cluster seen as one node: jobs go to partition ``one``, which holds
  only ``hfhpc-n1`` (``SBATCH_PARTITION`` & co in :meth:`ClusterView.env`).
* ``slurm_cluster2``: the whole 2-node cluster, default partition ``debug``; each node has its
  own network namespace and host name, reachable by name from the other.

Both skip (never fail) only where a cluster cannot exist: not root, or no network namespaces.
Every other problem fails the tests with the daemons' log tails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from tests.cluster.slurm import SlurmCluster


class ClusterView:
    """What the fixtures yield: the shared cluster, whole or restricted to one partition.

    ``nodes`` and ``state_dir`` describe it; pass :meth:`env` to every subprocess that
    should reach it (``subprocess.run([...], env=cluster.env())``).
    """

    def __init__(self, cluster: SlurmCluster, partition: str | None = None) -> None:
        self.cluster = cluster
        self.partition = partition
        self.nodes: list[str] = cluster.nodes[:1] if partition == "one" else list(cluster.nodes)
        self.state_dir: Path = cluster.state_dir
        # Where jobs reach services of the test process (nodes have their own loopback).
        self.host_address: str = cluster.host_address

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = self.cluster.env(base)
        if self.partition:
            # The input variables of sbatch, salloc and srun; an explicit --partition on the
            # command line still wins, but they do override `#SBATCH --partition` lines.
            for var in ("SBATCH_PARTITION", "SALLOC_PARTITION", "SLURM_PARTITION"):
                env[var] = self.partition
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a client command (``scontrol``, ``sacct``, ...) with :meth:`env`; raises
        :class:`~tests.cluster.slurm.SlurmClusterError` on failure unless ``check=False``."""
        return self.cluster.run(*cmd, check=check, timeout=timeout, env=self.env())

    def sbatch(self, *args: str, script: str | None = None, cwd: str | Path | None = None) -> str:
        """``sbatch --parsable`` (``script`` on stdin if given); returns the job id."""
        return self.cluster.sbatch(*args, script=script, cwd=cwd, env=self.env())

    def job_state(self, job_id: str | int, *, accounting: bool = False) -> str | None:
        """The job's current state word (``PENDING``, ``RUNNING``, ...), None if unknown."""
        return self.cluster.job_state(job_id, accounting=accounting)

    def wait_job(self, job_id: str | int, timeout: float = 60, *, accounting: bool = False) -> str:
        """Poll until the job ends and return its state, e.g. ``COMPLETED`` or ``FAILED``.

        ``accounting=True`` polls ``sacct`` only, so the state is in the database on return.
        """
        return self.cluster.wait_job(job_id, timeout, accounting=accounting)

    def requeue(self, job_id: str | int, *, release: bool = True) -> None:
        """``scontrol requeue``; with ``release`` the job restarts within ~2 s instead of
        ~2 min (see :meth:`SlurmCluster.requeue` for the race this avoids)."""
        self.cluster.requeue(job_id, release=release)

    def __repr__(self) -> str:
        return f"ClusterView(nodes={self.nodes}, partition={self.partition!r}, state_dir={self.state_dir})"


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the SLURM test cluster needs root (daemons, network namespaces, /etc/hosts)"
    if shutil.which("ip") is None:
        return "network namespaces are unavailable (no `ip` command: install iproute2)"
    probe = "hfhpc-probe"
    add = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if add.returncode != 0:
        return f"network namespaces are unavailable (`ip netns add` failed: {add.stderr.strip()})"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@pytest.fixture(scope="session")
def _hfhpc_slurm_shared() -> Iterator[SlurmCluster]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    running = SlurmCluster.attach()
    if running is not None and len(running.nodes) >= 2 and running.netns:
        yield running  # started by `cli start`: `cli stop` (or the next start()) stops it
        return
    cluster = SlurmCluster().start(2)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def slurm_cluster(_hfhpc_slurm_shared: SlurmCluster) -> ClusterView:
    """A one-node SLURM cluster (partition ``one`` = ``hfhpc-n1``), with 2 fake GPUs."""
    return ClusterView(_hfhpc_slurm_shared, partition="one")


@pytest.fixture(scope="session")
def slurm_cluster2(_hfhpc_slurm_shared: SlurmCluster) -> ClusterView:
    """The 2-node SLURM cluster (``hfhpc-n1``, ``hfhpc-n2``), 2 fake GPUs per node."""
    return ClusterView(_hfhpc_slurm_shared)
