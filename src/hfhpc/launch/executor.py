"""One way to start a job, two backends (submitit's Executor idea).

Both freeze the spec and lockfile into ``RUN_DIR/job.json`` first and end in the same per-node entry
point (``hfhpc.launch.node``): the local executor runs it now, in the foreground, as node 0 of 1;
the SLURM executor writes ``job.sbatch``, whose ``srun`` runs it once per node.

Both treat a run folder the same way (:func:`hfhpc.run.jobfile.rerun_state`): the same job resumes,
a complete one is left alone, a different one is refused; ``fresh`` starts over in a new folder.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from hfhpc.run.jobfile import COMPLETE, JobFile, fresh_run_dir, moved_to, prepare_run_dir, rerun_state, resolve_job
from hfhpc.spec import JobSpec


class Executor(ABC):
    """``resolve`` pins the job to a folder; ``prepare`` checks and writes that folder; ``start`` runs
    or submits it and returns an exit code or job record."""

    command = "hfhpc run"

    def resolve(self, spec: JobSpec, store: Path, *, fresh: bool = False) -> JobFile:
        job = resolve_job(spec, store)
        if fresh:
            job = moved_to(job, fresh_run_dir(job.run_dir))
        return job

    def check(self, job: JobFile) -> str:
        """The folder's state (new, resume or complete); raises when it holds another job."""
        return rerun_state(job, f"{self.command} {job.spec_path or 'SPEC'}")

    def prepare(self, spec: JobSpec, store: Path, *, fresh: bool = False) -> JobFile:
        """Resolve, check and write the run folder (a complete run's folder is left as it is)."""
        job = self.resolve(spec, store, fresh=fresh)
        if self.check(job) != COMPLETE:
            prepare_run_dir(job)
        return job

    @abstractmethod
    def start(self, job: JobFile): ...


class LocalExecutor(Executor):
    """``hfhpc run``: this machine, now, sealed; output on the terminal and in ``logs/``."""

    def start(self, job: JobFile) -> int:
        from hfhpc.launch.node import run_node

        return run_node(job.run_dir, local=True, tee=job.paths.local_log())


class SlurmExecutor(Executor):
    """``hfhpc submit``: write ``job.sbatch`` into the run folder and hand it to ``sbatch``."""

    command = "hfhpc submit"

    def prepare(self, spec: JobSpec, store: Path, *, fresh: bool = False) -> JobFile:
        # jobs.submit creates the run folder itself, after refusing a run that is still queued.
        job = self.resolve(spec, store, fresh=fresh)
        self.check(job)
        return job

    def start(self, job: JobFile):
        """Submit; return the remembered job record (its ``job_id`` is SLURM's)."""
        from hfhpc.launch import jobs

        return jobs.submit(job)
