"""``--mem``: always written; estimated from the model, the ranks and the workers unless the spec says."""

from __future__ import annotations

import json
from pathlib import Path

from hfhpc.launch import sbatch
from hfhpc.run.jobfile import JobFile
from hfhpc.plan import GIB, host_memory_gb
from hfhpc.spec import parse_spec
from hfhpc.store.lock import Lockfile, LockedAsset, LockedFile

COMMIT = "c" * 40
WEIGHTS = 14 * 10**9  # a 7B model saved in bf16


def _spec(tmp_path: Path, train: dict | None = None, **resources):
    data = {"name": "big", "recipe": "sft", "model": "org/seven-b", "dataset": "org/data", "train": train or {},
            "launch": {"strategy": "fsdp", "mixed_precision": "bf16"},
            "resources": {"nodes": 1, "gpus_per_node": 4, "time": "60", **resources}}
    spec = parse_spec(data, str(tmp_path / "job.yaml"))
    spec._source = tmp_path / "job.yaml"
    return spec


def _staged(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    snap = store / "hub" / "models--org--seven-b" / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    files = [LockedFile("model-00001-of-00002.safetensors", WEIGHTS // 2, "a" * 64, "b" * 40, True),
             LockedFile("model-00002-of-00002.safetensors", WEIGHTS // 2, "d" * 64, "e" * 40, True),
             LockedFile("config.json", 600, "f" * 64, "0" * 40, False)]
    Lockfile(tmp_path / "job.lock", [LockedAsset("model", "org/seven-b", "main", COMMIT, [], files)], store).save()
    return store


def _mem_line(spec, store: Path) -> list[str]:
    job = JobFile(spec, str(spec.source), [], store, Path("/tmp/run"), "/usr/bin/python3", "2026-12-03T00:00:00+00:00")
    return [line for line in sbatch.render_sbatch(job).splitlines() if line.startswith("#SBATCH --mem")]


def test_the_estimate_holds_the_mapped_weights_and_an_fp32_copy_per_rank(tmp_path: Path):
    store = _staged(tmp_path)
    four = host_memory_gb(_spec(tmp_path), store)
    # 14 GB mapped once, 4 ranks × 28 GB fp32 copies, 4 × 3 GiB runtime, 2 GiB data, 25% headroom.
    expected = (WEIGHTS + 4 * 2 * WEIGHTS + (4 * 3 + 2) * GIB) * 1.25 / GIB
    assert four == -(-expected // 1)
    two = host_memory_gb(_spec(tmp_path, gpus_per_node=2), store)
    assert four - two >= 2 * 2 * WEIGHTS / GIB  # two more ranks, two more CPU copies


def test_dataloader_workers_add_memory(tmp_path: Path):
    store = _staged(tmp_path)
    base = host_memory_gb(_spec(tmp_path), store)
    workers = host_memory_gb(_spec(tmp_path, train={"dataloader_num_workers": 4}), store)
    assert workers - base >= 4 * 4 * 1.25 - 1  # 4 ranks × 4 workers × 1 GiB, with headroom


def test_submit_always_writes_mem_and_zero_means_the_whole_node(tmp_path: Path):
    store = _staged(tmp_path)
    assert _mem_line(_spec(tmp_path), store) == [f"#SBATCH --mem={host_memory_gb(_spec(tmp_path), store)}G"]
    assert _mem_line(_spec(tmp_path, mem_gb=0), store) == ["#SBATCH --mem=0"]
    assert _mem_line(_spec(tmp_path, mem_gb=250), store) == ["#SBATCH --mem=250G"]
    assert _mem_line(_spec(tmp_path), tmp_path / "empty-store")[0].startswith("#SBATCH --mem=")


def test_a_model_of_lora_adapters_is_sized_by_its_base(tmp_path: Path):
    """The job loads the adapters' base and merges them (hfhpc.assets.load_model): the base's weights count."""
    store = _staged(tmp_path)
    full = host_memory_gb(_spec(tmp_path), store)
    lock = tmp_path / "job.lock"
    data = json.loads(lock.read_text())
    data["assets"].append({"kind": "model", "id": "run/sft-lora", "revision": "main", "commit": "1" * 40, "include": [],
                           "files": [{"path": "adapter_model.safetensors", "size": 10**6, "sha256": "2" * 64,
                                      "blob_id": "3" * 40, "lfs": False}], "base": "org/seven-b"})
    lock.write_text(json.dumps(data))
    spec = parse_spec({**_spec(tmp_path).model_dump(mode="json"), "model": {"from_run": "runs/sft-lora"}}, str(tmp_path / "job.yaml"))
    spec._source = tmp_path / "job.yaml"
    assert host_memory_gb(spec, store) == full
