"""The resolved job: the spec, the lockfile's commits and the store, frozen into ``RUN_DIR/job.json``.

``run`` and ``submit`` write it; the per-node entry point and the recipes read it, so a job runs
exactly the revisions that were checked, whatever happens to the spec or the lockfile afterwards.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from hfhpc import __version__
from hfhpc.errors import HfhpcError, LockfileError
from hfhpc.spec import JobSpec, parse_spec
from hfhpc.store.atomic import atomic_write_text
from hfhpc.store.lock import LockedAsset, load_lock
from hfhpc.store.stage import requests_from_spec

JOB_FILE = "job.json"
JOB_VERSION = 1


@dataclass
class JobFile:
    spec: JobSpec
    spec_path: str | None
    assets: list[LockedAsset]
    store: Path
    run_dir: Path
    python: str
    created: str

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
        }

    def save(self) -> Path:
        path = self.run_dir / JOB_FILE
        atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")
        return path


def load_job(run_dir: Path) -> JobFile:
    from hfhpc.store.lock import LockedFile

    path = Path(run_dir) / JOB_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise HfhpcError(f"{run_dir} is not a run folder (no {JOB_FILE})", "start the job with `hfhpc run SPEC` or `hfhpc submit SPEC`") from None
    spec = parse_spec(data["spec"], str(path))
    if data.get("spec_path"):
        spec._source = Path(data["spec_path"])
    assets = [
        LockedAsset(a["kind"], a["id"], a["revision"], a["commit"], a.get("include", []),
                    [LockedFile(f["path"], f["size"], f["sha256"], f["blob_id"], f["lfs"]) for f in a["files"]])
        for a in data["assets"]
    ]
    return JobFile(spec, data.get("spec_path"), assets, Path(data["store"]), Path(data["run_dir"]), data["python"], data["created"])


def resolve_job(spec: JobSpec, store: Path) -> JobFile:
    """Pin the spec's assets to the lockfile's commits; refuse if the lockfile does not cover them."""
    requests = requests_from_spec(spec)
    # A script that loads nothing from the Hub (CIFAR-10 from files) needs no lockfile.
    lock = load_lock(spec.lock_path(), missing_ok=not requests)
    assets = []
    for req in requests:
        locked = lock.get(*req.key)
        if locked is None or locked.revision != req.revision:
            raise LockfileError(str(lock.path), f"{req.kind} {req.repo_id}@{req.revision} is not in the lockfile",
                                f"run `hfhpc stage {spec.source or 'SPEC'}` on a login node")
        assets.append(locked)
    return JobFile(
        spec=spec,
        spec_path=str(spec.source) if spec.source else None,
        assets=assets,
        store=Path(store).absolute(),
        run_dir=spec.run_dir(),
        python=sys.executable,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def prepare_run_dir(job: JobFile) -> Path:
    """Create the run folder (logs/ inside) and write job.json. An existing run folder of the same
    job is reused: that is how a rerun resumes from its checkpoints."""
    (job.run_dir / "logs").mkdir(parents=True, exist_ok=True)
    return job.save()
