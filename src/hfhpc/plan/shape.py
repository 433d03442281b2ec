"""The model's shape, read from its ``config.json``: parameters and FLOPs per token."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfhpc.errors import UsageError

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from ``config.json``: a Llama/Mistral-style decoder."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False
    qkv_bias: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = "config.json") -> ModelShape:
        text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else None
        cfg = {**config, **(text or {})}
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
                   if not isinstance(cfg.get(k), int)]
        if missing:
            raise UsageError(f"{source}: not a decoder config that plan understands (no {', '.join(missing)})",
                             "plan estimates Llama/Mistral-style decoders; pass --model-config with such a config.json")
        if any(isinstance(cfg.get(k), int) and cfg[k] > 1 for k in ("num_local_experts", "num_experts", "n_routed_experts")):
            raise UsageError(f"{source}: mixture-of-experts models are not modelled by plan",
                             "size the job by hand from a measured run (see benchmarks/)")
        heads = cfg["num_attention_heads"]
        model_type = str(cfg.get("model_type", "?"))
        # Gemma ties its embeddings by default; the Llama family does not.
        tied = cfg.get("tie_word_embeddings", model_type.startswith("gemma"))
        return cls(
            model_type=model_type,
            hidden=cfg["hidden_size"],
            intermediate=cfg["intermediate_size"],
            layers=cfg["num_hidden_layers"],
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab=cfg["vocab_size"],
            tied_embeddings=bool(tied),
            qkv_bias=bool(cfg.get("attention_bias", model_type.startswith("qwen2"))),
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each matmul of a decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    @property
    def layer_params(self) -> int:
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return self.layer_linear_params + bias + 2 * self.hidden  # + the two RMSNorm weights

    @property
    def embedding_params(self) -> int:
        """Input embeddings plus the LM head when untied."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params + self.hidden

    def flops_per_token(self, ctx: int, *, trainable_weights: bool = True) -> float:
        """6·N + 12·L·h·ctx: forward and backward matmuls plus attention scores (not halved for
        causality), the seed bench's formula. Frozen weights (LoRA) need no weight gradient: 4·N."""
        dense = (6 if trainable_weights else 4) * self.params
        return dense + 12 * self.layers * self.hidden * ctx

    def describe(self) -> str:
        size = f"{self.params / 1e9:.2f}B" if self.params >= 1e8 else f"{self.params / 1e6:.2f}M"
        return (f"{size} parameters ({self.model_type}, {self.layers} layers, hidden {self.hidden}, "
                f"MLP {self.intermediate}, {self.heads} heads / {self.kv_heads} kv, vocab {self.vocab})")


def read_model_config(path: Path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise UsageError(f"{p}: no such file", "give the model's config.json (or its folder) to --model-config") from None
    except ValueError as e:
        raise UsageError(f"{p}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{p}: not a model config")
    return data


SHAPE_7B = ModelShape("mistral", 4096, 14336, 32, 32, 8, 128, 32000)
SHAPE_1B = ModelShape("mistral", 2048, 5632, 22, 32, 4, 64, 32000)

BENCH_SHAPES = {"7b": SHAPE_7B, "1b": SHAPE_1B}
