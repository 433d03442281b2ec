"""A spec file cannot hang, exhaust memory or crash hfhpc: every bad file is one typed line, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from hfhpc.errors import SpecError
from hfhpc.spec import load_spec, parse_spec
from tests.conftest import hfhpc

HEAD = "name: j\nrecipe: sft\nmodel: org/m\ndataset: org/d\n"
GOOD = {"name": "j", "recipe": "sft", "model": "org/m", "dataset": "org/d"}


def _load(tmp_path: Path, text: str | bytes):
    p = tmp_path / "job.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return load_spec(p)


def test_alias_bomb_is_refused_at_once(tmp_path: Path):
    # 1.3 KB that YAML expands to 10^9 strings: refused before a single node is built.
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"  a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    bomb = HEAD + "train:\n" + "\n".join("  " + ln.strip() for ln in lines) + "\n"
    assert len(bomb) < 1500
    with pytest.raises(SpecError, match="anchors and aliases"):
        _load(tmp_path, bomb)


def test_any_anchor_or_alias_is_refused(tmp_path: Path):
    with pytest.raises(SpecError, match="anchors and aliases") as e:
        _load(tmp_path, HEAD + "launch: &l {strategy: ddp}\n")
    assert e.value.key == "line 5"
    with pytest.raises(SpecError, match="anchors and aliases"):
        _load(tmp_path, HEAD + "x: &a [*a]\n")  # circular


def test_a_key_given_twice_is_refused(tmp_path: Path):
    with pytest.raises(SpecError, match="key 'epochs' is given twice \\(lines 6 and 7\\)"):
        _load(tmp_path, HEAD + "train:\n  epochs: 1\n  epochs: 3\n")
    with pytest.raises(SpecError, match="key 'name' is given twice"):
        _load(tmp_path, HEAD + "name: k\n")


def test_non_utf8_file_is_a_spec_error(tmp_path: Path):
    with pytest.raises(SpecError, match="not UTF-8"):
        _load(tmp_path, HEAD.encode() + b"output_dir: caf\xe9\n")


def test_deep_nesting_is_refused_without_recursion(tmp_path: Path):
    with pytest.raises(SpecError, match="nested more than"):
        _load(tmp_path, HEAD + "train: " + "[" * 20000 + "]" * 20000 + "\n")
    with pytest.raises(SpecError, match="nested more than"):
        _load(tmp_path, HEAD + "train:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 200)))


@pytest.mark.parametrize("text", [
    HEAD.encode() + b"output_dir: caf\xe9\n",
    (HEAD + "train: " + "[" * 20000 + "]" * 20000 + "\n").encode(),
    (HEAD + "x: &a [*a]\n").encode(),
])
def test_bad_spec_files_exit_2_with_one_line(tmp_path: Path, text: bytes):
    p = tmp_path / "job.yaml"
    p.write_bytes(text)
    for command in (["check", "--no-probe"], ["submit", "--dry-run"], ["plan"]):
        out = hfhpc(*command, str(p))
        assert out.returncode == 2, (command, out.stderr)
        assert out.stderr.count("\n") == 1 and "internal error" not in out.stderr


@pytest.mark.parametrize("yaml_value, seconds", [
    ("60", 3600),                 # YAML integer: minutes
    ("12:00:00", 43200),          # unquoted: not YAML 1.1's base-60 integer
    ('"1:00"', 60),               # MM:SS
    ("90", 5400),
    ('"5:30"', 330),
    ('"02:30:00"', 9000),
    ('"48:00:00"', 172800),
    ('"2-12"', 216000),           # D-HH
    ('"1-02:30"', 95400),         # D-HH:MM
    ('"0-03:00:00"', 10800),      # D-HH:MM:SS
    ('"1-00:00:01"', 86401),
])
def test_every_sbatch_time_format_is_accepted(tmp_path: Path, yaml_value, seconds):
    spec = _load(tmp_path, HEAD + f"resources: {{time: {yaml_value}}}\n")
    assert spec.resources.time_s == seconds


@pytest.mark.parametrize("value", ['"1-99:99:99"', '"1-24:00:00"', '"10:60"', '"1:61:00"', "0", '"3 hours"', "1.5", '"400-00:00:00"'])
def test_impossible_times_are_refused(tmp_path: Path, value):
    with pytest.raises(SpecError) as e:
        _load(tmp_path, HEAD + f"resources: {{time: {value}}}\n")
    assert e.value.key == "resources.time"


@pytest.mark.parametrize("patch, key", [
    ({"resources": {"nodes": 10**29}}, "resources.nodes"),
    ({"resources": {"mem_gb": 10**29}}, "resources.mem_gb"),
    ({"resources": {"gpus_per_node": 10**6}}, "resources.gpus_per_node"),
    ({"train": {"learning_rate": float("inf")}}, "train.learning_rate"),
    ({"train": {"learning_rate": float("nan")}}, "train.learning_rate"),
    ({"train": {"epochs": float("inf")}}, "train.epochs"),
    ({"train": {"max_steps": -5}}, "train.max_steps"),
    ({"train": {"max_steps": 0}}, "train.max_steps"),
    ({"resources": {"gpu_type": "a100:8,gpu:h100"}}, "resources.gpu_type"),
    ({"resources": {"gpu_type": "a100 --x"}}, "resources.gpu_type"),
])
def test_out_of_bounds_values_are_refused(patch, key):
    with pytest.raises(SpecError) as e:
        parse_spec({**GOOD, **patch}, "job.yaml")
    assert e.value.key == key


def test_yaml_inf_is_refused_as_a_learning_rate(tmp_path: Path):
    with pytest.raises(SpecError, match="finite"):
        _load(tmp_path, HEAD + "train: {learning_rate: .inf}\n")


def test_sane_values_still_pass():
    spec = parse_spec({**GOOD, "train": {"max_steps": 1, "learning_rate": 1e-4},
                       "resources": {"nodes": 64, "mem_gb": 2000, "gpu_type": "h100_80gb"}})
    assert spec.train.max_steps == 1 and spec.resources.gpu_type == "h100_80gb"
