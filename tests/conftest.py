"""Shared test setup: an isolated environment for every test, and a loopback Hub serving the
bundled tiny repos (built once per session with the real transformers/tokenizers/datasets code)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["tests.cluster.fixtures"]

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def isolate(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point HOME, HF_HOME, HFHPC_STORE and the state folder at a fresh folder; drop HF_* and SLURM_*."""
    home = tmp_path_factory.mktemp("home")
    for name in list(os.environ):
        if name.startswith(("HF_", "HFHPC_", "HUGGINGFACE_", "SLURM_", "SBATCH_", "TRANSFORMERS_", "XDG_")):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HFHPC_STATE_DIR", str(home / "state"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return home


@pytest.fixture(scope="session")
def upstream_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding the bundled repos: what the loopback Hub serves."""
    from hfhpc.demo.build import DEMO_REPOS, TEST_REPOS, build_upstream

    store = tmp_path_factory.mktemp("upstream")
    build_upstream(store, repos=DEMO_REPOS + TEST_REPOS)
    return store


@pytest.fixture(scope="session")
def hub(upstream_store: Path):
    """A running Hub-compatible server of the upstream store (``hub.url``)."""
    from hfhpc.store.server import StoreServer

    with StoreServer(upstream_store) as server:
        yield server


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


def hfhpc(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 300,
          input: str | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a child process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "hfhpc", *args],
        env=env if env is not None else dict(os.environ),
        cwd=cwd, capture_output=True, text=True, timeout=timeout, input=input,
    )


def offline_python(store: Path, code: str, extra_env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``code`` the way a user's job would: only HF_HOME and the offline variables set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HFHPC_"))}
    env.update(HF_HOME=str(store), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_EVALUATE_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
