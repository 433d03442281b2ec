"""The recipe registry: each recipe is named once, by its own module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hfhpc.errors import SpecError
from hfhpc import registry
from hfhpc.spec import parse_spec
from tests.conftest import hfhpc

SRC = Path(__file__).resolve().parents[2] / "src" / "hfhpc"
BUILT_IN = ("classify", "dpo", "evaluate", "harness", "infer", "script", "sft")


def test_every_built_in_recipe_is_found_by_its_module():
    assert tuple(registry.names()) == BUILT_IN
    for name, recipe in registry.recipes().items():
        assert recipe.name == name and recipe.summary and recipe.starter["recipe"] == name


def test_discovery_imports_no_ml_library():
    code = ("import sys\nfrom hfhpc import registry\nregistry.recipes()\n"
            "print([m for m in ('torch', 'transformers', 'trl', 'datasets', 'accelerate') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_no_module_outside_a_recipe_lists_recipe_names():
    # A recipe is named by its own module only (plan.py, the sft memory model, asks for sft by its
    # RECIPE); the demo's summary names the demo's runs.
    import re

    name = "[\"'](?:%s)[\"']" % "|".join(BUILT_IN)
    mentions = re.compile(rf"recipe\s*[!=]=\s*[\"']|{name}\s*[,:]\s*{name}")
    own = {f"{name}.py" for name in BUILT_IN}
    for path in SRC.rglob("*.py"):
        if path.parent.name == "recipes" and path.name in own or path.parent.name == "demo":
            continue
        found = [m.group(0) for m in mentions.finditer(path.read_text())]
        assert not found, f"{path} names recipes: {found}"


def test_train_key_of_another_recipe_is_an_error_naming_it():
    with pytest.raises(SpecError) as e:
        parse_spec({"name": "j", "recipe": "classify", "model": "o/m", "dataset": "o/d", "train": {"packing": True}}, "job.yaml")
    assert e.value.key == "train.packing"
    assert "`packing` belongs to recipe sft, not classify" in e.value.render()


@pytest.mark.parametrize("key", ["chat_template", "attention"])
def test_classify_refuses_every_sft_only_setting(key):
    with pytest.raises(SpecError, match=f"`{key}` belongs to recipe (dpo and )?sft"):
        parse_spec({"name": "j", "recipe": "classify", "model": "o/m", "dataset": "o/d", "train": {key: "x"}})


def test_infer_section_belongs_to_infer_and_evaluate():
    with pytest.raises(SpecError) as e:
        parse_spec({"name": "j", "recipe": "sft", "model": "o/m", "dataset": "o/d", "infer": {"batch_size": 2}})
    assert e.value.key == "infer" and "belongs to recipe evaluate and infer, not sft" in e.value.render()
    with pytest.raises(SpecError, match="`train:` belongs to recipe"):
        parse_spec({"name": "j", "recipe": "infer", "model": "o/m", "dataset": "o/d", "train": {"seed": 1}})
    spec = parse_spec({"name": "j", "recipe": "infer", "model": "o/m", "dataset": "o/d", "infer": {"seed": 7, "top_k": 3}})
    assert spec.infer.seed == 7 and spec.infer.model_extra == {"top_k": 3} and spec.train is None


def test_a_recipe_sees_its_own_train_model():
    from hfhpc.recipes.classify import ClassifyTrain
    from hfhpc.recipes.sft import SftTrain

    sft = parse_spec({"name": "j", "recipe": "sft", "model": "o/m", "dataset": "o/d", "train": {"max_length": 64}})
    assert isinstance(sft.train, SftTrain) and sft.train.max_length == 64 and sft.train.packing
    cls = parse_spec({"name": "j", "recipe": "classify", "model": "o/m", "dataset": "o/d"})
    assert isinstance(cls.train, ClassifyTrain) and not hasattr(cls.train, "packing")
    # job.json round trip keeps the recipe's model
    again = parse_spec(sft.model_dump(mode="json"))
    assert isinstance(again.train, SftTrain) and again.train.max_length == 64


def test_classify_refuses_lora_before_the_queue():
    with pytest.raises(SpecError, match="classify trains every weight"):
        parse_spec({"name": "j", "recipe": "classify", "model": "o/m", "dataset": "o/d", "train": {"lora": {"r": 8}}})


def test_a_new_recipe_module_is_found_with_no_other_edit(tmp_path: Path):
    # A copy of the package with one more module: discovery reads sources, so the new recipe is
    # listed, validated and rendered by `hfhpc init` without touching any other file.
    import shutil

    pkg = tmp_path / "src"
    shutil.copytree(SRC, pkg / "hfhpc", ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "hfhpc" / "recipes" / "echo.py").write_text(
        "from pydantic import Field\n"
        "from hfhpc.registry import Recipe\n"
        "from hfhpc.spec import TrainBase\n\n\n"
        "class EchoTrain(TrainBase):\n"
        "    beta: float = Field(0.1, gt=0, description='how loud')\n\n\n"
        "RECIPE = Recipe(name='echo', summary='repeats its input', needs=('model',), train=EchoTrain,\n"
        "                trainer_config=None, starter={'name': 'e', 'recipe': 'echo', 'model': 'o/m', 'train': {'beta': 0.5}})\n\n\n"
        "def main(job):\n"
        "    return 0\n"
    )
    code = (
        "from hfhpc import registry\nfrom hfhpc.spec import parse_spec\nfrom hfhpc.errors import SpecError\n"
        "from hfhpc.starters import render_starter\n"
        "print(registry.names())\n"
        "print(parse_spec({'name': 'e', 'recipe': 'echo', 'model': 'o/m', 'train': {'beta': 2}}).train.beta)\n"
        "try:\n    parse_spec({'name': 'e', 'recipe': 'sft', 'model': 'o/m', 'dataset': 'o/d', 'train': {'beta': 2}})\n"
        "except SpecError as e:\n    print(e.render())\n"
        "print('how loud' in render_starter('echo'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(pkg), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    names, beta, error, rendered = out.stdout.strip().splitlines()
    assert names == "['classify', 'dpo', 'echo', 'evaluate', 'harness', 'infer', 'script', 'sft']"
    assert beta == "2.0"
    assert "`beta` belongs to recipe dpo and echo, not sft" in error
    assert rendered == "True"


def test_init_lists_the_registered_recipes():
    out = hfhpc("init", "--help")
    assert out.returncode == 0
    for name, recipe in registry.recipes().items():
        assert name in out.stdout and recipe.summary in out.stdout.replace("\n", " ")


def test_script_starter_lists_the_assets_it_loads():
    from hfhpc.starters import render_starter

    text = render_starter("script")
    assert "\nmodels: [" in text and "\ndatasets: [" in text


def test_recipes_raise_typed_errors_not_exit_strings():
    import re

    # A rank's error is an hfhpc.errors type, printed in one line by the rank entry point.
    pattern = re.compile(r"SystemExit\(f?[\"']hfhpc: (?!error: \{e\.render\(\)\})")
    for path in (SRC / "recipes").glob("*.py"):
        assert not pattern.search(path.read_text()), path
