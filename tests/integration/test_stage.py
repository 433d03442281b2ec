"""Staging against a real loopback Hub, checked with the real huggingface_hub, transformers,
datasets and evaluate code running offline from the store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hfhpc.demo.build import CHAT_DATASET_ID, METRIC_ID, MINILM_ID, MODEL_ID
from hfhpc.store.importer import import_folder
from hfhpc.store.layout import dataset_arrow_dir, dataset_arrow_root, sha256_file
from hfhpc.store.server import StoreServer
from tests.conftest import hfhpc, offline_python
from tests.helpers import tree_digest, write_spec

SPEC = f"""\
name: tiny-sft
recipe: sft
model: {MODEL_ID}
dataset: {{id: {CHAT_DATASET_ID}, split: train_sft, eval_split: test_sft}}
metrics: [accuracy]
resources: {{gpus_per_node: 0}}
"""


def _env(hub_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["HF_ENDPOINT"] = hub_url
    env.update(extra)
    return env


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    return write_spec(tmp_path / "job.yaml", SPEC)


def test_stage_spec_then_unchanged_libraries_load_offline(hub, store: Path, spec: Path):
    out = hfhpc("--store", str(store), "stage", str(spec), env=_env(hub.url))
    assert out.returncode == 0, out.stderr
    assert "lockfile:" in out.stdout

    lock = json.loads((spec.parent / "job.lock").read_text())
    kinds = {a["id"]: a for a in lock["assets"]}
    assert set(kinds) == {MODEL_ID, CHAT_DATASET_ID, METRIC_ID}
    model = kinds[MODEL_ID]
    assert model["revision"] == "main" and len(model["commit"]) == 40
    snap = store / "hub" / f"models--{MODEL_ID.replace('/', '--')}" / "snapshots" / model["commit"]
    for f in model["files"]:
        assert (snap / f["path"]).stat().st_size == f["size"]
        assert sha256_file(snap / f["path"]) == f["sha256"]
    # The store's layout module names the folder where `load_dataset` really wrote its Arrow cache.
    data_commit = kinds[CHAT_DATASET_ID]["commit"]
    arrow = [p.parent for p in dataset_arrow_dir(store, CHAT_DATASET_ID, None).glob(f"*/{data_commit}/dataset_info.json")]
    assert arrow and arrow[0].parent.parent.parent == dataset_arrow_root(store, CHAT_DATASET_ID)

    code = f"""
from transformers import AutoModelForCausalLM, AutoTokenizer
import datasets, evaluate
m = AutoModelForCausalLM.from_pretrained({MODEL_ID!r}); t = AutoTokenizer.from_pretrained({MODEL_ID!r})
assert t.apply_chat_template([{{"role": "user", "content": "hi"}}], tokenize=False)
rows = {{s: datasets.load_dataset({CHAT_DATASET_ID!r}, split=s).num_rows for s in ["train_sft", "test_sft", "train_gen", "test_gen"]}}
acc = evaluate.load("accuracy").compute(predictions=[0, 1, 1], references=[0, 1, 0])["accuracy"]
print(rows, round(acc, 4))
"""
    res = offline_python(store, code)
    assert res.returncode == 0, res.stderr
    assert "'train_sft': 512" in res.stdout and "'test_gen': 64" in res.stdout
    assert "0.6667" in res.stdout


def test_restage_is_a_noop_without_network_and_update_moves(upstream_store: Path, store: Path, tmp_path: Path):
    # A private upstream: this test changes it.
    upstream = tmp_path / "up"
    shutil.copytree(upstream_store / "hub" / f"models--{MODEL_ID.replace('/', '--')}",
                    upstream / "hub" / f"models--{MODEL_ID.replace('/', '--')}", symlinks=True)
    args = ("--store", str(store), "stage", "--model", MODEL_ID, "--lock", str(tmp_path / "m.lock"))
    with StoreServer(upstream) as server:
        first = hfhpc(*args, env=_env(server.url))
        assert first.returncode == 0, first.stderr
        old_commit = json.loads((tmp_path / "m.lock").read_text())["assets"][0]["commit"]
    # Server gone: an unchanged re-stage asks nothing of the network.
    again = hfhpc(*args, env=_env("http://127.0.0.1:9"))
    assert again.returncode == 0, again.stderr
    assert "already staged" in again.stdout

    # Upstream moves main to a new commit.
    src = tmp_path / "newsrc"
    snap = next((upstream / "hub" / f"models--{MODEL_ID.replace('/', '--')}" / "snapshots").iterdir())
    shutil.copytree(snap, src)
    (src / "README.md").write_text("a new revision\n")
    new_commit, _ = import_folder(upstream, "model", MODEL_ID, src)
    assert new_commit != old_commit
    with StoreServer(upstream) as server:
        same = hfhpc(*args, env=_env(server.url))
        assert json.loads((tmp_path / "m.lock").read_text())["assets"][0]["commit"] == old_commit
        upd = hfhpc(*args, "--update", env=_env(server.url))
    assert upd.returncode == 0, upd.stderr
    assert same.returncode == 0
    assert f"updated {old_commit[:12]} → {new_commit[:12]}" in upd.stdout
    assert json.loads((tmp_path / "m.lock").read_text())["assets"][0]["commit"] == new_commit
    # Only the changed file travelled.
    assert "downloaded 15 B" in upd.stdout


def test_default_selection_prefers_safetensors_and_include_patterns(tmp_path: Path, store: Path):
    src = tmp_path / "repo"
    (src / "onnx").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"s" * 100)
    (src / "pytorch_model.bin").write_bytes(b"b" * 100)
    (src / "tf_model.h5").write_bytes(b"h" * 100)
    (src / "onnx" / "model.onnx").write_bytes(b"o" * 100)
    upstream = tmp_path / "up"
    import_folder(upstream, "model", "org/multi", src)
    with StoreServer(upstream) as server:
        out = hfhpc("--store", str(store), "stage", "--model", "org/multi", "--lock", str(tmp_path / "a.lock"), env=_env(server.url))
        assert out.returncode == 0, out.stderr
        files = {f["path"] for f in json.loads((tmp_path / "a.lock").read_text())["assets"][0]["files"]}
        assert files == {"config.json", "model.safetensors"}
        inc = hfhpc("--store", str(store), "stage", "--model", "org/multi", "--include", "*.bin", "--include", "config.json",
                    "--lock", str(tmp_path / "b.lock"), env=_env(server.url))
        assert inc.returncode == 0, inc.stderr
        files = {f["path"] for f in json.loads((tmp_path / "b.lock").read_text())["assets"][0]["files"]}
        assert files == {"config.json", "pytorch_model.bin"}
        none = hfhpc("--store", str(store), "stage", "--model", "org/multi", "--include", "*.gguf",
                     "--lock", str(tmp_path / "c.lock"), env=_env(server.url))
        assert none.returncode == 1
        assert "no file of model 'org/multi'@main matches '*.gguf'" in none.stderr
        assert not (tmp_path / "c.lock").exists()


def test_stage_from_plain_folder_and_git_clone(tmp_path: Path, store: Path):
    from hfhpc.demo.build import minilm_folder

    lock = tmp_path / "l.lock"
    out = hfhpc("--store", str(store), "stage", "--model", MINILM_ID, "--from", str(minilm_folder()), "--lock", str(lock))
    assert out.returncode == 0, out.stderr
    res = offline_python(store, f"from transformers import AutoModel; print(type(AutoModel.from_pretrained({MINILM_ID!r})).__name__)")
    assert res.returncode == 0, res.stderr
    assert "BertModel" in res.stdout

    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / "config.json").write_text('{"model_type": "bert"}')
    git = ["git", "-C", str(clone), "-c", "user.email=a@b", "-c", "user.name=a"]
    subprocess.run(["git", "init", "-q", str(clone)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    out = hfhpc("--store", str(store), "stage", "--model", "org/cloned", "--from", str(clone), "--lock", str(lock))
    assert out.returncode == 0, out.stderr
    assets = {a["id"]: a for a in json.loads(lock.read_text())["assets"]}
    assert assets["org/cloned"]["commit"] == head
    assert MINILM_ID in assets  # the lockfile keeps earlier assets

    # A clone made without git-lfs holds pointers, not weights: refuse, and say how to fix it.
    (clone / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 5\n")
    bad = hfhpc("--store", str(store), "stage", "--model", "org/pointer", "--from", str(clone), "--lock", str(lock))
    assert bad.returncode == 2
    assert "git lfs pull" in bad.stderr


def test_checksum_mismatch_names_the_file_and_keeps_nothing(tmp_path: Path, store: Path):
    src = tmp_path / "repo"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"x" * 1000)
    upstream = tmp_path / "up"
    import_folder(upstream, "model", "org/corrupt", src)
    blob = next((upstream / "hub" / "models--org--corrupt" / "blobs").glob("?" * 64))
    blob.write_bytes(b"y" * 1000)  # same size, other bytes: the listing's sha256 no longer matches
    with StoreServer(upstream) as server:
        out = hfhpc("--store", str(store), "stage", "--model", "org/corrupt", "--lock", str(tmp_path / "x.lock"), env=_env(server.url))
    assert out.returncode == 1
    assert "checksum mismatch for org/corrupt/model.safetensors" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    blobs = list((store / "hub" / "models--org--corrupt" / "blobs").iterdir())
    assert all(sha256_file(b) != sha256_file(blob) for b in blobs)
    assert not (tmp_path / "x.lock").exists()


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--model", "org/does-not-exist"], 1, "model 'org/does-not-exist' was not found on"),
        (["--model", MODEL_ID, "--revision", "v9"], 1, f"revision 'v9' of model '{MODEL_ID}' was not found"),
        (["--model", "../x"], 2, "invalid repository id '../x'"),
        (["--model", "a b"], 2, "invalid repository id 'a b': it contains whitespace"),
        (["--model", ""], 2, "invalid repository id '': it is empty"),
        (["--dataset", "a/b/c"], 2, "has more than one '/'"),
        ([], 2, "nothing to stage"),
    ],
)
def test_bad_input_one_line_error_store_unchanged(hub, store: Path, tmp_path: Path, args, code, message):
    before = tree_digest(store)
    out = hfhpc("--store", str(store), "stage", *args, "--lock", str(tmp_path / "x.lock"), env=_env(hub.url))
    assert out.returncode == code, out.stderr
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr
    assert tree_digest(store) == before
    assert not (tmp_path / "x.lock").exists()


def test_unreachable_endpoint(store: Path, tmp_path: Path):
    out = hfhpc("--store", str(store), "stage", "--model", MODEL_ID, "--lock", str(tmp_path / "x.lock"),
                env=_env("http://127.0.0.1:9"))
    assert out.returncode == 1
    assert "cannot reach http://127.0.0.1:9" in out.stderr and "login node" in out.stderr
    assert tree_digest(store / "hub") == {}


def test_no_space_left_is_a_clear_error_and_store_unchanged(hub, tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        out = hfhpc("--store", str(small / "store"), "stage", "--model", MINILM_ID, "--lock", str(tmp_path / "x.lock"), env=_env(hub.url))
        assert out.returncode == 1
        assert "no space left on the device holding" in out.stderr
        assert not list((small / "store" / "hub").rglob("*.safetensors"))
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_token_is_sent_but_never_written(hub, store: Path, spec: Path, tmp_path: Path):
    secret = "hf_SECRETtoken1234567890"
    out = hfhpc("--store", str(store), "stage", str(spec), env=_env(hub.url, HF_TOKEN=secret))
    assert out.returncode == 0, out.stderr
    assert secret not in out.stdout + out.stderr
    env_out = hfhpc("--store", str(store), "env", "--spec", str(spec), env=_env(hub.url, HF_TOKEN=secret))
    assert secret not in env_out.stdout
    for path in [*store.rglob("*"), *tmp_path.glob("*.lock")]:
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 5_000_000:
            assert secret.encode() not in path.read_bytes(), path


def test_killed_stage_completes_when_rerun_and_nothing_partial_is_visible(tmp_path: Path, store: Path):
    src = tmp_path / "repo"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(os.urandom(64 * 1024 * 1024))
    upstream = tmp_path / "up"
    import_folder(upstream, "model", "org/big", src)
    from tests.throttle import ThrottledProxy

    with StoreServer(upstream) as server, ThrottledProxy(server.url, bytes_per_s=8 * 1024 * 1024) as proxy:
        args = ("--store", str(store), "stage", "--model", "org/big", "--lock", str(tmp_path / "x.lock"))
        proc = subprocess.Popen([sys.executable, "-m", "hfhpc", *args], env=_env(proxy.url),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        blobs = store / "hub" / "models--org--big" / "blobs"
        deadline = time.time() + 60
        while time.time() < deadline and not any(p.name.startswith(".hfhpc-tmp-") and p.stat().st_size > 1 << 20 for p in blobs.glob(".*")):
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # Only complete files under final names: the partial one is a temporary.
        for blob in blobs.iterdir():
            if not blob.name.startswith("."):
                assert len(blob.name) in (40, 64)
                assert blob.stat().st_size in (2, 64 * 1024 * 1024)
        assert not (store / "hub" / "models--org--big" / "refs" / "main").exists()
        again = hfhpc(*args, env=_env(server.url))
    assert again.returncode == 0, again.stderr
    assert not [p for p in blobs.iterdir() if p.name.startswith(".hfhpc-tmp-")]
    snap = next((store / "hub" / "models--org--big" / "snapshots").iterdir())
    assert sha256_file(snap / "model.safetensors") == sha256_file(src / "model.safetensors")


def test_two_concurrent_stages_of_one_asset_both_succeed(hub, tmp_path: Path, store: Path):
    procs = [
        subprocess.Popen([sys.executable, "-m", "hfhpc", "--store", str(store), "stage", "--model", MINILM_ID,
                          "--lock", str(tmp_path / f"{i}.lock")], env=_env(hub.url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    locks = [json.loads((tmp_path / f"{i}.lock").read_text())["assets"][0] for i in range(2)]
    assert locks[0]["files"] == locks[1]["files"]
    blobs = list((store / "hub" / f"models--{MINILM_ID.replace('/', '--')}" / "blobs").iterdir())
    assert len(blobs) == len(locks[0]["files"])  # one copy of each file, no leftovers
    downloaded = sum("downloaded" in out for out, _ in results)
    assert downloaded == 1  # the second waited for the first and found everything there


def test_stage_warns_about_a_split_the_dataset_does_not_have(hub, tmp_path: Path):
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: x\nrecipe: sft\nmodel: {MODEL_ID}\ndataset: {{id: {CHAT_DATASET_ID}, split: train, eval_split: test_sft}}\n")
    out = hfhpc("--store", str(tmp_path / "store"), "stage", str(spec), env=dict(os.environ, HF_ENDPOINT=hub.url))
    assert out.returncode == 0, out.stderr
    assert (f"warning: dataset {CHAT_DATASET_ID} has no split 'train': it has train_sft, test_sft, train_gen, test_gen; "
            f"fix the split names in {spec}") in out.stdout
    assert "'test_sft'" not in out.stdout


CHAINED = """\
name: chained
recipe: dpo
model: {from_run: runs/sft}
dataset: {id: org/prefs, split: train_prefs}
resources: {gpus_per_node: 0}
"""


def _finished_run(folder: Path, *, summary: bool = True, model: bool = True, config: bool = True) -> Path:
    """A run folder as a training recipe leaves it (or part of it)."""
    (folder / "logs").mkdir(parents=True)
    if model:
        (folder / "model").mkdir()
        (folder / "model" / "model.safetensors").write_bytes(b"w" * 2000)
        if config:
            (folder / "model" / "config.json").write_text('{"model_type": "mistral"}')
    if summary:
        (folder / "summary.json").write_text('{"name": "sft", "recipe": "sft"}')
    return folder


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda runs: None, "runs/sft: no such run folder; run the spec that writes it first"),
        (lambda runs: _finished_run(runs / "sft", summary=False), "the run has not finished (no summary.json); wait until it has"),
        (lambda runs: _finished_run(runs / "sft", model=False), "holds no model/ folder"),
        (lambda runs: _finished_run(runs / "sft", config=False), "its model/ holds neither a model (config.json) nor LoRA adapters (adapter_config.json)"),
    ],
)
def test_stage_refuses_a_run_that_is_not_finished_writing_nothing(tmp_path: Path, store: Path, make, message):
    make(tmp_path / "runs")
    spec = write_spec(tmp_path / "dpo.yaml", CHAINED)
    out = hfhpc("--store", str(store), "stage", str(spec), env=_env("http://127.0.0.1:9"))
    assert out.returncode == 2, out.stderr
    assert f"model.from_run {tmp_path}/" in out.stderr and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not store.exists() and not spec.with_suffix(".lock").exists()


LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "/node-local/tmp/hfhpc-store/hub/models--org--tiny/snapshots/x"}


def _record(base: dict, *, lora: bool = True) -> dict:
    """The job.json of a run that started from ``base`` (a locked model asset)."""
    spec = {"name": "sft", "recipe": "sft", "model": {"id": base["id"]} if not base["id"].startswith("run/") else
            {"from_run": "../" + base["id"].removeprefix("run/")}, "dataset": {"id": "org/chat"},
            "resources": {"gpus_per_node": 0}, **({"train": {"lora": {"r": 4}}} if lora else {})}
    return {"version": 1, "hfhpc": "0", "created": "2026-01-01T00:00:00+00:00", "spec_path": "/lab/sft.yaml", "spec": spec,
            "assets": [base], "store": "/lab/store", "run_dir": "/lab/runs/sft", "python": "python"}


def _asset(repo_id: str, commit: str = "a" * 40) -> dict:
    return {"kind": "model", "id": repo_id, "revision": "main", "commit": commit, "include": [],
            "files": [{"path": "config.json", "size": 2, "sha256": "b" * 64, "blob_id": "c" * 40, "lfs": False}]}


def _lora_run(folder: Path, config: object = LORA, record: dict | None = None) -> Path:
    """A finished run trained with train.lora, as it leaves its folder: adapters, no model."""
    (folder / "model").mkdir(parents=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (folder / "model" / "adapter_config.json").write_text(text)
    (folder / "model" / "adapter_model.safetensors").write_bytes(b"w" * 2000)
    (folder / "summary.json").write_text("{}")
    if record is not None:
        (folder / "job.json").write_text(json.dumps(record))
    return folder


@pytest.mark.parametrize(
    "config, message",
    [
        ("{not json", "adapter_config.json is not JSON;"),
        ([LORA], "adapter_config.json is not a JSON object;"),
        ({**LORA, "peft_type": "PREFIX_TUNING"}, "adapter_config.json peft_type is 'PREFIX_TUNING', not 'LORA'"),
        ({**LORA, "target_modules": ["q_proj", {"path": "/etc"}]}, "target_modules is not a module name or a list of module names"),
        ({**LORA, "r": "4"}, "r is not a positive integer"),
        ({**LORA, "init_lora_weights": "pissa"}, "init_lora_weights 'pissa' changes the base weights"),
    ],
)
def test_stage_refuses_adapters_whose_config_is_not_plain_lora(tmp_path: Path, store: Path, config, message):
    """adapter_config.json is untrusted: checked before anything is staged, nothing it names followed."""
    _lora_run(tmp_path / "runs" / "sft", config, _record(_asset("org/tiny")))
    spec = write_spec(tmp_path / "dpo.yaml", CHAINED)
    out = hfhpc("--store", str(store), "stage", str(spec), env=_env("http://127.0.0.1:9"))
    assert out.returncode == 2, out.stderr
    assert f"model.from_run {tmp_path}/runs/sft: its model/adapter_config.json " in out.stderr and message in out.stderr
    assert "train the adapters again" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not store.exists() and not spec.with_suffix(".lock").exists()


@pytest.mark.parametrize(
    "record, message, fix",
    [
        (None, "its job.json is missing or unreadable: the base model of its adapters is unknown", "its job.json records the base"),
        (_record(_asset("org/tiny"), lora=False), "its job.json names no model trained with train.lora", "its job.json records the base"),
        ({**_record(_asset("org/tiny")), "assets": []}, "it pins no commit of org/tiny", "its job.json records the base"),
        (_record(_asset("org/tiny", commit="../../../etc/passwd")), "commit '../../../etc/passwd': a commit id of 40 is lowercase hex digits",
         "its job.json records the base"),
        (_record(_asset("run/base")), f"the base of its adapters, model run/base@{'a' * 12}, is not intact in the store",
         "stage the spec of that run again into this store (`hfhpc --store"),
    ],
)
def test_stage_refuses_adapters_whose_base_is_unknown_or_not_in_the_store(tmp_path: Path, store: Path, record, message, fix):
    _lora_run(tmp_path / "runs" / "sft", record=record)
    spec = write_spec(tmp_path / "dpo.yaml", CHAINED)
    out = hfhpc("--store", str(store), "stage", str(spec), env=_env("http://127.0.0.1:9"))
    assert out.returncode == 2, out.stderr
    assert f"model.from_run {tmp_path}/runs/sft: " in out.stderr and message in out.stderr and fix in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not store.exists() and not spec.with_suffix(".lock").exists()


def test_stage_refuses_a_run_folder_that_is_the_specs_own_output(tmp_path: Path, store: Path):
    _finished_run(tmp_path / "runs" / "sft")
    spec = write_spec(tmp_path / "dpo.yaml", CHAINED + "output_dir: runs/sft\n")
    out = hfhpc("--store", str(store), "stage", str(spec))
    assert out.returncode == 2
    assert "is this spec's own output_dir: the job would overwrite the model it starts from" in out.stderr
    assert not spec.with_suffix(".lock").exists()
