"""`hfhpc check` and `hfhpc exec` with the real libraries: fails before staging and names the fix,
passes after, catches corruption and task-only pipelines; the seal refuses a live hub at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hfhpc.demo.build import CHAT_DATASET_ID, MINILM_ID, MODEL_ID
from tests.conftest import hfhpc
from tests.helpers import write_spec

SPEC = f"""\
name: tiny-sft
recipe: sft
model: {MODEL_ID}
dataset: {{id: {CHAT_DATASET_ID}, split: train_sft, eval_split: test_sft}}
metrics: [accuracy]
resources: {{gpus_per_node: 0}}
"""

# The page's own patterns, unchanged: explicit model and tokenizer, load_dataset by id, evaluate.load.
PAGE_SCRIPT = f"""\
from transformers import pipeline
from datasets import load_dataset
import evaluate

generator = pipeline("text-generation", model="{MODEL_ID}", tokenizer="{MODEL_ID}")
print("generated:", len(generator("2 + 2 =", max_new_tokens=3)[0]["generated_text"]) > 0)
embed = pipeline("feature-extraction", model="{MINILM_ID}", tokenizer="{MINILM_ID}")
print("embedding dim:", len(embed("hello")[0][0]))
ds = load_dataset("{CHAT_DATASET_ID}", split="test_sft")
print("rows:", ds.num_rows)
accuracy = evaluate.load("accuracy")
print("accuracy:", accuracy.compute(predictions=[1, 0], references=[1, 1])["accuracy"])
"""


def _stage(hub, store: Path, folder: Path) -> Path:
    spec = write_spec(folder / "job.yaml", SPEC)
    env = dict(os.environ, HF_ENDPOINT=hub.url)
    out = hfhpc("--store", str(store), "stage", str(spec), env=env)
    assert out.returncode == 0, out.stderr
    out = hfhpc("--store", str(store), "stage", "--model", MINILM_ID, "--lock", str(folder / "extra.lock"), env=env)
    assert out.returncode == 0, out.stderr
    return spec


@pytest.fixture(scope="module")
def shared(hub, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One staged store for the tests that only read it: (spec, store)."""
    folder = tmp_path_factory.mktemp("staged")
    return _stage(hub, folder / "store", folder), folder / "store"


@pytest.fixture
def staged(shared: tuple[Path, Path], tmp_path: Path) -> Path:
    """A private copy of the staged spec (tests may edit it) over the shared store."""
    spec = tmp_path / "job.yaml"
    spec.write_text(shared[0].read_text())
    (tmp_path / "job.lock").write_text(shared[0].with_suffix(".lock").read_text())
    return spec


@pytest.fixture
def store(shared: tuple[Path, Path]) -> Path:  # overrides the empty per-test store
    return shared[1]


def test_check_fails_before_staging_with_the_fix_then_passes(hub, tmp_path: Path):
    store = tmp_path / "own-store"
    spec = write_spec(tmp_path / "job.yaml", SPEC)
    before = hfhpc("--store", str(store), "check", str(spec))
    assert before.returncode == 1
    assert "not ready: 3 problems" in before.stdout
    assert f"hfhpc stage {spec}" in before.stdout
    out = hfhpc("--store", str(store), "stage", str(spec), env=dict(os.environ, HF_ENDPOINT=hub.url))
    assert out.returncode == 0, out.stderr
    after = hfhpc("--store", str(store), "check", str(spec))
    assert after.returncode == 0, after.stdout + after.stderr
    assert "ready: 3 assets verified" in after.stdout
    assert "sealed load probes passed" in after.stdout


def test_check_catches_a_corrupted_blob_and_repair_fixes_it(hub, tmp_path: Path):
    store = tmp_path / "own-store"
    staged = _stage(hub, store, tmp_path)
    weights = next((store / "hub").glob(f"models--{MODEL_ID.replace('/', '--')}/snapshots/*/model.safetensors"))
    blob = weights.resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))  # same size: only the hash can tell
    out = hfhpc("--store", str(store), "check", str(staged))
    assert out.returncode == 1
    assert "model.safetensors: corrupt (sha256 mismatch)" in out.stdout
    assert f"hfhpc stage {staged} --repair" in out.stdout
    fix = hfhpc("--store", str(store), "stage", str(staged), "--repair", env=dict(os.environ, HF_ENDPOINT=hub.url))
    assert fix.returncode == 0, fix.stderr
    again = hfhpc("--store", str(store), "check", str(staged), "--no-probe")
    assert again.returncode == 0, again.stdout


def test_check_reports_a_wrong_split_as_a_spec_problem(staged: Path, store: Path):
    staged.write_text(SPEC.replace("split: train_sft", "split: train"))
    out = hfhpc("--store", str(store), "check", str(staged))
    assert out.returncode == 1
    assert "no split 'train'; the dataset has train_sft, test_sft, train_gen, test_gen" in out.stdout


def test_check_scripts_names_task_only_pipeline_default_and_unstaged_assets(staged: Path, store: Path, tmp_path: Path):
    script = tmp_path / "infer.py"
    script.write_text(
        "from transformers import pipeline\nfrom datasets import load_dataset\n"
        "clf = pipeline('text-classification')\n"
        "data = load_dataset('stanfordnlp/imdb', split='test')\n"
        f"ok = load_dataset('{CHAT_DATASET_ID}', split='test_sft')\n"
    )
    out = hfhpc("--store", str(store), "check", str(script))
    assert out.returncode == 1, out.stdout
    assert f"{script}:3" in out.stdout
    assert "distilbert/distilbert-base-uncased-finetuned-sst-2-english" in out.stdout
    assert f"{script}:4" in out.stdout and "hfhpc stage --dataset stanfordnlp/imdb" in out.stdout
    assert f"{script}:5" not in out.stdout  # staged: fine

    page = tmp_path / "page.py"
    page.write_text(PAGE_SCRIPT)
    ok = hfhpc("--store", str(store), "check", str(page))
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_page_script_runs_unchanged_under_exec(staged: Path, store: Path, tmp_path: Path):
    page = tmp_path / "page.py"
    page.write_text(PAGE_SCRIPT)
    out = hfhpc("--store", str(store), "exec", "--", sys.executable, str(page))
    assert out.returncode == 0, out.stderr
    assert "generated: True" in out.stdout
    assert "embedding dim: 384" in out.stdout
    assert "rows: 64" in out.stdout
    assert "accuracy: 0.5" in out.stdout


def test_sealed_child_refuses_a_live_hub_at_once_but_loads_from_the_store(hub, staged: Path, store: Path, tmp_path: Path):
    script = tmp_path / "reach.py"
    script.write_text(
        "from transformers import AutoTokenizer\n"
        f"AutoTokenizer.from_pretrained('{MODEL_ID}')\n"
        "print('loaded from the store')\n"
        "import urllib.request\n"
        "try:\n"
        f"    urllib.request.urlopen('{hub.url}/api/models/{MODEL_ID}', timeout=30)\n"
        "    print('REACHED THE HUB')\n"
        "except Exception as e:\n"
        "    print('refused by', [c.__name__ for c in type(getattr(e, 'reason', e)).__mro__])\n"
    )
    out = hfhpc("--store", str(store), "exec", "--", sys.executable, str(script))
    assert out.returncode == 0, out.stderr
    assert "loaded from the store" in out.stdout
    assert "REACHED THE HUB" not in out.stdout
    # The guard's own refusal (a ConnectionRefusedError), not a timeout or a failed connection attempt.
    assert "NetworkSealedError" in out.stdout.split("refused by")[1]
    assert "127.0.0.1" in out.stderr and "sealed" in out.stderr

    # Allowed in the spec (a site service): reachable.
    staged.write_text(SPEC + "site: {allow_hosts: ['127.0.0.1']}\n")
    allowed = hfhpc("--store", str(store), "exec", "--spec", str(staged), "--", sys.executable, str(script))
    assert "REACHED THE HUB" in allowed.stdout, allowed.stderr


def test_unsealed_task_only_pipeline_fails_fast_under_exec(store: Path, tmp_path: Path):
    script = tmp_path / "default.py"
    script.write_text("from transformers import pipeline\npipeline('text-classification')\n")
    out = hfhpc("--store", str(store), "exec", "--", sys.executable, str(script))
    assert out.returncode != 0
    assert "distilbert" in out.stderr
    assert "Retrying" not in out.stderr  # never huggingface_hub's retry loop


def test_env_lines_make_a_hand_written_job_work(staged: Path, store: Path, tmp_path: Path):
    page = tmp_path / "page.py"
    page.write_text(PAGE_SCRIPT)
    job = tmp_path / "job.sh"
    job.write_text(f'eval "$(hfhpc --store {store} env --spec {staged})"\npython {page}\n')
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    res = subprocess.run(["bash", str(job)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "rows: 64" in res.stdout


def test_check_names_train_keys_the_trainer_does_not_have(staged: Path, store: Path):
    staged.write_text(SPEC + "train: {warmup_ratio: 0.1, lr_scheduler_type: cosine}\n")
    out = hfhpc("--store", str(store), "check", str(staged))
    assert out.returncode == 1
    assert "not a field of the trainer's config: warmup_ratio" in out.stdout
    assert "lr_scheduler_type" not in out.stdout


def test_check_passes_a_model_whose_repository_ships_files_staging_leaves_out(hub, tmp_path: Path):
    """Real repositories carry onnx/, TensorFlow and Flax weights beside the safetensors; staging
    leaves them out on purpose, so the probe must load what the job loads, not the whole snapshot."""
    from hfhpc.demo.build import ALL_FORMATS_MODEL_ID

    spec = write_spec(tmp_path / "job.yaml", f"""\
name: all-formats
recipe: sft
model: {ALL_FORMATS_MODEL_ID}
dataset: {{id: {CHAT_DATASET_ID}, split: train_sft, max_samples: 16}}
train: {{max_length: 128, max_steps: 2, per_device_batch_size: 4, save_steps: 100}}
launch: {{strategy: single, mixed_precision: "no"}}
resources: {{gpus_per_node: 0, cpus_per_gpu: 1}}
""")
    store = tmp_path / "store"
    out = hfhpc("--store", str(store), "stage", str(spec), env=dict(os.environ, HF_ENDPOINT=hub.url))
    assert out.returncode == 0, out.stderr
    snapshot = next((store / "hub").glob(f"models--{ALL_FORMATS_MODEL_ID.replace('/', '--')}/snapshots/*"))
    assert (snapshot / "model.safetensors").is_file()
    assert not (snapshot / "onnx").exists() and not (snapshot / "tf_model.h5").exists()

    checked = hfhpc("--store", str(store), "check", str(spec))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "ready: 2 assets verified" in checked.stdout

    ran = hfhpc("--store", str(store), "run", str(spec), timeout=600)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert (tmp_path / "runs" / "all-formats" / "model" / "model.safetensors").is_file()


def test_a_load_that_fails_with_every_file_staged_is_not_sent_back_to_stage(tmp_path: Path):
    """Staging again would answer "already staged": the fix must be something that can fix it."""
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "no-such-architecture"}')
    store = tmp_path / "store"
    spec = write_spec(tmp_path / "job.yaml", "name: odd\nrecipe: script\nscript: x.py\nmodel: org/odd\nresources: {gpus_per_node: 0}\n")
    (tmp_path / "x.py").write_text("print('hello')\n")
    out = hfhpc("--store", str(store), "stage", "--model", "org/odd", "--from", str(folder), "--lock", str(tmp_path / "job.lock"))
    assert out.returncode == 0, out.stderr
    checked = hfhpc("--store", str(store), "check", str(spec))
    assert checked.returncode == 1, checked.stdout
    assert "model org/odd: config: fails offline:" in checked.stdout
    assert "hfhpc stage" not in checked.stdout
    assert "not fixed by staging (every locked file is in the store, intact)" in checked.stdout
    assert f"hfhpc --store {store} exec -- python -c" in checked.stdout


def _base_model(dest: Path) -> Path:
    """The tiny chat model without its chat template, as a base model ships."""
    import json

    from hfhpc.demo.build import build_tiny_chat_model

    folder = build_tiny_chat_model(dest)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


def test_sft_on_a_model_without_a_chat_template_fails_check_not_the_queued_job(tmp_path: Path):
    """A base model has no chat template; the sft recipe renders every conversation with one. `check`
    says so on the login node, and the spec's own template clears it."""
    folder = _base_model(tmp_path / "base")
    store = tmp_path / "store"
    spec = write_spec(tmp_path / "job.yaml", SPEC.replace(f"model: {MODEL_ID}", "model: org/base-model"))
    out = hfhpc("--store", str(store), "stage", "--model", "org/base-model", "--from", str(folder),
                "--lock", str(tmp_path / "job.lock"))
    assert out.returncode == 0, out.stderr

    checked = hfhpc("--store", str(store), "check", str(spec))
    assert checked.returncode == 1, checked.stdout
    assert "model org/base-model: chat template: none in its tokenizer files" in checked.stdout
    assert "set train.chat_template in the spec" in checked.stdout

    spec.write_text(spec.read_text() + "train: {chat_template: \"{% for m in messages %}{{ m['content'] }}{% endfor %}\"}\n")
    checked = hfhpc("--store", str(store), "check", str(spec))
    assert "chat template" not in checked.stdout, checked.stdout


def test_dpo_needs_a_chat_template_for_conversation_pairs_only(tmp_path: Path):
    """Preference pairs of messages are rendered with the template; pairs of text are not: `check`
    fails the first on a model without one and passes the second (no false failure)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hfhpc.demo.build import build_preference_dataset

    model = _base_model(tmp_path / "base")
    text = tmp_path / "text-prefs"
    (text / "data").mkdir(parents=True)
    pq.write_table(pa.table({"prompt": ["2 plus 3 is"] * 8, "chosen": [" 5."] * 8, "rejected": [" 6."] * 8}),
                   text / "data" / "train.parquet")
    store = tmp_path / "store"
    lock = str(tmp_path / "job.lock")
    for kind, repo_id, folder in (("--model", "org/base-model", model),
                                  ("--dataset", "org/chat-prefs", build_preference_dataset(tmp_path / "chat-prefs")),
                                  ("--dataset", "org/text-prefs", text)):
        out = hfhpc("--store", str(store), "stage", kind, repo_id, "--from", str(folder), "--lock", lock)
        assert out.returncode == 0, out.stderr

    base = "name: prefs\nrecipe: dpo\nmodel: org/base-model\nresources: {gpus_per_node: 0}\n"
    spec = write_spec(tmp_path / "job.yaml", base + "dataset: {id: org/chat-prefs, split: train_prefs}\n")
    checked = hfhpc("--store", str(store), "check", str(spec))
    assert checked.returncode == 1, checked.stdout
    assert "model org/base-model: chat template: none in its tokenizer files" in checked.stdout

    spec.write_text(base + "dataset: {id: org/text-prefs, split: train}\n")
    checked = hfhpc("--store", str(store), "check", str(spec))
    assert checked.returncode == 0, checked.stdout + checked.stderr
