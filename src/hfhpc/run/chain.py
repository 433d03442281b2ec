"""A finished run's model as the next spec's model: ``model: {from_run: runs/zephyr-sft}``.

The spec gives such a model the id ``run/<folder name>`` (``hfhpc.spec.run_model_id``); this module
finds the run's ``model/`` folder and refuses one that is not a finished run's model. ``hfhpc stage``
then imports it into the store the way ``stage --from`` imports a clone (``store.importer``), under
a commit derived from its contents that the lockfile pins, so ``check``, the node-local copy and
the recipes treat it as any staged model. ``check`` compares the folder with that pin again
(:func:`changes`): a run trained again in the same folder is not silently what the next job starts
from.

A run trained with ``train.lora`` saves only its adapters (``adapter_config.json`` and
``adapter_model.safetensors``). Their base is the model that run started from, as its own
``job.json`` pinned it (:func:`adapter_bases`), never the ``base_model_name_or_path`` peft wrote
(often the node-local store of that job): ``stage`` pins the base too, the adapters name it
(``LockedAsset.base``), and the recipes load it and merge the adapters (``hfhpc.assets.load_model``).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from hfhpc.assets import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_settings
from hfhpc.errors import HfhpcError, LockfileError, RunModelError, UsageError
from hfhpc.run.jobfile import load_job
from hfhpc.run.paths import RunDir
from hfhpc.spec import RUN_NAMESPACE
from hfhpc.store.importer import describe_file, folder_files
from hfhpc.store.lock import LockedAsset, base_chain, parse_asset
from hfhpc.store.stage import requests_from_spec
from hfhpc.store.validate import UnsafeInputError
from hfhpc.store.verify import VerifyCache, verify_asset

if TYPE_CHECKING:
    from hfhpc.spec import JobSpec, ModelRef

# What a folder must hold to load as a model (a LoRA run's model/ holds adapters instead).
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
    try:
        folder_files(model)
    except UnsafeInputError as e:
        raise RunModelError(str(run.root), f"its {RunDir.MODEL}/ holds an unsafe {e.what} {e.value!r}: {e.problem}",
                            "replace the link by the file it should hold (cp -L) or remove it, then stage again") from None
    if (model / MODEL_CONFIG).is_file():
        return model
    if not (model / ADAPTER_CONFIG).is_file():
        raise RunModelError(str(run.root), f"its {RunDir.MODEL}/ holds neither a model ({MODEL_CONFIG}) nor LoRA adapters ({ADAPTER_CONFIG})",
                            "name the run folder of a training recipe (sft, dpo, classify)")
    retrain = "train the adapters again with `hfhpc run` (train.lora), or start from a run trained without train.lora"
    try:
        adapter_settings(model / ADAPTER_CONFIG)
    except (OSError, ValueError) as e:
        raise RunModelError(str(run.root), f"its {RunDir.MODEL}/{ADAPTER_CONFIG} {e}", retrain) from None
    if not (model / ADAPTER_WEIGHTS).is_file():
        raise RunModelError(str(run.root), f"its {RunDir.MODEL}/ has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}", retrain)
    return model


def holds_adapters(folder: Path) -> bool:
    """``folder`` (a run's ``model/``) holds LoRA adapters, not a model."""
    return not (folder / MODEL_CONFIG).is_file() and (folder / ADAPTER_CONFIG).is_file()


def adapter_bases(spec: JobSpec, ref: ModelRef, store: Path) -> list[LockedAsset]:
    """The models under the adapters of the run ``ref`` names, nearest first, as that run's own
    ``job.json`` pinned them (the model it started from, and that model's base if it held adapters
    too); empty when its ``model/`` is a full model. :class:`RunModelError` when the record names
    no base, or names a ``run/…`` base that ``store`` does not hold intact (no Hub has it: staging
    could not fetch it)."""
    run = run_of(spec, ref)
    if not holds_adapters(run.model):
        return []
    root, job_file = str(run.root), RunDir.JOB
    fix = f"start from a run that `hfhpc run` or `hfhpc submit` trained with train.lora: its {job_file} records the base"
    try:
        job = load_job(run.root)
    except HfhpcError:
        raise RunModelError(root, f"its {job_file} is missing or unreadable: the base model of its adapters is unknown", fix) from None
    if job.spec.model is None or getattr(job.spec.train, "lora", None) is None:
        raise RunModelError(root, f"its {job_file} names no model trained with train.lora: the base of its adapters is unknown", fix)
    try:
        # The record is untrusted like a lockfile: every pin is checked before it names a store path.
        assets = [parse_asset(run.job_file, a.to_json()) for a in job.assets]
        started = next((a for a in assets if a.key == ("model", job.spec.model.id)), None)
        if started is None:
            raise ValueError(f"it pins no commit of {job.spec.model.id}, the model the run started from")
        bases = [started, *base_chain(started, assets)]
    except (LockfileError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise RunModelError(root, f"its {job_file} cannot name the base of its adapters: {getattr(e, 'message', e)}", fix) from None
    cache = VerifyCache(store)
    for base in bases:
        if base.id.startswith(f"{RUN_NAMESPACE}/") and verify_asset(store, base, cache):
            how = f"hfhpc --store {shlex.quote(str(store))} stage {shlex.quote(job.spec_path or 'SPEC')}"
            raise RunModelError(root, f"the base of its adapters, model {base.id}@{base.commit[:12]}, is not intact in the store {store}",
                                f"stage the spec of that run again into this store (`{how}`), then stage this one")
    return bases


def model_folders(spec: JobSpec) -> dict[tuple[str, str], Path]:
    """The folder of every model ``spec`` takes from a run, by asset key, for ``stage_spec``; all of
    them checked before anything is staged, so a refusal leaves the store and the lockfile as they were."""
    return {("model", m.id): run_model_folder(spec, m) for m in spec.all_models() if m.from_run is not None}


def model_bases(spec: JobSpec, store: Path) -> dict[tuple[str, str], list[LockedAsset]]:
    """The bases (:func:`adapter_bases`) of every model ``spec`` takes from a LoRA run, by that model's
    key, for ``stage_spec``; checked before anything is staged, with one pin per id in the lockfile."""
    own = {r.key for r in requests_from_spec(spec)}
    pins: dict[tuple[str, str], str] = {}
    out = {}
    for m in spec.all_models():
        if m.from_run is None:
            continue
        bases = adapter_bases(spec, m, store)
        for base in bases:
            if base.key in own:
                raise RunModelError(str(run_of(spec, m).root), f"the base of its adapters, model {base.id}, is also a model of {spec.source or 'the spec'}",
                                    "name it only once: the job loads it under the adapters")
            if pins.setdefault(base.key, base.commit) != base.commit:
                raise RunModelError(str(run_of(spec, m).root), f"its adapters' base {base.id} is pinned at another commit than another run's",
                                    "start each model of the spec from runs trained on the same base")
        if bases:
            out[("model", m.id)] = bases
    return out


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
