"""One way to start a job, two backends (submitit's Executor idea).

Both freeze the spec and lockfile into ``RUN_DIR/job.json`` first and end in the same per-node entry
point (``hfhpc.launch.node``): the local executor runs it now, in the foreground, as node 0 of 1;
the SLURM executor writes ``job.sbatch``, whose ``srun`` runs it once per node.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from datetime import datetime
from pathlib import Path

from hfhpc.launch.jobfile import JobFile, prepare_run_dir, resolve_job
from hfhpc.preflight import check_before_start
from hfhpc.spec import JobSpec


class Executor(ABC):
    """``prepare`` pins the job; ``start`` runs or submits it and returns an exit code or job id."""

    def prepare(self, spec: JobSpec, store: Path) -> JobFile:
        check_before_start(spec)
        job = resolve_job(spec, store)
        prepare_run_dir(job)
        return job

    @abstractmethod
    def start(self, job: JobFile): ...


class LocalExecutor(Executor):
    """``hfhpc run``: this machine, now, sealed; output on the terminal and in ``logs/``."""

    def start(self, job: JobFile) -> int:
        from hfhpc.launch.node import run_node

        log = job.run_dir / "logs" / f"local-{datetime.now().strftime('%Y%m%d-%H%M%S')}.out"
        return run_node(job.run_dir, local=True, tee=log)


class SlurmExecutor(Executor):
    """``hfhpc submit``: write ``job.sbatch`` into the run folder and hand it to ``sbatch``."""

    def prepare(self, spec: JobSpec, store: Path) -> JobFile:
        # jobs.submit creates the run folder itself, after refusing a run that is still queued.
        check_before_start(spec)
        return resolve_job(spec, store)

    def start(self, job: JobFile):
        """Submit; return the remembered job record (its ``job_id`` is SLURM's)."""
        from hfhpc.launch import jobs

        return jobs.submit(job)
