"""``hfhpc report``: plots and one self-contained HTML page from a real tiny run's files, checked in
headless Chromium; ``eta_report`` against time limits and requeues."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import pytest

from hfhpc.report import build_report, eta_report
from tests.conftest import hfhpc

# metrics.jsonl of the demo SFT run (examples/demo/sft.yaml: 40 steps on CPU), as hfhpc run wrote it.
DEMO_METRICS = """\
{"step": 1, "epoch": 0.0909, "max_steps": 40, "loss": 6.919645309448242, "learning_rate": 0.003, "grad_norm": 2.4271767139434814, "mean_token_accuracy": 0.0, "num_tokens": 2011.0, "elapsed_s": 3.752, "step_s": 3.7521}
{"step": 5, "epoch": 0.4545, "max_steps": 40, "loss": 6.305881977081299, "learning_rate": 0.0027, "grad_norm": 6.652935981750488, "mean_token_accuracy": 0.3983159586787224, "num_tokens": 10046.0, "tokens_per_s": 1168.9, "elapsed_s": 10.626, "step_s": 2.1252}
{"step": 10, "epoch": 0.9091, "max_steps": 40, "loss": 5.467515182495117, "learning_rate": 0.0023250000000000002, "grad_norm": 1.91161048412323, "mean_token_accuracy": 0.5370813965797424, "num_tokens": 20001.0, "tokens_per_s": 1512.2, "elapsed_s": 17.209, "step_s": 1.7209}
{"step": 15, "epoch": 1.3636, "max_steps": 40, "loss": 4.630658340454102, "learning_rate": 0.0019500000000000001, "grad_norm": 1.8757872581481934, "mean_token_accuracy": 0.5896095275878906, "num_tokens": 30082.0, "tokens_per_s": 1072.4, "elapsed_s": 26.61, "step_s": 1.774}
{"step": 20, "epoch": 1.8182, "max_steps": 40, "loss": 4.065326309204101, "learning_rate": 0.001575, "grad_norm": 1.6437370777130127, "mean_token_accuracy": 0.5677468657493592, "num_tokens": 40046.0, "tokens_per_s": 624.7, "elapsed_s": 42.559, "step_s": 2.1279}
{"step": 25, "epoch": 2.2727, "max_steps": 40, "loss": 3.5131900787353514, "learning_rate": 0.0012000000000000001, "grad_norm": 1.646510362625122, "mean_token_accuracy": 0.6107900023460389, "num_tokens": 49974.0, "tokens_per_s": 1005.6, "elapsed_s": 52.431, "step_s": 2.0973}
{"step": 30, "epoch": 2.7273, "max_steps": 40, "loss": 3.1848770141601563, "learning_rate": 0.0008250000000000001, "grad_norm": 1.506365418434143, "mean_token_accuracy": 0.6084567427635192, "num_tokens": 60047.0, "tokens_per_s": 703.5, "elapsed_s": 66.75, "step_s": 2.225}
{"step": 35, "epoch": 3.1818, "max_steps": 40, "loss": 2.9549371719360353, "learning_rate": 0.00045, "grad_norm": 1.423017978668213, "mean_token_accuracy": 0.6156236410140992, "num_tokens": 70135.0, "tokens_per_s": 1134.7, "elapsed_s": 75.64, "step_s": 2.1611}
{"step": 40, "epoch": 3.6364, "max_steps": 40, "loss": 2.8696060180664062, "learning_rate": 7.500000000000001e-05, "grad_norm": 1.449753761291504, "mean_token_accuracy": 0.6020543813705445, "num_tokens": 80076.0, "tokens_per_s": 5914.7, "elapsed_s": 77.321, "step_s": 1.933}
{"step": 40, "epoch": 3.6364, "max_steps": 40, "elapsed_s": 77.362, "step_s": 1.934}
{"step": 40, "epoch": 3.6364, "max_steps": 40, "eval_loss": 2.831112861633301, "eval_mean_token_accuracy": 0.6124397814273834, "elapsed_s": 77.533, "step_s": 1.9383}
"""
DEMO_EVAL = {"eval_loss": 2.831112861633301, "eval_runtime": 0.1678, "eval_samples_per_second": 65.555,
             "eval_steps_per_second": 11.919, "eval_entropy": 5.480621099472046,
             "eval_mean_token_accuracy": 0.6124397814273834, "eval_num_tokens": 80076.0, "epoch": 3.6363636363636362}
# The demo model's config.json (a 205,120-parameter Mistral).
DEMO_CONFIG = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
               "vocab_size": 1024, "tie_word_embeddings": False}
MODEL_ID, MODEL_COMMIT = "hfhpc-demo/tiny-chat-mistral", "49779b2e20e9a2b808b11f48c400216d8cbc66b4"
SBATCH = "#!/bin/bash\n#SBATCH --job-name=demo-sft\n#SBATCH --signal=B:USR1@60\n# <run & 'quote'>\nsrun hfhpc-node\n"

# Plot colours (report.COLORS) as RGB: each must show up in the browser's screenshot.
PLOT_RGB = {"train loss": (0x1F, 0x77, 0xB4), "learning rate": (0x2C, 0xA0, 0x2C), "tokens/s": (0x94, 0x67, 0xBD),
            "MFU": (0xFF, 0x7F, 0x0E)}


def _spec(name: str, time: str = "0-00:10:00", gpus: int = 0) -> dict:
    return {"name": name, "recipe": "sft", "model": {"id": MODEL_ID, "revision": "main", "include": []},
            "dataset": {"id": "hfhpc-demo/ultrachat-tiny", "split": "train_sft", "eval_split": "test_sft"},
            "train": {"max_length": 256, "max_steps": 40, "learning_rate": 0.003, "per_device_batch_size": 8},
            "launch": {"strategy": "single", "mixed_precision": "no"},
            "resources": {"nodes": 1, "gpus_per_node": gpus, "time": time}}


def make_run(folder: Path, *, metrics: str, spec: dict, summary: dict | None = None, eval_: dict | None = None) -> Path:
    """A run folder as hfhpc writes it, with the model's config.json staged in a store beside it."""
    store = folder / "store"
    snap = store / "hub" / f"models--{MODEL_ID.replace('/', '--')}" / "snapshots" / MODEL_COMMIT
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(DEMO_CONFIG))
    run = folder / "runs" / spec["name"]
    (run / "logs").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(metrics)
    job = {"version": 1, "created": "2026-11-25T18:48:00+00:00", "spec_path": str(folder / "sft.yaml"), "spec": spec,
           "assets": [{"kind": "model", "id": MODEL_ID, "revision": "main", "commit": MODEL_COMMIT, "include": [], "files": []}],
           "store": str(store), "run_dir": str(run), "python": "python"}
    (run / "job.json").write_text(json.dumps(job))
    (run / "job.sbatch").write_text(SBATCH)
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    if eval_ is not None:
        (run / "eval.json").write_text(json.dumps(eval_))
    return run


@pytest.fixture
def demo_run(tmp_path: Path) -> Path:
    summary = {"name": "demo-sft", "recipe": "sft", "steps": 40, "train_loss": 4.139343094825745, "train_seconds": 78.79,
               "eval": DEMO_EVAL, "model_dir": "model", "resumed_from": None, "world_size": 1, "assistant_only_loss": True}
    return make_run(tmp_path, metrics=DEMO_METRICS, spec=_spec("demo-sft"), summary=summary, eval_=DEMO_EVAL)


def _ink(png: bytes, rgb: tuple[int, int, int] | None = None, tol: int = 40) -> int:
    """Pixels that are not near-white, or near ``rgb``."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(BytesIO(png)).convert("RGB")).astype(int)
    if rgb is None:
        return int((pixels.min(axis=2) < 235).sum())
    return int((np.abs(pixels - np.array(rgb)).max(axis=2) <= tol).sum())


def test_plots_and_a_self_contained_page(demo_run: Path):
    report = build_report(demo_run)
    assert report.html == demo_run / "report.html"
    assert set(report.plots) == {"loss", "learning_rate", "throughput", "mfu", "grad_norm"}
    for name, path in report.plots.items():
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG") and path.parent == demo_run
        assert _ink(data) > 2000, name  # axes, lines and labels, not a blank canvas
    page = report.html.read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 5
    assert base64.b64decode(images[0]) == report.plots["loss"].read_bytes()
    # Nothing outside the file: no links to images, scripts or style sheets.
    assert not re.search(r"(src|href)=['\"](?!data:)", page)
    assert "2.831" in page and "eval_mean_token_accuracy" in page  # eval.json
    assert "train_loss" in page and "4.13934" in page  # summary.json
    assert "max_length: 256" in page  # the spec
    assert "&lt;run &amp; &#x27;quote&#x27;&gt;" in page  # job.sbatch, escaped
    assert "N = 205,120 from the config.json of hfhpc-demo/tiny-chat-mistral@49779b2e" in page
    assert "this run used CPUs" in page
    assert report.eta is None  # finished runs have no ETA


# metrics.jsonl of a tiny DPO run (the demo's preference pairs, 30 steps on CPU), as hfhpc run wrote it.
DPO_METRICS = """\
{"step": 1, "epoch": 0.0312, "max_steps": 30, "loss": 0.6931471824645996, "grad_norm": 0.9585766196250916, "learning_rate": 0.001, "entropy": 6.9186296463012695, "num_tokens": 375.0, "mean_token_accuracy": 0.0, "rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/accuracies": 0.0, "rewards/margins": 0.0, "logps/chosen": -63.053157806396484, "logps/rejected": -74.46736907958984, "elapsed_s": 4.128, "unix_time": 1796323350.284, "step_s": 4.1283}
{"step": 5, "epoch": 0.1562, "max_steps": 30, "loss": 0.5792500972747803, "grad_norm": 1.0977510213851929, "learning_rate": 0.0008666666666666667, "entropy": 6.918408513069153, "num_tokens": 1913.0, "mean_token_accuracy": 0.06777895800769329, "rewards/chosen": 0.06263413652777672, "rewards/rejected": -0.19694865122437477, "rewards/accuracies": 0.84375, "rewards/margins": 0.2595827914774418, "logps/chosen": -65.96728038787842, "logps/rejected": -83.56002235412598, "tokens_per_s": 151.4, "elapsed_s": 14.29, "unix_time": 1796323360.446, "step_s": 2.858}
{"step": 10, "epoch": 0.3125, "max_steps": 30, "loss": 0.45406246185302734, "grad_norm": 0.7449762225151062, "learning_rate": 0.0007, "entropy": 6.917931842803955, "num_tokens": 3788.0, "mean_token_accuracy": 0.24310339093208314, "rewards/chosen": 0.18395306468009948, "rewards/rejected": -0.43861755132675173, "rewards/accuracies": 0.95, "rewards/margins": 0.6225706100463867, "logps/chosen": -60.84351501464844, "logps/rejected": -82.4676010131836, "tokens_per_s": 90.4, "elapsed_s": 35.028, "unix_time": 1796323381.183, "step_s": 3.5028}
{"step": 30, "epoch": 0.9375, "max_steps": 30, "eval_loss": 0.2531411349773407, "eval_runtime": 26.6735, "eval_samples_per_second": 2.399, "eval_steps_per_second": 0.3, "eval_entropy": 6.914209604263306, "eval_num_tokens": 11175.0, "eval_logits/chosen": -0.110308867224419, "eval_logits/rejected": 0.057579248200791834, "eval_mean_token_accuracy": 0.4345388673245907, "eval_rewards/chosen": 0.6238228306174278, "eval_rewards/rejected": -0.8300249874591827, "eval_rewards/accuracies": 0.96875, "eval_rewards/margins": 1.45384781062603, "eval_logps/chosen": -55.994601249694824, "eval_logps/rejected": -85.5152587890625, "elapsed_s": 143.223, "unix_time": 1796323489.378, "step_s": 4.7741}
"""


def test_a_dpo_run_gets_reward_and_reward_accuracy_plots(tmp_path: Path):
    spec = {**_spec("tiny-dpo"), "recipe": "dpo",
            "dataset": {"id": "hfhpc-demo/ultrafeedback-tiny", "split": "train_prefs", "eval_split": "test_prefs"}}
    run = make_run(tmp_path, metrics=DPO_METRICS, spec=spec, eval_={"eval_rewards/accuracies": 0.96875, "pairs": 64})
    report = build_report(run)
    assert {"rewards", "reward_accuracy"} <= set(report.plots)
    # The chosen rewards' line (green), the train accuracy's (blue).
    for name, rgb in (("rewards", (0x2C, 0xA0, 0x2C)), ("reward_accuracy", (0x1F, 0x77, 0xB4))):
        data = report.plots[name].read_bytes()
        assert _ink(data) > 2000 and _ink(data, rgb) > 50, name
    page = report.html.read_text()
    assert "eval reward accuracy" in page and "0.969" in page
    assert len(re.findall(r"src='data:image/png;base64,", page)) == len(report.plots)


def test_an_sft_run_gets_no_reward_plots(demo_run: Path):
    assert not {"rewards", "reward_accuracy"} & set(build_report(demo_run).plots)


def test_cli_writes_elsewhere_with_o(demo_run: Path, tmp_path: Path):
    out = hfhpc("report", str(demo_run), "-o", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out" / "report.html").is_file() and (tmp_path / "out" / "mfu.png").is_file()
    assert not (demo_run / "report.html").exists()
    assert f"report: {tmp_path / 'out' / 'report.html'}" in out.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = hfhpc("report", str(empty))
    assert bad.returncode == 1 and "neither metrics.jsonl nor summary.json" in bad.stderr


def test_report_imports_no_ml_library(demo_run: Path):
    heavy = ("torch", "transformers", "trl", "accelerate", "datasets", "evaluate", "peft")
    code = ("import sys; from hfhpc.cli.main import main; rc = main(sys.argv[1:]); "
            f"print('HEAVY', [m for m in {heavy!r} if m in sys.modules]); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, "report", str(demo_run)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


def test_mfu_without_a_reachable_model_config_says_so(demo_run: Path):
    shutil.rmtree(demo_run.parent.parent / "store")
    report = build_report(demo_run)
    assert "MFU not computed: the model&#x27;s config.json is not reachable from here" in report.html.read_text()


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium, installed quietly when absent (as root)."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip("chromium is not installed and installing it needs root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:  # stale package lists on a fresh machine
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env)
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    found = shutil.which("chromium")
    assert found, "apt-get installed chromium but it is not on PATH"
    return found


def test_page_renders_with_every_plot_in_headless_chromium(demo_run: Path, chromium: str, tmp_path: Path):
    report = build_report(demo_run)
    shot = tmp_path / "shot.png"
    # Only the page travels: prove it renders without the PNG files next to it.
    page = tmp_path / "alone" / "report.html"
    page.parent.mkdir()
    shutil.copy(report.html, page)
    out = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, HOME=str(tmp_path)),
    )
    assert out.returncode == 0 and shot.is_file(), out.stderr[-2000:]
    png = shot.read_bytes()
    from PIL import Image

    assert Image.open(BytesIO(png)).size == (1280, 2000)
    assert _ink(png) > 40_000  # text, table rules and plots: a blank page has none
    for name, rgb in PLOT_RGB.items():
        assert _ink(png, rgb) > 150, f"no {name} line in the screenshot"


# -- ETA against the time limit -----------------------------------------------------------------

def _metrics(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_eta_of_a_requeued_run_that_needs_more_allocations(tmp_path: Path):
    # 1,000 steps at 6 s each; the second allocation has trained 100 steps since its resume at 300.
    rows = [{"step": s, "max_steps": 1000, "loss": 3.0, "learning_rate": 1e-4, "tokens_per_s": 500.0,
             "elapsed_s": 6.0 * s, "step_s": 6.0} for s in (100, 200, 300)]
    rows += [{"step": 300 + s, "max_steps": 1000, "loss": 2.5, "learning_rate": 1e-4, "tokens_per_s": 500.0,
              "elapsed_s": 6.0 * s, "step_s": 6.0} for s in (50, 100)]
    run = make_run(tmp_path, metrics=_metrics(rows), spec=_spec("long", time="0-01:00:00", gpus=1))
    # The batch script's own warning time counts (here the GPU default); without a script, the spec's.
    sbatch = run / "job.sbatch"
    sbatch.write_text(sbatch.read_text().replace("USR1@60", "USR1@300"))
    eta = eta_report(run, 3600)
    # 600 steps × 6 s = 3,600 s left; this allocation used 600 s and stops 300 s before its limit
    # (the sbatch default for GPU jobs): 2,700 s left in it; then 3,600 - 300 - 300 (restart) = 3,000 s
    # of training per allocation: ceil((3,600 - 2,700) / 3,000) = 1 more.
    assert eta.remaining_s == 3600 and eta.time_left_s == 2700
    assert eta.finishes_in_allocation is False and eta.requeues == 1
    assert "The run will not finish in this allocation: about 1 more allocation" in eta.warning
    # SLURM's own clock (with start-up) wins over the logged one: 1,500 s used leaves 1,800.
    assert eta_report(run, 3600, elapsed_s=1500).time_left_s == 1800
    assert eta_report(run, 3600 * 4).requeues == 0 and eta_report(run, 3600 * 4).warning is None
    # A 10-minute limit trains 0 s per allocation after start-up and the warning margin.
    assert "leaves no time to train" in eta_report(run, 600, signal_delay_s=300).warning
    sbatch.unlink()
    assert eta_report(run, 3600).time_left_s == 2700  # from the spec: 300 s on GPUs


def test_report_of_an_unfinished_run_shows_the_eta_and_requeues(tmp_path: Path):
    rows = [{"step": s, "max_steps": 1000, "loss": 3.0 - s / 1000, "learning_rate": 1e-4, "tokens_per_s": 500.0,
             "elapsed_s": 6.0 * s, "step_s": 6.0} for s in (100, 200, 300)]
    rows += [{"step": 300 + s, "max_steps": 1000, "loss": 2.6, "learning_rate": 1e-4, "tokens_per_s": 480.0,
              "elapsed_s": 6.0 * s, "step_s": 6.0} for s in (50, 100)]
    run = make_run(tmp_path, metrics=_metrics(rows), spec=_spec("long", time="0-01:00:00", gpus=1))
    report = build_report(run)
    page = report.html.read_text()
    assert report.eta is not None and report.eta.requeues == 1
    assert "<h2>Time</h2>" in page and "1:00:00 of training left" in page and "class='warn'" in page
    assert "running or stopped" in page


def test_eta_without_progress_or_max_steps(tmp_path: Path):
    run = make_run(tmp_path, metrics="", spec=_spec("new"))
    eta = eta_report(run, 3600)
    assert eta.step == 0 and eta.remaining_s is None and eta.requeues is None
    assert "no ETA" in eta.render()
