"""The bundled demo repositories load with the real libraries, from folders and from a built store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hfhpc.demo import build
from hfhpc.store.layout import snapshot_dir

MESSAGES = [
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 plus 3 is 5."},
    {"role": "user", "content": "What color is snow?"},
    {"role": "assistant", "content": "Snow is white."},
]


@pytest.fixture(scope="session")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo-folders")
    return {
        "model": build.build_tiny_chat_model(root / "tiny-chat-mistral"),
        "chat": build.build_chat_dataset(root / "ultrachat-tiny"),
        "sentiment": build.build_classification_dataset(root / "sentiment-tiny"),
        # evaluate.load(folder) looks for <folder>/<folder name>.py.
        "metric": build.build_metric(root / "accuracy"),
    }


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("demo-store")
    commits = build.build_upstream(root / "store", root / "work")
    return root / "store", commits


def test_tokenizer_renders_the_chat_template_with_an_assistant_mask(folders):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folders["model"])
    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert text == (
        "<s><|user|>\nWhat is 2 plus 3?</s>\n<|assistant|>\n2 plus 3 is 5.</s>\n"
        "<|user|>\nWhat color is snow?</s>\n<|assistant|>\nSnow is white.</s>\n"
    )
    prompt = tok.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")

    out = tok.apply_chat_template(MESSAGES, return_assistant_tokens_mask=True, return_dict=True)
    trained = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    # Only what the assistant says, its eos included, is marked for the loss.
    assert tok.decode(trained) == "2 plus 3 is 5.</s>Snow is white.</s>"
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert 1000 <= len(tok) <= 2000


def test_model_loads_and_generates(folders):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folders["model"])
    model = AutoModelForCausalLM.from_pretrained(folders["model"])
    assert model.config.model_type == "mistral"
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.num_key_value_heads) == (64, 2, 2)
    assert model.config.vocab_size == len(tok)
    assert (folders["model"] / "model.safetensors").is_file()
    gen = json.loads((folders["model"] / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id and gen["pad_token_id"] == tok.pad_token_id

    inputs = tok.apply_chat_template(MESSAGES[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def test_chat_dataset_keeps_ultrachat_split_names_and_schema(folders, tmp_path):
    import hashlib

    import datasets

    for split, rows in build.CHAT_SPLITS.items():
        ds = datasets.load_dataset(str(folders["chat"]), split=split, cache_dir=str(tmp_path))
        assert ds.num_rows == rows
        assert ds.column_names == ["prompt", "prompt_id", "messages"]
        row = ds[0]
        assert row["prompt_id"] == hashlib.sha256(row["prompt"].encode()).hexdigest()
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and 2 <= len(roles) <= 6
        assert row["messages"][0]["content"] == row["prompt"]


def test_sentiment_dataset_has_class_labels(folders, tmp_path):
    import datasets

    ds = datasets.load_dataset(str(folders["sentiment"]), cache_dir=str(tmp_path))
    assert {s: d.num_rows for s, d in ds.items()} == build.SENTIMENT_SPLITS
    label = ds["train"].features["label"]
    assert isinstance(label, datasets.ClassLabel) and label.names == ["negative", "positive"]
    assert set(ds["train"]["label"]) == {0, 1}


def test_metric_computes_accuracy_offline(folders):
    import evaluate

    for target in (folders["metric"], folders["metric"] / "accuracy.py"):
        result = evaluate.load(str(target)).compute(predictions=[0, 1, 1], references=[0, 1, 0])
        assert result == pytest.approx({"accuracy": 2 / 3})


def test_minilm_loads_from_the_wheel():
    from transformers import AutoModel

    model = AutoModel.from_pretrained(build.minilm_folder(), local_files_only=True)
    assert model.config.model_type == "bert"


def test_build_upstream_is_idempotent_and_deterministic(store, folders):
    path, commits = store
    assert list(commits) == [repo_id for _, repo_id, _ in build.DEMO_REPOS]
    assert build.build_upstream(path, path.parent / "work") == commits
    # The builders are seeded: the store's snapshot holds the same bytes as an independent build.
    snapshot = snapshot_dir(path, "model", build.MODEL_ID, commits[build.MODEL_ID])
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (snapshot / name).read_bytes() == (folders["model"] / name).read_bytes()


def test_store_serves_the_model_offline_as_hf_home(store):
    path, _ = store
    # huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when imported: only a fresh process sees them.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(path), HF_HUB_OFFLINE="1")
    code = (
        "from transformers import AutoConfig\n"
        f"print(AutoConfig.from_pretrained({build.MODEL_ID!r}).model_type)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "mistral"
