"""Supervised fine-tuning of a chat model with TRL, offline from the store.

setup (tokenizer, template, prepared data, model) → train (resuming from the newest complete
checkpoint) → save (``model/`` with the tokenizer, ``eval.json``, ``summary.json``).

Packing keeps documents apart: TRL's best-fit-decreasing packing flattens each batch into one row
and passes the documents' boundaries, and attention runs per document (variable-length
FlashAttention on GPUs, :mod:`hfhpc.recipes.attention`), so no token attends across a boundary. With
a template that marks assistant turns, the loss covers only those. Full fine-tuning keeps fp32
weights and computes in bf16 (autocast, or FSDP's mixed precision); LoRA keeps the frozen base in bf16.
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal

from pydantic import Field

from hfhpc import assets
from hfhpc.recipes import chatdata, checkpoint
from hfhpc.recipes.common import (
    EXIT_INTERRUPTED,
    StopOnSignal,
    chat_tokenizer,
    cuda_available,
    half_dtype,
    load_causal_lm,
    log,
    mark,
    prepared_root,
    save_final_model,
    train_from_checkpoint,
    trainer_callbacks,
    training_kwargs,
    weights_dtype,
    write_summary,
)
from hfhpc.registry import Recipe
from hfhpc.spec import TrainBase
from hfhpc.run.jobfile import JobFile


class SftTrain(TrainBase):
    """``train:`` of the sft recipe; any other key passes through to TRL's ``SFTConfig``."""

    max_length: int = Field(1024, ge=8, description="tokens per packed sequence")
    packing: bool = Field(True, description="pack documents; they never attend to each other")
    assistant_only_loss: bool | None = Field(None, description="train on assistant turns only (default: when the template allows)")
    chat_template: str | None = Field(None, description="template for base models without one: a name or a Jinja string")
    attention: Literal["auto", "varlen", "sdpa", "flex_attention", "eager"] = Field(
        "auto", description="auto: variable-length FlashAttention over packed documents (PyTorch's, on GPU), else sdpa")


RECIPE = Recipe(
    name="sft",
    summary="supervised fine-tuning of a chat model with TRL's SFTTrainer (packed, per-document attention)",
    needs=("model", "dataset"),
    train=SftTrain,
    trainer_config="trl:SFTConfig",
    offline_check=chatdata.offline_check,
    starter={
        "name": "zephyr-sft",
        "recipe": "sft",
        "model": {"id": "HuggingFaceH4/zephyr-7b-beta", "revision": "main"},
        "dataset": {"id": "HuggingFaceH4/ultrachat_200k", "split": "train_sft", "eval_split": "test_sft"},
        "train": {"max_length": 2048, "packing": True, "epochs": 1, "learning_rate": 2.0e-5,
                  "per_device_batch_size": 8, "save_steps": 200},
        "launch": {"strategy": "fsdp", "mixed_precision": "bf16"},
        "resources": {"nodes": 1, "gpus_per_node": 4, "cpus_per_gpu": 12, "time": "0-03:00:00",
                      "account": "def-someone"},
        "site": {"preamble": ["module load python/3.11 gcc arrow"]},
        "output_dir": "runs/zephyr-sft",
    },
)


def own_layers(spec: Any) -> bool:
    """Whether this recipe checkpoints and compiles each decoder layer itself (hfhpc.recipes.layers):
    on one device, DDP or FSDP2, full fine-tuning or LoRA (FSDP1's flat parameters keep the Trainer's
    own checkpointing, uncompiled); only then does ``launch.keep_activations`` apply."""
    return spec.recipe == RECIPE.name and (spec.launch.strategy != "fsdp" or spec.fsdp_version == 2)


def attention_implementation(choice: str, *, packed: bool, max_length: int | None = None) -> str:
    """The transformers attention implementation for ``train.attention``."""
    if choice == "varlen" or (choice == "auto" and packed):
        from hfhpc.recipes import attention

        return attention.register(max_length)
    return "sdpa" if choice == "auto" else choice


def main(job: JobFile) -> int:
    # First: SLURM's warning can come early, and a SIGUSR1 with no handler ends the process.
    stop = StopOnSignal().install()

    from trl import SFTConfig, SFTTrainer

    mark("imports")

    spec, t = job.spec, job.spec.train
    model_id, commit, bases = spec.model.id, job.model_commit, job.model_bases
    dref = spec.dataset

    # -- setup -------------------------------------------------------------------------------
    tokenizer = chat_tokenizer(job, t.chat_template)
    assistant_only = t.assistant_only_loss
    if assistant_only is None:
        assistant_only = chatdata.template_marks_assistant(tokenizer.chat_template)

    modelled = {"max_length", "packing", "epochs", "assistant_only_loss", "chat_template", "lora", "attention"}
    layers_here = own_layers(spec)
    kwargs = {k: v for k, v in training_kwargs(job, own_layers=layers_here).items() if k not in modelled}
    gpu = spec.resources.gpus_per_node > 0 and cuda_available()
    # Compiling pays on GPUs (fused norms, activations and rotary embeddings) once a job has the steps
    # to earn its compile back: the decoder layers are compiled as one region (hfhpc.recipes.layers),
    # never the whole model by the Trainer. Unset, the first steps run eager and their time decides
    # (hfhpc.recipes.compiling); true compiles before the first step; false never.
    setting = kwargs.pop("torch_compile", None)
    setting = None if setting is None else bool(setting)
    # Asked for where the layers are not the recipe's (FSDP1): the Trainer compiles the model.
    kwargs["torch_compile"] = bool(setting) and not layers_here
    if kwargs["torch_compile"]:
        # accelerate launch passes dynamic=False to the ranks: every new packed length would be compiled
        # again. Unset, torch compiles the changing dimensions dynamically after seeing them change.
        os.environ.pop("ACCELERATE_DYNAMO_USE_DYNAMIC", None)
    may_compile = layers_here and (setting is True or (setting is None and gpu))
    args = SFTConfig(**kwargs, max_length=t.max_length, packing=t.packing)

    # Templated, tokenized and packed once (exactly as TRL would), cached beside the store and shared by
    # every job and node; TRL's own preparation is then skipped. TRL shuffles before packing when asked
    # to (shuffle_dataset): then it packs our tokenized rows itself.
    cache_root = prepared_root(job)
    own_packing = not args.shuffle_dataset if hasattr(args, "shuffle_dataset") else True
    with args.main_process_first(local=False, desc="dataset preparation"):
        prepared = {}
        for split in dref.all_splits():
            t0 = time.perf_counter()
            common = dict(dataset_id=dref.id, commit=job.dataset_commit, config=dref.config, split=split,
                          tokenizer=tokenizer, tokenizer_commit=commit, assistant_only=assistant_only,
                          cache_root=cache_root, max_samples=dref.max_samples)
            eval_packing = getattr(args, "eval_packing", None)
            packing = args.packing if split == dref.split or eval_packing is None else eval_packing
            if own_packing:
                found = chatdata.packed_split(**common, max_length=args.max_length, packing=packing,
                                              packing_strategy=args.packing_strategy,
                                              truncation_mode=args.truncation_mode)
                ds, hit, ready = found.dataset, found.from_cache, found.ready
            else:
                (ds, hit), ready = chatdata.prepared_split(**common), False
            prepared[split] = (ds, ready)
            what = "packed rows" if ready and packing else "rows"
            log(f"{split}: {len(ds)} {what} {'from the prepared cache' if hit else 'prepared'} in {time.perf_counter() - t0:.1f} s")
    args.dataset_kwargs = {"skip_prepare_dataset": all(ready for _, ready in prepared.values())}
    mark("data")
    train_ds = prepared[dref.split][0]
    eval_ds = prepared[dref.eval_split][0] if dref.eval_split else None

    attn = attention_implementation(t.attention, packed=t.packing, max_length=t.max_length)
    saved_dtype = getattr(assets.load_config(model_id, commit, bases), "dtype", None)
    model = load_causal_lm(job, dtype=weights_dtype(spec, gpu=gpu, frozen=t.lora is not None), attn=attn)
    mark("model")
    callbacks = trainer_callbacks(job, stop)
    if layers_here:
        from hfhpc.recipes import layers

        done = layers.prepare_layers(model, checkpoint=gpu and spec.launch.activation_checkpointing,
                                     keep=spec.launch.keep_activations, compile=setting is True)
        log(f"decoder layers: {done['layers']}, {done['checkpointed']} checkpointed, {done['compiled']} compiled")
    if may_compile:
        compiled, more = layers.compile_callbacks(job, model, setting=setting, args=args, rows=len(train_ds))
        callbacks += more
    elif setting is None and layers_here:
        from hfhpc.recipes.compiling import decide

        log(f"compile: {decide(None, steps_left=0, eager_step_s=None, stored=False, gpu=gpu).line()}")
    mark("layers")
    peft_config = None
    if t.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", **{"r": 16, "lora_alpha": 32, "target_modules": "all-linear", **t.lora})

    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
        callbacks=callbacks, peft_config=peft_config,
    )
    checkpoint.install(trainer, stop)
    mark("trainer")
    if layers_here and trainer.is_fsdp_enabled:
        layers.hand_to_fsdp2(trainer, half_dtype(spec))

    # -- train ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    result, resumed_from = train_from_checkpoint(trainer, job.run_dir, stop)
    if result is None:
        return EXIT_INTERRUPTED

    # -- save ----------------------------------------------------------------------------------
    eval_metrics = trainer.evaluate() if eval_ds is not None else {}
    if may_compile:
        compiled.save_if_new()  # the evaluation's graphs too
    # Scores only: the Trainer's timings (eval_runtime, eval_*_per_second) are not results.
    eval_metrics = {k: v for k, v in eval_metrics.items()
                    if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second"))}
    out = save_final_model(job, trainer, tokenizer, lora=t.lora is not None, dtype=saved_dtype, scores=eval_metrics)
    write_summary(job, {
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "train_seconds": round(time.perf_counter() - t0, 2),
        "eval": eval_metrics,
        "model_dir": str(out),
        "resumed_from": resumed_from,
        "world_size": args.world_size,
        "assistant_only_loss": assistant_only,
    })
    log(f"done: model in {out}")
    return 0

