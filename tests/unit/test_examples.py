"""Every shipped example parses (torchtune's test_configs idea); recipes run end to end elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from hfhpc.spec import load_spec

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").rglob("*.yaml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_example_spec_is_valid(path: Path):
    spec = load_spec(path)
    assert spec.name and spec.recipe
    if spec.recipe == "script":
        assert spec.resolve_path(spec.script).is_file()


def test_zephyr_example_is_the_page_job():
    spec = load_spec(Path(__file__).resolve().parents[2] / "examples" / "zephyr-sft.yaml")
    assert spec.model.id == "HuggingFaceH4/zephyr-7b-beta"
    assert spec.dataset.id == "HuggingFaceH4/ultrachat_200k" and spec.dataset.split == "train_sft"
    assert spec.launch.strategy == "fsdp" and spec.resources.gpus_per_node == 4 and spec.resources.nodes == 1
    assert spec.train.max_length == 2048
