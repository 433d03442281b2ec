"""What ``run`` and ``submit`` check before anything is queued or started: every mistake that needs
no GPU to find, so that it is a one-line error now instead of a traceback after hours in the queue.

- ``train:`` keys that neither the recipe's ``train`` model nor its trainer config
  (``Recipe.trainer_config``, e.g. TRL's ``SFTConfig``) knows: ``max_lenght`` would otherwise pass
  ``stage`` and ``submit`` and kill the job with ``TypeError: SFTConfig.__init__() got an unexpected
  keyword argument``. The config's fields are read in a child process: importing TRL imports torch,
  which the login node's commands never do.
  The answer is kept in the state folder per Python, class and library versions: the import takes
  10-40 s on a busy login node, the next submit reads a file.
- the run folder (``output_dir``): it must be a folder this user can create and write, and not a
  kernel file system such as ``/proc``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from importlib import metadata
from pathlib import Path

from hfhpc import env as hfenv
from hfhpc.errors import SpecError
from hfhpc import registry
from hfhpc.spec import JobSpec, did_you_mean

PSEUDO_FILESYSTEMS = ("/proc", "/sys", "/dev")


def _where(spec: JobSpec) -> str:
    return str(spec.source) if spec.source else "the spec"


FIELDS_CACHE = "trainer-fields.json"


def _versions(target: str) -> str:
    # Trainer configs derive from transformers' TrainingArguments: its version counts too.
    out = []
    for dist in dict.fromkeys((target.split(":")[0].split(".")[0], "transformers")):
        try:
            out.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return ",".join(out)


def trainer_fields(target: str) -> list[str]:
    """``registry.trainer_fields`` remembered in the state folder for this Python and these versions."""
    from hfhpc.atomic import atomic_write_text

    path = hfenv.state_dir() / FIELDS_CACHE
    key = f"{sys.executable} {target} {_versions(target)}"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    fields = cached.get(key)
    if isinstance(fields, list) and all(isinstance(f, str) for f in fields):
        return fields
    fields = registry.trainer_fields(target)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({**cached, key: fields}))
    except OSError:
        pass  # a read-only state folder costs time, not correctness
    return fields


def check_trainer_keys(spec: JobSpec) -> None:
    """Refuse ``train:`` keys the recipe's trainer config lacks (one line, with a "did you mean")."""
    extra = sorted((getattr(spec.train, "model_extra", None) or {}).keys())
    target = registry.get(spec.recipe).trainer_config
    if not extra or not target:
        return
    try:
        fields = trainer_fields(target)
    except (RuntimeError, OSError) as e:
        # A login node without the training libraries: the compute side checks again at start.
        warnings.warn(f"train: keys {', '.join(extra)} not checked here ({e})", stacklevel=2)
        return
    own = list(type(spec.train).model_fields)
    for key in extra:
        if key not in fields:
            raise SpecError(_where(spec), f"train.{key}", f"unknown key{did_you_mean(key, own + fields)}",
                            f"valid keys: the recipe's own ({', '.join(own)}) and any field of {target}")


def check_run_dir(spec: JobSpec) -> Path:
    """The run folder, if it can be created and written; else a ``SpecError`` on ``output_dir``."""
    run_dir = spec.run_dir()
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    real = os.path.realpath(existing)
    problem = None
    if any(real == p or real.startswith(p + "/") for p in PSEUDO_FILESYSTEMS):
        problem = f"{run_dir} is on the kernel's file system {real.split('/')[1] and '/' + real.split('/')[1]}"
    elif not existing.is_dir():
        problem = f"{existing} is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{run_dir} cannot be created: {existing} is not writable"
    if problem:
        raise SpecError(_where(spec), "output_dir", problem, "set output_dir to a folder you can write (e.g. under $SCRATCH)")
    return run_dir


def check_before_start(spec: JobSpec) -> None:
    """Everything ``run`` and ``submit`` check before the job is queued or started."""
    check_run_dir(spec)
    check_trainer_keys(spec)
