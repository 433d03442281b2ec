"""A finished run's model as the next spec's model: ``model: {from_run: runs/zephyr-sft}``.

The spec gives such a model the id ``run/<folder name>`` (``hfhpc.spec.run_model_id``); this module
finds the run's ``model/`` folder and refuses one that is not a finished run's model. ``hfhpc stage``
then imports it into the store the way ``stage --from`` imports a clone (``store.importer``), under
a commit derived from its contents that the lockfile pins, so ``check``, the node-local copy and
the recipes treat it as any staged model. ``check`` compares the folder with that pin again
(:func:`changes`): a run trained again in the same folder is not silently what the next job starts
from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from hfhpc.errors import RunModelError, UsageError
from hfhpc.run.paths import RunDir
from hfhpc.store.importer import describe_file, folder_files
from hfhpc.store.lock import LockedAsset
from hfhpc.store.validate import UnsafeInputError

if TYPE_CHECKING:
    from hfhpc.spec import JobSpec, ModelRef
    from hfhpc.store.verify import VerifyCache

# What a folder must hold to load as a model (a LoRA run's model/ holds only its adapters).
MODEL_CONFIG = "config.json"


def run_of(spec: JobSpec, ref: ModelRef) -> RunDir:
    """The run folder ``ref.from_run`` names, relative to the spec's folder like ``output_dir``."""
    return RunDir(Path(os.path.normpath(spec.resolve_path(ref.from_run or "").absolute())))


def run_model_folder(spec: JobSpec, ref: ModelRef) -> Path:
    """The ``model/`` folder of the finished run ``ref`` names; :class:`RunModelError` if there is none
    to stage. Reads names only, hashes nothing and writes nothing."""
    run = run_of(spec, ref)
    spec_file = str(spec.source or "the spec")
    if not run.root.is_dir():
        raise RunModelError(str(run.root), "no such run folder",
                            f"run the spec that writes it first, or fix model.from_run in {spec_file}")
    if run.root == spec.run_dir():
        raise RunModelError(str(run.root), "is this spec's own output_dir: the job would overwrite the model it starts from",
                            f"name another run in model.from_run, or give {spec_file} another output_dir")
    if not run.complete:
        raise RunModelError(str(run.root), f"the run has not finished (no {RunDir.SUMMARY})",
                            f"wait until it has (`hfhpc status {run.root}`), then stage {spec_file} again")
    model = run.model
    if model.is_symlink() or not model.is_dir():
        raise RunModelError(str(run.root), f"holds no {RunDir.MODEL}/ folder (a training recipe writes one)",
                            "name the run folder of a training recipe (sft, dpo, classify)")
    if not (model / MODEL_CONFIG).is_file():
        raise RunModelError(str(run.root), f"its {RunDir.MODEL}/ has no {MODEL_CONFIG} (a run with train.lora saves only its adapters)",
                            "start from a run trained without train.lora")
    try:
        folder_files(model)
    except UnsafeInputError as e:
        raise RunModelError(str(run.root), f"its {RunDir.MODEL}/ holds an unsafe {e.what} {e.value!r}: {e.problem}",
                            "replace the link by the file it should hold (cp -L) or remove it, then stage again") from None
    return model


def model_folders(spec: JobSpec) -> dict[tuple[str, str], Path]:
    """The folder of every model ``spec`` takes from a run, by asset key, for ``stage_spec``; all of
    them checked before anything is staged, so a refusal leaves the store and the lockfile as they were."""
    return {("model", m.id): run_model_folder(spec, m) for m in spec.all_models() if m.from_run is not None}


def changes(folder: Path, locked: LockedAsset, cache: VerifyCache) -> list[str]:
    """How ``folder`` differs from what the lockfile pinned of it (``"config.json changed"``,
    ``"x added"``, ``"y removed"``); empty when it holds exactly those files.

    Large files are hashed through the store's verification cache: a second ``check`` of an
    unchanged 7B model reads metadata only, and ``check --full`` hashes them again.
    """
    try:
        now = {rel: describe_file(rel, full, sha256=lambda p: cache.sha256(p, p.stat())) for rel, full in folder_files(folder)}
    except (UnsafeInputError, UsageError) as e:
        return [e.message]
    pinned = {f.path: f for f in locked.files}
    out = []
    for path in sorted(now.keys() | pinned.keys()):
        if path not in pinned:
            out.append(f"{path} added")
        elif path not in now:
            out.append(f"{path} removed")
        elif (now[path].size, now[path].blob_id) != (pinned[path].size, pinned[path].blob_id):
            out.append(f"{path} changed")
    return out
