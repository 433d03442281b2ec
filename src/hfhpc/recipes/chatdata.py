"""Chat data for SFT: template, tokenize and pack once per (dataset revision, tokenizer, settings), cache
the result as Arrow next to the store, and share it with every job and node.

Rows in the ultrachat ``messages`` schema are rendered with the model's chat template and tokenized.
Where the template marks assistant turns with ``{% generation %}``, the ``labels`` column is -100
everywhere else, so the loss covers only them. Any other column (ultrachat's string ``prompt`` among
them, which TRL would misread) is dropped.

The result is exactly what TRL's SFTTrainer builds itself (``tokenizer.apply_chat_template(messages,
return_assistant_tokens_mask=True)``, labels from the assistant mask, then ``pack_dataset``), only
faster:

- rows are prepared in worker processes (one per core), in chunks that each write their own Arrow file;
- no Python list per token: ids, masks and labels are numpy arrays, and Arrow columns are built from
  their offsets;
- for byte-level BPE tokenizers that split words with a regular expression (GPT-2, Llama 3, Qwen,
  Mistral's Tekken and the like), each distinct word is tokenized once and looked up after that. The
  word split is the tokenizer's own expression, run by Python's ``re`` on ASCII text; any other text
  goes to the tokenizer whole. The shortcut is checked against the tokenizer on probe strings and on a
  sample of rows; any difference turns it off and the preparation runs again without it;
- packing (``packed_split``) reproduces TRL's ``pack_dataset`` row for row, so the trainer can skip its
  own preparation (``SFTConfig(dataset_kwargs={"skip_prepare_dataset": True})``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain, repeat
from pathlib import Path
from typing import Any

from hfhpc.atomic import tmp_dir

PREPARED_VERSION = 3
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")

# TRL packs with one ``datasets.map(batched=True)`` and its default batch size: rows are packed 1,000 at a time.
PACK_BATCH_ROWS = 1000
PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")

# What ``cache_key`` hashes for a packed dataset, besides the prepared split's own key.
_PACK_LAYOUT = 1


def template_marks_assistant(template: str | None) -> bool:
    return bool(template and _GENERATION.search(template))


# The fix for a model with no chat template, wherever it is found (check, or a rank's data preparation).
NO_TEMPLATE_FIX = "set train.chat_template in the spec (a Jinja template), or start from a chat model"


def chat_template_of(snapshot: Path, override: str | None) -> str | None:
    """The template a recipe applies, read from a staged snapshot without transformers: the spec's
    ``override``, else the tokenizer's (``chat_template.jinja`` first, as transformers reads it)."""
    if override:
        return override
    jinja_file = snapshot / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    try:
        value = json.loads((snapshot / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        return None
    if isinstance(value, list):  # named templates: the default one
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    return value if isinstance(value, str) else None


def offline_check(spec, store: Path) -> tuple[list[tuple[str, str, str, str, str]], None]:
    """What ``hfhpc check`` adds for the sft recipe (``Recipe.offline_check``): it renders every
    conversation with the chat template."""
    return template_check(spec, store, needed=lambda files: True), None


def template_check(spec, store: Path, needed: Callable[[Any], bool]) -> list[tuple[str, str, str, str, str]]:
    """The problem ``check`` reports for a job that renders conversations (``needed(files)``, given the
    spec's staged files) with a model that has no chat template and a spec that gives none: it would
    fail at its first data step, after its wait in the queue. The template is read as the run's
    tokenizer finds it (hfhpc.assets.load_tokenizer); an unstaged model is reported elsewhere."""
    from hfhpc.store.lock import job_files

    files = job_files(spec, store)
    snapshot = files.model_snapshot
    if snapshot is None:
        return []
    if not (snapshot / "tokenizer_config.json").is_file() and files.config_snapshot is not None:
        snapshot = files.config_snapshot  # adapters without a tokenizer of their own: their base's
    if chat_template_of(snapshot, spec.train.chat_template) or not needed(files):
        return []
    return [("model", spec.model.id, "chat template",
             f"none in its tokenizer files, and the {spec.recipe} recipe renders the data's conversations with one",
             NO_TEMPLATE_FIX)]


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
              template: str | None, assistant_only: bool, max_samples: int | None, layout: str | None = None) -> str:
    """The prepared split's folder name; ``layout`` names a trainer-ready form of it (packing, length)."""
    fields = [PREPARED_VERSION, dataset_id, commit, config, split, tokenizer_commit,
              hashlib.sha256((template or "").encode()).hexdigest(), assistant_only, max_samples]
    if layout is not None:
        fields.append(layout)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------------------------------
# Rendering

def _render(conversations: list, template: str, special: dict, assistant_only: bool,
            tools: list | None = None, template_kwargs: list | None = None) -> tuple[list[str], list | None]:
    """Chat template → texts (and the character spans of ``{% generation %}`` blocks), as
    ``apply_chat_template`` renders them: message keys whose value is None are dropped first."""
    from transformers.utils.chat_template_utils import render_jinja_template

    conversations = [[{k: v for k, v in m.items() if v is not None} for m in chat] for chat in conversations]
    if tools is None and template_kwargs is None:
        texts, spans = render_jinja_template(conversations=conversations, chat_template=template,
                                             return_assistant_tokens_mask=assistant_only, **special)
        return texts, (spans if assistant_only else None)
    texts, spans = [], []
    for i, chat in enumerate(conversations):
        row_tools = tools[i] if tools is not None else None
        if isinstance(row_tools, str):
            row_tools = json.loads(row_tools)
        kwargs = {**special, **((template_kwargs[i] or {}) if template_kwargs is not None else {})}
        text, span = render_jinja_template(conversations=[chat], tools=row_tools, chat_template=template,
                                           return_assistant_tokens_mask=assistant_only, **kwargs)
        texts.append(text[0])
        spans.append(span[0] if assistant_only else None)
    return texts, (spans if assistant_only else None)


# ---------------------------------------------------------------------------------------------------
# Tokenizing: both paths return, for a batch of texts, the flat token ids, the tokens per row and (when
# asked) each token's character offsets in "global" coordinates, where row r starts at base[r] and rows
# are one character apart.

class _Mismatch(Exception):
    """The word cache gave other tokens than the tokenizer: prepare without it."""


def _global_bases(texts: list[str]):
    import numpy as np

    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    return np.cumsum(lengths + 1) - (lengths + 1)


class _LibraryTokens:
    """The tokenizer itself, as ``tokenizer(texts, add_special_tokens=False)`` runs it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.backend = _plain_backend(tokenizer)

    def encodings(self, texts: list[str]):
        if self.backend is None:
            return self.tokenizer(texts, add_special_tokens=False).encodings
        # What ``tokenizer(texts)`` sets before it encodes: no truncation, no padding, its special-token split.
        if self.backend.truncation is not None or self.backend.padding is not None:
            from transformers.tokenization_utils_base import TruncationStrategy
            from transformers.utils import PaddingStrategy

            self.tokenizer.set_truncation_and_padding(
                padding_strategy=PaddingStrategy.DO_NOT_PAD, truncation_strategy=TruncationStrategy.DO_NOT_TRUNCATE,
                max_length=None, stride=0, pad_to_multiple_of=None, padding_side=None)
        if self.backend.encode_special_tokens != bool(self.tokenizer.split_special_tokens):
            self.backend.encode_special_tokens = bool(self.tokenizer.split_special_tokens)
        return self.backend.encode_batch(texts, add_special_tokens=False)

    def __call__(self, texts: list[str], offsets: bool):
        import numpy as np

        encs = self.encodings(texts)
        lengths = np.fromiter(map(len, encs), dtype=np.int64, count=len(encs))
        total = int(lengths.sum())
        ids = np.fromiter(chain.from_iterable(e.ids for e in encs), dtype=np.int32, count=total)
        if not offsets:
            return ids, lengths, None, None
        pairs = np.fromiter(chain.from_iterable(chain.from_iterable(e.offsets for e in encs)), dtype=np.int64,
                            count=2 * total).reshape(-1, 2)
        base = np.repeat(_global_bases(texts), lengths)
        return ids, lengths, pairs[:, 0] + base, pairs[:, 1] + base


def _plain_backend(tokenizer):
    """The Rust tokenizer when ``tokenizer(...)`` is a plain call of it (no subclass preprocessing)."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # pragma: no cover - older transformers
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(tokenizer)._encode_plus is not TokenizersBackend._encode_plus:
        return None
    if type(tokenizer).__call__ is not TokenizersBackend.__call__:
        return None
    return backend


_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_UNICODE_CLASSES = {"L": "A-Za-z", "N": "0-9"}
_ESCAPES = set("sSdDwWbBnrtfv") | {"x", "u"}
_UNSAFE_ASCII = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")


def _ascii_regex(pattern: str) -> re.Pattern | None:
    """The tokenizer's word-split expression (Oniguruma, Ruby syntax) as Python ``re`` for ASCII text,
    wrapped in one capture group; None when it uses something whose meaning could differ."""
    out: list[str] = []
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            m = re.match(r"\\([pP])\{(\^?)(\w+)\}", pattern[i:])
            if m:
                negated = (m.group(1) == "P") != (m.group(2) == "^")
                cls = _UNICODE_CLASSES.get(m.group(3))
                if cls is None or (negated and in_class):
                    return None
                out.append(cls if in_class else f"[{'^' if negated else ''}{cls}]")
                i += len(m.group(0))
                continue
            nxt = pattern[i + 1:i + 2]
            if not nxt or (nxt.isalnum() and nxt not in _ESCAPES):
                return None
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if in_class:
            if c == "[" or pattern.startswith("&&", i):
                return None  # nested classes and intersections
            if c == "]":
                in_class = False
        elif c == "[":
            in_class = True
            out.append(c)
            i += 1
            if pattern.startswith("^", i):
                out.append("^")
                i += 1
            if pattern.startswith("]", i):
                out.append("\\]")
                i += 1
            continue
        elif c in "^$":
            return None  # line anchors in Ruby syntax, string anchors in Python
        out.append(c)
        i += 1
    try:
        compiled = re.compile("(" + "".join(out) + ")", re.ASCII)
    except re.error:
        return None
    # One group (ours), and no empty match (where splitters could differ on what follows it).
    return compiled if compiled.groups == 1 and compiled.fullmatch("") is None else None


def _word_split(config: dict) -> re.Pattern | None:
    pre = config.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space") or not pre.get("use_regex", True):
            return None
        return _ascii_regex(_GPT2_SPLIT)
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 2:
        split, byte_level = pre["pretokenizers"]
        if split.get("type") != "Split" or byte_level.get("type") != "ByteLevel":
            return None
        if byte_level.get("add_prefix_space") or byte_level.get("use_regex", True):
            return None
        if str(split.get("behavior")).lower() != "isolated" or split.get("invert"):
            return None
        pattern = split.get("pattern") or {}
        if "Regex" in pattern:
            return _ascii_regex(pattern["Regex"])
        if "String" in pattern:
            return re.compile("(" + re.escape(pattern["String"]) + ")")
    return None


def _offsets_kept(processor: dict | None) -> bool:
    """Post-processors that, without special tokens, leave each token's offsets to the token alone."""
    if not processor:
        return True
    kind = processor.get("type")
    if kind == "Sequence":
        return all(_offsets_kept(p) for p in processor.get("processors", []))
    if kind == "TemplateProcessing":
        return True
    if kind in ("ByteLevel", "RobertaProcessing"):
        # With both, the first token of a text keeps one leading space that later ones lose.
        return not (processor.get("trim_offsets") and processor.get("add_prefix_space"))
    return False


_PROBES = (
    "Hello, world! It's 3.14159 -- isn't it?  Yes.\n\n\tTabs\r\nand  spaces   ",
    "a\n\n b  c\n  d\t\te   \n", "x's y'all 'tis we'LL they'RE I'd 'S", "   leading", "trailing   \n",
    "12345678 ab12cd 1,000,000.5 $20 100% #tag @user", "<>[]{}()..!!?? ~`^|\\/ \"quoted\" 'single'",
    "MiXeD CaSe WORDS and_under_scores foo-bar foo.bar foo/bar", "def f(x):\n    return x * 2\n\n\n",
)


class _WordTokens:
    """Distinct words are tokenized once, by the tokenizer, and reused: see the module's docstring."""

    MAX_WORDS = 2_000_000

    def __init__(self, library: _LibraryTokens, word_re: re.Pattern, added: list[dict], normalized_added: list[dict]):
        import numpy as np

        self.library = library
        self.words = word_re.split
        self.added = self._alternation([a["content"] for a in added])
        self.added_normalized = self._alternation([a["content"] for a in normalized_added])
        self.memo: dict[str, int] = {}
        self.count = 0  # entries (words and added tokens) kept across batches
        self.first = np.zeros(1024, dtype=np.int64)  # per entry: its first token in the token table
        self.ntok = np.zeros(1024, dtype=np.int64)
        self.chars = np.zeros(1024, dtype=np.int64)  # per entry: its length in characters
        self.tokens = 0
        self.tok_id = np.zeros(4096, dtype=np.int32)
        self.tok_start = np.zeros(4096, dtype=np.int64)  # offsets relative to the entry's first character
        self.tok_end = np.zeros(4096, dtype=np.int64)
        contents = [a["content"] for a in added + normalized_added]
        self._remember(contents, self._encode(contents, words=False))
        self.n_added = self.count
        for a in added + normalized_added:
            entry = self.memo[a["content"]]
            if self.ntok[entry] != 1 or self.tok_id[self.first[entry]] != a["id"]:
                raise _Mismatch(f"added token {a['content']!r}")

    @classmethod
    def for_tokenizer(cls, tokenizer, library: _LibraryTokens) -> _WordTokens | None:
        if library.backend is None or tokenizer.split_special_tokens:
            return None
        try:
            config = json.loads(library.backend.to_str())
        except Exception:  # noqa: BLE001 - a backend that cannot describe itself: no shortcut
            return None
        word_re = _word_split(config)
        model = config.get("model") or {}
        normalizer = (config.get("normalizer") or {}).get("type")
        added = [a for a in config.get("added_tokens", []) if a.get("content")]
        if word_re is None or model.get("dropout") not in (None, 0, 0.0) or not _offsets_kept(config.get("post_processor")):
            return None
        if any(a.get("lstrip") or a.get("rstrip") or a.get("single_word") for a in added):
            return None
        normalized = [a for a in added if a.get("normalized")]
        if normalizer is not None and (normalizer not in ("NFC", "NFKC", "NFD", "NFKD") or normalized):
            return None  # Unicode normalization leaves ASCII as it is; other normalizers may not
        try:
            words = cls(library, word_re, [a for a in added if not a.get("normalized")], normalized)
            probes = list(_PROBES) + ["".join(f" {a['content']}x{p[:9]}" for a in added) for p in _PROBES[:3]]
            words.check(probes, list(range(len(probes))))
        except _Mismatch:
            return None
        return words

    @staticmethod
    def _alternation(contents: list[str]):
        if not contents:
            return None
        # Longest first: at the leftmost match, the longest token wins, as in the tokenizer's automaton.
        return re.compile("(" + "|".join(re.escape(c) for c in sorted(contents, key=len, reverse=True)) + ")").split

    def _encode(self, strings: list[str], *, words: bool):
        encs = self.library.encodings(strings)
        if words:
            pre = self.library.backend.pre_tokenizer
            for word in strings:
                if len(pre.pre_tokenize_str(word)) != 1:
                    raise _Mismatch(f"{word!r} is more than one word for the tokenizer")
        return encs

    def _remember(self, strings: list[str], encs) -> None:
        import numpy as np

        if not strings:
            return
        n_new = len(strings)
        lengths = [len(e) for e in encs]
        total = sum(lengths)
        self._grow(self.count + n_new, self.tokens + total)
        self.first[self.count:self.count + n_new] = self.tokens + np.cumsum([0] + lengths[:-1])
        self.ntok[self.count:self.count + n_new] = lengths
        self.chars[self.count:self.count + n_new] = [len(x) for x in strings]
        end = self.tokens + total
        self.tok_id[self.tokens:end] = list(chain.from_iterable(e.ids for e in encs))
        pairs = np.array(list(chain.from_iterable(chain.from_iterable(e.offsets for e in encs))), dtype=np.int64)
        self.tok_start[self.tokens:end] = pairs[0::2]
        self.tok_end[self.tokens:end] = pairs[1::2]
        for k, s in enumerate(strings):
            self.memo[s] = self.count + k
        self.count += n_new
        self.tokens = end

    def _truncate(self, count: int) -> None:
        """Keep the first ``count`` entries only."""
        self.count = count
        self.tokens = int(self.first[count - 1] + self.ntok[count - 1]) if count else 0

    def _forget(self) -> None:
        """Keep the added tokens, drop the words (a bound on memory for very large vocabularies)."""
        self.memo = {s: e for s, e in self.memo.items() if e < self.n_added}
        self._truncate(self.n_added)

    def _grow(self, entries: int, tokens: int) -> None:
        import numpy as np

        if entries > len(self.first):
            size = max(entries, 2 * len(self.first))
            self.first = np.resize(self.first, size)
            self.ntok = np.resize(self.ntok, size)
            self.chars = np.resize(self.chars, size)
        if tokens > len(self.tok_id):
            size = max(tokens, 2 * len(self.tok_id))
            self.tok_id = np.resize(self.tok_id, size)
            self.tok_start = np.resize(self.tok_start, size)
            self.tok_end = np.resize(self.tok_end, size)

    def _segments(self, texts: list[str]) -> tuple[list[str], list[int], list[str]]:
        """Each text as a list of strings that the tokenizer encodes independently: added tokens, words
        of ASCII pieces, and whole pieces with other characters (returned apart: encoded per batch)."""
        segs: list[str] = []
        per_text: list[int] = []
        pieces: list[str] = []
        words, added, added_normalized = self.words, self.added, self.added_normalized
        unsafe = _UNSAFE_ASCII.search
        for text in texts:
            n0 = len(segs)
            parts = added(text) if added is not None else [text]
            if added_normalized is None and text.isascii() and not unsafe(text):
                for i, part in enumerate(parts):  # the common case: every piece is plain ASCII
                    if i & 1:
                        segs.append(part)
                    elif part:
                        segs.extend(filter(None, words(part)))
                per_text.append(len(segs) - n0)
                continue
            for i, part in enumerate(parts):
                if i & 1:
                    segs.append(part)
                    continue
                subparts = added_normalized(part) if added_normalized is not None else (part,)
                for j, piece in enumerate(subparts):
                    if j & 1:
                        segs.append(piece)
                    elif not piece:
                        continue
                    elif piece.isascii() and not unsafe(piece):
                        segs.extend(filter(None, words(piece)))
                    else:
                        segs.append(piece)
                        pieces.append(piece)
            per_text.append(len(segs) - n0)
        return segs, per_text, pieces

    def __call__(self, texts: list[str], offsets: bool):
        import numpy as np

        if self.count > self.MAX_WORDS:
            self._forget()
        segs, per_text, pieces = self._segments(texts)
        entry = np.fromiter(map(self.memo.get, segs, repeat(-1)), dtype=np.int64, count=len(segs))
        missing = np.flatnonzero(entry < 0)
        if len(missing):
            piece_set = set(pieces)
            new_words = list(dict.fromkeys(s for s in (segs[k] for k in missing) if s not in piece_set))
            self._remember(new_words, self._encode(new_words, words=True))
        kept = self.count
        if len(missing):
            local = list(dict.fromkeys(pieces))
            self._remember(local, self._encode(local, words=False))
            entry[missing] = np.fromiter(map(self.memo.__getitem__, (segs[k] for k in missing)), dtype=np.int64,
                                         count=len(missing))
            for s in local:  # pieces are mostly unique: not worth keeping
                del self.memo[s]
        try:
            return self._assemble(texts, segs, per_text, entry, offsets)
        finally:
            self._truncate(kept)

    def _assemble(self, texts, segs, per_text, entry, offsets):
        import numpy as np

        ntok = self.ntok[entry]
        total = int(ntok.sum())
        seg_first = np.cumsum(ntok) - ntok
        flat = np.repeat(self.first[entry] - seg_first, ntok) + np.arange(total)
        ids = self.tok_id[flat]
        per_text = np.asarray(per_text, dtype=np.int64)
        seg_bounds = np.concatenate([[0], np.cumsum(per_text)])
        tok_cum = np.concatenate([[0], np.cumsum(ntok)])
        lengths = np.diff(tok_cum[seg_bounds])
        if not offsets:
            return ids, lengths, None, None
        seg_len = self.chars[entry]
        row_of_seg = np.repeat(np.arange(len(texts)), per_text)
        seg_start = np.cumsum(seg_len) - seg_len + row_of_seg  # rows one character apart
        start = np.repeat(seg_start, ntok)
        return ids, lengths, start + self.tok_start[flat], start + self.tok_end[flat]

    def check(self, texts: list[str], rows) -> None:
        """Compare with the tokenizer on some of the texts: ids and offsets must be identical."""
        import numpy as np

        sample = [texts[i] for i in rows]
        if not sample:
            return
        ours = self(sample, offsets=True)
        ref = self.library(sample, offsets=True)
        for a, b in zip(ours, ref):
            if not np.array_equal(a, b):
                raise _Mismatch("the word cache and the tokenizer disagree")


def _assistant_mask(spans: list, starts, ends, lengths, texts: list[str]):
    """Per token: does it overlap a ``{% generation %}`` span? The rule of ``apply_chat_template(...,
    return_assistant_tokens_mask=True)``: one pass over the tokens with a pointer into the spans."""
    import numpy as np

    base = _global_bases(texts)
    span_count = np.fromiter(map(len, spans), dtype=np.int64, count=len(spans))
    flat = list(chain.from_iterable(spans))
    if not flat:
        return np.zeros(len(starts), dtype=bool)
    pairs = np.asarray(flat, dtype=np.int64).reshape(-1, 2) + np.repeat(base, span_count)[:, None]
    span_start, span_end = pairs[:, 0], pairs[:, 1]
    span_stop = np.cumsum(span_count)  # per row: one past its last span
    row_of_tok = np.repeat(np.arange(len(texts)), lengths)
    # The pointer after a token = spans whose end is at or before the furthest token start so far.
    pointer = np.searchsorted(span_end, np.maximum.accumulate(starts), side="right")
    mask = (pointer < span_stop[row_of_tok]) & (ends > span_start[np.minimum(pointer, len(span_start) - 1)])
    # Ends only decrease inside a row (rows are apart): there, nested or out-of-order blocks, token by token.
    unsorted = np.unique(np.searchsorted(span_stop, np.flatnonzero(np.diff(span_end) < 0), side="right"))
    if len(unsorted):
        tok_first = np.cumsum(lengths) - lengths
        for r in unsorted.tolist():
            a, b = tok_first[r], tok_first[r] + lengths[r]
            mask[a:b] = _mask_reference(starts[a:b] - base[r], ends[a:b] - base[r], spans[r])
    return mask


def _mask_reference(starts, ends, spans):
    import numpy as np

    mask = np.zeros(len(starts), dtype=bool)
    k = 0
    for t, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
        while k < len(spans) and s >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if e > spans[k][0]:
            mask[t] = True
    return mask


class _Tokenizer:
    """Rendered chats → ids, tokens per row and labels, for one process."""

    def __init__(self, tokenizer, *, word_cache: bool = True):
        self.word_cache = word_cache  # asked for (it is used only where it applies: ``uses_word_cache``)
        self.library = _LibraryTokens(tokenizer)
        self.words = _WordTokens.for_tokenizer(tokenizer, self.library) if word_cache else None

    @property
    def uses_word_cache(self) -> bool:
        return self.words is not None

    def __call__(self, texts: list[str], spans: list | None, *, check_every: int = 0, row0: int = 0):
        import numpy as np

        encode = self.words or self.library
        ids, lengths, starts, ends = encode(texts, offsets=spans is not None)
        if self.words is not None and check_every:
            self.words.check(texts, [i for i in range(len(texts)) if (row0 + i) % check_every == 0])
        if spans is None:
            return ids, lengths, None
        mask = _assistant_mask(spans, starts, ends, lengths, texts)
        counts = np.concatenate([[0], np.cumsum(mask)])
        trained = counts[np.cumsum(lengths)] - counts[np.cumsum(lengths) - lengths]
        empty = np.flatnonzero((lengths == 0) | (trained == 0))
        if len(empty):
            raise ValueError(
                f"row {row0 + int(empty[0])} has no assistant tokens to train on: the chat template's "
                "{% generation %} blocks mark none of its text (TRL's SFTTrainer refuses such rows too)"
            )
        return ids, lengths, np.where(mask, ids, np.int32(-100)).astype(np.int32)


# ---------------------------------------------------------------------------------------------------
# Packing, row for row as TRL's pack_dataset (one batch of PACK_BATCH_ROWS rows at a time)

def _bfd(lengths: list[int], seq_length: int) -> list[list[int]]:
    """Best-fit decreasing: items → bins (lists of item indices), TRL's order and ties: longest first
    (stable), each into the fullest bin it fits, first-opened among equals, else a new bin."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)  # stable, like Arrow's sort
    spaces: list[int] = []  # remaining spaces of open bins, ascending, distinct
    bins_by_space: dict[int, deque] = {}
    bins: list[list[int]] = []
    for item in order:
        length = lengths[item]
        k = bisect_left(spaces, length)
        if k < len(spaces):
            space = spaces[k]
            queue = bins_by_space[space]
            items = queue.popleft()
            if not queue:
                del spaces[k], bins_by_space[space]
        else:
            space, items = seq_length, []
            bins.append(items)
        items.append(item)
        space -= length
        if space > 0:
            queue = bins_by_space.get(space)
            if queue is None:
                bins_by_space[space] = deque([items])
                insort(spaces, space)
            else:
                queue.append(items)
    return bins


def _pack_plan(row_lengths, seq_length: int, strategy: str):
    """Rows of these lengths, laid end to end in flat token arrays → the token ranges of the packed rows:
    (range starts, range lengths, ranges per packed row, seq_lengths or None), in output order."""
    import numpy as np

    offsets = np.concatenate([[0], np.cumsum(row_lengths)])
    starts, sizes, per_row = [], [], []
    n = len(row_lengths)
    for b0 in range(0, n, PACK_BATCH_ROWS):
        lengths = row_lengths[b0:b0 + PACK_BATCH_ROWS]
        if strategy == "wrapped":
            total = int(lengths.sum())
            cuts = np.arange(0, total, seq_length)
            starts.append(offsets[b0] + cuts)
            sizes.append(np.minimum(seq_length, total - cuts))
            per_row.append(np.ones(len(cuts), dtype=np.int64))
            continue
        rows = np.flatnonzero(lengths > 0)
        if strategy == "bfd":
            item_row, item_start = rows, np.zeros(len(rows), dtype=np.int64)
            item_len = np.minimum(lengths[rows], seq_length)
        else:  # bfd_split: rows longer than seq_length become several items
            pieces = -(-lengths[rows] // seq_length)
            item_row = np.repeat(rows, pieces)
            first = np.cumsum(pieces) - pieces
            item_start = (np.arange(int(pieces.sum())) - np.repeat(first, pieces)) * seq_length
            item_len = np.minimum(seq_length, lengths[item_row] - item_start)
        bins = _bfd(item_len.tolist(), seq_length)
        order = np.fromiter(chain.from_iterable(bins), dtype=np.int64, count=len(item_len))
        starts.append(offsets[b0 + item_row[order]] + item_start[order])
        sizes.append(item_len[order])
        per_row.append(np.fromiter(map(len, bins), dtype=np.int64, count=len(bins)))
    if not starts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, (None if strategy == "wrapped" else empty)
    starts, sizes, per_row = np.concatenate(starts), np.concatenate(sizes), np.concatenate(per_row)
    return starts, sizes, per_row, (None if strategy == "wrapped" else sizes)


def _gather(starts, sizes):
    import numpy as np

    total = int(sizes.sum())
    return np.repeat(starts - (np.cumsum(sizes) - sizes), sizes) + np.arange(total, dtype=np.int64)


def _list_array(offsets, values):
    import numpy as np
    import pyarrow as pa

    if len(values) and offsets[-1] >= 2**31:
        return pa.LargeListArray.from_arrays(pa.array(offsets.astype(np.int64)), pa.array(values))
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def _rows_table(ids, lengths, labels):
    """Flat arrays → a table of rows (input_ids, labels)."""
    import numpy as np
    import pyarrow as pa

    offsets = np.concatenate([[0], np.cumsum(lengths)])
    columns = {"input_ids": _list_array(offsets, ids)}
    if labels is not None:
        columns["labels"] = _list_array(offsets, labels)
    return pa.table(columns)


def _packed_table(ids, lengths, labels, seq_length: int, strategy: str, truncation_mode: str = "keep_start"):
    """Flat arrays of rows → the trainer-ready table: TRL's pack_dataset for a packing strategy, or
    TRL's truncation (and its dropping of rows with nothing to train on) for ``strategy=None``."""
    import numpy as np
    import pyarrow as pa

    row_start = np.cumsum(lengths) - lengths
    if strategy is None:
        keep_start = truncation_mode == "keep_start"
        sizes = np.minimum(lengths, seq_length)
        starts = row_start if keep_start else row_start + lengths - sizes
        take = _gather(starts, sizes)
        row_of = np.repeat(np.arange(len(lengths)), sizes)
        trained = labels[take] != -100 if labels is not None else np.ones(len(take), dtype=bool)
        keep = np.bincount(row_of[trained], minlength=len(lengths)) > 0
        starts, sizes = starts[keep], sizes[keep]
        take, per_row, seq_lengths = _gather(starts, sizes), np.ones(int(keep.sum()), dtype=np.int64), None
    else:
        starts, sizes, per_row, seq_lengths = _pack_plan(lengths, seq_length, strategy)
        take = _gather(starts, sizes)
    row_sizes = np.add.reduceat(sizes, np.cumsum(per_row) - per_row) if len(per_row) else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(row_sizes)])
    columns = {"input_ids": _list_array(offsets, ids[take])}
    if labels is not None:
        columns["labels"] = _list_array(offsets, labels[take])
    if seq_lengths is not None:
        bounds = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
        columns["seq_lengths"] = pa.ListArray.from_arrays(pa.array(bounds), pa.array(seq_lengths.astype(np.int32)))
    return pa.table(columns)


# ---------------------------------------------------------------------------------------------------
# The preparation: chunks of rows, each in a worker process, each writing its own Arrow files

@dataclass
class _Layout:
    """A trainer-ready form of the prepared split."""

    max_length: int
    packing: bool = True
    strategy: str = "bfd"
    truncation_mode: str = "keep_start"

    def __post_init__(self):
        if self.packing and self.strategy not in PACKING_STRATEGIES:
            raise ValueError(f"packing strategy {self.strategy!r}: hfhpc packs with one of {PACKING_STRATEGIES}")
        if not self.packing and self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation mode {self.truncation_mode!r}: expected keep_start or keep_end")

    @property
    def name(self) -> str:
        how = self.strategy if self.packing else f"truncate-{self.truncation_mode}"
        return f"v{_PACK_LAYOUT}-{how}-{self.max_length}-{PACK_BATCH_ROWS}"

    def table(self, ids, lengths, labels):
        return _packed_table(ids, lengths, labels, self.max_length, self.strategy if self.packing else None,
                             self.truncation_mode)


@dataclass
class _Work:
    dataset: Any  # the rows to prepare (``messages`` and the optional per-row template inputs)
    tokenizer: Any
    template: str
    assistant_only: bool
    chunks: list[tuple[int, int]]
    rows_dir: Path | None  # where the tokenized rows go (None: kept in memory)
    layout_dir: Path | None
    layout: _Layout | None
    word_cache: bool = True
    check_every: int = 97  # rows compared with the tokenizer when the word cache is on
    render_batch: int = 500
    encoder: _Tokenizer | None = None


_WORK: _Work | None = None  # what forked workers run (set by the parent before it forks)


def _chunk_name(i: int, n: int) -> str:
    return f"data-{i:05d}-of-{n:05d}.arrow"


def _write_table(path: Path, table) -> None:
    import pyarrow as pa

    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _prepare_chunk(i: int) -> dict:
    """Render, tokenize and label rows [start, stop) of the work; write their files; return counts."""
    import numpy as np

    work = _WORK
    assert work is not None
    if work.encoder is None or work.encoder.word_cache != work.word_cache:
        work.encoder = _Tokenizer(work.tokenizer, word_cache=work.word_cache)
    start, stop = work.chunks[i]
    ids, lengths, labels = [], [], []
    data = work.dataset.with_format("arrow")
    columns = work.dataset.column_names
    special = dict(work.tokenizer.special_tokens_map)
    try:
        for a in range(start, stop, work.render_batch):
            table = data[a:min(stop, a + work.render_batch)]
            texts, spans = _render(
                table.column("messages").to_pylist(), work.template, special, work.assistant_only,
                tools=table.column("tools").to_pylist() if "tools" in columns else None,
                template_kwargs=table.column("chat_template_kwargs").to_pylist() if "chat_template_kwargs" in columns else None,
            )
            i_ids, i_len, i_lab = work.encoder(texts, spans, check_every=work.check_every, row0=a)
            ids.append(i_ids)
            lengths.append(i_len)
            labels.append(i_lab)
    except _Mismatch:
        return {"chunk": i, "mismatch": True}
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    labels = (np.concatenate(labels) if labels else np.zeros(0, np.int32)) if work.assistant_only else None
    out: dict = {"chunk": i, "mismatch": False, "rows": int(len(lengths)), "tokens": int(lengths.sum()),
                 "word_cache": work.encoder.uses_word_cache}
    name = _chunk_name(i, len(work.chunks))
    rows_table = _rows_table(ids, lengths, labels)
    if work.rows_dir is not None:
        _write_table(work.rows_dir / name, rows_table)
    else:
        out["table"] = rows_table
    if work.layout is not None:
        packed = work.layout.table(ids, lengths, labels)
        out["packed_rows"] = packed.num_rows
        if work.layout_dir is not None:
            _write_table(work.layout_dir / name, packed)
        else:
            out["packed"] = packed
    return out


def _chunks(rows: int, processes: int) -> list[tuple[int, int]]:
    """Row ranges on PACK_BATCH_ROWS boundaries, a few per process (for balance), at most 10,000 rows."""
    per = -(-rows // max(1, processes * 4))
    per = min(10_000, max(PACK_BATCH_ROWS, -(-per // PACK_BATCH_ROWS) * PACK_BATCH_ROWS))
    return [(a, min(rows, a + per)) for a in range(0, rows, per)] or [(0, 0)]


def _processes(requested: int | None, chunks: int) -> int:
    if requested is None:
        try:
            requested = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            requested = os.cpu_count() or 1
    return max(1, min(requested, chunks, 32))


def _run(work: _Work, num_proc: int | None) -> list[dict]:
    """All chunks, in worker processes when there are several; again without the word cache if it
    disagreed with the tokenizer anywhere."""
    global _WORK
    import logging

    processes = _processes(num_proc, len(work.chunks))
    _WORK = work
    try:
        for _attempt in range(2):
            results = _run_chunks(work, processes)
            if not any(r["mismatch"] for r in results):
                return sorted(results, key=lambda r: r["chunk"])
            logging.getLogger(__name__).warning(
                "hfhpc: the word cache and the tokenizer disagreed; preparing again with the tokenizer alone")
            work.word_cache = False
        raise RuntimeError("the tokenizer disagreed with itself")  # pragma: no cover - unreachable
    finally:
        _WORK = None


def _run_chunks(work: _Work, processes: int) -> list[dict]:
    if processes == 1:
        with tokenizer_threads("true"):
            return [_prepare_chunk(i) for i in range(len(work.chunks))]
    import multiprocessing

    # The parent does not tokenize while its workers run; they run one thread each.
    with tokenizer_threads("false"):
        if work.encoder is None or work.encoder.word_cache != work.word_cache:  # inherited by every worker
            work.encoder = _Tokenizer(work.tokenizer, word_cache=work.word_cache)
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            return list(pool.imap_unordered(_prepare_chunk, range(len(work.chunks))))


@contextmanager
def tokenizer_threads(value: str):
    """TOKENIZERS_PARALLELISM for the preparation (jobs set it to false so that dataloader workers forked
    later do not deadlock): the fast tokenizer's own threads in one process, none in worker processes."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _message_columns(ds):
    keep = [c for c in ("messages", "tools", "chat_template_kwargs") if c in ds.column_names]
    return ds.select_columns(keep)


def tokenize_messages(ds, tokenizer, *, assistant_only: bool, batch_size: int = 500, num_proc: int | None = 1):
    """``messages`` → ``input_ids`` and ``labels`` (-100 outside assistant turns), in memory; other columns
    dropped. The tokens and mask of ``tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True)``."""
    import datasets
    import pyarrow as pa

    work = _Work(dataset=_message_columns(ds), tokenizer=tokenizer, template=tokenizer.get_chat_template(),
                 assistant_only=assistant_only, chunks=_chunks(len(ds), num_proc or 1), rows_dir=None,
                 layout_dir=None, layout=None, render_batch=batch_size)
    tables = [r["table"] for r in _run(work, num_proc)]
    return datasets.Dataset(pa.concat_tables(tables))


def pack_rows(ds, *, max_length: int, strategy: str = "bfd"):
    """A tokenized dataset (``input_ids``, optional ``labels``) packed in memory as TRL's
    ``pack_dataset(ds, max_length, strategy)`` packs it (``seq_lengths`` for the bfd strategies)."""
    import datasets

    ids, lengths, labels = _flat_columns(ds.with_format("arrow")[:])
    return datasets.Dataset(_Layout(max_length=max_length, strategy=strategy).table(ids, lengths, labels))


def _flat_columns(table):
    """input_ids (and labels) of an Arrow table → flat numpy values and row lengths."""
    import numpy as np
    import pyarrow.compute as pc

    def flat(name):
        column = table.column(name).combine_chunks()
        return column.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)

    lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False).astype(np.int64)
    labels = flat("labels") if "labels" in table.column_names else None
    return flat("input_ids"), lengths, labels


# ---------------------------------------------------------------------------------------------------
# The cache: a prepared split is a folder in the layout of ``Dataset.save_to_disk``

def _finish(folder: Path, files: list[str], fingerprint: str) -> None:
    """Write what ``datasets.load_from_disk`` reads beside the Arrow files, as ``save_to_disk`` writes it."""
    from dataclasses import asdict

    import datasets

    parts = [datasets.Dataset.from_file(str(folder / f), in_memory=False) for f in files]
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    state = {k: ds.__dict__[k] for k in ("_format_columns", "_format_kwargs", "_format_type", "_output_all_columns")}
    state.update(_fingerprint=fingerprint, _split=None, _data_files=[{"filename": f} for f in files])
    info = asdict(ds.info)
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    (folder / "dataset_info.json").write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2))
    del ds, parts


def _is_done(folder: Path) -> bool:
    return (folder / "dataset_info.json").is_file() and (folder / "state.json").is_file()


def _publish(tmp: Path, folder: Path) -> None:
    try:
        tmp.rename(folder)
    except OSError:  # a concurrent preparer got there first: same content, keep theirs
        if not _is_done(folder):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _load(folder: Path):
    import datasets

    return datasets.load_from_disk(str(folder))


def _source(dataset_id, commit, split, config, max_samples):
    from hfhpc import assets

    ds = assets.load_split(dataset_id, commit, split, config)
    if max_samples:
        ds = ds.select(range(min(max_samples, len(ds))))
    return ds


def _prepare(ds, *, tokenizer, assistant_only: bool, cache_root: Path, key: str, layout: _Layout | None,
             layout_key: str | None, num_proc: int | None, word_cache: bool = True) -> None:
    """Tokenize ``ds`` into ``cache_root/key`` and, with a layout, its trainer-ready form into
    ``cache_root/layout_key``, in one pass over the rows."""
    cache_root.mkdir(parents=True, exist_ok=True)
    rows_tmp = tmp_dir(cache_root, f".{key}.")
    layout_tmp = tmp_dir(cache_root, f".{layout_key}.") if layout_key else None
    try:
        chunks = _chunks(len(ds), _processes(num_proc, len(ds) // PACK_BATCH_ROWS + 1))
        work = _Work(dataset=_message_columns(ds), tokenizer=tokenizer, template=tokenizer.get_chat_template(),
                     assistant_only=assistant_only, chunks=chunks, rows_dir=rows_tmp, layout_dir=layout_tmp,
                     layout=layout, word_cache=word_cache)
        _run(work, num_proc)
        files = [_chunk_name(i, len(chunks)) for i in range(len(chunks))]
        _finish(rows_tmp, files, key)
        if layout_tmp is not None:
            _finish(layout_tmp, files, layout_key)
        _publish(rows_tmp, cache_root / key)
        if layout_tmp is not None:
            _publish(layout_tmp, cache_root / layout_key)
    finally:
        for tmp in (rows_tmp, layout_tmp):
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _lay_out(rows_folder: Path, *, cache_root: Path, layout: _Layout, layout_key: str) -> None:
    """The trainer-ready form of an already prepared split."""
    import numpy as np

    ds = _load(rows_folder)
    chunks = _chunks(len(ds), 1)
    tmp = tmp_dir(cache_root, f".{layout_key}.")
    try:
        table = ds.with_format("arrow")
        for i, (a, b) in enumerate(chunks):
            ids, lengths, labels = _flat_columns(table[a:b])
            _write_table(tmp / _chunk_name(i, len(chunks)), layout.table(ids, lengths.astype(np.int64), labels))
        _finish(tmp, [_chunk_name(i, len(chunks)) for i in range(len(chunks))], layout_key)
        _publish(tmp, cache_root / layout_key)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def prepared_split(
    *, dataset_id: str, commit: str | None, config: str | None, split: str, tokenizer, tokenizer_commit: str | None,
    assistant_only: bool, cache_root: Path, max_samples: int | None = None, num_proc: int | None = None,
    word_cache: bool = True,
):
    """The tokenized split (one row per conversation: ``input_ids``, ``labels``), from the cache when this
    exact preparation was done before. Returns ``(dataset, from_cache)``. Datasets that are not chat
    (prompt/completion, text) come back with only the columns TRL reads, for TRL to tokenize."""
    key = cache_key(dataset_id=dataset_id, commit=commit, config=config, split=split, tokenizer_commit=tokenizer_commit,
                    template=tokenizer.chat_template, assistant_only=assistant_only, max_samples=max_samples)
    folder = Path(cache_root) / key
    if _is_done(folder):
        return _load(folder), True
    ds = _source(dataset_id, commit, split, config, max_samples)
    kind = schema_of(ds.column_names)
    if kind != "messages":
        # TRL tokenizes prompt/completion and text datasets itself; keep only what it reads.
        keep = ["prompt", "completion"] if kind == "prompt-completion" else ["text"]
        return ds.remove_columns([c for c in ds.column_names if c not in keep]), False
    _prepare(ds, tokenizer=tokenizer, assistant_only=assistant_only, cache_root=Path(cache_root), key=key,
             layout=None, layout_key=None, num_proc=num_proc, word_cache=word_cache)
    return _load(folder), False


@dataclass(frozen=True)
class Prepared:
    """A split for SFTTrainer. ``ready``: packed (or truncated) rows that the trainer takes as they are,
    with ``SFTConfig(dataset_kwargs={"skip_prepare_dataset": True})``; otherwise (a dataset that is not
    chat) raw rows for TRL's own preparation."""

    dataset: Any
    from_cache: bool
    ready: bool


def packed_split(
    *, dataset_id: str, commit: str | None, config: str | None, split: str, tokenizer, tokenizer_commit: str | None,
    assistant_only: bool, cache_root: Path, max_length: int, packing: bool = True, packing_strategy: str = "bfd",
    truncation_mode: str = "keep_start", max_samples: int | None = None, num_proc: int | None = None,
    word_cache: bool = True,
) -> Prepared:
    """The split exactly as SFTTrainer's own preparation would leave it, cached.

    With ``packing``: TRL's ``pack_dataset`` (``bfd``, ``bfd_split`` or ``wrapped``; rows packed 1,000 at a
    time as TRL does with its default ``dataset_num_proc=None``): columns ``input_ids``, ``labels`` (when
    ``assistant_only``; without, the collator uses the ids) and, for the bfd strategies, ``seq_lengths``,
    from which the padding-free collator builds per-document position ids. Without ``packing``: rows
    truncated to ``max_length`` (``truncation_mode``), rows with no trained token dropped, as TRL does.
    The tokenized rows are cached too (``prepared_split`` returns them). ``num_proc``: worker processes
    (default: one per core this process may use); ``word_cache=False``: the tokenizer alone (same result).
    """
    layout = _Layout(max_length=max_length, packing=packing, strategy=packing_strategy, truncation_mode=truncation_mode)
    fields = dict(dataset_id=dataset_id, commit=commit, config=config, split=split, tokenizer_commit=tokenizer_commit,
                  template=tokenizer.chat_template, assistant_only=assistant_only, max_samples=max_samples)
    key, layout_key = cache_key(**fields), cache_key(**fields, layout=layout.name)
    cache_root = Path(cache_root)
    if _is_done(cache_root / layout_key):
        return Prepared(_load(cache_root / layout_key), True, True)
    if _is_done(cache_root / key):
        _lay_out(cache_root / key, cache_root=cache_root, layout=layout, layout_key=layout_key)
        return Prepared(_load(cache_root / layout_key), True, True)
    ds = _source(dataset_id, commit, split, config, max_samples)
    kind = schema_of(ds.column_names)
    if kind != "messages":
        keep = ["prompt", "completion"] if kind == "prompt-completion" else ["text"]
        return Prepared(ds.remove_columns([c for c in ds.column_names if c not in keep]), False, False)
    _prepare(ds, tokenizer=tokenizer, assistant_only=assistant_only, cache_root=cache_root, key=key, layout=layout,
             layout_key=layout_key, num_proc=num_proc, word_cache=word_cache)
    return Prepared(_load(cache_root / layout_key), False, True)
