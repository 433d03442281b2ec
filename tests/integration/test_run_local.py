"""`hfhpc run`: the same per-node entry point as SLURM, on this machine, sealed and offline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hfhpc.demo.build import MODEL_ID
from tests.conftest import hfhpc

SCRIPT = """\
import os, sys, socket
rank = int(os.environ.get("RANK", 0)); world = int(os.environ.get("WORLD_SIZE", 1))
if world > 1:
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    t = torch.ones(1) * (rank + 1); dist.all_reduce(t)
    print(f"rank {rank}: allreduce {t.item():.0f}", flush=True)
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained("%s")
print(f"rank {rank}/{world} HF_HOME={os.environ['HF_HOME']} args={sys.argv[1:]} run={os.environ['HFHPC_RUN_DIR']}", flush=True)
code = int(os.environ.get("FAIL_RANK_CODE", "0")) if str(rank) == os.environ.get("FAIL_RANK") else 0
sys.exit(code)
""" % MODEL_ID


@pytest.fixture(scope="module")
def staged_job(hub, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("job dir with space")
    (folder / "probe.py").write_text(SCRIPT)
    spec = folder / "job.yaml"
    spec.write_text(
        "name: probe\nrecipe: script\nscript: probe.py\nargs: ['--name', \"it's a b\"]\n"
        f"model: {MODEL_ID}\nresources: {{gpus_per_node: 0, procs_per_node: 2}}\n"
    )
    store = folder / "store"
    out = hfhpc("--store", str(store), "stage", str(spec), env=dict(os.environ, HF_ENDPOINT=hub.url))
    assert out.returncode == 0, out.stderr
    return spec, store


def test_two_cpu_ranks_run_sealed_from_the_store(staged_job):
    spec, store = staged_job
    out = hfhpc("--store", str(store), "run", str(spec))
    assert out.returncode == 0, out.stderr
    for rank in (0, 1):
        assert f"rank {rank}: allreduce 3" in out.stdout
        assert f"rank {rank}/2 HF_HOME={store} args=['--name', \"it's a b\"]" in out.stdout
    run_dir = spec.parent / "runs" / "probe"
    assert (run_dir / "job.json").exists()
    logs = list((run_dir / "logs").glob("local-*.out"))
    assert logs and "rank 1/2" in logs[-1].read_text()


def test_node_local_copy_is_used_when_configured(staged_job, tmp_path: Path):
    spec, store = staged_job
    local = tmp_path / "node-local"
    spec2 = spec.with_name("local.yaml")
    spec2.write_text(spec.read_text().replace("name: probe", "name: probe-local") + f"site: {{local_dir: '{local}'}}\n")
    spec2.with_suffix(".lock").write_text(spec.with_suffix(".lock").read_text())
    out = hfhpc("--store", str(store), "run", str(spec2))
    assert out.returncode == 0, out.stderr
    assert f"HF_HOME={local / 'hfhpc-store'}" in out.stdout
    assert list((local / "hfhpc-store" / "hub").glob("models--*/snapshots/*/config.json"))
    assert "node-local copy done" in out.stderr


def test_a_failing_rank_fails_the_run_and_is_named(staged_job):
    spec, store = staged_job
    out = hfhpc("--store", str(store), "run", str(spec), env=dict(os.environ, FAIL_RANK="1", FAIL_RANK_CODE="7"))
    assert out.returncode == 1  # torchrun's status when a rank failed
    assert "rank       : 1" in out.stdout + out.stderr or "rank: 1" in out.stdout + out.stderr
    assert "exitcode   : 7" in out.stdout + out.stderr or "exitcode: 7" in out.stdout + out.stderr


def test_run_without_staging_names_the_fix(tmp_path: Path):
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: x\nrecipe: script\nscript: x.py\nmodel: {MODEL_ID}\nresources: {{gpus_per_node: 0}}\n")
    out = hfhpc("--store", str(tmp_path / "s"), "run", str(spec))
    assert out.returncode == 2
    assert "never staged" in out.stderr and f"run `hfhpc stage {spec}` on a login node" in out.stderr


def test_sigterm_is_forwarded_to_the_ranks(staged_job, tmp_path: Path):
    spec, store = staged_job
    script = spec.parent / "sleeper.py"
    script.write_text(
        "import signal, sys, time, os\n"
        "def bye(signum, frame):\n"
        "    print('rank got', signal.Signals(signum).name, flush=True); sys.exit(3)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    spec3 = spec.with_name("sleep.yaml")
    spec3.write_text(f"name: sleeper\nrecipe: script\nscript: sleeper.py\nmodel: {MODEL_ID}\nresources: {{gpus_per_node: 0}}\n")
    spec3.with_suffix(".lock").write_text(spec.with_suffix(".lock").read_text())
    proc = subprocess.Popen([sys.executable, "-m", "hfhpc", "--store", str(store), "run", str(spec3)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "ready" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert "rank got SIGTERM" in out
    assert proc.returncode == 3  # the rank's own status: 3 = checkpointed, run again to resume
