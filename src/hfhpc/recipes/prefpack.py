"""Padding-free preference batches: the policy's and the reference's forward over one packed row.

TRL's ``DPOTrainer`` runs chosen and rejected in one forward, as a batch of ``2 × pairs`` rows
padded on the right to the longest (``DataCollatorForPreference``), and patches the models'
``forward`` with a fused LM head (``trl.trainer.utils.add_fused_lm_head``): called with
``fused_lm_head=True`` it returns per-token log-probabilities of shape ``(rows, length - 1)``. Its own
``padding_free`` is switched off for DPO in TRL 1.16. The padding is work: with the lengths of the
benchmark's pairs about half of each padded batch is padding.

:func:`install` wraps that fused forward of the policy (under PEFT, of the base model, where TRL
patched it) and of the reference. A padded batch is run as one row of its real tokens; position ids
restart at 0 at each sequence, and the sequences' boundaries (``cu_seq_lens_q``/``cu_seq_lens_k``,
``max_length_q``/``max_length_k``, no attention mask) go to the attention implementation, which
attends within each sequence only (``hfhpc_varlen``, :mod:`hfhpc.recipes.attention`). The labels are
passed pre-shifted (``shift_labels``, which the fused head scores as they are): the last token of a
sequence predicts nothing, exactly as in the padded layout, where the next position is padding.
Every per-token output is scattered back to the padded ``(rows, length - 1)`` layout, so TRL's loss,
rewards and metrics run unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F

IGNORE = -100  # the label that scores nothing (TRL's and transformers')


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """One row of the real tokens of a right-padded batch: ``input_ids``, ``position_ids``,
    ``shift_labels`` (each token's next label, ``-100`` at a sequence's last token) and the boundaries."""
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1)
    nxt = torch.full_like(labels, IGNORE)
    nxt[:, :-1] = labels[:, 1:].masked_fill(~mask[:, 1:], IGNORE)
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    longest = int(lengths.max())
    return {
        "input_ids": input_ids[mask].unsqueeze(0),
        "position_ids": (mask.cumsum(dim=1) - 1)[mask].unsqueeze(0),
        "shift_labels": nxt[mask].unsqueeze(0),
        "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
    }


def unpack(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A packed row's per-token values ``(1, tokens)`` in the padded ``(rows, length - 1)`` layout of
    next-token outputs (zero at padding, as the fused head leaves every unscored position)."""
    # masked_scatter keeps the values connected to the graph (their gradients flow back through it).
    return values.new_zeros(mask.shape).masked_scatter(mask, values[0])[:, :-1]


def right_padded(mask: torch.Tensor) -> bool:
    """Whether every row's real tokens come first (no real token after a padding one)."""
    return not bool((mask[:, 1:] > mask[:, :-1]).any())


def pack_forward(forward: Callable) -> Callable:
    """``forward`` (a model's fused-head forward) running right-padded fused calls as one packed row;
    every other call (generation, logits, a batch not padded on the right) goes to it unchanged."""

    @functools.wraps(forward)
    def packed_forward(*args, **kwargs):
        ids, mask, labels = kwargs.get("input_ids"), kwargs.get("attention_mask"), kwargs.get("labels")
        plain = (args or not kwargs.get("fused_lm_head") or ids is None or mask is None or labels is None
                 or any(kwargs.get(k) is not None for k in ("position_ids", "inputs_embeds", "shift_labels"))
                 or ids.dim() != 2 or not right_padded(mask))
        if plain:
            return forward(*args, **kwargs)
        rest = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "labels")}
        row = pack(ids, mask, labels)
        out = forward(**rest, **row)
        valid, tokens = mask.bool(), row["input_ids"].shape[1]
        for name, value in out.items():
            if isinstance(value, torch.Tensor) and value.shape == (1, tokens):
                out[name] = unpack(value, valid)
        return out

    packed_forward.hfhpc_packed = True
    return packed_forward


def install(trainer) -> list[str]:
    """Pack the fused forwards of ``trainer``'s policy and reference (a built ``DPOTrainer``, before
    ``train``); returns what was packed. Their attention must keep packed sequences apart
    (``hfhpc_varlen``)."""
    from accelerate.utils import is_peft_model

    done = []
    policy = trainer.accelerator.unwrap_model(trainer.model)
    targets = [("policy", policy.get_base_model() if is_peft_model(policy) else policy)]
    if getattr(trainer, "ref_model", None) is not None:
        targets.append(("reference", trainer.accelerator.unwrap_model(trainer.ref_model)))
    for name, model in targets:
        forward = model.__dict__.get("forward")
        if forward is None:  # TRL patches the instance (add_fused_lm_head); without it nothing is fused
            raise RuntimeError(f"the {name} model has no fused LM head forward: this TRL version does not patch it")
        if not getattr(forward, "hfhpc_packed", False):
            model.forward = pack_forward(forward)
        done.append(name)
    return done
