"""``hfhpc report RUN_DIR``: plots of a run and one self-contained HTML page; the ETA of a run.

The page embeds its plots as base64 data URIs, so ``report.html`` alone can be copied off the
cluster and opened anywhere. Everything comes from the run folder's files (``metrics.jsonl``,
``summary.json``, ``eval.json``, ``job.json``, ``job.sbatch``) and, for MFU, the model's staged
``config.json``; torch is never imported, matplotlib draws with its Agg backend.

MFU per GPU = tokens/s per GPU × FLOPs per token / the card's dense bf16 peak, with FLOPs per token
= 6·N + 12·L·h·s (the seed bench's formula: forward and backward matmuls plus attention scores, not
halved for causality; 4·N with LoRA, whose frozen weights get no weight gradients), N and the shape
from the run's model config, s = ``train.max_length``, and the peak of ``resources.gpu_type``
(989 TFLOP/s, an H100's, when it is not set).
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hfhpc.errors import HfhpcError
from hfhpc.run.paths import RunDir
from hfhpc.run.progress import DEFAULT_RESTART_S, allocations_left, read_metrics, read_progress

if TYPE_CHECKING:
    from hfhpc.run.jobfile import JobFile
    from hfhpc.spec import JobSpec


# -- reading a run -------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunData:
    run_dir: Path
    rows: list[dict]
    summary: dict | None
    eval: dict | None
    job: JobFile | None
    sbatch: str | None

    @property
    def spec(self) -> JobSpec | None:
        return self.job.spec if self.job else None

    @property
    def name(self) -> str:
        return str((self.summary or {}).get("name") or (self.spec.name if self.spec else None) or self.run_dir.name)

    @property
    def finished(self) -> bool:
        return self.summary is not None


def _json_file(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_run(run_dir: Path) -> RunData:
    from hfhpc.run.jobfile import load_job

    paths = RunDir(Path(run_dir).absolute())
    if not paths.root.is_dir():
        raise HfhpcError(f"{paths.root} is not a folder", "give a run folder (a spec's output_dir)")
    rows = read_metrics(paths.root)
    summary = _json_file(paths.summary)
    if not rows and summary is None:
        raise HfhpcError(f"{paths.root} has neither {paths.METRICS} nor {paths.SUMMARY}",
                         "give the run folder of a job that has started training (`hfhpc status` lists them)")
    try:
        sbatch: str | None = paths.sbatch.read_text()
    except OSError:
        sbatch = None
    try:
        job: JobFile | None = load_job(paths.root)
    except HfhpcError:
        job = None  # a run folder copied without its job file still has plots
    return RunData(paths.root, rows, summary, _json_file(paths.eval), job, sbatch)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def series(rows: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that carry ``key``."""
    xs, ys = [], []
    for r in rows:
        v = _num(r.get(key))
        if v is not None:
            xs.append(float(r["step"]))
            ys.append(v)
    return xs, ys


def restart_steps(rows: Sequence[dict]) -> list[float]:
    """Steps at which a new allocation began: ``elapsed_s`` restarts from zero after a requeue."""
    out, last = [], None
    for r in rows:
        e = _num(r.get("elapsed_s"))
        if e is not None and last is not None and e < last:
            out.append(float(r["step"]))
        if e is not None:
            last = e
    return out


# -- MFU --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MfuBasis:
    flops_per_token: float
    peak_flops: float
    world: int
    explanation: str


def model_config_path(run: RunData) -> tuple[Path | None, str]:
    """The config.json of the run's model: the staged snapshot job.json names, else ``model/``."""
    from hfhpc.store.layout import snapshot_dir

    job = run.job
    if job is not None and job.spec.model is not None and job.model_commit:
        try:  # a model of LoRA adapters has its base's config
            model_id, commit = (job.model_bases or [(job.spec.model.id, job.model_commit)])[-1]
        except ValueError:
            model_id, commit = job.spec.model.id, job.model_commit
        path = snapshot_dir(job.store, "model", model_id, commit) / "config.json"
        if path.is_file():
            return path, f"config.json of {model_id}@{commit[:8]}"
    final = RunDir(run.run_dir).model / "config.json"
    if final.is_file():
        return final, "config.json of the run's final model"
    return None, "the model's config.json is not reachable from here"


def mfu_basis(run: RunData) -> tuple[MfuBasis | None, str]:
    """How tokens/s turn into MFU for this run, or None and why not."""
    from hfhpc.plan import GPUS, ModelShape, gpu_kind_of, read_model_config

    path, where = model_config_path(run)
    if path is None:
        return None, f"MFU not computed: {where}"
    try:
        shape = ModelShape.from_config(read_model_config(path), str(path))
    except HfhpcError as e:
        return None, f"MFU not computed: {e.message}"
    if run.spec is None:
        return None, f"MFU not computed: no readable {RunDir.JOB}"
    train, res = run.spec.train, run.spec.resources
    seq = int(train.max_length or 1024)
    lora = train.lora is not None
    world = int((run.summary or {}).get("world_size") or 0) or res.nodes * res.procs
    kind = GPUS.get(gpu_kind_of(res.gpu_type or "") or "h100")
    assert kind is not None
    flops = shape.flops_per_token(seq, trainable_weights=not lora)
    n = f"{shape.params / 1e9:.2f}B" if shape.params >= 1e8 else f"{shape.params:,}"
    text = (f"MFU = tokens/s per GPU × ({'4' if lora else '6'}·N + 12·L·h·s) / {kind.bf16_tflops:.0f} TFLOP/s "
            f"({kind.label} bf16 dense); N = {n} from the {where}, L = {shape.layers}, h = {shape.hidden}, s = {seq}, "
            f"{world} GPU{'s' if world > 1 else ''}")
    if not res.gpus_per_node:
        text += "; this run used CPUs: shown against the GPU peak for scale only"
    return MfuBasis(flops, kind.bf16_tflops * 1e12, world, text), text


# -- plots --------------------------------------------------------------------------------------------

COLORS = {"train": "#1f77b4", "eval": "#d62728", "lr": "#2ca02c", "tps": "#9467bd", "mfu": "#ff7f0e", "grad": "#8c564b",
          "chosen": "#2ca02c", "rejected": "#d62728", "margin": "#1f77b4"}


def _figure(title: str, ylabel: str):
    try:
        import matplotlib
    except ImportError:
        raise HfhpcError("the report's plots need matplotlib",
                         "pip install matplotlib (it is in hfhpc's `train` extra)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 3.6), dpi=110)
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def _finish(fig, ax, path: Path, restarts: Sequence[float], note: str | None = None) -> Path:
    import matplotlib.pyplot as plt

    for k, step in enumerate(restarts):
        ax.axvline(step, color="grey", linestyle=":", linewidth=1, label="resumed (requeue or rerun)" if k == 0 else None)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=False, fontsize=9)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="#555555", wrap=True, va="bottom")
        fig.tight_layout(rect=(0, 0.1, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _train_and_eval(ax, rows: Sequence[dict], key: str) -> bool:
    """``key`` as logged in training (a line) and its ``eval_`` twin (dashed, square markers); whether
    either had a value."""
    xs, ys = series(rows, key)
    ex, ey = series(rows, f"eval_{key}")
    if xs:
        ax.plot(xs, ys, color=COLORS["train"], marker="o", markersize=3, linewidth=1.5, label="train")
    if ex:
        ax.plot(ex, ey, color=COLORS["eval"], marker="s", markersize=6, linestyle="--", linewidth=1.2, label="eval")
    return bool(xs or ex)


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#777777", wrap=True)


def render_plots(run: RunData, out_dir: Path) -> dict[str, Path]:
    """The :data:`~hfhpc.run.paths.PLOTS`, one PNG each: loss, learning rate, throughput, MFU (the
    gradient norm when logged; rewards and reward accuracy for preference tuning)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, restarts = run.rows, restart_steps(run.rows)
    plots: dict[str, Path] = {}

    fig, ax = _figure("Loss", "loss")
    if not _train_and_eval(ax, rows, "loss"):
        _empty(ax, "no loss logged yet")
    plots["loss"] = _finish(fig, ax, RunDir.plot(out_dir, "loss"), restarts)

    fig, ax = _figure("Learning rate", "learning rate")
    xs, ys = series(rows, "learning_rate")
    if xs:
        ax.plot(xs, ys, color=COLORS["lr"], linewidth=1.5)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    else:
        _empty(ax, "no learning rate logged")
    plots["learning_rate"] = _finish(fig, ax, RunDir.plot(out_dir, "learning_rate"), restarts)

    fig, ax = _figure("Throughput (all GPUs)", "tokens / s")
    xs, ys = series(rows, "tokens_per_s")
    if xs:
        ax.plot(xs, ys, color=COLORS["tps"], marker="o", markersize=3, linewidth=1.5)
        ax.axhline(statistics.median(ys), color=COLORS["tps"], alpha=0.4, linestyle="--",
                   label=f"median {statistics.median(ys):,.0f}")
        ax.set_ylim(bottom=0)
    else:
        _empty(ax, "no tokens/s logged (it needs num_tokens from TRL)")
    plots["throughput"] = _finish(fig, ax, RunDir.plot(out_dir, "throughput"), restarts)

    basis, why = mfu_basis(run)
    fig, ax = _figure("Model FLOPs utilisation per GPU", "MFU (%)")
    if basis is not None and xs:
        mfu = [100 * y / basis.world * basis.flops_per_token / basis.peak_flops for y in ys]
        ax.plot(xs, mfu, color=COLORS["mfu"], marker="o", markersize=3, linewidth=1.5)
        ax.set_ylim(bottom=0)
    else:
        _empty(ax, why if basis is None else "no tokens/s logged")
    plots["mfu"] = _finish(fig, ax, RunDir.plot(out_dir, "mfu"), restarts, note=why)

    gx, gy = series(rows, "grad_norm")
    if gx:
        fig, ax = _figure("Gradient norm (before clipping)", "grad norm")
        ax.plot(gx, gy, color=COLORS["grad"], linewidth=1.2)
        plots["grad_norm"] = _finish(fig, ax, RunDir.plot(out_dir, "grad_norm"), restarts)
    plots.update(_reward_plots(rows, out_dir, restarts))
    return plots


def _reward_plots(rows: Sequence[dict], out_dir: Path, restarts: Sequence[float]) -> dict[str, Path]:
    """A DPO run's implicit rewards (β · log-ratio against the reference) and how often the chosen
    answer's reward is the higher one; nothing for runs that log no rewards."""
    plots: dict[str, Path] = {}
    if not series(rows, "rewards/chosen")[0]:
        return plots
    fig, ax = _figure("Rewards (β · log-ratio to the reference)", "reward")
    for key, label in (("chosen", "chosen"), ("rejected", "rejected"), ("margin", "margin (chosen − rejected)")):
        xs, ys = series(rows, f"rewards/{key}s" if key == "margin" else f"rewards/{key}")
        if xs:
            ax.plot(xs, ys, color=COLORS[key], marker="o", markersize=3, linewidth=1.5, label=label)
    ax.axhline(0, color="#999999", linewidth=0.8)
    plots["rewards"] = _finish(fig, ax, RunDir.plot(out_dir, "rewards"), restarts)

    fig, ax = _figure("Reward accuracy (chosen above rejected)", "share of pairs")
    _train_and_eval(ax, rows, "rewards/accuracies")
    ax.axhline(0.5, color="#999999", linestyle=":", linewidth=1.0, label="chance")
    ax.set_ylim(-0.02, 1.02)
    plots["reward_accuracy"] = _finish(fig, ax, RunDir.plot(out_dir, "reward_accuracy"), restarts)
    return plots


# -- ETA ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EtaReport:
    """Where a run stands against its allocations."""

    step: int
    max_steps: int | None
    seconds_per_step: float | None
    remaining_s: float | None  # training time left
    elapsed_s: float | None  # time used in the current allocation
    time_left_s: float | None  # in the current allocation, before SLURM's warning signal
    finishes_in_allocation: bool | None
    requeues: int | None  # further allocations needed after this one
    warning: str | None

    def render(self) -> str:
        def hms(s: float | None) -> str:
            if s is None:
                return "?"
            s = int(round(s))
            return f"{s // 3600}:{s % 3600 // 60:02}:{s % 60:02}"

        if self.remaining_s is None:
            return f"step {self.step}: no ETA (max_steps unknown or no step timing logged yet)"
        text = f"step {self.step}/{self.max_steps}: {hms(self.remaining_s)} of training left"
        if self.time_left_s is not None:
            text += f", {hms(self.time_left_s)} left in this allocation"
        return text + (f". {self.warning}" if self.warning else "")


def eta_report(run_dir: Path, time_limit_s: float, *, elapsed_s: float | None = None,
               signal_delay_s: float | None = None, restart_s: float = DEFAULT_RESTART_S) -> EtaReport:
    """The ETA of the run in ``run_dir`` against a SLURM time limit of ``time_limit_s`` per allocation.

    ``elapsed_s`` is the time used in the current allocation (SLURM's RunTime; default: the last
    logged ``elapsed_s``, which starts when training starts). The job stops ``signal_delay_s`` before
    each limit to checkpoint (default: what its job file records), and every further allocation
    spends ``restart_s`` loading before it trains again: :func:`hfhpc.run.progress.allocations_left`,
    the same forecast as ``hfhpc status``'s.
    """
    from hfhpc.run.jobfile import warning_s_of

    progress = read_progress(Path(run_dir))
    if progress is None:
        return EtaReport(0, None, None, None, elapsed_s, None, None, None, None)
    if signal_delay_s is None:
        signal_delay_s = warning_s_of(Path(run_dir))
    used = elapsed_s if elapsed_s is not None else progress.elapsed_s
    remaining = progress.eta_s
    base = (progress.step, progress.max_steps, progress.seconds_per_step, remaining, used)
    if remaining is None or not time_limit_s:
        left = max(0.0, time_limit_s - (used or 0.0) - signal_delay_s) if time_limit_s else None
        return EtaReport(*base, left, None, None, None)
    found = allocations_left(remaining, time_limit_s=time_limit_s, used_s=used or 0.0,
                             signal_delay_s=signal_delay_s, restart_s=restart_s)
    if found.more == 0:
        return EtaReport(*base, found.time_left_s, True, 0, None)
    if found.more is None:
        warning = (f"The time limit ({time_limit_s:.0f} s) leaves no time to train after a requeue: "
                   "raise resources.time")
        return EtaReport(*base, found.time_left_s, False, None, warning)
    n = found.more
    warning = (f"The run will not finish in this allocation: about {n} more allocation"
               f"{'s' if n > 1 else ''} (requeue{'s' if n > 1 else ''}) of {time_limit_s / 3600:.1f} h; "
               "the job checkpoints and requeues itself before each limit, and a longer resources.time needs fewer")
    return EtaReport(*base, found.time_left_s, False, n, warning)


# -- HTML ----------------------------------------------------------------------------------------------

CSS = """
body { font: 15px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #1d2330;
       margin: 0; background: #f5f6f8; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 10px; }
.sub { color: #5b6476; margin-bottom: 18px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 12px; }
.card { background: #fff; border-radius: 8px; padding: 12px 14px; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
.card .k { color: #5b6476; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 22px; font-weight: 600; margin-top: 2px; }
.plots { display: grid; grid-template-columns: 1fr 1fr; gap: 14px; }
.plots figure { margin: 0; background: #fff; border-radius: 8px; padding: 8px; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
.plots img { width: 100%; display: block; }
table { border-collapse: collapse; background: #fff; border-radius: 8px; overflow: hidden;
        box-shadow: 0 1px 2px rgba(0,0,0,.08); min-width: 420px; }
td, th { padding: 6px 12px; border-bottom: 1px solid #eceef2; text-align: left; vertical-align: top; }
td.num { font-variant-numeric: tabular-nums; }
pre { background: #fff; border-radius: 8px; padding: 12px 14px; overflow-x: auto; font-size: 12.5px;
      box-shadow: 0 1px 2px rgba(0,0,0,.08); }
.warn { background: #fff4e5; border-left: 4px solid #f0a020; padding: 10px 14px; border-radius: 4px; }
.muted { color: #5b6476; font-size: 13px; }
"""


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:,.6g}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _table(data: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td class='num'>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in data.items())
    return f"<table>{rows}</table>"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _cards(run: RunData, basis: MfuBasis | None) -> list[tuple[str, str]]:
    rows, summary = run.rows, run.summary or {}
    cards = []
    last = rows[-1] if rows else {}
    max_steps = _num(last.get("max_steps"))
    steps = summary.get("steps", last.get("step"))
    if steps is not None:
        cards.append(("steps", f"{int(steps):,}" + (f" / {int(max_steps):,}" if max_steps and max_steps > 0 else "")))
    _, losses = series(rows, "loss")
    if losses:
        cards.append(("last train loss", f"{losses[-1]:.4g}"))
    _, evals = series(rows, "eval_loss")
    ev = (run.eval or {}).get("eval_loss", evals[-1] if evals else None)
    if _num(ev) is not None:
        cards.append(("eval loss", f"{ev:.4g}"))
    _, accuracy = series(rows, "eval_rewards/accuracies")
    acc = (run.eval or {}).get("eval_rewards/accuracies", accuracy[-1] if accuracy else None)
    if _num(acc) is not None:
        cards.append(("eval reward accuracy", f"{acc:.3f}"))
    _, tps = series(rows, "tokens_per_s")
    if tps:
        med = statistics.median(tps)
        cards.append(("tokens/s (median)", f"{med:,.0f}"))
        if basis is not None:
            cards.append(("MFU per GPU (median)", f"{100 * med / basis.world * basis.flops_per_token / basis.peak_flops:.3g}%"))
    if _num(summary.get("train_seconds")) is not None:
        cards.append(("train time", f"{summary['train_seconds'] / 60:.1f} min"))
    cards.append(("state", "finished" if run.finished else "running or stopped"))
    return cards


def render_html(run: RunData, plots: dict[str, Path], *, eta: EtaReport | None = None) -> str:
    """One self-contained page: the numbers, the plots (embedded), eval, the spec and the script."""
    import yaml

    basis, why = mfu_basis(run)
    spec, job = run.spec, run.job
    model = spec.model.id if spec and spec.model else "?"
    dataset = spec.dataset.id if spec and spec.dataset else None
    created = job.created if job else ""
    sub = " · ".join(html.escape(x) for x in [spec.recipe if spec else "", model, dataset or "", str(run.run_dir), created] if x)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(run.name)} · hfhpc report</title><style>{CSS}</style></head><body><main>",
        f"<h1>{html.escape(run.name)}</h1><div class='sub'>{sub}</div>",
        "<div class='cards'>" + "".join(
            f"<div class='card'><div class='k'>{html.escape(k)}</div><div class='v'>{html.escape(v)}</div></div>"
            for k, v in _cards(run, basis)) + "</div>",
    ]
    if eta is not None and eta.remaining_s is not None:
        cls = "warn" if eta.warning else "muted"
        parts.append(f"<h2>Time</h2><p class='{cls}'>{html.escape(eta.render())}</p>")
    titles = {"loss": "Train and eval loss", "learning_rate": "Learning rate", "throughput": "Tokens per second",
              "mfu": "MFU", "grad_norm": "Gradient norm", "rewards": "Rewards", "reward_accuracy": "Reward accuracy"}
    parts.append("<h2>Training</h2><div class='plots'>" + "".join(
        f"<figure><img alt='{html.escape(titles.get(k, k))}' src='{_data_uri(p)}'></figure>" for k, p in plots.items())
        + "</div>")
    parts.append(f"<p class='muted'>{html.escape(why)}</p>")
    if run.summary:
        flat = {k: v for k, v in run.summary.items() if k != "eval"}
        parts.append("<h2>Summary</h2>" + _table(flat))
    if run.eval:
        parts.append("<h2>Evaluation (eval.json)</h2>" + _table(run.eval))
    if job is not None:
        source = job.spec_path
        note = f"<p class='muted'>as resolved in {RunDir.JOB}{' from ' + html.escape(source) if source else ''}</p>"
        dumped = yaml.safe_dump(job.spec.model_dump(mode="json"), sort_keys=False)
        parts.append("<h2>Spec</h2>" + note + f"<pre>{html.escape(dumped)}</pre>")
        if job.assets:
            parts.append(_table({f"{a.kind} {a.id}": f"{a.revision} → {a.commit}" for a in job.assets}))
    if run.sbatch:
        parts.append(f"<h2>{RunDir.SBATCH}</h2><pre>{html.escape(run.sbatch)}</pre>")
    parts.append("<p class='muted'>written by hfhpc report</p></main></body></html>")
    return "\n".join(parts)


@dataclass(frozen=True)
class Report:
    html: Path
    plots: dict[str, Path]
    eta: EtaReport | None


def build_report(run_dir: Path, out_dir: Path | None = None) -> Report:
    """Write the PNG plots and ``report.html`` of ``run_dir`` into ``out_dir`` (default: the run folder)."""
    from hfhpc.atomic import atomic_write_text

    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.run_dir
    plots = render_plots(run, out)
    eta = None
    if not run.finished and run.spec is not None:
        eta = eta_report(run.run_dir, run.spec.resources.time_s)
    page = RunDir(out).report
    atomic_write_text(page, render_html(run, plots, eta=eta))
    return Report(page, plots, eta)
