"""What ``run`` and ``submit`` check before anything is queued or started: every mistake that needs
no GPU to find, so that it is a one-line error now instead of a traceback after hours in the queue.

- ``train:`` keys that neither the recipe's ``train`` model nor its trainer config
  (``Recipe.trainer_config``, e.g. TRL's ``SFTConfig``) knows: ``max_lenght`` would otherwise pass
  ``stage`` and ``submit`` and kill the job with ``TypeError: SFTConfig.__init__() got an unexpected
  keyword argument``. The config's fields are read in a child process: importing TRL imports torch,
  which the login node's commands never do.
- the run folder (``output_dir``): it must be a folder this user can create and write, and not a
  kernel file system such as ``/proc``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from hfhpc.errors import SpecError
from hfhpc.recipes import registry
from hfhpc.spec import JobSpec, did_you_mean

PSEUDO_FILESYSTEMS = ("/proc", "/sys", "/dev")


def _where(spec: JobSpec) -> str:
    return str(spec.source) if spec.source else "the spec"


def check_trainer_keys(spec: JobSpec) -> None:
    """Refuse ``train:`` keys the recipe's trainer config lacks (one line, with a "did you mean")."""
    extra = sorted((getattr(spec.train, "model_extra", None) or {}).keys())
    target = registry.get(spec.recipe).trainer_config
    if not extra or not target:
        return
    try:
        fields = registry.trainer_fields(target)
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
