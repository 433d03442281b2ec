"""What a ``pip install hfhpc`` user gets: the wheel, installed (not editable) into a fresh virtualenv
and run outside the source tree, answers the login-node commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


# HuggingFaceH4/zephyr-7b-beta's config.json, the fields the planner reads.
ZEPHYR_CONFIG = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
                 "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768,
                 "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def _sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the built wheel; its dependencies come from the test environment's
    site-packages (a plain path entry: that folder's own .pth files, the editable hfhpc among them,
    are not read)."""
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    built = _sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                 "--disable-pip-version-check", "-w", str(dist), str(REPO_ROOT)])
    assert built.returncode == 0, built.stderr
    wheel = next(dist.glob("hfhpc-*.whl"))
    venv = root / "venv"
    made = _sh([sys.executable, "-m", "venv", str(venv)])
    assert made.returncode == 0, made.stderr
    deps = [p for p in sys.path if p.endswith("site-packages")]
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "test-deps.pth").write_text("".join(f"{p}\n" for p in deps))
    inst = _sh([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                "--disable-pip-version-check", str(wheel)])
    assert inst.returncode == 0, inst.stderr
    return venv


def _hfhpc(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["HFHPC_STORE"] = str(cwd / "store")
    return _sh([str(venv / "bin" / "hfhpc"), *args], cwd=cwd, env=env)


def test_installed_wheel_runs_the_login_node_commands_without_the_source_tree(installed: Path, tmp_path: Path):
    where = _sh([str(installed / "bin" / "python"), "-c", "import hfhpc; print(hfhpc.__file__)"], cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert str(installed) in where.stdout, f"hfhpc imported from {where.stdout.strip()}, not the wheel"

    helped = _hfhpc(installed, "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "stage" in helped.stdout, helped.stderr

    spec = tmp_path / "job.yaml"
    init = _hfhpc(installed, "init", "sft", "-o", str(spec), cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    assert "recipe: sft" in spec.read_text()

    example = tmp_path / "zephyr-sft.yaml"
    example.write_text((REPO_ROOT / "examples" / "zephyr-sft.yaml").read_text())
    config = tmp_path / "config.json"
    config.write_text(json.dumps(ZEPHYR_CONFIG))
    plan = _hfhpc(installed, "plan", str(example), "--model-config", str(config), cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    # The measured throughput anchors ship with the package: the estimate cites the 4-GPU result.
    assert "sft_7b_4xh200.json" in plan.stdout, plan.stdout

    job = tmp_path / "script.yaml"
    (tmp_path / "train.py").write_text("print('hello')\n")
    job.write_text("name: hello\nrecipe: script\nscript: train.py\nresources: {gpus_per_node: 1, time: '1:00:00'}\n")
    script = _hfhpc(installed, "submit", str(job), "--dry-run", cwd=tmp_path)
    assert script.returncode == 0, script.stderr
    assert script.stdout.startswith("#!") and "srun" in script.stdout
