"""The per-node entry point: ``python -m hfhpc.launch.node RUN_DIR [--local]``.

One runs on every node of a job (``srun --ntasks-per-node=1``), or once for ``hfhpc run``. It works
out what hand-written scripts get wrong: the machine rank and the head node (from the job environment,
:mod:`hfhpc.scheduler.environment`, which it hands on to the ranks), a rendezvous port derived from the
job id and checked free, the total process count. It copies the job's assets to node-local disk, then starts the ranks: ``accelerate
launch`` on GPUs, ``torchrun`` for CPU ranks (``accelerate launch --cpu`` starts one process only),
or the process itself when the job has one rank. Signals are forwarded to every rank, and the ranks'
exit status is the node's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hfhpc import env as hfenv
from hfhpc.offline.environ import offline_environ
from hfhpc.run.jobfile import JobFile, load_job
from hfhpc.scheduler.environment import LOOPBACK, JobEnvironment, without_handed_down
from hfhpc import registry
from hfhpc.atomic import atomic_write_text
from hfhpc.spec import JobSpec

FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PORT_BASE, PORT_SPAN = 20000, 20000


@dataclass(frozen=True)
class Topology:
    nodes: int
    node_rank: int
    procs_per_node: int
    head: str
    job_id: str | None
    restart: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


def topology(job: JobFile, jobenv: JobEnvironment, *, local: bool) -> Topology:
    procs = job.spec.resources.procs
    if local or not jobenv.in_job:
        return Topology(1, 0, procs, LOOPBACK, None, 0)
    return Topology(
        nodes=jobenv.num_nodes,
        node_rank=jobenv.node_rank,
        procs_per_node=procs,
        head=jobenv.head,
        job_id=jobenv.job_id,
        restart=jobenv.restart_count,
    )


def _port_free(port: int, host: str = "") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous_port(job: JobFile, topo: Topology, *, timeout_s: float = 600) -> int:
    """The head node picks the port and publishes it in the run folder; the other nodes read it.

    Derived from the job id, so two jobs on one node do not both take 29500; checked free on the
    head, moving up until one is. Only the head can check, hence the shared file.
    """
    if job.spec.launch.port:
        return job.spec.launch.port
    if topo.job_id is None:
        return _free_port()
    announce = job.paths.port_file(topo.job_id, topo.restart)
    if topo.node_rank == 0:
        port = PORT_BASE + int("".join(c for c in topo.job_id if c.isdigit()) or "0") % PORT_SPAN
        while not _port_free(port):
            port = PORT_BASE + (port - PORT_BASE + 1) % PORT_SPAN
        atomic_write_text(announce, f"{port}\n")
        return port
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(announce.read_text())
        time.sleep(0.2)
    raise SystemExit(f"hfhpc: node {topo.node_rank}: the head node never announced its port ({announce})")


def node_local_store(job: JobFile, jobenv: JobEnvironment, log) -> Path:
    """Where the job reads its assets: a node-local copy when there is node-local disk, else the store."""
    if not job.spec.launch.node_local:
        return job.store
    base = job.spec.site.local_dir or jobenv.tmpdir
    if not base:
        return job.store
    from hfhpc.store.local import copy_assets

    return copy_assets(job.store, job.assets, Path(os.path.expandvars(base)) / "hfhpc-store", log=log)


def _model_dir(job: JobFile, store: Path) -> Path | None:
    from hfhpc.store.layout import snapshot_dir

    if job.spec.model is None or job.model_commit is None:
        return None
    return snapshot_dir(store, "model", job.spec.model.id, job.model_commit)


def uses_launcher(spec: JobSpec, world_size: int) -> bool:
    """Whether the ranks start under a launcher: several ranks, or FSDP on one GPU (what the spec asks
    for: its checkpoints are sharded as FSDP writes them, and resume on more GPUs)."""
    return world_size > 1 or spec.launch.strategy == "fsdp"


def ranks_command(job: JobFile, topo: Topology, port: int, store: Path) -> list[str]:
    """The command that starts this node's ranks."""
    spec = job.spec
    if registry.get(spec.recipe).user_script:
        target = [str(spec.resolve_path(spec.script)), *spec.args]
        module: list[str] = []
    else:
        target = [str(job.run_dir)]
        module = ["-m", "hfhpc.recipes.run"]
    py = job.python if Path(job.python).exists() else sys.executable
    if not uses_launcher(spec, topo.world_size):
        return [py, *module, *target]
    if spec.resources.gpus_per_node == 0:
        return [
            py, "-m", "torch.distributed.run",
            f"--nnodes={topo.nodes}", f"--nproc-per-node={topo.procs_per_node}", f"--node-rank={topo.node_rank}",
            f"--master-addr={topo.head}", f"--master-port={port}",
            *module, *target,
        ]
    from hfhpc.launch.accelerate import accelerate_config, is_transformers_model, layer_class_to_wrap, write_config

    model_dir = _model_dir(job, store) if spec.launch.strategy == "fsdp" else None
    cfg = accelerate_config(
        spec, num_machines=topo.nodes, num_processes=topo.world_size, machine_rank=topo.node_rank,
        main_process_ip=topo.head, main_process_port=port,
        layer_cls=layer_class_to_wrap(model_dir) if model_dir else None,
        transformers_model=bool(model_dir) and is_transformers_model(model_dir),
    )
    cfg_path = write_config(cfg, job.paths.accelerate_config(topo.node_rank))
    return [py, "-m", "accelerate.commands.launch", "--config_file", str(cfg_path), *module, *target]


def ranks_environ(job: JobFile, topo: Topology, store: Path, base: dict[str, str],
                  jobenv: JobEnvironment | None = None) -> dict[str, str]:
    """The ranks' environment: sealed and offline, with the job environment as ``HFHPC_*``
    variables (the scheduler's own variables are read once, by the agent)."""
    spec = job.spec
    env = offline_environ(store, base=without_handed_down(base), allow_hosts=spec.site.allow_hosts)
    from hfhpc.store import readonly

    if not readonly.is_writable(store):
        # A read-only store: datasets' locks and caches go to node-local scratch (store/readonly.py).
        env.update(readonly.scratch_environ(store, readonly.scratch_dir(jobenv.tmpdir if jobenv else None, f"job-{topo.job_id or os.getpid()}")))
    if jobenv is not None and topo.job_id is not None:
        env.update(jobenv.rank_variables())
    env[hfenv.HFHPC_RUN_DIR] = str(job.run_dir)
    env[hfenv.HFHPC_NODE_RANK] = str(topo.node_rank)
    env[hfenv.HFHPC_RESTART_COUNT] = str(topo.restart)
    # One thread per core the rank owns: never more than this node has for each rank (a laptop or
    # a test machine has fewer cores than a cluster node's cpus_per_gpu).
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, min(spec.resources.cpus_per_gpu, cores // max(1, topo.procs_per_node)))
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env["PYTHONUNBUFFERED"] = "1"
    # Batch logs are files: per-example progress bars and cache notices only bury the training log.
    env.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("DATASETS_VERBOSITY", "error")
    if spec.resources.gpus_per_node == 0:
        # Trainer and accelerate otherwise look for GPUs; with torchrun ranks they use gloo on CPU.
        env["ACCELERATE_USE_CPU"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env["CUDA_VISIBLE_DEVICES"] = visible_gpus(env.get("CUDA_VISIBLE_DEVICES"), spec.resources.gpus_per_node)
    return env


def visible_gpus(visible: str | None, wanted: int) -> str:
    """The GPUs the ranks see: the first ``wanted`` of those this process sees (all of the machine's
    outside SLURM). A one-GPU job that sees eight would get Trainer's ``nn.DataParallel``; under
    SLURM the allocation already is what the job asked for."""
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible is not None else [str(i) for i in range(wanted)]
    if len(ids) < wanted:
        raise SystemExit(f"hfhpc: the job asks for {wanted} GPUs per node and this node shows {len(ids)} "
                         f"(CUDA_VISIBLE_DEVICES={visible}): lower resources.gpus_per_node or run where more are visible")
    return ",".join(ids[:wanted])


# Stop signals: the ranks finish their step, checkpoint and exit 3. SLURM's time-limit warning
# (USR1) and USR2 kill a process that has no handler, so the ranks start with them ignored (a
# disposition exec keeps) and get them only once they handle them: a signal that comes while a
# rank still imports torch waits, instead of killing it or being lost.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
# torchrun and accelerate launch die of USR1 (orphaning the ranks, each in its own session) and
# answer TERM by killing the ranks 30 s later, whatever their checkpoint is doing: they get no
# stop signal; the agent delivers it to the ranks themselves.
LAUNCHER_IGNORES = STOP_SIGNALS


def _ignore_stop_signals() -> None:
    for sig in LAUNCHER_IGNORES:
        signal.signal(sig, signal.SIG_IGN)


def children(pid: int) -> list[int]:
    """The child processes of ``pid``, from /proc (Linux)."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses; split after the last ")".
        if int(stat[stat.rindex(b")") + 2:].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def handling(pid: int, signum: int) -> bool | None:
    """Whether ``pid`` has a handler for ``signum`` (False: ignores it; None: default action or unknown)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            masks = dict(line.split(":", 1) for line in f if line.startswith(("SigIgn", "SigCgt")))
    except (OSError, ValueError):
        return None
    bit = 1 << (signum - 1)
    if int(masks.get("SigCgt", "0"), 16) & bit:
        return True
    if int(masks.get("SigIgn", "0"), 16) & bit:
        return False
    return None


class _Forwarder:
    """Take the agent's signals from the moment it starts; pass them to the ranks once they run.

    With a launcher (``launcher=True``) the signals go to its children, the ranks, never to the
    launcher itself; without one, to the one rank. Only the ranks: their own helper processes
    (data loader workers, compile workers) are theirs to stop.
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.launcher = False
        self.received: list[int] = []
        self.log = None  # where received signals are noted (the job log)
        self._pending: set[int] = set()  # stop signals some rank was not ready for
        self._delivered: set[tuple[int, int]] = set()  # (pid, signal): a stop signal goes to a rank once
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _Forwarder:
        for sig in FORWARDED:
            with contextlib.suppress(ValueError, OSError):  # not the main thread: nothing to install
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def attach(self, proc: subprocess.Popen, *, launcher: bool) -> None:
        self.proc, self.launcher = proc, launcher
        for sig in dict.fromkeys(self.received):  # what came before the ranks started
            self._deliver(sig)

    def _on_signal(self, signum: int, frame) -> None:
        self.received.append(signum)
        self._note(f"got {signal.Signals(signum).name}")
        if self.proc is not None:
            self._deliver(signum)

    def _targets(self, signum: int) -> list[int]:
        assert self.proc is not None
        if not self.launcher:
            return [self.proc.pid]
        ranks = children(self.proc.pid)
        if not ranks and signum not in STOP_SIGNALS:
            return [self.proc.pid]  # no ranks yet: the launcher ends
        return ranks

    def _deliver(self, signum: int) -> None:
        targets = self._targets(signum)
        if not targets and signum in STOP_SIGNALS:
            self._pending.add(signum)  # the launcher has not started the ranks yet
        for pid in targets:
            if signum in STOP_SIGNALS:
                if (pid, signum) in self._delivered:
                    continue
                if handling(pid, signum) is False:  # still ignored: the rank has not set up yet
                    self._pending.add(signum)
                    continue
                self._delivered.add((pid, signum))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)
                if signum in STOP_SIGNALS:
                    self._note(f"{signal.Signals(signum).name} passed to rank process {pid}")

    def _note(self, message: str) -> None:
        # Called from the signal handler too: a write that would re-enter a stream is skipped.
        if self.log is not None:
            with contextlib.suppress(RuntimeError, OSError):
                self.log(message)

    def retry(self) -> None:
        """Deliver the stop signals that ranks were not ready for."""
        if self.proc is not None and self.proc.poll() is None:
            pending, self._pending = self._pending, set()
            for sig in sorted(pending):
                self._deliver(sig)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _pump(stream, sinks) -> None:
    for line in iter(stream.readline, b""):
        for sink in sinks:
            sink.write(line)
            sink.flush()


def run_node(run_dir: Path, *, local: bool = False, environ: dict[str, str] | None = None, tee: Path | None = None) -> int:
    """Start this node's ranks and wait for them; return their exit status (128+N for signal N).

    Status 3 means the ranks stopped on a signal after writing a checkpoint (requeue, or run the
    same command again), also where a launcher reports its ranks' 3 as a failure.
    """
    with _Forwarder() as fwd:
        return _run_node(run_dir, fwd, local=local, environ=environ, tee=tee)


def _run_node(run_dir: Path, fwd: _Forwarder, *, local: bool, environ: dict[str, str] | None, tee: Path | None) -> int:
    started = time.time()
    environ = dict(os.environ if environ is None else environ)
    job = load_job(run_dir)
    jobenv = JobEnvironment.from_environ(environ, strict=not local, handed_down=False)
    topo = topology(job, jobenv, local=local)
    prefix = f"hfhpc[node {topo.node_rank}/{topo.nodes} {socket.gethostname()}]"

    def log(msg: str) -> None:
        line = f"{prefix} {msg.removeprefix('hfhpc: ')}"
        print(line, file=sys.stderr, flush=True)
        if tee:
            with open(tee, "a") as f:
                f.write(line + "\n")

    store = node_local_store(job, jobenv, log)
    port = rendezvous_port(job, topo)
    cmd = ranks_command(job, topo, port, store)
    launcher = uses_launcher(job.spec, topo.world_size)
    env = ranks_environ(job, topo, store, environ, jobenv)
    env[hfenv.HFHPC_NODE_STARTED] = f"{started:.3f}"  # the ranks log their start-up against it
    cwd = job.spec.base_dir() if registry.get(job.spec.recipe).user_script else job.run_dir
    log(f"{topo.world_size} rank(s), head {topo.head}:{port}, assets from {store}")
    log("start: " + " ".join(cmd))
    out = subprocess.PIPE if tee else None
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True, stdout=out,
                            stderr=subprocess.STDOUT if tee else None, preexec_fn=_ignore_stop_signals)
    fwd.log = log
    fwd.attach(proc, launcher=launcher)
    if tee:
        with open(tee, "ab") as logfile:
            pump = threading.Thread(target=_pump, args=(proc.stdout, [sys.stdout.buffer, logfile]), daemon=True)
            pump.start()
            code = _wait(proc, fwd)
            pump.join()
    else:
        code = _wait(proc, fwd)
    if code not in (0, 3) and not registry.get(job.spec.recipe).user_script:
        from hfhpc.run.checkpoints import stopped_on_signal

        stop = stopped_on_signal(job.run_dir, job_id=topo.job_id, restart=topo.restart,
                                 since=None if topo.job_id else started)
        if stop is not None:
            log(f"status {code}, but the ranks stopped after writing {stop.path.name}")
            code = 3
    if code != 0:
        got = f" after {signal.Signals(fwd.received[-1]).name}" if fwd.received else ""
        log(f"ranks exited with status {code}{got}")
    return code


def _wait(proc: subprocess.Popen, fwd: _Forwarder) -> int:
    while True:
        try:
            code = proc.wait(timeout=1.0)
            break
        except subprocess.TimeoutExpired:
            fwd.retry()
        except InterruptedError:
            continue
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hfhpc.launch.node", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--local", action="store_true", help="ignore SLURM: one node, this machine")
    args = ap.parse_args(argv)
    from hfhpc.errors import HfhpcError
    from hfhpc.offline.guard_path import require_seal

    try:
        require_seal()  # a job started with HFHPC_SEAL=1 never runs unsealed
    except HfhpcError as exc:
        print(f"hfhpc: error: {exc.render()}", file=sys.stderr, flush=True)
        return exc.exit_code
    return run_node(args.run_dir.absolute(), local=args.local)


if __name__ == "__main__":
    sys.exit(main())
