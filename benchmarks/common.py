"""Shared bits of the benchmarks: where results go and how the machine is named."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """The card when there is one, else the CPU: results always say what they ran on."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except OSError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu}, {os.cpu_count()} cores"


def versions(*names: str) -> dict[str, str | None]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **data}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def spec_overrides(train: list[str], launch: list[str]) -> dict[str, str]:
    """``--train``/``--launch KEY=VALUE`` options as the text a benchmark's spec template takes:
    ``train_extra`` (lines of the ``train:`` block) and ``launch_extra`` (keys of the ``launch:`` mapping)."""
    pairs = lambda items: (x.split("=", 1) for x in items)  # noqa: E731
    return {"train_extra": "".join(f"  {k}: {v}\n" for k, v in pairs(train)),
            "launch_extra": "".join(f", {k}: {v}" for k, v in pairs(launch))}


def stage(store: Path, spec: Path, env: dict) -> None:
    """Stage ``spec`` as a user would, from ``hfhpc serve`` of ``store`` itself standing in for the Hub
    (staging finds every file already there: no second copy of the model)."""
    import sys

    serve = subprocess.Popen([sys.executable, "-m", "hfhpc.cli.main", "--store", str(store), "serve", "--port", "0"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        while not line.startswith("serving"):
            line = serve.stdout.readline()
            if not line:
                raise SystemExit("hfhpc serve did not start")
        endpoint = line.rsplit(" at ", 1)[1].strip()
        subprocess.run([sys.executable, "-m", "hfhpc.cli.main", "stage", "--quiet", str(spec)],
                       env=dict(env, HF_ENDPOINT=endpoint), check=True)
    finally:
        serve.terminate()


def steps_logged(run_dir: Path) -> int:
    try:
        return sum(1 for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line)
    except FileNotFoundError:
        return 0


def kill_tree(pid: int) -> None:
    """End a job and every process under it (the launcher and the ranks each run in their own session)."""
    import signal
    import time

    from hfhpc.launch.node import children

    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += children(p)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(3)  # GPU memory is freed once the ranks are gone


def run_job(spec: Path, root: Path, run_dir: Path, env: dict, *, compile_cache: str = "cold",
            stop_after: int = 0) -> tuple[float, float | None]:
    """``hfhpc run spec`` as a new job on a "fresh node": empty local compile caches (inductor's and
    Triton's) and, ``cold``, nothing compiled in the store either (``store``: the kernels an earlier
    job left there). ``stop_after``: end the job after this many logged steps, without its final save
    (throughput is measured by then). Returns when it started and its wall time (None when stopped)."""
    import shutil
    import sys
    import tempfile
    import time

    shutil.rmtree(run_dir, ignore_errors=True)  # a new job, not a resumed one
    local = Path(tempfile.mkdtemp(prefix="node-", dir=root))
    env = dict(env, TORCHINDUCTOR_CACHE_DIR=str(local / "inductor"), TRITON_CACHE_DIR=str(local / "triton"))
    if compile_cache == "cold":
        shutil.rmtree(root / "store" / "hfhpc" / "compiled", ignore_errors=True)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "hfhpc.cli.main", "run", str(spec)], env=env)
    stopped = False
    while proc.poll() is None:
        time.sleep(1)
        if stop_after and steps_logged(run_dir) >= stop_after:
            kill_tree(proc.pid)
            stopped = True
    wall = time.time() - t0
    if proc.returncode != 0 and not stopped:
        raise SystemExit(f"hfhpc run failed with status {proc.returncode}")
    return t0, None if stopped else wall
