"""Training tokens per epoch: exact from the prepared dataset, else estimated from a sample of the
staged one, rendered with the recipe's own chat-template renderer and counted with ``tokenizer.json``."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfhpc.plan.memory import PlanInputs
from hfhpc.store.lock import JobFiles
from hfhpc.store.prepare import staged_sample



@dataclass(frozen=True)
class DatasetTokens:
    """Training tokens of one epoch under the spec's packing and truncation."""

    rows: int
    tokens: int  # tokens trained on per epoch
    sequences: int  # training sequences per epoch (packed bins, or rows)
    padded_tokens: int | None  # without packing: tokens including padding to each batch's longest row
    source: str
    exact: bool


def tokens_from_lengths(lengths: Sequence[int], *, rows: int | None = None, seq_len: int, packing: bool,
                        packing_strategy: str, micro_batch: int, source: str, exact: bool) -> DatasetTokens:
    """Per-epoch tokens from per-row token counts (all rows, or a sample scaled to ``rows``).

    bfd packing truncates rows longer than ``seq_len`` (TRL's ``pack_dataset``), bfd_split and wrapped
    keep every token; without packing each row is truncated and batches pad to their longest row.
    """
    n = len(lengths)
    total_rows = rows if rows is not None else n
    scale = total_rows / n if n else 0.0
    clipped = [min(x, seq_len) for x in lengths]
    if packing and packing_strategy in ("wrapped", "bfd_split"):
        tokens = round(sum(lengths) * scale)
    else:
        tokens = round(sum(clipped) * scale)
    padded = None
    if packing:
        # Best-fit decreasing fills bins almost completely when most rows are shorter than a bin.
        sequences = max(1, math.ceil(tokens / seq_len)) if tokens else 0
    else:
        sequences = total_rows
        shuffled = clipped[:]
        random.Random(0).shuffle(shuffled)  # the Trainer's sampler shuffles: batch maxima of a random order
        batches = [shuffled[k:k + micro_batch] for k in range(0, n, micro_batch)]
        per_row = sum(len(b) * max(b) for b in batches) / n if n else 0.0
        padded = round(per_row * total_rows)
    return DatasetTokens(total_rows, tokens, sequences, padded, source, exact)


def _arrow_table_lengths(paths: Iterable[Path], column: str) -> list[int]:
    import pyarrow as pa
    import pyarrow.compute as pc

    lengths: list[int] = []
    for path in paths:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
        lengths.extend(pc.list_value_length(table.column(column)).to_pylist())
    return lengths


def prepared_dataset_tokens(folder: Path, **kw: Any) -> DatasetTokens | None:
    """Exact counts from a dataset saved by ``save_to_disk`` with an ``input_ids`` column."""
    try:
        state = json.loads((folder / "state.json").read_text())
        files = [folder / f["filename"] for f in state["_data_files"]]
        lengths = _arrow_table_lengths(files, "input_ids")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return tokens_from_lengths(lengths, source=f"prepared dataset {folder} (exact)", exact=True, **kw)



# The recipes render with transformers' own sandbox (hfhpc.recipes.chatdata); plan runs on login
# nodes, where importing transformers costs 1.5 s and a bare venv may lack it: this is the same
# Jinja sandbox (its extensions and globals), close enough to count a sample's tokens.
def _render_chat(template: str | None, messages: list[dict], special: Mapping[str, str]) -> str:
    if template:
        try:
            return _jinja_env().from_string(template).render(messages=messages, add_generation_prompt=False, **special)
        except Exception:  # noqa: BLE001 - a template using features we lack: fall back to the plain text
            pass
    return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in messages)


def _jinja_env():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """transformers' ``{% generation %}`` block (marks assistant text); renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
    return env


def _special_tokens(tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = tokenizer_config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def sample_row_lengths(rows: list[dict], snapshot: Path, template: str | None) -> tuple[list[int], str]:
    """Token counts of sample rows, rendered as the recipe renders them; and how they were counted."""
    texts = []
    try:
        special = _special_tokens(json.loads((snapshot / "tokenizer_config.json").read_text()))
    except (OSError, ValueError):
        special = {}
    for row in rows:
        if isinstance(row.get("messages"), list):
            texts.append(_render_chat(template, row["messages"], special))
        elif "prompt" in row and "completion" in row:
            texts.append(f"{row['prompt']}{row['completion']}")
        else:
            texts.append(str(row.get("text", "")))
    tokenizer_file = snapshot / "tokenizer.json"
    if tokenizer_file.is_file() and importlib.util.find_spec("tokenizers") is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_file))
        return [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)], "tokenizer.json"
    # A tokenizer without tokenizer.json (sentencepiece only): the usual 4 characters per token.
    return [math.ceil(len(t) / 4) for t in texts], "4 characters per token (no tokenizer.json or no tokenizers library)"



def dataset_tokens(spec: Any, store: Path, files: JobFiles, inputs: PlanInputs) -> tuple[DatasetTokens | None, str]:
    """Tokens of one epoch of the training split: exact from the prepared dataset, else estimated
    from a sample of the staged dataset, else None with the reason."""
    from hfhpc.recipes.chatdata import cache_key, chat_template_of, template_marks_assistant

    t, dref = spec.train, spec.dataset
    if dref is None:
        return None, "the spec has no dataset"
    extra = t.model_extra or {}
    kw = dict(seq_len=t.max_length, packing=t.packing, packing_strategy=str(extra.get("packing_strategy", "bfd")),
              micro_batch=inputs.micro_batch)
    if files.model_snapshot is None:
        return None, "unknown: the model is not staged (its tokenizer and template are needed)"
    template = chat_template_of(files.model_snapshot, t.chat_template)
    assistant_only = t.assistant_only_loss if t.assistant_only_loss is not None else template_marks_assistant(template)
    key = cache_key(dataset_id=dref.id, commit=files.dataset_commit, config=dref.config, split=dref.split,
                    tokenizer_commit=files.model_commit, template=template, assistant_only=assistant_only,
                    max_samples=dref.max_samples)
    if importlib.util.find_spec("pyarrow") is None:  # the datasets library's Arrow reader; absent on a bare login venv
        return None, "unknown: counting tokens needs pyarrow (install the `train` extra on the login node)"
    for root in (Path(store) / "hfhpc" / "prepared", spec.run_dir() / "prepared"):
        if (root / key / "dataset_info.json").is_file():
            found = prepared_dataset_tokens(root / key, **kw)
            if found is not None:
                return found, found.source
    if files.dataset_commit is None:
        return None, "unknown: the dataset is not in the lockfile (run `hfhpc stage SPEC`)"
    staged = staged_sample(store, dref, files.dataset_commit)
    if staged is None:
        return None, NOT_STAGED
    rows, sample = staged
    lengths, how = sample_row_lengths(sample, files.model_snapshot, template)
    found = tokens_from_lengths(lengths, rows=rows, exact=False, **kw,
                                source=f"estimate: {len(sample)}-row sample ({how}) × {rows:,} rows")
    return found, found.source


NOT_STAGED = "unknown: the dataset is not staged in this store (run `hfhpc stage SPEC` on a login node)"


