"""Preference tuning with TRL's ``DPOTrainer`` (Direct Preference Optimization), offline from the store.

setup (tokenizer, template, prepared pairs, policy and reference) → train (resuming from the newest
complete checkpoint) → save (``model/`` with the tokenizer, ``eval.json`` with the held-out reward
accuracy, ``summary.json``).

The reference is the policy's starting weights, frozen, loaded from the same locked commit on every
rank (TRL would load it again by name, at whatever revision the cache calls ``main``); with LoRA it is
the base with the adapters switched off, and no second copy is loaded. ``precompute_ref_log_probs``
computes the reference's log-probabilities of every pair once, before training, and keeps them beside
the prepared pairs (TRL writes them into the dataset's own cache folder, keyed by the pairs and a hash
of the reference weights): the next job on the same data and model reads them, and no reference model
stays in memory while training.

The model to tune is the job file's ``model`` (its locked commit): Zephyr's DPO step starts from the
SFT step's model staged like any other.

Padding-free (``train.padding_free``, the default): the policy's and the reference's forward run each
padded batch as one row of its real tokens, attention kept within each sequence
(:mod:`hfhpc.recipes.prefpack`, :mod:`hfhpc.recipes.attention`); TRL's loss sees the padded layout.
On GPUs, full fine-tuning checkpoints the policy's decoder layers (per
``launch.activation_checkpointing``) and compiles the policy's and the reference's as the sft recipe
does (:mod:`hfhpc.recipes.layers`): with ``train.torch_compile`` unset, once the first steps show the
job long enough to earn the compile back (:mod:`hfhpc.recipes.compiling`); the kernels are kept in
the store.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field, model_validator

from hfhpc.recipes import prefdata
from hfhpc.registry import Recipe
from hfhpc.spec import TrainBase

# What the DPOTrainer logs and metrics.jsonl keeps, besides the shared keys.
DPO_LOGGED = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
              "logps/chosen", "logps/rejected")


class DpoTrain(TrainBase):
    """DPO settings. Any other key passes through to TRL's ``DPOConfig`` (``loss_type``,
    ``label_smoothing``, ``lr_scheduler_type``, ``warmup_ratio`` …)."""

    learning_rate: float = Field(1.0e-6, gt=0, description="peak learning rate (TRL's DPO default)")
    beta: float = Field(0.1, gt=0, description="how far the policy may move from the reference (higher: less)")
    max_length: int | None = Field(1024, ge=8, description="tokens of prompt + completion kept (their start)")
    max_prompt_length: int | None = Field(None, ge=1, description="tokens of the prompt kept (its end; default: all)")
    precompute_ref_log_probs: bool = Field(
        False, description="compute the reference's log-probs once, cached beside the prepared pairs; no reference model while training")
    chat_template: str | None = Field(None, description="template for models without one: a Jinja string")
    padding_free: bool = Field(
        True, description="run each batch's chosen and rejected sequences as one packed row, attention kept within each")

    @model_validator(mode="after")
    def _lengths(self) -> DpoTrain:
        if self.max_length is not None and self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length}): "
                             "otherwise no completion token is left to compare")
        return self


RECIPE = Recipe(
    name="dpo",
    summary="preference tuning (DPO) of a chat model on chosen/rejected pairs with TRL's DPOTrainer",
    needs=("model", "dataset"),
    train=DpoTrain,
    trainer_config="trl:DPOConfig",
    offline_check=prefdata.offline_check,
    starter={
        "name": "zephyr-dpo",
        "recipe": "dpo",
        "model": {"id": "alignment-handbook/zephyr-7b-sft-full", "revision": "main"},
        "dataset": {"id": "HuggingFaceH4/ultrafeedback_binarized", "split": "train_prefs", "eval_split": "test_prefs"},
        "train": {"beta": 0.01, "max_length": 1024, "max_prompt_length": 512, "epochs": 1, "learning_rate": 5.0e-7,
                  "per_device_batch_size": 8, "gradient_accumulation_steps": 4, "save_steps": 100},
        "launch": {"strategy": "fsdp", "mixed_precision": "bf16"},
        "resources": {"nodes": 1, "gpus_per_node": 4, "cpus_per_gpu": 12, "mem_gb": 0, "time": "0-06:00:00",
                      "account": "def-someone"},
        "site": {"preamble": ["module load python/3.11 gcc arrow"]},
        "output_dir": "runs/zephyr-dpo",
    },
)


def trainer_class():
    """TRL's DPOTrainer, taking pairs this recipe prepared as they are (TRL would try to find a
    ``prompt`` in them and tokenize again)."""
    from trl import DPOTrainer

    class PreparedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" in getattr(dataset, "column_names", ()):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return PreparedDPOTrainer


def eval_scores(metrics: dict[str, Any], pairs: int) -> dict[str, Any]:
    """eval.json: the Trainer's scores (not its timings), and the reward accuracy by its plain name."""
    scores = {k: v for k, v in metrics.items()
              if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second"))}
    if "eval_rewards/accuracies" in scores:
        scores["reward_accuracy"] = scores["eval_rewards/accuracies"]
    scores["pairs"] = pairs
    return scores


def main(job) -> int:
    from hfhpc import assets
    from hfhpc.recipes import checkpoint
    from hfhpc.recipes.common import (
        EXIT_INTERRUPTED,
        LOGGED,
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

    # First: SLURM's warning can come early, and a SIGUSR1 with no handler ends the process.
    stop = StopOnSignal().install()

    from transformers import AutoModelForCausalLM
    from trl import DPOConfig

    mark("imports")

    spec, t = job.spec, job.spec.train
    model_id, commit, bases = spec.model.id, job.model_commit, job.model_bases
    dref = spec.dataset

    # -- setup -------------------------------------------------------------------------------
    tokenizer = chat_tokenizer(job, t.chat_template, required=False)  # plain-text pairs need none

    modelled = {"epochs", "lora", "beta", "max_length", "max_prompt_length", "precompute_ref_log_probs", "chat_template",
                "padding_free"}
    kwargs = {k: v for k, v in training_kwargs(job).items() if k not in modelled}
    gpu = spec.resources.gpus_per_node > 0 and cuda_available()
    # Each decoder layer checkpointed and compiled by the recipe, as sft does (hfhpc.recipes.layers): on
    # GPUs, full fine-tuning, and not under FSDP1's flat parameters; the Trainer then checkpoints nothing
    # itself. train.torch_compile unset: eager first steps, then compiled when the job's steps left earn
    # the compile back (hfhpc.recipes.compiling); true: compiled before the first step; false: never.
    fsdp = spec.launch.strategy == "fsdp"
    layerwise = t.lora is None and (not fsdp or spec.fsdp_version == 2)
    setting = kwargs.pop("torch_compile", None)
    setting = None if setting is None else bool(setting)
    own_layers = layerwise and (setting is True or (setting is None and gpu))
    if setting and not layerwise:
        kwargs["torch_compile"] = True  # asked for where the layers are not the recipe's: the Trainer compiles
    if own_layers:
        for key in ("activation_checkpointing", "gradient_checkpointing"):
            if key in kwargs:
                kwargs[key] = False
    args = DPOConfig(**kwargs, beta=t.beta, max_length=t.max_length, precompute_ref_log_probs=t.precompute_ref_log_probs)

    # Templated and tokenized once, cached beside the store and shared by every job and node.
    cache_root = prepared_root(job)
    prepared = {}
    with args.main_process_first(local=False, desc="dataset preparation"):
        for split in dref.all_splits():
            t0 = time.perf_counter()
            found = prefdata.prepared_pairs(
                dataset_id=dref.id, commit=job.dataset_commit, config=dref.config, split=split, tokenizer=tokenizer,
                tokenizer_commit=commit, cache_root=cache_root, max_length=t.max_length,
                max_prompt_length=t.max_prompt_length, max_samples=dref.max_samples)
            prepared[split] = found.dataset
            log(f"{split}: {len(found.dataset)} pairs {'from the prepared cache' if found.from_cache else 'prepared'} "
                f"in {time.perf_counter() - t0:.1f} s")
    train_ds = prepared[dref.split]
    eval_ds = prepared[dref.eval_split] if dref.eval_split else None
    mark("data")

    saved_dtype = getattr(assets.load_config(model_id, commit, bases), "dtype", None)
    if t.padding_free:
        from hfhpc.recipes import attention

        attn = attention.register(t.max_length)
    else:
        attn = "sdpa"
    model = load_causal_lm(job, dtype=weights_dtype(spec, gpu=gpu, frozen=t.lora is not None), attn=attn)
    ref_layers = []
    if own_layers:
        from hfhpc.recipes import layers

        done = layers.prepare_layers(model, checkpoint=spec.launch.activation_checkpointing,
                                     keep=spec.launch.keep_activations, compile=setting is True)
        log(f"decoder layers: {done['layers']}, {done['checkpointed']} checkpointed, {done['compiled']} compiled")
    peft_config = None
    ref_model = None
    if t.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", **{"r": 16, "lora_alpha": 32, "target_modules": "all-linear", **t.lora})
    elif not (t.precompute_ref_log_probs and spec.launch.strategy != "fsdp"):
        # The frozen reference: the same commit, in the compute dtype on GPUs (it only runs forward).
        ref_model = assets.load_model(AutoModelForCausalLM, model_id, commit, bases,
                                      dtype=weights_dtype(spec, gpu=gpu, frozen=True), attn_implementation=attn)
        ref_model.requires_grad_(False).eval()
        if own_layers:
            layers.prepare_layers(ref_model, checkpoint=False, compile=setting is True)
            ref_layers = layers.decoder_layers(ref_model)  # found now, before FSDP2 renames their classes
    # else: TRL computes the reference log-probs with the policy before its first step.

    mark("models")
    callbacks = trainer_callbacks(job, stop, logged=LOGGED + DPO_LOGGED)
    if own_layers:
        compiled, more = layers.compile_callbacks(job, model, setting=setting, args=args, rows=len(train_ds),
                                                  others=ref_layers)
        callbacks += more
    trainer = trainer_class()(
        model=model, ref_model=ref_model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        processing_class=tokenizer, callbacks=callbacks, peft_config=peft_config,
    )
    if t.padding_free:
        from hfhpc.recipes import prefpack

        log(f"padding-free batches: {' and '.join(prefpack.install(trainer))} packed")
    if t.precompute_ref_log_probs:
        trainer.ref_model = None  # its log-probs are in the datasets now
    checkpoint.install(trainer, stop)
    mark("trainer")
    if own_layers and fsdp:
        layers.hand_to_fsdp2(trainer, half_dtype(spec))

    # -- train ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    result, resumed_from = train_from_checkpoint(trainer, job.run_dir, stop)
    if result is None:
        return EXIT_INTERRUPTED

    # -- save ----------------------------------------------------------------------------------
    scores = eval_scores(trainer.evaluate(), len(eval_ds)) if eval_ds is not None else {}
    if own_layers:
        compiled.save_if_new()  # the evaluation's graphs too
    out = save_final_model(job, trainer, tokenizer, lora=t.lora is not None, dtype=saved_dtype, scores=scores)
    write_summary(job, {
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "train_seconds": round(time.perf_counter() - t0, 2),
        "eval": scores,
        "model_dir": str(out),
        "resumed_from": resumed_from,
        "world_size": args.world_size,
        "pairs": len(train_ds),
        "padding_free": t.padding_free,
        "reference": "base without adapters" if t.lora is not None else (
            "precomputed log-probs" if t.precompute_ref_log_probs else "frozen copy of the starting weights"),
    })
    log(f"done: model in {out}" + (f"; held-out reward accuracy {scores['reward_accuracy']:.3f} on {len(eval_ds)} pairs"
                                   if "reward_accuracy" in scores else ""))
    return 0
