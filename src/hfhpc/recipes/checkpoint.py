"""The Trainer side of atomic checkpoints: :func:`install` makes a ``Trainer`` write each checkpoint
in the format :mod:`hfhpc.run.checkpoints` owns (staged, hashed, marked, renamed), and turns a
checkpoint that fails to load into a typed error the recipe can fall back from.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hfhpc.errors import DiskFullError, HfhpcError, NonFiniteLossError
from hfhpc.run import checkpoints
from hfhpc.run.paths import RunDir


class CheckpointWriteError(HfhpcError):
    """A checkpoint could not be written; the previous complete one is untouched."""

    def __init__(self, path: str, detail: str, previous: str | None):
        self.path, self.detail, self.previous = path, detail, previous
        kept = f"the previous checkpoint {Path(previous).name} is intact" if previous else "no earlier checkpoint exists"
        super().__init__(f"writing {path} failed ({detail}); {kept}", "fix the cause and run the same command again to resume")


class CheckpointDiskFullError(DiskFullError):
    """No space (or quota) left while writing a checkpoint; the partial one was removed."""

    def __init__(self, path: str, previous: str | None):
        super().__init__(path)
        self.previous = previous
        kept = f"the previous checkpoint {Path(previous).name} is intact" if previous else "no earlier checkpoint exists"
        self.message = f"no space left on the device holding {path} while writing a checkpoint; {kept}"
        self.fix = "free space (or lower train.save_total_limit) and run the same command again to resume"


class CheckpointLoadError(HfhpcError):
    """A checkpoint that passed its marker check and still failed to load; the recipe falls back."""

    def __init__(self, path: str, detail: str):
        self.path, self.detail = path, detail
        super().__init__(f"{path} does not load ({detail})", "run the same command again: it resumes from an older checkpoint")


def _disk_full(error: BaseException, where: Path) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain, or a filesystem with no room left (torch.save reports
    a full disk as a RuntimeError without an errno)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    with contextlib.suppress(OSError):
        st = os.statvfs(where)
        return st.f_bavail * st.f_frsize < 1 << 20
    return False


# -- the Trainer side ---------------------------------------------------------------------------

def install(trainer, stop=None):
    """Make ``trainer`` (a transformers ``Trainer`` or subclass) save checkpoints atomically.

    Wraps the instance's ``_save_checkpoint`` (one place, whatever the Trainer subclass): the original
    writes into the staging folder, then the main process commits and applies retention, with a
    barrier before and after so that no rank runs ahead of a checkpoint that is not there yet.
    ``stop`` is the recipe's :class:`~hfhpc.recipes.common.StopOnSignal`: a checkpoint written because
    of it records the signal, so the node agent can tell a clean stop from a failure.

    Two guards come with it. A loss or gradient norm that is NaN or infinite ends training with
    :class:`~hfhpc.errors.NonFiniteLossError` before any checkpoint or final model holds such
    weights: each micro-batch's loss is folded into one flag on the device (no synchronisation per
    step), read at every save and at the end, and every logged loss and gradient norm is checked.
    And a checkpoint whose files fail to load raises :class:`CheckpointLoadError` naming it.
    """
    import torch
    from transformers import TrainerCallback

    original_save = trainer._save_checkpoint
    original_output_dir = trainer._get_output_dir
    original_step = trainer.training_step
    timing = {"max_step_s": 0.0, "t": None}
    nonfinite: dict[str, Any] = {"flag": None}

    def training_step(model, inputs, num_items_in_batch=None):
        loss = original_step(model, inputs, num_items_in_batch)
        bad = ~torch.isfinite(loss.detach()).all()
        nonfinite["flag"] = bad if nonfinite["flag"] is None else (nonfinite["flag"] | bad)
        return loss

    def check_finite() -> None:
        flag = nonfinite["flag"]
        if flag is not None and bool(flag):
            raise NonFiniteLossError(trainer.state.global_step, "loss")

    class _FiniteLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            # Every rank gets the same logs (the loss is averaged over ranks): all stop together.
            for key in ("loss", "grad_norm"):
                value = (logs or {}).get(key)
                if isinstance(value, (int, float)) and not math.isfinite(value):
                    raise NonFiniteLossError(state.global_step, key)

        def on_train_end(self, args, state, control, **kw):
            check_finite()

    trainer.training_step = training_step
    trainer.add_callback(_FiniteLoss())
    _no_step_past_the_end(trainer)
    _raise_load_errors(trainer)

    class _StepTimer(TrainerCallback):
        # The longest step since the last save: a stop signal may arrive at the start of one.
        def on_step_begin(self, args, state, control, **kw):
            timing["t"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if timing["t"] is not None:
                timing["max_step_s"] = max(timing["max_step_s"], time.perf_counter() - timing["t"])

    trainer.add_callback(_StepTimer())

    def save_checkpoint(model, trial=None):
        args = trainer.args
        run_dir = Path(original_output_dir(trial))
        step = trainer.state.global_step
        check_finite()  # before anything is written: NaN weights are never a checkpoint
        final = RunDir(run_dir).checkpoint(step)
        staging = checkpoints.staging_dir(run_dir, step)
        main = args.should_save
        previous = checkpoints.last_complete(run_dir)
        t0 = time.perf_counter()
        if main:
            checkpoints.remove_leftovers(run_dir)
            staging.mkdir(parents=True)
        trainer.accelerator.wait_for_everyone()
        trainer._get_output_dir = lambda trial=None: str(staging)
        failure: BaseException | None = None
        try:
            original_save(model, trial)
            best = trainer.state.best_model_checkpoint
            if best and Path(best).parent == staging:
                # This one is the best so far: the Trainer found it under the staging name.
                trainer.state.best_model_checkpoint = str(final)
                if main:
                    trainer.state.save_to_json(str(staging / final.name / "trainer_state.json"))
            own_rng = staging / final.name / f"rng_state_{args.process_index}.pth"
            if own_rng.exists():
                checkpoints.fsync_file(own_rng)  # this rank's own writes (the main rank's fsync may not flush another client's)
        except Exception as e:  # noqa: BLE001 - every failure leaves the previous checkpoint in charge
            failure = e
        finally:
            del trainer._get_output_dir
        if failure is None:
            trainer.accelerator.wait_for_everyone()
        if main:
            try:
                if failure is not None:
                    raise failure
                staged = staging / final.name
                stop_info = None
                if stop is not None and stop.stopped:
                    from hfhpc.scheduler.environment import JobEnvironment

                    jobenv = JobEnvironment.from_environ(os.environ)
                    stop_info = {
                        "signal": signal.Signals(stop.signum).name if stop.signum else "peer",
                        "job_id": jobenv.job_id,
                        "restart": jobenv.restart_count,
                    }
                checkpoints.write_marker(
                    staged, step,
                    save_s=round(time.perf_counter() - t0, 3),
                    max_step_s=round(timing["max_step_s"], 4),
                    world_size=args.world_size,
                    epoch=trainer.state.epoch,
                    stop=stop_info,
                )
                checkpoints.commit(staged, final)
                with contextlib.suppress(OSError):
                    staging.rmdir()
                if args.save_total_limit:
                    best = trainer.state.best_model_checkpoint
                    checkpoints.apply_retention(run_dir, args.save_total_limit, protect=(Path(best),) if best else ())
            except Exception as e:  # noqa: BLE001
                shutil.rmtree(staging, ignore_errors=True)
                prev = str(previous.path) if previous else None
                if _disk_full(e, run_dir):
                    raise CheckpointDiskFullError(str(run_dir), prev) from e
                raise CheckpointWriteError(str(final), f"{type(e).__name__}: {e}", prev) from e
        elif failure is not None:
            prev = str(previous.path) if previous else None
            raise CheckpointWriteError(str(final), f"{type(failure).__name__}: {failure}", prev) from failure
        timing["max_step_s"] = 0.0
        trainer.accelerator.wait_for_everyone()

    trainer._save_checkpoint = save_checkpoint
    return trainer


def _no_step_past_the_end(trainer) -> None:
    """Resumed from the checkpoint of the last step, the Trainer would still start an epoch and train
    one more step before it checks ``max_steps``: an epoch that starts at the end is skipped."""
    original = trainer._run_epoch

    def run_epoch(*args, **kwargs):
        state = trainer.state
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            trainer.control.should_training_stop = True
            return None
        return original(*args, **kwargs)

    trainer._run_epoch = run_epoch


def _raise_load_errors(trainer) -> None:
    """Wrap the Trainer's checkpoint loaders: any failure becomes a :class:`CheckpointLoadError`."""
    for name in ("_load_from_checkpoint", "_load_optimizer_and_scheduler", "_load_rng_state"):
        original = getattr(trainer, name, None)
        if original is None:
            continue

        def load(checkpoint, *args, _original=original, **kwargs):
            try:
                return _original(checkpoint, *args, **kwargs)
            except Exception as e:  # noqa: BLE001 - a checkpoint from disk is untrusted: any failure means "do not use it"
                if checkpoint is None:
                    raise
                raise CheckpointLoadError(str(checkpoint), f"{type(e).__name__}: {e}") from e

        setattr(trainer, name, load)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """In a rank: turn a checkpoint or non-finite-loss error into one line on stderr and exit status 1."""
    try:
        yield
    except (CheckpointWriteError, CheckpointDiskFullError, NonFiniteLossError) as e:
        raise SystemExit(f"hfhpc: error: {e.render()}") from None


if __name__ == "__main__":
    # Batch scripts written before the format moved to hfhpc.run.checkpoints call this module;
    # a requeued job runs its old script again.
    raise SystemExit(checkpoints.main())
