"""The batch script of a submitted job, generated in code from the resolved job file.

The script is meant to be read by the person who submitted it: a header that says what it is and how
to resubmit it, the ``#SBATCH`` request, then one commented section per step (site setup, Python,
offline environment, launch). Every value that comes from the spec or the machine is ``shlex``-quoted
in shell lines; values that go into ``#SBATCH`` lines are validated instead, because SLURM reads
those lines without a shell and nothing can be quoted there.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from hfhpc import __version__
from hfhpc import env as hfenv
from hfhpc.errors import SpecError
from hfhpc.offline.environ import offline_environ
from hfhpc.run.checkpoints import signal_delay_s
from hfhpc.run.jobfile import JobFile
from hfhpc.run.paths import RunDir
from hfhpc.spec import JobSpec

# Values of #SBATCH options we build (account, partition, qos, GPU type): no spaces, quotes or
# newlines, since SLURM takes the rest of the line as is. Commas allow partition lists.
_SBATCH_VALUE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._,:+-]*")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

GUARD_PATH_MODULE = "hfhpc.offline.guard_path"  # prints the guard folder of the Python that runs it


def render_sbatch(job: JobFile, *, python: str | None = None) -> str:
    """The complete batch script for ``job``.

    ``python`` is the interpreter the job uses when no virtualenv is activated (default: the one
    that resolved the job, ``job.python``); a virtualenv it lives in is activated instead.
    """
    python = python or job.python
    env_lines, launcher = _python_environment(job, python)
    sections = [
        _header(job),
        _directives(job),
        ["set -euo pipefail"],
        _preamble(job.spec),
        env_lines,
        _offline_environment(job, launcher),
        _launch(job, launcher),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"


# -- header -----------------------------------------------------------------------------------

def _comment_safe(text: str) -> str:
    """``text`` for a ``#`` comment: a newline in a path must not end the comment."""
    return _CONTROL_RE.sub(lambda m: repr(m.group())[1:-1], text)


def _header(job: JobFile) -> list[str]:
    spec = job.spec
    run_dir = shlex.quote(str(job.run_dir))
    resubmit = f"cd {run_dir} && sbatch {job.paths.sbatch.name}"
    lines = [
        "#!/bin/bash",
        f"# hfhpc job {spec.name!r}, recipe {spec.recipe!r}, written by hfhpc {__version__} on {job.created}",
        f"# spec:    {job.spec_path or '(none)'}",
        f"# run dir: {job.run_dir}",
        "#",
        "# Resubmit exactly this job (the same pinned revisions; it resumes from its last checkpoint):",
        f"#   {resubmit}",
        "# or rebuild it from the spec and its lockfile:",
        f"#   hfhpc submit {shlex.quote(job.spec_path) if job.spec_path else 'SPEC'}",
        "# Follow it with `hfhpc status JOB_ID` and `hfhpc logs -f JOB_ID`.",
    ]
    return [lines[0]] + [_comment_safe(line) for line in lines[1:]]


# -- #SBATCH ----------------------------------------------------------------------------------

def _check_sbatch_value(job: JobFile, key: str, value: str) -> str:
    if not _SBATCH_VALUE_RE.fullmatch(value):
        raise SpecError(job.spec_path or "<spec>", key, f"{value!r} cannot go into an #SBATCH line",
                        "use letters, digits and . _ - + : , only")
    return value


def _check_extra(job: JobFile, index: int, line: str) -> str:
    key = f"resources.extra_sbatch[{index}]"
    if not line.startswith("--"):
        raise SpecError(job.spec_path or "<spec>", key, f"{line!r} is not a long sbatch option",
                        "write options like `--constraint=v100`")
    if _CONTROL_RE.search(line):
        raise SpecError(job.spec_path or "<spec>", key, "contains a newline or control character",
                        "write one option per list item")
    return line


def mem_gb(job: JobFile) -> int:
    """``--mem`` in GB: the spec's ``resources.mem_gb`` (0: the whole node), else the estimate."""
    if job.spec.resources.mem_gb is not None:
        return job.spec.resources.mem_gb
    from hfhpc.plan.host import host_memory_gb

    return host_memory_gb(job.spec, job.store)


def _directives(job: JobFile) -> list[str]:
    res = job.spec.resources
    delay = job.signal_delay_s if job.signal_delay_s is not None else signal_delay_s(job.spec, job.run_dir)
    if delay >= res.time_s:
        raise SpecError(job.spec_path or "<spec>", "launch.signal_delay_s",
                        f"{delay} s is not shorter than resources.time ({res.time})",
                        "lower launch.signal_delay_s or raise resources.time")
    opts = [f"--job-name={job.spec.name}", f"--nodes={res.nodes}", "--ntasks-per-node=1"]
    if res.gpus_per_node and res.gpu_type:
        opts.append(f"--gres=gpu:{_check_sbatch_value(job, 'resources.gpu_type', res.gpu_type)}:{res.gpus_per_node}")
    elif res.gpus_per_node:
        opts.append(f"--gpus-per-node={res.gpus_per_node}")
    opts.append(f"--cpus-per-task={res.cpus_per_gpu * res.procs}")
    # Always --mem: without it the job gets the site's default, often a few GB per core.
    mem = mem_gb(job)
    opts.append(f"--mem={mem}G" if mem else "--mem=0")
    opts.append(f"--time={res.time}")
    for key in ("account", "partition", "qos"):
        value = getattr(res, key)
        if value:
            opts.append(f"--{key}={_check_sbatch_value(job, f'resources.{key}', value)}")
    lines = [
        "# One task per node: the hfhpc node agent, which starts this node's "
        f"{res.procs} process{'es' if res.procs != 1 else ''}.",
        *(f"#SBATCH {o}" for o in opts),
        "# Relative to the run dir, where sbatch is run: SLURM reads #SBATCH lines without a shell,",
        "# so a path with spaces or quotes could not be written here.",
        f"#SBATCH --output={RunDir.SLURM_LOG_PATTERN}",
        f"#SBATCH --error={RunDir.SLURM_LOG_PATTERN}",
        f"# SIGUSR1 to this shell {delay} s before the time limit: the job saves a checkpoint, stops,",
        "# and is requeued; the next allocation resumes from it, appending to the same log.",
        f"#SBATCH --signal=B:USR1@{delay}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
    ]
    if res.extra_sbatch:
        lines.append("# resources.extra_sbatch, verbatim (a later option wins over an earlier one):")
        lines += [f"#SBATCH {_check_extra(job, i, x)}" for i, x in enumerate(res.extra_sbatch)]
    return lines


# -- body -------------------------------------------------------------------------------------

def _unbound_ok(lines: list[str]) -> list[str]:
    """Run ``lines`` with ``set -u`` off: module and activate scripts read unset variables."""
    return ["set +u", *lines, "set -u"]


def _preamble(spec: JobSpec) -> list[str]:
    if not spec.site.preamble:
        return []
    return ["# -- site setup (site.preamble, verbatim) --", *_unbound_ok(list(spec.site.preamble))]


def venv_of(python: str) -> Path | None:
    """The virtualenv ``python`` belongs to, judged by its path (not resolved: a venv's python is
    a link to the base interpreter), or None."""
    root = Path(python).parent.parent
    return root if (root / "pyvenv.cfg").is_file() and (root / "bin" / "activate").is_file() else None


def _python_environment(job: JobFile, python: str) -> tuple[list[str], str]:
    """The lines that make Python available, and the interpreter the launch line then calls."""
    site = job.spec.site
    if site.requirements:
        return _node_local_venv(job), "python"
    if site.venv:
        venv = job.spec.resolve_path(site.venv)
        head = "# -- Python: the virtualenv of site.venv --"
    else:
        venv = venv_of(python)
        head = "# -- Python: the virtualenv hfhpc was submitted from --"
    if venv is None:
        head = f"# -- Python: {python}, called by its path (it belongs to no virtualenv) --"
        return [_comment_safe(head)], shlex.quote(python)
    activate = shlex.quote(str(venv / "bin" / "activate"))
    return [head, *_unbound_ok([f"source {activate}"])], "python"


def _node_local_venv(job: JobFile) -> list[str]:
    """Build the job's virtualenv on every node's local disk from the site's wheels.

    The pattern the Alliance documents for multi-node jobs: Lustre is slow on a venv's many small
    files, node-local disk is fast. ``$SLURM_TMPDIR`` has the same path on every node, so the batch
    shell (on the first node) activates the same path each task then finds on its own node.
    """
    site = job.spec.site
    requirements = shlex.quote(str(job.spec.resolve_path(site.requirements)))
    local = shlex.quote(str(job.spec.resolve_path(site.local_dir))) if site.local_dir else '"${SLURM_TMPDIR:-/tmp}"'
    find_links = ' --find-links "$3"' if site.wheelhouse else ""
    wheelhouse = f" {shlex.quote(str(job.spec.resolve_path(site.wheelhouse)))}" if site.wheelhouse else ""
    return [
        "# -- Python: a virtualenv on each node's local disk, from site.requirements --",
        "# pip installs from the site's wheels only (--no-index): compute nodes have no internet.",
        f'HFHPC_VENV={local}/hfhpc-venv-"$SLURM_JOB_ID"',
        'srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 bash -c \'',
        "  set -euo pipefail",
        '  python3 -m venv "$1"',
        f'  "$1/bin/pip" install --quiet --no-index{find_links} -r "$2"',
        f"' bash \"$HFHPC_VENV\" {requirements}{wheelhouse}",
        *_unbound_ok(['source "$HFHPC_VENV/bin/activate"']),
        "python -c 'import hfhpc' || {",
        f"  echo \"hfhpc: the job's virtualenv lacks hfhpc: add it to \"{requirements} >&2",
        "  exit 1",
        "}",
    ]


def offline_variables(job: JobFile) -> dict[str, str]:
    """The variables the job needs, exactly those :func:`hfhpc.offline.environ.offline_environ` sets
    (its ``PYTHONPATH`` names this installation's guard: the script asks the job's Python instead)."""
    return offline_environ(job.store, base={}, allow_hosts=job.spec.site.allow_hosts)


def _offline_environment(job: JobFile, python: str) -> list[str]:
    removed = (*hfenv.SECRET_VARS, *hfenv.CACHE_OVERRIDES, hfenv.HF_ENDPOINT)
    lines = [
        "# -- offline, sealed environment: the store, no network, no token --",
        "# sbatch copies the submitting shell's environment into the job: drop tokens and caches",
        "# that would point elsewhere. The proxy variables send curl, wget, git and pip to a port",
        "# that refuses at once, except for the allowed hosts.",
        f"unset {' '.join(removed)}",
    ]
    for name, value in offline_variables(job).items():
        if name != "PYTHONPATH":
            lines += hfenv.export_lines({name: value})
    lines += [
        "# The seal's guard, from the Python that runs the job (a folder written here at submit time",
        "# could be gone after an upgrade or a move): first on PYTHONPATH, the site's modules after it.",
        "# The node agent and every recipe refuse to start while HFHPC_SEAL=1 and the guard is not in force.",
        f"HFHPC_GUARD=$({python} -m {GUARD_PATH_MODULE}) || {{",
        "  echo \"hfhpc: the job's Python cannot name hfhpc's seal guard: install hfhpc in it\" >&2",
        "  exit 1",
        "}",
        'export PYTHONPATH="$HFHPC_GUARD${PYTHONPATH:+:$PYTHONPATH}"',
    ]
    return lines


def _launch(job: JobFile, python: str) -> list[str]:
    run_dir = shlex.quote(str(job.run_dir))
    return [
        "# -- launch: the hfhpc node agent, once per node --",
        f"cd {run_dir}",
        'echo "hfhpc: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, restart ${SLURM_RESTART_COUNT:-0}, $(date -Is)"',
        "# srun runs in the background so that this shell can take SLURM's signals (the --signal",
        "# warning goes to this shell only, \"B:\") and pass them on; srun forwards them to every task.",
        "HFHPC_SRUN=''",
        "HFHPC_WARNED=0",
        "trap 'HFHPC_WARNED=1; kill -USR1 \"$HFHPC_SRUN\" 2>/dev/null || true' USR1",
        "trap 'kill -TERM \"$HFHPC_SRUN\" 2>/dev/null || true' TERM",
        "# --cpus-per-task again: srun of SLURM 22.05 does not inherit it from sbatch.",
        'srun --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" \\',
        f"  {python} -m hfhpc.launch.node {run_dir} &",
        "HFHPC_SRUN=$!",
        "# A trapped signal ends `wait` early while srun runs on: wait until srun is gone, then once",
        "# more for its exit status (bash keeps it).",
        'while kill -0 "$HFHPC_SRUN" 2>/dev/null; do wait "$HFHPC_SRUN" || true; done',
        'wait "$HFHPC_SRUN" && HFHPC_STATUS=0 || HFHPC_STATUS=$?',
        "# Exit status 3: the run stopped on the time-limit warning after writing a checkpoint. With",
        "# several nodes srun may report another status (--kill-on-bad-exit ends the other nodes when",
        "# the first exits 3): the checkpoint's marker says whether this allocation stopped cleanly.",
        'if [ "$HFHPC_WARNED" -eq 1 ] && { [ "$HFHPC_STATUS" -eq 3 ] ||',
        f'    {python} -m hfhpc.run.checkpoints stopped {run_dir} --job-id "$SLURM_JOB_ID" --restart "${{SLURM_RESTART_COUNT:-0}}"; }}; then',
        '  echo "hfhpc: checkpoint written before the time limit: requeueing job $SLURM_JOB_ID"',
        '  scontrol requeue "$SLURM_JOB_ID" || echo "hfhpc: requeue refused: resubmit job.sbatch to resume"',
        "  HFHPC_STATUS=3",
        "fi",
        'exit "$HFHPC_STATUS"',
    ]
