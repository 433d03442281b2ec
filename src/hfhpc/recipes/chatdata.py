"""Chat data for SFT: template and tokenize once per (dataset revision, tokenizer, settings), cache
the result as Arrow next to the store, and share it with every job and node.

Rows in the ultrachat ``messages`` schema are rendered with the model's chat template and tokenized
in batches (the fast tokenizer runs each batch in parallel). Where the template marks assistant
turns with ``{% generation %}``, the ``labels`` column is -100 everywhere else, so the loss covers
only them. Any
other column (ultrachat's string ``prompt`` among them, which TRL would misread) is dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

PREPARED_VERSION = 2
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def template_marks_assistant(template: str | None) -> bool:
    return bool(template and _GENERATION.search(template))


def schema_of(column_names: list[str]) -> str:
    if "messages" in column_names:
        return "messages"
    if "prompt" in column_names and "completion" in column_names:
        return "prompt-completion"
    if "text" in column_names:
        return "text"
    raise ValueError(
        f"the dataset has columns {column_names}: SFT needs `messages` (chat), `prompt`+`completion`, or `text`"
    )


def cache_key(*, dataset_id: str, commit: str | None, config: str | None, split: str, tokenizer_commit: str | None,
              template: str | None, assistant_only: bool, max_samples: int | None) -> str:
    blob = json.dumps(
        [PREPARED_VERSION, dataset_id, commit, config, split, tokenizer_commit,
         hashlib.sha256((template or "").encode()).hexdigest(), assistant_only, max_samples],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def tokenize_messages(ds, tokenizer, *, assistant_only: bool, batch_size: int = 1000, num_proc: int | None = None):
    """``messages`` → ``input_ids`` and ``labels`` (-100 outside assistant turns), batched; other columns dropped.

    The same rendering and tokens as ``tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True)``,
    with the mask computed from token offsets in numpy rather than token by token in Python, and labels
    built here so TRL does not rebuild them in Python either.
    """
    import numpy as np
    from transformers.utils.chat_template_utils import render_jinja_template

    backend = tokenizer.backend_tokenizer
    template_kwargs = dict(tokenizer.special_tokens_map)

    def encode(batch):
        texts, spans = render_jinja_template(
            conversations=batch["messages"], chat_template=tokenizer.chat_template,
            return_assistant_tokens_mask=assistant_only, **template_kwargs,
        )
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        ids = [np.asarray(e.ids, dtype=np.int32) for e in encodings]
        if not assistant_only:
            return {"input_ids": ids}
        labels = []
        for e, row_ids, row_spans in zip(encodings, ids, spans):
            offsets = np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)
            mask = np.zeros(len(row_ids), dtype=bool)
            for start, end in row_spans:
                # A token belongs to a turn when it overlaps it (as transformers decides).
                mask |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
            labels.append(np.where(mask, row_ids, -100).astype(np.int32))
        return {"input_ids": ids, "labels": labels}

    with _tokenizer_threads():
        return ds.map(encode, batched=True, batch_size=batch_size, remove_columns=ds.column_names, num_proc=num_proc,
                      desc="templating and tokenizing")


@contextmanager
def _tokenizer_threads():
    """Let the fast tokenizer use every core while preparing (jobs set TOKENIZERS_PARALLELISM=false so
    that dataloader workers forked later do not deadlock; the library disables it again after a fork)."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def prepared_split(
    *, dataset_id: str, commit: str | None, config: str | None, split: str, tokenizer, tokenizer_commit: str | None,
    assistant_only: bool, cache_root: Path, max_samples: int | None = None,
):
    """The tokenized split, from the cache when this exact preparation was done before."""
    import datasets

    from hfhpc import assets

    key = cache_key(dataset_id=dataset_id, commit=commit, config=config, split=split, tokenizer_commit=tokenizer_commit,
                    template=tokenizer.chat_template, assistant_only=assistant_only, max_samples=max_samples)
    folder = cache_root / key
    if (folder / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(folder)), True
    ds = assets.load_split(dataset_id, commit, split, config)
    if max_samples:
        ds = ds.select(range(min(max_samples, len(ds))))
    kind = schema_of(ds.column_names)
    if kind != "messages":
        # TRL tokenizes prompt/completion and text datasets itself; keep only what it reads.
        keep = ["prompt", "completion"] if kind == "prompt-completion" else ["text"]
        return ds.remove_columns([c for c in ds.column_names if c not in keep]), False
    ds = tokenize_messages(ds, tokenizer, assistant_only=assistant_only)
    tmp = folder.with_name(f".{key}.tmp")
    ds.save_to_disk(str(tmp))
    tmp.rename(folder)  # a concurrent preparer may win the rename: same content, either is fine
    return datasets.load_from_disk(str(folder)), False
