"""Small helpers every recipe shares: the run folder's files, training arguments from the spec,
progress logging to ``metrics.jsonl``, and stopping cleanly on a signal with a checkpoint.

Recipes stay flat scripts (setup → run → save); only these helpers are shared.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from hfhpc.run.jobfile import JobFile
from hfhpc.atomic import atomic_write_json

EXIT_INTERRUPTED = 3
# Trainer log keys copied into metrics.jsonl (with every numeric eval_* key).
LOGGED = ("loss", "learning_rate", "grad_norm", "mean_token_accuracy", "entropy", "num_tokens")
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


def _process_start() -> float:
    """When this process started (Linux: from /proc, so the interpreter's start and imports count);
    elsewhere, now."""
    try:  # both in seconds since boot: the process's start, and now
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


STARTED = _process_start()  # this rank's start
_MARKS: list[tuple[str, float]] = []  # (what just finished, when): where the time before the first step went


def mark(done: str) -> None:
    """Note that ``done`` (a phase of start-up: "imports", "data", "model" …) has just finished; the
    "ready to train" line lists each phase's seconds."""
    _MARKS.append((done, time.time()))


def phases_line(now: float) -> str:
    """``imports 6.1 s, data 0.3 s, …, the rest 2.0 s`` from the marks since this process started."""
    parts, last = [], STARTED
    for done, when in _MARKS:
        parts.append(f"{done} {when - last:.1f} s")
        last = when
    if parts:
        parts.append(f"the rest {now - last:.1f} s")
    return ", ".join(parts)


def job_started() -> float | None:
    """When the node agent started this job on this node (``HFHPC_NODE_STARTED``), if known."""
    try:
        return float(os.environ["HFHPC_NODE_STARTED"])
    except (KeyError, ValueError):
        return None


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def log(msg: str) -> None:
    if is_main():
        print(f"hfhpc: {msg}", flush=True)


def write_summary(job: JobFile, data: dict[str, Any]) -> Path:
    path = job.paths.summary
    if is_main():
        atomic_write_json(path, {"name": job.spec.name, "recipe": job.spec.recipe, **data})
    return path


def spec_path(job: JobFile) -> str:
    """The spec file that a recipe's ``SpecError`` names."""
    return str(job.spec.source or job.spec_path or "the job's spec")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def half_dtype(spec):
    """The half-precision torch dtype ``launch.mixed_precision`` names, or None ("no")."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.launch.mixed_precision)


def weights_dtype(spec, *, gpu: bool, frozen: bool):
    """The dtype a model's weights are loaded in. Trained weights: fp32 masters (the compute runs in
    half precision under autocast or FSDP's policy). Frozen weights (a LoRA base, a DPO reference, an
    inference model) only run forward: half precision on GPUs."""
    import torch

    half = half_dtype(spec)
    return half if (gpu and frozen and half is not None) else torch.float32


def chat_tokenizer(job: JobFile, template: str | None, *, required: bool = True):
    """The model's tokenizer for chat data: ``template`` (the spec's ``train.chat_template``) replaces the
    model's own and the EOS token pads where the model names no pad token. ``required``: a model with no
    template at all is a spec error before any data is read (``hfhpc check`` says so before the job
    is queued: hfhpc.recipes.chatdata.offline_check)."""
    from hfhpc import assets
    from hfhpc.errors import SpecError
    from hfhpc.recipes import chatdata

    tokenizer = assets.load_tokenizer(job.spec.model.id, job.model_commit, job.model_bases)
    if template:
        tokenizer.chat_template = template
    if required and not tokenizer.chat_template:
        raise SpecError(spec_path(job), "train.chat_template", f"{job.spec.model.id} has no chat template",
                        chatdata.NO_TEMPLATE_FIX)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(job: JobFile, *, dtype, attn: str):
    """The job's model (its locked commit; a LoRA run's adapters merged into their base), logged with
    its size, dtype, attention and loading time."""
    from transformers import AutoModelForCausalLM

    from hfhpc import assets

    t0 = time.perf_counter()
    model = assets.load_model(AutoModelForCausalLM, job.spec.model.id, job.model_commit, job.model_bases, dtype=dtype,
                              attn_implementation=attn)
    log(f"model {job.spec.model.id}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters in {dtype}, "
        f"attention {attn}, loaded in {time.perf_counter() - t0:.1f} s")
    return model


def training_kwargs(job: JobFile, *, own_layers: bool = False) -> dict[str, Any]:
    """Trainer/SFTConfig arguments from the spec; any key of ``train:`` not modelled passes through.
    ``own_layers``: the recipe checkpoints the decoder layers itself (hfhpc.recipes.layers), so the
    Trainer must not."""
    spec, t = job.spec, job.spec.train
    gpu = spec.resources.gpus_per_node > 0 and cuda_available()
    kwargs: dict[str, Any] = dict(
        output_dir=str(job.run_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to="none",
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
        use_cpu=not gpu,
        bf16=gpu and spec.launch.mixed_precision == "bf16",
        fp16=gpu and spec.launch.mixed_precision == "fp16",
    )
    # FSDP checkpoints activations through its own config (the launcher's); transformers 5 renamed the
    # option (the old name still works there, with a warning).
    ckpt = gpu and spec.launch.activation_checkpointing and spec.launch.strategy != "fsdp" and not own_layers
    kwargs[_checkpointing_option()] = ckpt
    if gpu:
        kwargs["optim"] = "adamw_torch_fused"  # one kernel per step for all parameters
    if t.eval_steps:
        kwargs.update(eval_strategy="steps", eval_steps=t.eval_steps)
    kwargs.update(t.model_extra or {})
    return kwargs


def steps_per_job(args, rows: int) -> int:
    """Optimizer steps of the whole run (the Trainer's count: per-rank batches, accumulation, epochs)."""
    import math

    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return math.ceil(args.num_train_epochs * math.ceil(rows / per_step))


def _checkpointing_option() -> str:
    from transformers import TrainingArguments

    fields = getattr(TrainingArguments, "__dataclass_fields__", {})
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


class StopOnSignal:
    """SIGUSR1 (SLURM's warning before the time limit), SIGUSR2, SIGTERM or SIGINT: finish the current step,
    save a checkpoint, stop. The recipe then exits with status 3 and the same command resumes.

    Ranks get the signal at different moments (one node before another), so they agree on the step
    to stop at: after every step each rank's flag is combined with the others' (a one-integer
    all-reduce on a gloo group), and all stop at the first step where any rank was told to.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.by_peer = False
        self._group = None

    def install(self) -> StopOnSignal:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)
        return self

    def _handler(self, signum: int, frame) -> None:
        if self.signum is None:
            print(f"hfhpc: rank {rank()} got {signal.Signals(signum).name}: checkpointing after this step", flush=True)
        self.signum = signum

    @property
    def stopped(self) -> bool:
        return self.signum is not None or self.by_peer

    def agree(self) -> bool:
        """Whether any rank was signalled; every rank must call this at the same step."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.stopped
        import torch

        if self._group is None:
            # A CPU group, so that NCCL jobs do not synchronise the GPU for one integer per step.
            self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        flag = torch.tensor([1 if self.stopped else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if flag.item() and not self.stopped:
            self.by_peer = True
        return self.stopped


def _peak_memory_gib() -> float | None:
    """This process's peak GPU memory so far (what PyTorch allocated), or None without CUDA."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def trainer_callbacks(job: JobFile, stop: StopOnSignal, logged: tuple[str, ...] = LOGGED) -> list:
    """Callbacks that write metrics.jsonl (the Trainer's ``logged`` keys and every numeric eval_* key)
    and honour ``stop`` (built lazily: they need transformers)."""
    from transformers import TrainerCallback

    metrics_path = job.paths.metrics

    class Progress(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = time.perf_counter()
            self.last_t = self.t0
            self.last_tokens = None
            self.last_step = 0
            self.first_logged = False

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = self.last_t = time.perf_counter()
            now = time.time()
            node = job_started()
            since_job = f" ({now - node:.1f} s after the job's start on this node)" if node else ""
            phases = phases_line(now)
            log(f"ready to train {now - STARTED:.1f} s after start{since_job}" + (f": {phases}" if phases else ""))
            self.last_step = state.global_step
            stop.agree()  # collective: every rank creates the group at the same point

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            now = time.perf_counter()
            record: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "max_steps": state.max_steps}
            for key, value in logs.items():
                if key in logged or (key.startswith("eval_") and isinstance(value, (int, float))):
                    record[key] = value
            tokens = logs.get("num_tokens")
            if tokens is not None and self.last_tokens is not None and now > self.last_t:
                record["tokens_per_s"] = round((tokens - self.last_tokens) / (now - self.last_t), 1)
            if tokens is not None:
                self.last_tokens, self.last_t = tokens, now
            steps = state.global_step - self.last_step
            record["elapsed_s"] = round(now - self.t0, 3)
            record["unix_time"] = round(time.time(), 3)
            peak = _peak_memory_gib()
            if peak is not None:
                record["peak_mem_gib"] = peak
            if steps > 0:
                record["step_s"] = round((now - self.t0) / steps, 4)
            if steps > 0 and not self.first_logged:
                self.first_logged = True  # the first step pays for every kernel's first use
                log(f"step {state.global_step} done {now - self.t0:.1f} s after ready to train")
            append_jsonl(metrics_path, record)

        def on_step_end(self, args, state, control, **kw):
            if stop.agree():
                control.should_save = True
                control.should_training_stop = True
            return control

    from hfhpc.recipes import profile

    profiled = profile.callback(job)
    return [Progress()] + ([profiled] if profiled is not None else [])


def train_from_checkpoint(trainer, run_dir: Path, stop: StopOnSignal) -> tuple[Any, str | None]:
    """Train from the newest complete checkpoint whose files match their recorded hashes, or from
    the start. A checkpoint that fails to load anyway is named in a warning and the next older one
    is tried. Returns the Trainer's result (None when a stop signal ended training early, with a
    checkpoint written: the same command resumes) and the checkpoint it resumed from."""
    from hfhpc.recipes.checkpoint import CheckpointLoadError, one_line_errors
    from hfhpc.run.checkpoints import set_aside

    accelerator = trainer.accelerator
    while True:
        resume = last_checkpoint(run_dir, accelerator)
        if resume:
            log(f"resuming from {resume}")
        try:
            with one_line_errors():
                result = trainer.train(resume_from_checkpoint=resume)
            break
        except CheckpointLoadError as e:
            # Every rank loads the same files, so every rank gets here: the main one sets it aside.
            if accelerator.is_main_process:
                moved = set_aside(Path(e.path))
                log(f"warning: skipping {Path(e.path).name}: it does not load ({e.detail}); moved aside to {moved.name}")
            accelerator.wait_for_everyone()
    if result is not None and trainer.state.global_step == getattr(trainer, "_initial_global_step", None) and resume:
        log(f"nothing left to train: {Path(resume).name} is the last step")
        result = result._replace(training_loss=None)
    # A signal that came after the last step (during the final save) does not stop the job.
    if stop.stopped and trainer.state.global_step < trainer.state.max_steps:
        log(f"stopped at step {trainer.state.global_step} with a checkpoint: run the same command again to resume")
        return None, resume
    return result, resume


def last_checkpoint(run_dir: Path, accelerator=None) -> str | None:
    """The newest complete checkpoint-N whose files match their sha256 (see
    :mod:`hfhpc.run.checkpoints`); newer incomplete ones are named in a warning and skipped, corrupt
    ones also set aside. The main process reads the checkpoint; the others wait and take the same."""
    from hfhpc.run.checkpoints import last_complete, resume_point

    main = accelerator is None or accelerator.is_main_process
    found = resume_point(Path(run_dir), warn=log) if main else None
    if accelerator is not None:
        accelerator.wait_for_everyone()
        if not main:
            found = last_complete(Path(run_dir))
    return str(found.path) if found else None


def prepared_root(job: JobFile, name: str = "prepared") -> Path:
    """Prepared data and compiled kernels live beside the shared store when it is writable, else in
    the run folder."""
    root = job.store / "hfhpc" / name
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    return job.run_dir / name


def save_in_dtype(model, dtype) -> None:
    """Make ``model.save_pretrained`` write its weights in ``dtype`` (the staged model's own, bf16 for
    most): training keeps fp32 weights, the final model is the size of the one it started from."""
    import torch

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or dtype == torch.float32:
        return
    original = model.save_pretrained

    def save_pretrained(*args, state_dict=None, **kwargs):
        state = model.state_dict() if state_dict is None else state_dict
        state = {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in state.items()}
        model.config.dtype = dtype
        return original(*args, state_dict=state, **kwargs)

    model.save_pretrained = save_pretrained


def save_final_model(job: JobFile, trainer, tokenizer, *, lora: bool, dtype, scores: dict[str, Any]) -> Path:
    """The run's ``model/``: one plain HF model (gathered from FSDP shards; checkpoints stay sharded,
    fast and resumable), full weights in the staged model's dtype, the tokenizer beside it; and
    ``eval.json`` when there are scores."""
    out = job.paths.model
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    if not lora:
        save_in_dtype(trainer.accelerator.unwrap_model(trainer.model), dtype)
    trainer.save_model(str(out))
    if is_main():
        tokenizer.save_pretrained(str(out))
        if scores:
            atomic_write_json(job.paths.eval, scores)
    return out
