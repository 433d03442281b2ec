"""The resolved job: the spec, the lockfile's commits and the store, frozen into ``RUN_DIR/job.json``.

``run`` and ``submit`` write it; the per-node entry point, the recipes, ``status`` and ``report`` read
it, so a job runs exactly the revisions that were checked, whatever happens to the spec or the
lockfile afterwards.

Running a spec again is safe (:func:`rerun_state`): a run folder whose job differs from the spec and
lockfile is refused, naming what changed; a complete run is left alone; anything else resumes.
``--fresh`` picks a new folder instead (:func:`fresh_run_dir`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from hfhpc import __version__
from hfhpc.errors import HfhpcError, LockfileError, RunDiffersError
from hfhpc.run.checkpoints import signal_delay_s
from hfhpc.run.paths import RunDir
from hfhpc.spec import JobSpec, parse_spec
from hfhpc.atomic import atomic_write_text
from hfhpc.store.lock import LockedAsset, base_chain, load_lock
from hfhpc.store.stage import requests_from_spec

JOB_VERSION = 1
# Spec keys that say where and for how long a job runs, not what it computes: changing them between
# two runs of one folder resumes it (a longer resources.time is the usual reason to resubmit).
PLACEMENT_KEYS = ("resources.time", "resources.account", "resources.partition", "resources.qos",
                  "resources.mem_gb", "resources.extra_sbatch", "resources.cpus_per_gpu", "site",
                  "launch.signal_delay_s", "launch.node_local", "launch.port", "output_dir")


@dataclass
class JobFile:
    spec: JobSpec
    spec_path: str | None
    assets: list[LockedAsset]
    store: Path
    run_dir: Path
    python: str
    created: str
    # Seconds between SLURM's warning signal and the time limit (the #SBATCH --signal of a submitted
    # job; for `hfhpc run`, what a submission would use). None in job files of older versions.
    signal_delay_s: int | None = None

    @property
    def paths(self) -> RunDir:
        return RunDir(self.run_dir)

    # -- asset lookups used by recipes -----------------------------------------------------
    def commit_of(self, kind: str, repo_id: str) -> str | None:
        for a in self.assets:
            if a.key == (kind, repo_id):
                return a.commit
        return None

    @property
    def model_commit(self) -> str | None:
        return self.commit_of("model", self.spec.model.id) if self.spec.model else None

    @property
    def model_bases(self) -> list[tuple[str, str]]:
        """(id, commit) of the models under the spec's model's adapters, nearest first: empty for a
        full model (``LockedAsset.base``; the recipes load them through ``hfhpc.assets.load_model``)."""
        model = next((a for a in self.assets if self.spec.model and a.key == ("model", self.spec.model.id)), None)
        return [] if model is None else [(b.id, b.commit) for b in base_chain(model, self.assets)]

    @property
    def dataset_commit(self) -> str | None:
        return self.commit_of("dataset", self.spec.dataset.id) if self.spec.dataset else None

    def to_json(self) -> dict:
        return {
            "version": JOB_VERSION,
            "hfhpc": __version__,
            "created": self.created,
            "spec_path": self.spec_path,
            "spec": self.spec.model_dump(mode="json"),
            "assets": [a.to_json() for a in self.assets],
            "store": str(self.store),
            "run_dir": str(self.run_dir),
            "python": self.python,
            "signal_delay_s": self.signal_delay_s,
        }

    def save(self) -> Path:
        path = self.paths.job_file
        atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")
        return path


def load_job(run_dir: Path) -> JobFile:
    path = RunDir(run_dir).job_file
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise HfhpcError(f"{run_dir} is not a run folder (no {path.name})", "start the job with `hfhpc run SPEC` or `hfhpc submit SPEC`") from None
    except (OSError, ValueError) as e:
        raise HfhpcError(f"{path} is unreadable ({type(e).__name__})", "start over with `hfhpc run SPEC --fresh`") from None
    if not isinstance(data, dict) or not isinstance(data.get("spec"), dict):
        raise HfhpcError(f"{path} is not a job file", "start over with `hfhpc run SPEC --fresh`")
    try:
        return _parse_job(data, path)
    except (KeyError, TypeError, ValueError) as e:
        raise HfhpcError(f"{path} is not a job file this version reads ({type(e).__name__}: {e})",
                         "start over with `hfhpc run SPEC --fresh`") from None


def _parse_job(data: dict, path: Path) -> JobFile:
    from hfhpc.store.lock import LockedFile

    spec = parse_spec(data["spec"], str(path))
    if data.get("spec_path"):
        spec._source = Path(data["spec_path"])
    assets = [
        LockedAsset(a["kind"], a["id"], a["revision"], a["commit"], a.get("include", []),
                    [LockedFile(f["path"], f["size"], f["sha256"], f["blob_id"], f["lfs"]) for f in a["files"]],
                    a.get("base"))
        for a in data["assets"]
    ]
    delay = data.get("signal_delay_s")
    return JobFile(spec, data.get("spec_path"), assets, Path(data["store"]), Path(data["run_dir"]), data["python"],
                   data["created"], signal_delay_s=delay if isinstance(delay, int) and not isinstance(delay, bool) else None)


def resolve_job(spec: JobSpec, store: Path) -> JobFile:
    """Pin the spec's assets to the lockfile's commits; refuse if the lockfile does not cover them."""
    requests = requests_from_spec(spec)
    # A script that loads nothing from the Hub (CIFAR-10 from files) needs no lockfile.
    lock = load_lock(spec.lock_path(), missing_ok=not requests, stage=spec.stage_command())
    assets = []
    for req in requests:
        locked = lock.get(*req.key)
        if locked is None or locked.revision != req.revision:
            raise LockfileError(str(lock.path), f"{req.kind} {req.repo_id}@{req.revision} is not in the lockfile",
                                f"run `{spec.stage_command()}` on a login node")
        assets.append(locked)
    # The models that adapters apply to are the job's assets too: pinned, copied to node-local disk, loaded.
    for locked in list(assets):
        try:
            bases = base_chain(locked, lock.assets)
        except ValueError as e:
            raise LockfileError(str(lock.path), str(e), f"run `{spec.stage_command()}` on a login node") from None
        assets += [b for b in bases if b.key not in {a.key for a in assets}]
    return JobFile(
        spec=spec,
        spec_path=str(spec.source) if spec.source else None,
        assets=assets,
        store=Path(store).absolute(),
        run_dir=spec.run_dir(),
        python=sys.executable,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        signal_delay_s=signal_delay_s(spec, spec.run_dir()),
    )


def moved_to(job: JobFile, run_dir: Path) -> JobFile:
    """``job`` in another run folder (``--fresh``)."""
    return replace(job, run_dir=Path(run_dir), signal_delay_s=signal_delay_s(job.spec, Path(run_dir)))


def warning_s_of(run_dir: Path) -> float:
    """The SIGUSR1 lead time of the run in ``run_dir`` (0 when its job file says nothing usable)."""
    try:
        job = load_job(run_dir)
    except HfhpcError:
        return 0.0
    return float(job.signal_delay_s if job.signal_delay_s is not None else signal_delay_s(job.spec))


def prepare_run_dir(job: JobFile) -> Path:
    """Create the run folder (logs/ inside) and write job.json. An existing run folder of the same
    job is reused: that is how a rerun resumes from its checkpoints (:func:`rerun_state` first)."""
    job.paths.logs.mkdir(parents=True, exist_ok=True)
    return job.save()


# -- running a spec again ---------------------------------------------------------------------

NEW, RESUME, COMPLETE = "new", "resume", "complete"


def _flat(value: object, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for k, v in value.items():
            out |= _flat(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return {prefix: value}


def differences(old: JobFile, new: JobFile) -> list[str]:
    """What differs between two jobs, as spec keys (``train.max_steps``) and assets
    (``model org/name``); keys of :data:`PLACEMENT_KEYS` do not count."""
    a, b = _flat(old.spec.model_dump(mode="json")), _flat(new.spec.model_dump(mode="json"))
    keys = [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)
            and not any(k == p or k.startswith(p + ".") for p in PLACEMENT_KEYS)]
    pinned = {x.key: (x.revision, x.commit, sorted(x.include)) for x in old.assets}
    now = {x.key: (x.revision, x.commit, sorted(x.include)) for x in new.assets}
    keys += [f"{kind} {repo_id}" for kind, repo_id in sorted(pinned.keys() | now.keys())
             if pinned.get((kind, repo_id)) != now.get((kind, repo_id))]
    return keys


def rerun_state(job: JobFile, command: str = "hfhpc run SPEC") -> str:
    """Whether ``job``'s folder is :data:`NEW`, to :data:`RESUME`, or :data:`COMPLETE` (leave it).

    Raises :class:`~hfhpc.errors.RunDiffersError` when the folder holds another job: resuming it
    with a changed spec or lockfile would mix two trainings in one set of checkpoints.
    """
    paths = job.paths
    if not paths.job_file.exists():
        return NEW
    try:
        old = load_job(paths.root)
    except HfhpcError:
        raise RunDiffersError(str(paths.root), [paths.job_file.name + " (unreadable)"], command) from None
    keys = differences(old, job)
    if keys:
        raise RunDiffersError(str(paths.root), keys, command)
    return COMPLETE if paths.complete else RESUME


def fresh_run_dir(run_dir: Path) -> Path:
    """The first of ``RUN_DIR-2``, ``RUN_DIR-3``, … that does not exist yet (``RUN_DIR`` itself when
    it does not)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return run_dir
    n = 2
    while (candidate := run_dir.with_name(f"{run_dir.name}-{n}")).exists():
        n += 1
    return candidate
