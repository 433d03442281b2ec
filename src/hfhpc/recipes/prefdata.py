"""Preference pairs for DPO: template, tokenize and truncate once per (dataset revision, tokenizer,
settings), cache the result as Arrow next to the store, and share it with every job and node.

Rows hold ``chosen`` and ``rejected`` completions, as message lists (UltraFeedback's
``ultrafeedback_binarized``: each list is the whole conversation, the user's turn included) or as
plain text with a text ``prompt``. A conversational row's prompt is the longest run of messages that
``chosen`` and ``rejected`` share (TRL's ``extract_prompt``), or its ``prompt`` column when that is a
message list too; a string ``prompt`` beside message lists (UltraFeedback's) is not used, because TRL
would concatenate it with a list and fail.

Each pair becomes the three columns TRL's ``DPOTrainer`` builds itself (``prompt_ids``,
``chosen_ids``, ``rejected_ids``; its ``_prepare_dataset``): the prompt is rendered with the
generation prompt, prompt + chosen and prompt + rejected without, and the completion starts where the
token lists diverge. Then the truncation TRL 1.16 no longer does for prompts: the prompt keeps its last
``max_prompt_length`` tokens (the question's end, next to the answer), and prompt + completion keep
their first ``max_length`` tokens (what TRL's collator would keep); a pair whose prompt alone fills
``max_length`` is dropped, as TRL drops it.

Rows are prepared in worker processes, in chunks that each write one Arrow file (the machinery of
:mod:`hfhpc.recipes.chatdata`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfhpc.errors import UsageError
from hfhpc.recipes import chatdata

PREPARED_VERSION = 1
COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def cache_key(*, dataset_id: str, commit: str | None, config: str | None, split: str, tokenizer_commit: str | None,
              template: str | None, max_length: int | None, max_prompt_length: int | None,
              max_samples: int | None) -> str:
    """The prepared split's folder name."""
    fields = ["dpo", PREPARED_VERSION, dataset_id, commit, config, split, tokenizer_commit,
              hashlib.sha256((template or "").encode()).hexdigest(), max_length, max_prompt_length, max_samples]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def is_conversation(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def split_pair(row: dict) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of one row: message lists, or strings."""
    chosen, rejected = row["chosen"], row["rejected"]
    if is_conversation(chosen) and is_conversation(rejected):
        prompt = row.get("prompt")
        if is_conversation(prompt) and prompt:
            return prompt, chosen, rejected
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        return chosen[:shared], chosen[shared:], rejected[shared:]
    if isinstance(chosen, str) and isinstance(rejected, str) and isinstance(row.get("prompt"), str):
        return row["prompt"], chosen, rejected
    raise ValueError("a preference row needs `chosen` and `rejected` as message lists (with or without a message-list "
                     "`prompt`), or all three of `prompt`, `chosen`, `rejected` as text")


def offline_check(spec, store: Path) -> tuple[list[tuple[str, str, str, str, str]], None]:
    """What ``hfhpc check`` adds for the dpo recipe (``Recipe.offline_check``): pairs of conversations
    need the chat template; pairs of text need none. Decided from the first rows of the staged split."""
    from hfhpc.store.prepare import staged_sample

    def conversations(files) -> bool:
        staged = staged_sample(store, spec.dataset, files.dataset_commit) if files.dataset_commit else None
        for row in staged[1] if staged else ():
            try:
                return is_conversation(split_pair(row)[1])
            except (KeyError, TypeError, ValueError):  # not a pair: preparation says what is wrong
                continue
        return False

    return chatdata.template_check(spec, store, needed=conversations), None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def truncate(prompt: list[int], chosen: list[int], rejected: list[int], *, max_length: int | None,
             max_prompt_length: int | None) -> tuple[list[int], list[int], list[int]] | None:
    """The pair as trained, or None when the prompt alone fills ``max_length``."""
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[len(prompt) - max_prompt_length:]
    if max_length is not None:
        if len(prompt) >= max_length:
            return None
        room = max_length - len(prompt)
        chosen, rejected = chosen[:room], rejected[:room]
    return prompt, chosen, rejected


def tokenize_pairs(rows: list[dict], tokenizer, *, max_length: int | None, max_prompt_length: int | None) -> dict[str, list]:
    """``prompt_ids``, ``chosen_ids``, ``rejected_ids`` of ``rows`` (dicts with prompt/chosen/rejected)."""
    parts = [split_pair(r) for r in rows]
    conversational = [is_conversation(c) for _, c, _ in parts]
    ids: list[tuple[list[int], list[int], list[int]]] = [([], [], [])] * len(parts)
    chat = [i for i, c in enumerate(conversational) if c]
    if chat:
        if not tokenizer.chat_template:
            raise UsageError("the preference pairs are conversations, and the model's tokenizer has no chat template",
                             chatdata.NO_TEMPLATE_FIX)
        prompts = tokenizer.apply_chat_template([parts[i][0] for i in chat], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([parts[i][0] + parts[i][1] for i in chat] + [parts[i][0] + parts[i][2] for i in chat],
                                             tokenize=False)
        enc = tokenizer(list(prompts) + list(full), add_special_tokens=False)["input_ids"]
        n = len(chat)
        for k, i in enumerate(chat):
            ids[i] = (enc[k], enc[n + k], enc[2 * n + k])
    plain = [i for i, c in enumerate(conversational) if not c]
    if plain:
        eos = tokenizer.eos_token or ""
        end = lambda text: text if text.endswith(eos) else text + eos  # noqa: E731 - TRL's add_eos
        texts = ([parts[i][0] for i in plain] + [parts[i][0] + end(parts[i][1]) for i in plain]
                 + [parts[i][0] + end(parts[i][2]) for i in plain])
        enc = tokenizer(texts)["input_ids"]
        n = len(plain)
        for k, i in enumerate(plain):
            ids[i] = (enc[k], enc[n + k], enc[2 * n + k])
    out: dict[str, list] = {c: [] for c in COLUMNS}
    for prompt, with_chosen, with_rejected in ids:
        cut = min(_common_prefix(prompt, with_chosen), _common_prefix(prompt, with_rejected))
        kept = truncate(prompt[:cut], with_chosen[cut:], with_rejected[cut:], max_length=max_length,
                        max_prompt_length=max_prompt_length)
        if kept is None:
            continue
        for column, value in zip(COLUMNS, kept, strict=True):
            out[column].append(value)
    return out


@dataclass
class _Work:
    dataset: Any
    tokenizer: Any
    chunks: list[tuple[int, int]]
    folder: Path
    max_length: int | None
    max_prompt_length: int | None
    batch: int = 500


_WORK: _Work | None = None  # what forked workers run (set by the parent before it forks)


def _table(columns: dict[str, list]):
    import pyarrow as pa

    return pa.table({c: pa.array(columns[c], type=pa.list_(pa.int32())) for c in COLUMNS})


def _prepare_chunk(i: int) -> dict:
    work = _WORK
    assert work is not None
    start, stop = work.chunks[i]
    keep = [c for c in ("prompt", "chosen", "rejected") if c in work.dataset.column_names]
    data = work.dataset.select_columns(keep)
    columns: dict[str, list] = {c: [] for c in COLUMNS}
    for a in range(start, stop, work.batch):
        rows = data[a:min(stop, a + work.batch)]
        batch = [dict(zip(rows, values, strict=True)) for values in zip(*rows.values(), strict=True)]
        got = tokenize_pairs(batch, work.tokenizer, max_length=work.max_length, max_prompt_length=work.max_prompt_length)
        for c in COLUMNS:
            columns[c].extend(got[c])
    chatdata._write_table(work.folder / chatdata._chunk_name(i, len(work.chunks)), _table(columns))
    return {"chunk": i, "rows": len(columns["prompt_ids"]), "dropped": (stop - start) - len(columns["prompt_ids"])}


def _run(work: _Work, num_proc: int | None) -> list[dict]:
    global _WORK
    processes = chatdata._processes(num_proc, len(work.chunks))
    _WORK = work
    try:
        if processes == 1:
            with chatdata.tokenizer_threads("true"):
                return [_prepare_chunk(i) for i in range(len(work.chunks))]
        import multiprocessing

        with chatdata.tokenizer_threads("false"), multiprocessing.get_context("fork").Pool(processes) as pool:
            return sorted(pool.imap_unordered(_prepare_chunk, range(len(work.chunks))), key=lambda r: r["chunk"])
    finally:
        _WORK = None


@dataclass(frozen=True)
class PreparedPairs:
    dataset: Any
    from_cache: bool
    folder: Path


def prepared_pairs(*, dataset_id: str, commit: str | None, config: str | None, split: str, tokenizer,
                   tokenizer_commit: str | None, cache_root: Path, max_length: int | None,
                   max_prompt_length: int | None, max_samples: int | None = None,
                   num_proc: int | None = None) -> PreparedPairs:
    """The split's pairs as ``DPOTrainer`` trains them, from the cache when this exact preparation
    was done before. ``num_proc``: worker processes (default: one per core this process may use)."""
    key = cache_key(dataset_id=dataset_id, commit=commit, config=config, split=split, tokenizer_commit=tokenizer_commit,
                    template=tokenizer.chat_template, max_length=max_length, max_prompt_length=max_prompt_length,
                    max_samples=max_samples)
    cache_root = Path(cache_root)
    folder = cache_root / key
    if chatdata._is_done(folder):
        return PreparedPairs(chatdata._load(folder), True, folder)
    ds = chatdata._source(dataset_id, commit, split, config, max_samples)
    missing = [c for c in ("chosen", "rejected") if c not in ds.column_names]
    if missing:
        raise ValueError(f"{dataset_id} split {split} has columns {ds.column_names}: DPO needs `chosen` and `rejected` "
                         "(and `prompt` for text pairs)")
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_root))
    try:
        chunks = chatdata._chunks(len(ds), chatdata._processes(num_proc, len(ds) // chatdata.PACK_BATCH_ROWS + 1))
        work = _Work(dataset=ds, tokenizer=tokenizer, chunks=chunks, folder=tmp, max_length=max_length,
                     max_prompt_length=max_prompt_length)
        _run(work, num_proc)
        chatdata._finish(tmp, [chatdata._chunk_name(i, len(chunks)) for i in range(len(chunks))], key)
        chatdata._publish(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return PreparedPairs(chatdata._load(folder), False, folder)
