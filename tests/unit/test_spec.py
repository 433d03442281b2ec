"""The job spec: validation, error messages, starters."""

from __future__ import annotations

from pathlib import Path

import json
import pytest
import yaml

from hfhpc.errors import SpecError
from hfhpc import registry
from hfhpc.spec import load_spec, lock_path_for, parse_spec
from hfhpc.starters import render_starter
from tests.conftest import hfhpc

GOOD = {"name": "j", "recipe": "sft", "model": "org/m", "dataset": "org/d"}


def test_short_forms_expand_and_defaults_fill():
    spec = parse_spec({**GOOD, "metrics": ["accuracy", "org/custom"], "train": {"warmup_ratio": 0.1}})
    assert spec.model.id == "org/m" and spec.model.revision == "main"
    assert spec.dataset.id == "org/d" and spec.dataset.split == "train"
    assert [m.id for m in spec.metrics] == ["evaluate-metric/accuracy", "org/custom"]
    assert spec.train.model_extra == {"warmup_ratio": 0.1}  # passes through to TRL
    assert spec.resources.world_size == 1


@pytest.mark.parametrize(
    "patch, key, text",
    [
        ({"bogus": 1}, "bogus", "unknown key; valid keys here: name, recipe, model"),
        ({"resources": {"gpu": 4}}, "resources.gpu", "valid keys here: nodes, gpus_per_node"),
        ({"model": {"id": "org/m", "rev": "x"}}, "model.rev", "valid keys here: id, from_run, revision, include"),
        ({"model": {"id": "org/m", "from_run": "runs/a"}}, "model", "give `id:` (a Hub model) or `from_run:` (a finished run folder), not both"),
        ({"model": {"revision": "v1"}}, "model", "give `id:` (a Hub model) or `from_run:`"),
        ({"model": {"from_run": "runs/a", "revision": "v1"}}, "model", "`from_run:` stages the run's whole model/ folder"),
        ({"model": {"from_run": "runs/a", "include": ["*.json"]}}, "model", "`revision:` and `include:` belong to a Hub model"),
        ({"model": {"from_run": "runs/my run"}}, "model", "the run folder's name 'my run' cannot name its staged model"),
        ({"model": {"from_run": "runs/a--b"}}, "model", "rename the folder"),
        ({"model": {"from_run": ".."}}, "model", "does not end in a folder name"),
        ({"model": {"from_run": ""}}, "model", "is not a path"),
        ({"model": {"from_run": ["runs/a"]}}, "model", "from_run must be the path of a run folder"),
        ({"recipe": "script", "script": "t.py", "model": {"from_run": "a/sft"}, "models": [{"from_run": "b/sft"}]}, "",
         "two models would be staged as run/sft (a/sft and b/sft): give the run folders different names"),
        ({"recipe": "train"}, "recipe", "must be 'classify', 'dpo', 'evaluate', 'harness', 'infer', 'script' or 'sft'"),
        ({"recipe": "stf"}, "recipe", "(did you mean `sft`?)"),
        ({"resources": {"gpus_per_nod": 4}}, "resources.gpus_per_nod", "unknown key (did you mean `gpus_per_node`?)"),
        ({"model": "../etc"}, "model.id", "invalid repository id '../etc'"),
        ({"resources": {"time": "3 hours"}}, "resources.time", "is not a SLURM time"),
        ({"resources": {"nodes": 0}}, "resources.nodes", "greater than or equal to 1"),
        ({"name": "a b"}, "name", "is not a job name"),
        ({"launch": {"strategy": "fsdp"}, "resources": {"gpus_per_node": 0}}, "", "fsdp' needs GPUs"),
    ],
)
def test_errors_name_file_key_and_fix(patch, key, text):
    with pytest.raises(SpecError) as e:
        parse_spec({**GOOD, **patch}, "job.yaml")
    assert e.value.key == key
    assert text in e.value.render()
    assert e.value.render().startswith(f"job.yaml: {key}" if key else "job.yaml")


def test_recipe_requirements():
    with pytest.raises(SpecError, match="recipe 'sft' needs `model:`"):
        parse_spec({"name": "j", "recipe": "sft", "dataset": "org/d"})
    with pytest.raises(SpecError, match="recipe 'script' needs `script:`"):
        parse_spec({"name": "j", "recipe": "script"})
    with pytest.raises(SpecError, match="needs `metrics:`"):
        parse_spec({"name": "j", "recipe": "evaluate", "predictions": "p.jsonl"})


def test_load_spec_paths_and_yaml_errors(tmp_path: Path):
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump({**GOOD, "output_dir": "out"}))
    spec = load_spec(p)
    assert spec.source == p and spec.lock_path() == tmp_path / "job.lock" == lock_path_for(p)
    assert spec.run_dir() == tmp_path / "out"
    p.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(p)
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "nope.yaml")
    p.write_text("- a list\n")
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        load_spec(p)


def test_source_is_not_a_yaml_key():
    with pytest.raises(SpecError, match="unknown key"):
        parse_spec({**GOOD, "source": "/x"})


@pytest.mark.parametrize("recipe", registry.names())
def test_every_starter_is_valid_and_commented(recipe):
    text = render_starter(recipe, "x.yaml")
    spec = parse_spec(yaml.safe_load(text))
    assert spec.recipe == recipe
    assert "# " in text and "hfhpc stage x.yaml" in text


def test_init_writes_and_refuses_to_overwrite(tmp_path: Path):
    out = tmp_path / "job.yaml"
    first = hfhpc("init", "sft", "-o", str(out))
    assert first.returncode == 0, first.stderr
    assert load_spec(out).recipe == "sft"
    again = hfhpc("init", "infer", "-o", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr
    assert load_spec(out).recipe == "sft"
    bad = hfhpc("init", "nope")
    assert bad.returncode == 2


def test_job_json_keeps_every_key_of_the_recipes_own_train_section():
    from hfhpc.spec import JobSpec

    for recipe, train in (("sft", {"max_length": 256, "packing": False, "warmup_steps": 0.1}),
                          ("dpo", {"beta": 0.01, "max_length": 128, "loss_type": "ipo"})):
        spec = parse_spec({"name": "x", "recipe": recipe, "model": "org/model", "dataset": "org/data", "train": train})
        frozen = json.loads(json.dumps(spec.model_dump(mode="json")))
        again = JobSpec.model_validate(frozen).train
        assert type(again) is type(spec.train) and again.model_dump() == spec.train.model_dump(), recipe


def test_a_model_from_a_run_is_staged_under_an_id_derived_from_the_folder_name(tmp_path: Path):
    from hfhpc.spec import JobSpec

    (tmp_path / "specs").mkdir()
    path = tmp_path / "specs" / "dpo.yaml"
    path.write_text("name: d\nrecipe: dpo\nmodel: {from_run: ../runs/zephyr-sft/}\ndataset: org/prefs\n"
                    "models: [{from_run: /abs/other-run}, org/extra]\n")
    spec = load_spec(path)
    assert spec.model.id == "run/zephyr-sft" and spec.model.from_run == "../runs/zephyr-sft/"
    assert [m.id for m in spec.all_models()] == ["run/zephyr-sft", "run/other-run", "org/extra"]
    # Relative to the spec's folder, as output_dir is.
    assert spec.resolve_path(spec.model.from_run).resolve() == (tmp_path / "runs" / "zephyr-sft").resolve()
    # job.json keeps the spec's own form, and reads back to the same model.
    frozen = json.loads(json.dumps(spec.model_dump(mode="json")))
    assert frozen["model"] == {"from_run": "../runs/zephyr-sft/", "revision": "main", "include": []}
    assert frozen["models"][1] == {"id": "org/extra", "revision": "main", "include": []}
    again = JobSpec.model_validate(frozen)
    assert again.model == spec.model and again.models == spec.models


def test_the_stage_command_that_fixes_name_is_ready_to_paste(tmp_path: Path):
    folder = tmp_path / "my jobs"
    folder.mkdir()
    (folder / "job.yaml").write_text("name: x\nrecipe: sft\nmodel: org/m\ndataset: org/d\n")
    spec = load_spec(str(folder / "job.yaml"))
    assert spec.stage_command() == f"hfhpc stage '{folder}/job.yaml'"
    assert spec.stage_command(" --repair").endswith("job.yaml' --repair")
    assert parse_spec({"name": "x", "recipe": "sft", "model": "org/m", "dataset": "org/d"}).stage_command() == "hfhpc stage SPEC"
