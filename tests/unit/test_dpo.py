"""The dpo recipe's spec section and its preparation of preference pairs, against TRL's own."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from hfhpc.demo import build
from hfhpc.errors import SpecError
from hfhpc.recipes import prefdata
from hfhpc.spec import parse_spec

BASE = {"name": "x", "recipe": "dpo", "model": "org/model", "dataset": "org/prefs"}


def test_train_section_is_typed_and_passes_dpo_config_keys_through():
    from hfhpc.recipes.dpo import DpoTrain

    spec = parse_spec({**BASE, "train": {"beta": 0.01, "max_prompt_length": 256, "loss_type": "ipo"}})
    assert isinstance(spec.train, DpoTrain)
    assert spec.train.beta == 0.01 and spec.train.max_length == 1024 and spec.train.learning_rate == 1.0e-6
    assert spec.train.model_extra == {"loss_type": "ipo"}
    assert spec.train.padding_free is True  # modelled: never passed on to DPOConfig, whose own is off for DPO
    assert parse_spec({**BASE, "train": {"padding_free": False}}).train.padding_free is False
    with pytest.raises(SpecError, match="padding_free"):
        parse_spec({**BASE, "train": {"padding_free": "sometimes"}}, "job.yaml")
    assert type(parse_spec({**BASE, "recipe": "sft"}).train).__name__ == "SftTrain"


def test_a_prompt_limit_that_leaves_no_completion_is_a_spec_error():
    with pytest.raises(SpecError, match=r"max_prompt_length \(1024\) must be below max_length \(1024\)"):
        parse_spec({**BASE, "train": {"max_prompt_length": 1024}}, "job.yaml")


def test_truncation_keeps_the_prompt_end_and_the_completion_start_and_drops_full_prompts():
    prompt, chosen, rejected = list(range(10)), [100, 101, 102], [200]
    assert prefdata.truncate(prompt, chosen, rejected, max_length=8, max_prompt_length=6) == (
        [4, 5, 6, 7, 8, 9], [100, 101], [200])
    assert prefdata.truncate(prompt, chosen, rejected, max_length=None, max_prompt_length=None) == (prompt, chosen, rejected)
    assert prefdata.truncate(prompt, chosen, rejected, max_length=10, max_prompt_length=None) is None


def test_the_prompt_of_a_conversation_is_what_chosen_and_rejected_share():
    user, follow = {"role": "user", "content": "q"}, {"role": "user", "content": "and?"}
    a, b, c = ({"role": "assistant", "content": t} for t in ("yes", "no", "maybe"))
    row = {"prompt": "q", "chosen": [user, a, follow, b], "rejected": [user, a, follow, c]}
    assert prefdata.split_pair(row) == ([user, a, follow], [b], [c])
    with pytest.raises(ValueError, match="message lists"):
        prefdata.split_pair({"prompt": 1, "chosen": "x", "rejected": "y"})


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build.build_tiny_chat_model(tmp_path_factory.mktemp("model"))


def test_pairs_are_tokenized_exactly_as_dpo_trainer_tokenizes_them(tiny_model: Path, tmp_path: Path):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = build._preference_rows(24, random.Random(3))
    user, follow = {"role": "user", "content": "What is 2 plus 3?"}, {"role": "user", "content": "And 4 plus 4?"}
    answer = {"role": "assistant", "content": "2 plus 3 is 5."}
    rows.append({"chosen": [user, answer, follow, {"role": "assistant", "content": "4 plus 4 is 8."}],
                 "rejected": [user, answer, follow, {"role": "assistant", "content": "8 is 4 plus 4."}]})
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    # TRL finds the prompt itself when the rows have none (ultrafeedback's text prompt would break it).
    raw = datasets.Dataset.from_list([{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
    args = DPOConfig(output_dir=str(tmp_path), max_length=None, report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model), args=args, train_dataset=raw,
                         processing_class=tokenizer)
    ours = prefdata.tokenize_pairs(rows, tokenizer, max_length=None, max_prompt_length=None)
    for column in prefdata.COLUMNS:
        assert ours[column] == trainer.train_dataset[column], column
    assert all(len(p) > 0 and c != r for p, c, r in zip(*(ours[c] for c in prefdata.COLUMNS), strict=True))


def test_conversations_without_a_chat_template_are_refused_in_one_line_and_text_pairs_need_none(tiny_model: Path):
    from transformers import AutoTokenizer

    from hfhpc.errors import UsageError

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = None  # a base model's tokenizer
    with pytest.raises(UsageError, match="no chat template") as refused:
        prefdata.tokenize_pairs(build._preference_rows(4, random.Random(0)), tokenizer, max_length=None,
                                max_prompt_length=None)
    assert "set train.chat_template" in refused.value.render()
    text = [{"prompt": "2 plus 3 is", "chosen": " 5.", "rejected": " 6."}]
    ours = prefdata.tokenize_pairs(text, tokenizer, max_length=None, max_prompt_length=None)
    assert len(ours["prompt_ids"]) == 1 and ours["chosen_ids"][0] != ours["rejected_ids"][0]


ZEPHYR_7B = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "vocab_size": 32000, "tie_word_embeddings": False}


def _plan(tmp_path: Path, **train):
    import json

    from hfhpc.plan import make_plan

    config = tmp_path / "config.json"
    config.write_text(json.dumps(ZEPHYR_7B))
    spec = parse_spec({**BASE, "train": {"per_device_batch_size": 4, "max_length": 1024, **train},
                       "launch": {"strategy": "fsdp"}, "resources": {"gpus_per_node": 4}})
    return make_plan(spec, tmp_path / "store", model_config=config, gpu="h100")


def test_plan_holds_a_frozen_reference_unless_lora_or_precomputed_log_probs_replace_it(tmp_path: Path):
    from hfhpc.plan import GIB

    full, precomputed = _plan(tmp_path), _plan(tmp_path, precompute_ref_log_probs=True)
    backward = {p.name: p for p in full.memory.phases}["backward (first layer)"]
    ref = next(t for t in backward.terms if t.name == "reference model weights")
    assert ref.bytes == 2 * full.inputs.shape.params / 4  # bf16, sharded over 4 GPUs like the policy
    assert abs(full.memory.phases[1].bytes - precomputed.memory.phases[1].bytes - ref.bytes) < 1
    assert not any("reference" in t.name for p in _plan(tmp_path, lora={"r": 8}).memory.phases for t in p.terms)
    # The reference's forward slows the step by a quarter; precomputed log-probs do not.
    assert full.throughput.tokens_per_s_per_gpu == pytest.approx(0.75 * precomputed.throughput.tokens_per_s_per_gpu)
    assert full.memory.peak_gib > precomputed.memory.peak_gib + 3 * 2**30 / GIB
