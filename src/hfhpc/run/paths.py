"""Every file and folder of a run, named once (the way submitit's ``JobPaths`` names a job's files).

::

    RUN_DIR/
      job.json              the resolved job: spec + locked commits (hfhpc.run.jobfile)
      job.sbatch            the batch script `hfhpc submit` wrote
      logs/                 <name>-<job id>.out (SLURM), local-<time>.out (`hfhpc run`), launcher configs
      metrics.jsonl         one JSON object per logged step (hfhpc.run.progress)
      checkpoint-N/         complete checkpoints, each with hfhpc-complete.json (hfhpc.run.checkpoints)
      model/                the final Hugging Face model
      eval.json  summary.json  predictions.jsonl
      report.html  loss.png  learning_rate.png  throughput.png  mfu.png  grad_norm.png
      export/checkpoint-N/  `hfhpc export`'s output
      .hfhpc-run.lock/      held while a run or a submission uses the folder (hfhpc.run.lock)
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

CHECKPOINT_PREFIX = "checkpoint-"
PLOTS = ("loss", "learning_rate", "throughput", "mfu", "grad_norm", "rewards", "reward_accuracy")


class RunDir:
    """The paths of one run folder. Nothing here touches the disk except :attr:`complete`."""

    # The names, for messages and for files found by name.
    JOB = "job.json"
    SBATCH = "job.sbatch"
    LOCK = ".hfhpc-run.lock"
    METRICS = "metrics.jsonl"
    MODEL = "model"
    EVAL = "eval.json"
    SUMMARY = "summary.json"
    PREDICTIONS = "predictions.jsonl"
    EXPORT = "export"
    REPORT = "report.html"
    LOGS = "logs"

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # -- what the job is -------------------------------------------------------------------------
    @property
    def job_file(self) -> Path:
        return self.root / self.JOB

    @property
    def sbatch(self) -> Path:
        return self.root / self.SBATCH

    @property
    def lock(self) -> Path:
        return self.root / self.LOCK

    # -- logs ------------------------------------------------------------------------------------
    # sbatch runs in the run folder: #SBATCH --output takes this relative pattern (%x name, %j id).
    SLURM_LOG_PATTERN = f"{LOGS}/%x-%j.out"

    @property
    def logs(self) -> Path:
        return self.root / self.LOGS

    def slurm_log(self, name: str, job_id: str) -> Path:
        """What ``SLURM_LOG_PATTERN`` becomes for job ``job_id`` called ``name``."""
        return self.logs / f"{name}-{job_id}.out"

    def local_log(self, when: datetime | None = None) -> Path:
        return self.logs / f"local-{(when or datetime.now()).strftime('%Y%m%d-%H%M%S')}.out"

    def port_file(self, job_id: str, restart: int) -> Path:
        """Where the head node announces the rendezvous port of one allocation."""
        return self.logs / f".port-{job_id}-{restart}"

    def accelerate_config(self, node_rank: int) -> Path:
        return self.logs / f"accelerate-node{node_rank}.yaml"

    def profile(self, rank: int) -> Path:
        """Where a rank writes the profile of the steps ``HFHPC_PROFILE_STEPS`` names."""
        return self.logs / f"profile-rank{rank}.txt"

    # -- what the recipes write ------------------------------------------------------------------
    @property
    def metrics(self) -> Path:
        return self.root / self.METRICS

    @property
    def model(self) -> Path:
        return self.root / self.MODEL

    @property
    def eval(self) -> Path:
        return self.root / self.EVAL

    @property
    def summary(self) -> Path:
        """Written last, atomically, by every built-in recipe: its presence means the run is done."""
        return self.root / self.SUMMARY

    @property
    def predictions(self) -> Path:
        return self.root / self.PREDICTIONS

    def rank_predictions(self, rank: int) -> Path:
        return self.root / f"predictions.rank{rank}.jsonl"

    def checkpoint(self, step: int) -> Path:
        return self.root / f"{CHECKPOINT_PREFIX}{step}"

    @property
    def export(self) -> Path:
        return self.root / self.EXPORT

    # -- what `hfhpc report` writes ----------------------------------------------------------------
    @property
    def report(self) -> Path:
        return self.root / self.REPORT

    @staticmethod
    def plot(out_dir: Path, name: str) -> Path:
        """One of the report's :data:`PLOTS`, as a PNG in ``out_dir``."""
        if name not in PLOTS:
            raise ValueError(f"no plot called {name!r}: one of {', '.join(PLOTS)}")
        return Path(out_dir) / f"{name}.png"

    # -- state -----------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """The job ran to its end: ``summary.json`` is there (a ``script`` recipe writes none)."""
        return self.summary.is_file()
