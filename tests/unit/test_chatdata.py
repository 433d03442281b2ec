"""Chat data preparation: assistant-only masks, dropped columns, the cache key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hfhpc.recipes import chatdata


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    from hfhpc.demo.build import build_tiny_chat_model

    return AutoTokenizer.from_pretrained(build_tiny_chat_model(tmp_path_factory.mktemp("m") / "model"))


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


def test_same_tokens_and_mask_as_apply_chat_template(tokenizer):
    import datasets

    conversations = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
         {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Red, of course."}],
        [{"role": "user", "content": "Reverse 'abc'."}, {"role": "assistant", "content": "cba"}],
    ]
    ours = chatdata.tokenize_messages(datasets.Dataset.from_dict({"messages": conversations}), tokenizer, assistant_only=True)
    ref = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    for row, ids, mask in zip(ours, ref["input_ids"], ref["assistant_masks"]):
        assert row["input_ids"] == ids
        assert row["labels"] == [i if m else -100 for i, m in zip(ids, mask)]


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
    for field, value in [("commit", "b"), ("split", "test"), ("tokenizer_commit", "u"), ("template", "y"), ("assistant_only", False), ("max_samples", 10)]:
        assert chatdata.cache_key(**{**base, field: value}) != key, field
