"""Chat data preparation: the same tokens, assistant masks and packed rows as TRL's SFTTrainer builds
itself (apply_chat_template, labels from the assistant mask, pack_dataset), the cache, the cache key."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from hfhpc.recipes import chatdata

# Zephyr's own template (line structure included), with {% generation %} around what the assistant says.
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)

# Llama 3's word split (case-insensitive contractions, digits in threes, newlines apart).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)

TRICKY = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
     {"role": "assistant", "content": "Red, of course."}],
    [{"role": "user", "content": "Reverse 'abc'."}, {"role": "assistant", "content": "cba"}],
    [{"role": "user", "content": "Café — “quoted” ünïcödé ✓ 東京 🙂\x07\x1f end"},
     {"role": "assistant", "content": "Naïve?\u00a0Yes…\u2028ok"}],
    [{"role": "user", "content": "Text with </s> and <|assistant|> and <s> inside, x's y'ALL"},
     {"role": "assistant", "content": "  leading\n\n\n  and trailing spaces   \t\r\n"}],
    [{"role": "user", "content": "1234567 89,000.50 $20 100% a1b2c3 ___ foo-bar/baz.qux"},
     {"role": "assistant", "content": "def f(x):\n    return x ** 2\n\n\n# done"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "Empty question, short answer."}],
]


def words(rng: random.Random, n: int) -> str:
    vocab = ["the", "a", "model", "answers", "question", "It's", "don't", "42", "3.14", "x", "data,", "step:",
             "(note)", "naïve", "\n", "  ", "—", "Über", "code_block", "e.g.", "!!"]
    return " ".join(rng.choice(vocab) for _ in range(n))


def conversations(n: int, seed: int = 0, longest: int = 60) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chat = []
        if rng.random() < 0.2:
            chat.append({"role": "system", "content": words(rng, rng.randint(1, 8))})
        for _ in range(rng.randint(1, 3)):
            chat.append({"role": "user", "content": words(rng, rng.randint(1, longest))})
            chat.append({"role": "assistant", "content": words(rng, rng.randint(1, longest))})
        out.append(chat)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hfhpc.demo.build import build_tiny_chat_model

    return build_tiny_chat_model(tmp_path_factory.mktemp("m") / "model")


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def variant(model_dir: Path, *, template: str | None = None, pre_tokenizer=None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if template is not None:
        tok.chat_template = template
    if pre_tokenizer is not None:
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizer
    return tok


def reference(tokenizer, chats: list) -> tuple[list, list]:
    """TRL's tokenization of conversational rows and its labels (build_labels from the assistant mask)."""
    ids, labels = [], []
    for chat in chats:
        out = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids.append(list(out["input_ids"]))
        labels.append([t if m else -100 for t, m in zip(out["input_ids"], out["assistant_masks"])])
    return ids, labels


def write_rows(folder: Path, chats: list) -> Path:
    """A local dataset folder in ultrachat's schema (load_dataset reads it as the split ``train``)."""
    folder.mkdir(parents=True)
    with open(folder / "train.jsonl", "w") as f:
        for i, chat in enumerate(chats):
            f.write(json.dumps({"prompt": chat[0]["content"], "prompt_id": str(i), "messages": chat}) + "\n")
    return folder


def split_args(folder: Path, tokenizer, cache: Path, **kw) -> dict:
    return dict(dataset_id=str(folder), commit=None, config=None, split="train", tokenizer=tokenizer,
                tokenizer_commit="t", assistant_only=True, cache_root=cache, **kw)


def test_only_assistant_tokens_are_trained_and_prompt_column_is_dropped(tokenizer):
    import datasets

    rows = {
        "prompt": ["What is 2 plus 2?"],
        "prompt_id": ["x"],
        "messages": [[{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4"}]],
    }
    out = chatdata.tokenize_messages(datasets.Dataset.from_dict(rows), tokenizer, assistant_only=True)
    assert out.column_names == ["input_ids", "labels"]
    ids, labels = out[0]["input_ids"], out[0]["labels"]
    assert len(ids) == len(labels)
    trained = tokenizer.decode([label for label in labels if label != -100])
    assert "4" in trained and "2 plus 2" not in trained and "<|user|>" not in trained


@pytest.mark.parametrize("template", ["demo", "zephyr"])
@pytest.mark.parametrize("split", ["gpt2", "llama3", "digits"])
def test_same_tokens_and_labels_as_trl(model_dir, template, split):
    """Byte-level BPE with GPT-2's and Llama 3's word splits takes the word cache; with a pre-tokenizer it
    does not know, the tokenizer runs alone. Either way: TRL's ids and labels, token for token."""
    import datasets
    from tokenizers import Regex, pre_tokenizers

    pre = {
        "gpt2": None,
        "llama3": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        "digits": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False)]),
    }[split]
    tok = variant(model_dir, template=ZEPHYR_TEMPLATE if template == "zephyr" else None, pre_tokenizer=pre)
    assert chatdata._Tokenizer(tok).uses_word_cache == (split != "digits")
    chats = TRICKY + conversations(40, seed=1)
    ours = chatdata.tokenize_messages(datasets.Dataset.from_dict({"messages": chats}), tok, assistant_only=True)
    ids, labels = reference(tok, chats)
    assert ours["input_ids"][:] == ids
    assert ours["labels"][:] == labels


def test_a_tokenizer_set_to_truncate_or_pad_still_gives_the_reference(model_dir):
    """apply_chat_template turns the backend's own truncation and padding off; so does the preparation."""
    import datasets

    tok = variant(model_dir)
    chats = conversations(5, seed=8)
    ids, labels = reference(tok, chats)
    tok.backend_tokenizer.enable_truncation(16)
    tok.backend_tokenizer.enable_padding(length=4096)
    ours = chatdata.tokenize_messages(datasets.Dataset.from_dict({"messages": chats}), tok, assistant_only=True)
    assert ours["input_ids"][:] == ids and ours["labels"][:] == labels


def test_without_assistant_only_loss_there_are_no_labels(tokenizer):
    import datasets

    chats = TRICKY[:3]
    ours = chatdata.tokenize_messages(datasets.Dataset.from_dict({"messages": chats}), tokenizer, assistant_only=False)
    assert ours.column_names == ["input_ids"]
    assert ours["input_ids"][:] == reference(tokenizer, chats)[0]


def test_a_row_without_assistant_tokens_is_refused(tokenizer):
    import datasets

    rows = {"messages": [[{"role": "user", "content": "Hello?"}]]}
    with pytest.raises(ValueError, match="no assistant tokens"):
        chatdata.tokenize_messages(datasets.Dataset.from_dict(rows), tokenizer, assistant_only=True)


def test_worker_processes_give_the_same_rows(tokenizer):
    import datasets

    ds = datasets.Dataset.from_dict({"messages": conversations(2500, seed=2, longest=5)})
    one = chatdata.tokenize_messages(ds, tokenizer, assistant_only=True, num_proc=1)
    two = chatdata.tokenize_messages(ds, tokenizer, assistant_only=True, num_proc=2)
    assert one["input_ids"][:] == two["input_ids"][:] and one["labels"][:] == two["labels"][:]


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split", "wrapped"])
def test_packing_is_trl_pack_dataset_row_for_row(strategy):
    import datasets
    from trl import pack_dataset

    rng = random.Random(3)
    lengths = [rng.choice([0, 1, 5, 30, 64, 100, 127, 128, 129, 300]) for _ in range(2600)]  # three TRL batches
    ids = [[rng.randrange(1000) for _ in range(n)] for n in lengths]
    labels = [[t if rng.random() < 0.5 else -100 for t in row] for row in ids]
    ds = datasets.Dataset.from_dict({"input_ids": ids, "labels": labels})
    ours = chatdata.pack_rows(ds, max_length=128, strategy=strategy)
    theirs = pack_dataset(ds, 128, strategy)
    assert ours.column_names == theirs.column_names
    for column in ours.column_names:
        assert ours[column][:] == theirs[column][:], column


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split"])
def test_packed_bins_fit_and_keep_every_token_once(strategy):
    import datasets

    rng = random.Random(4)
    rows = [[rng.randrange(50_000) for _ in range(rng.choice([1, 2, 7, 63, 64, 65, 200]))] for _ in range(2300)]
    ds = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    packed = chatdata.pack_rows(ds, max_length=64, strategy=strategy)
    documents = []
    for row in packed:
        assert 0 < len(row["input_ids"]) <= 64
        assert sum(row["seq_lengths"]) == len(row["input_ids"]) == len(row["labels"])
        assert row["labels"] == row["input_ids"]
        at = 0
        for n in row["seq_lengths"]:
            documents.append(tuple(row["input_ids"][at:at + n]))
            at += n
    if strategy == "bfd":  # each document once, cut at max_length
        expected = [tuple(r[:64]) for r in rows]
    else:  # each document once, in pieces of max_length
        expected = [tuple(r[i:i + 64]) for r in rows for i in range(0, len(r), 64)]
    assert sorted(documents) == sorted(expected)
    # Packing decreasing sizes best-fit leaves little room: close to the fewest rows possible.
    tokens = sum(len(d) for d in documents)
    assert len(packed) <= -(-tokens // 64) * 1.1 + 3


def test_packed_split_is_what_sfttrainer_prepares_and_the_trainer_takes_it_as_is(model_dir, tokenizer, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    chats = TRICKY + conversations(1200, seed=5, longest=12)  # two of TRL's packing batches
    folder = write_rows(tmp_path / "data", chats)
    prepared = chatdata.packed_split(**split_args(folder, tokenizer, tmp_path / "cache", max_length=96))
    assert prepared.ready and not prepared.from_cache
    assert prepared.dataset.column_names == ["input_ids", "labels", "seq_lengths"]

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = dict(max_length=96, packing=True, report_to="none", use_cpu=True, per_device_train_batch_size=2)
    raw = datasets.Dataset.from_dict({"messages": chats})
    trl_side = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=raw,
                          args=SFTConfig(output_dir=str(tmp_path / "a"), assistant_only_loss=True, **config))
    for column in prepared.dataset.column_names:
        assert prepared.dataset[column][:] == trl_side.train_dataset[column][:], column

    ours = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=prepared.dataset,
                      args=SFTConfig(output_dir=str(tmp_path / "b"), dataset_kwargs={"skip_prepare_dataset": True},
                                     **config))
    assert ours.train_dataset is prepared.dataset
    batch = ours.data_collator([prepared.dataset[0], prepared.dataset[1]])
    lengths = prepared.dataset[0]["seq_lengths"] + prepared.dataset[1]["seq_lengths"]
    assert batch["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]


def test_cache_reuse_and_a_packed_form_made_from_cached_rows(tokenizer, tmp_path):
    chats = conversations(1500, seed=6, longest=10)
    folder = write_rows(tmp_path / "data", chats)
    cache = tmp_path / "cache"

    rows, hit = chatdata.prepared_split(**split_args(folder, tokenizer, cache, num_proc=2))
    assert not hit and rows.column_names == ["input_ids", "labels"]
    ids, labels = reference(tokenizer, chats)
    assert rows["input_ids"][:] == ids and rows["labels"][:] == labels
    again, hit = chatdata.prepared_split(**split_args(folder, tokenizer, cache))
    assert hit and again["input_ids"][:] == ids
    # The save_to_disk layout (what `hfhpc plan` reads for exact token counts).
    key = next(p for p in cache.iterdir() if not p.name.startswith("."))
    state = json.loads((key / "state.json").read_text())
    assert sum(1 for f in state["_data_files"] if (key / f["filename"]).is_file()) == len(state["_data_files"]) == 2

    packed = chatdata.packed_split(**split_args(folder, tokenizer, cache, max_length=80))
    assert packed.from_cache and packed.ready
    assert packed.dataset[:] == chatdata.pack_rows(rows, max_length=80)[:]
    assert chatdata.packed_split(**split_args(folder, tokenizer, cache, max_length=80)).from_cache
    fresh = chatdata.packed_split(**split_args(folder, tokenizer, tmp_path / "fresh", max_length=80, num_proc=2))
    assert not fresh.from_cache and fresh.dataset[:] == packed.dataset[:]
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_without_packing_rows_are_truncated_and_rows_with_nothing_to_train_dropped(tokenizer, tmp_path):
    chats = [[{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}]] + conversations(30, seed=7, longest=2)
    folder = write_rows(tmp_path / "data", chats)
    kept = chatdata.packed_split(**split_args(folder, tokenizer, tmp_path / "c", max_length=40, packing=False))
    assert kept.ready and kept.dataset.column_names == ["input_ids", "labels"]
    ids, labels = reference(tokenizer, chats)
    expected = [(i[:40], lab[:40]) for i, lab in zip(ids, labels) if any(x != -100 for x in lab[:40])]
    assert 0 < len(expected) < len(chats) and expected[0][0] == ids[1][:40]  # the long question is dropped
    assert list(zip(kept.dataset["input_ids"][:], kept.dataset["labels"][:])) == expected


def test_datasets_that_are_not_chat_go_to_trl_as_they_are(tokenizer, tmp_path):
    folder = tmp_path / "text"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "hello", "id": 1}\n{"text": "world", "id": 2}\n')
    prepared = chatdata.packed_split(**split_args(folder, tokenizer, tmp_path / "c", max_length=32))
    assert not prepared.ready and prepared.dataset.column_names == ["text"]


def test_template_detection_and_schemas():
    assert chatdata.template_marks_assistant("{% generation %}x{% endgeneration %}")
    assert chatdata.template_marks_assistant("{%- generation -%}x")
    assert not chatdata.template_marks_assistant("{{ messages }}")
    assert chatdata.schema_of(["prompt", "prompt_id", "messages"]) == "messages"
    assert chatdata.schema_of(["prompt", "completion"]) == "prompt-completion"
    with pytest.raises(ValueError, match="SFT needs `messages`"):
        chatdata.schema_of(["question"])


def test_cache_key_changes_with_what_changes_the_result():
    base = dict(dataset_id="o/d", commit="a", config=None, split="train", tokenizer_commit="t", template="x",
                assistant_only=True, max_samples=None)
    key = chatdata.cache_key(**base)
    assert key == chatdata.cache_key(**base)
    for field, value in [("commit", "b"), ("split", "test"), ("tokenizer_commit", "u"), ("template", "y"),
                         ("assistant_only", False), ("max_samples", 10), ("layout", "v1-bfd-2048-1000")]:
        assert chatdata.cache_key(**{**base, field: value}) != key, field
