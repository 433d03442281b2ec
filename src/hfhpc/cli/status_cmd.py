"""``hfhpc status [JOB]``: a table of submitted jobs, or one job in detail (progress, ETA vs time left)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hfhpc.launch.jobs import JobStatus, Progress

DEFAULT_ROWS = 20


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", nargs="?", metavar="JOB", help="job id or run folder (default: a table of recent jobs)")
    p.add_argument("--all", action="store_true", help=f"every remembered job of this cluster, not the last {DEFAULT_ROWS}")


def run(args: argparse.Namespace) -> int:
    from hfhpc.launch.executor import scheduler
    from hfhpc.launch.jobs import job_status, job_statuses, jobs_file, jobs_of_this_cluster, list_jobs

    executor = scheduler()
    if args.job:
        print("\n".join(detail_lines(job_status(args.job, executor))))
        return 0
    records = list_jobs()
    if not records:
        print(f"no jobs submitted yet (they are remembered in {jobs_file()})")
        return 0
    mine = jobs_of_this_cluster(records, executor)
    if not mine:
        print(f"no jobs submitted to this cluster yet ({len(records)} of other clusters are remembered in {jobs_file()})")
        return 0
    shown = mine if args.all else mine[-DEFAULT_ROWS:]
    print(render_table(job_statuses(shown, executor)))
    if len(mine) < len(records):
        print(f"({len(records) - len(mine)} remembered job(s) of other clusters not shown)")
    return 0


def duration(seconds: float | None) -> str:
    """``H:MM:SS``, or SLURM's ``D-HH:MM:SS`` from a day on."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    return f"{days}-{hours:02}:{minutes:02}:{s:02}" if days else f"{hours}:{minutes:02}:{s:02}"


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _step(p: Progress | None) -> str:
    if p is None:
        return "-"
    return f"{p.step}/{p.max_steps}" if p.max_steps and p.max_steps > 0 else str(p.step)


def render_table(statuses: list[JobStatus]) -> str:
    header = ("JOB", "NAME", "STATE", "TIME/LIMIT", "STEP", "LOSS", "TOK/S", "ETA")
    rows = [header]
    for st in statuses:
        p = st.progress
        eta = duration(st.eta_s) + ("!" if st.allocations_needed else "")
        state = f"{st.state} ({st.reason})" if st.pending_reason else st.state
        rows.append((
            st.job_id or "-", st.name, state, f"{duration(st.elapsed_s)}/{duration(st.time_limit_s)}",
            _step(p), _number(p and p.loss, ".4g"), _number(p and p.tokens_per_s, ",.0f"), eta,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if any(st.allocations_needed for st in statuses):
        lines.append("! the ETA exceeds the time left: `hfhpc status JOB` says how many requeues it needs")
    # Each pending reason once, in words: the codes alone say little.
    waiting: dict[str, list[str]] = {}
    for st in statuses:
        if st.pending_reason:
            waiting.setdefault(st.pending_reason.render(), []).append(st.job_id or "-")
    for text, ids in waiting.items():
        lines.append(f"{', '.join(ids)}: {text}")
    return "\n".join(lines)


def detail_lines(st: JobStatus) -> list[str]:
    where = f" on {st.nodelist}" if st.nodelist else ""
    why = f" ({st.reason})" if st.reason else ""
    restarts = f", restarted {st.restarts}×" if st.restarts else ""
    lines = [f"job {st.job_id or '(not submitted)'}  {st.name}  {st.state}{why}{where}{restarts}"]
    pending = st.pending_reason
    if pending is not None:
        lines.append(f"  waiting:  {pending.meaning}")
        if pending.fix:
            lines.append(f"  to do:    {pending.fix}")
        if pending.never_starts:
            lines.append("  note:     it will not start unless this changes")
    if st.run_dir:
        lines.append(f"  run dir:  {st.run_dir}")
    if st.log_path:
        lines.append(f"  log:      {st.log_path}")
    if st.time_limit_s is not None or st.elapsed_s is not None:
        left = f" ({duration(st.remaining_s)} left)" if st.remaining_s is not None else ""
        lines.append(f"  time:     {duration(st.elapsed_s)} of {duration(st.time_limit_s)}{left}")
    if st.exit_code and not st.active:
        lines.append(f"  exit:     {st.exit_code}")
    lines += _progress_lines(st)
    return lines


def _progress_lines(st: JobStatus) -> list[str]:
    p = st.progress
    if p is None:
        return ["  progress: none logged yet (metrics.jsonl)"]
    parts = [f"step {_step(p)}"]
    if p.max_steps and p.max_steps > 0:
        parts[0] += f" ({100 * p.step / p.max_steps:.0f}%)"
    if p.epoch is not None:
        parts.append(f"epoch {p.epoch:.2f}")
    if p.loss is not None:
        parts.append(f"loss {p.loss:.4g}")
    if p.learning_rate is not None:
        parts.append(f"lr {p.learning_rate:.3g}")
    if p.tokens_per_s is not None:
        parts.append(f"{p.tokens_per_s:,.0f} tokens/s")
    lines = [f"  progress: {', '.join(parts)}"]
    if st.eta_s is not None:
        lines.append(f"  ETA:      {duration(st.eta_s)}")
    more = st.allocations_needed
    if more:
        left = (f"the time limit ({duration(st.time_limit_s)})" if st.state == "PENDING"
                else f"the {duration(st.remaining_s)} left in this allocation")
        lines.append(
            f"  warning:  the ETA exceeds {left}: about {more} more "
            f"allocation{'s' if more > 1 else ''} of {duration(st.time_limit_s)} (the job checkpoints and requeues "
            "itself before each time limit; a longer resources.time needs fewer)"
        )
    return lines
