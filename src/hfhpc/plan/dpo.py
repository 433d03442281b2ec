"""Preference tuning (recipe: dpo, TRL's DPOTrainer) as SFT's step with three differences:

* each micro-batch holds b pairs, i.e. 2·b sequences (chosen and rejected in one forward), padded to
  the batch's longest (no packing): the memory model runs with micro-batch 2·b and seq_len
  max_length, padding-free off;
* a frozen reference model: its weights (the compute dtype; sharded like the policy's under FSDP),
  and during the loss its forward, which keeps nothing for backward (no_grad): one layer's working
  set and one logit tile. None with LoRA (the reference is the base with adapters off) or with
  train.precompute_ref_log_probs (computed before training; under FSDP its copy is freed then);
* the reference forward costs 2·N FLOPs per token beside the policy's 6·N (4·N with LoRA): the
  throughput is the SFT anchors' scaled by 6/8 (4/6 with LoRA), none when precomputed.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from hfhpc.plan.memory import (ALLOCATOR_SLACK, TRL_TILE_TOKENS, TRL_TILE_VOCAB, MemoryEstimate, Phase, PlanInputs,
                               Term, estimate_memory, layer_activation_bytes_per_token)
from hfhpc.plan.throughput import Throughput
from hfhpc.plan.tokens import DatasetTokens, _arrow_table_lengths, tokens_from_lengths
from hfhpc.recipes.chatdata import chat_template_of
from hfhpc.store.lock import JobFiles


DPO_DEFAULT_LENGTH = 1024


def dpo_inputs(spec: Any, p: PlanInputs) -> PlanInputs:
    return replace(p, micro_batch=2 * spec.train.per_device_batch_size, padding_free=False,
                   seq_len=spec.train.max_length or DPO_DEFAULT_LENGTH)


def dpo_reference_in_memory(spec: Any) -> bool:
    t = spec.train
    return t.lora is None and not t.precompute_ref_log_probs


def dpo_memory(spec: Any, p: PlanInputs) -> MemoryEstimate:
    """The policy's estimate with the reference model's terms added."""
    base = estimate_memory(p)
    if not dpo_reference_in_memory(spec):
        return base
    s, c = p.shape, p.compute_bytes
    W = p.world if p.fsdp else 1
    weights = Term("reference model weights", c * s.params / W,
                   f"{c}·N frozen" + (f" / {W} (FSDP)" if W > 1 else ""))
    per_token, _ = layer_activation_bytes_per_token(p)
    forward = [Term("reference forward (no grad)", per_token * p.tokens + c * min(p.tokens, TRL_TILE_TOKENS) * min(s.vocab, TRL_TILE_VOCAB),
                    "one layer's working set + one logit tile; nothing kept for backward")]
    if p.fsdp:
        forward.append(Term("reference gathered layers", 2 * c * s.layer_params, "current + prefetched layer"))
    phases = []
    for phase in base.phases:
        extra = [weights] + (forward if phase.name.startswith("loss") else [])
        phases.append(Phase(phase.name, phase.terms + tuple(extra)))
    peak = max(ph.bytes for ph in phases)
    overhead = tuple(Term(t.name, ALLOCATOR_SLACK * peak, t.formula) if t.name == "allocator slack" else t
                     for t in base.overhead)
    return MemoryEstimate(tuple(phases), overhead)


def dpo_throughput(spec: Any, tp: Throughput) -> Throughput:
    """Tokens (chosen + rejected) per second: the policy's rate slowed by the reference's forward."""
    if not dpo_reference_in_memory(spec) and spec.train.lora is None:
        return tp
    policy = 4 if spec.train.lora is not None else 6
    scale = policy / (policy + 2)
    note = f"reference forward: {scale:.2f}× the fine-tuning rate (2·N more FLOPs per token beside {policy}·N)"
    return replace(tp, tokens_per_s_per_gpu=tp.tokens_per_s_per_gpu * scale, notes=tp.notes + (note,))


def dpo_dataset_tokens(spec: Any, store: Path, files: JobFiles, inputs: PlanInputs) -> tuple[DatasetTokens | None, str]:
    """Tokens of one epoch of pairs: exact from the prepared pairs (prompt + chosen, prompt + rejected;
    each padded to the longest of its micro-batch unless ``train.padding_free``), else the staged split's row count at max_length."""
    from hfhpc.recipes import prefdata
    from hfhpc.store.prepare import dataset_cache_dir

    t, dref = spec.train, spec.dataset
    seq = t.max_length or DPO_DEFAULT_LENGTH
    if files.model_snapshot is None:
        return None, "unknown: the model is not staged (its tokenizer and template are needed)"
    template = chat_template_of(files.model_snapshot, t.chat_template)
    key = prefdata.cache_key(dataset_id=dref.id, commit=files.dataset_commit, config=dref.config, split=dref.split,
                             tokenizer_commit=files.model_commit, template=template, max_length=t.max_length,
                             max_prompt_length=t.max_prompt_length, max_samples=dref.max_samples)
    if importlib.util.find_spec("pyarrow") is None:
        return None, "unknown: counting tokens needs pyarrow (install the `train` extra on the login node)"
    for root in (Path(store) / "hfhpc" / "prepared", spec.run_dir() / "prepared"):
        folder = root / key
        try:
            state = json.loads((folder / "state.json").read_text())
            paths = [folder / f["filename"] for f in state["_data_files"]]
            prompt = _arrow_table_lengths(paths, "prompt_ids")
            chosen = _arrow_table_lengths(paths, "chosen_ids")
            rejected = _arrow_table_lengths(paths, "rejected_ids")
        except (OSError, ValueError, KeyError, TypeError):
            continue
        # A micro-batch of b pairs is one batch of 2·b rows padded to the longest: pair the lengths up.
        lengths = [n for p, c, r in zip(prompt, chosen, rejected, strict=True) for n in (p + c, p + r)]
        found = tokens_from_lengths(lengths, seq_len=seq, packing=False, packing_strategy="bfd",
                                    micro_batch=inputs.micro_batch, source=f"prepared pairs {folder} (exact)", exact=True)
        # Padding-free (the recipe's default): a step computes the pairs' own tokens, no padding.
        padded = found.tokens if getattr(t, "padding_free", False) else found.padded_tokens
        return replace(found, rows=len(prompt), padded_tokens=padded), found.source
    if files.dataset_commit is None:
        return None, "unknown: the dataset is not in the lockfile (run `hfhpc stage SPEC`)"
    for folder in dataset_cache_dir(store, dref.id, dref.config, files.dataset_commit):
        try:
            rows = int(json.loads((folder / "dataset_info.json").read_text())["splits"][dref.split]["num_examples"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if dref.max_samples:
            rows = min(rows, dref.max_samples)
        source = f"estimate: {rows:,} pairs × 2 sequences at max_length {seq} (an upper bound; exact once prepared)"
        return DatasetTokens(rows, 2 * rows * seq, 2 * rows, 2 * rows * seq, source, False), source
    return None, "unknown: the dataset is not staged in this store (run `hfhpc stage SPEC` on a login node)"
