"""A real, throwaway SLURM cluster on this one (Debian 12, root, no systemd) machine.

Everything a test needs from a cluster is real: ``sbatch``/``srun``/``scontrol``/``sacct``
talk to a real ``slurmctld`` that launches jobs through real ``slurmd`` daemons, accounting
goes through ``slurmdbd`` into its own MariaDB, and multi-node jobs run on nodes that have
their own network stack and host name, so that ``srun hostname`` differs per node and a task
on node 2 reaches a listener on node 1 by name (as torch.distributed rendezvous does).

Layout (see ``NOTES.md``, "A real SLURM cluster on one Debian 12 machine", for the measured
reasons behind most choices):

* state, configuration, logs, spool and the database live under ``/tmp/hfhpc-slurm/<name>``;
* one bridge ``hfhpcbr0`` holds the controller address 10.203.0.1; node *i* lives in network
  namespace ``hfhpc-n<i>`` (a veth pair onto the bridge, address 10.203.0.<10+i>, no default
  route, so nodes can reach nothing but each other and the controller) and in its own UTS
  namespace, whose host name is the node name;
* ``/etc/hosts`` gets one marked line per name while the cluster runs;
* daemons are tracked by pid file, never by name: exited daemons stay zombies here (nothing
  reaps orphans), and other clusters or test runs may have look-alike processes.

Only one cluster can run on the machine at a time (the bridge, the addresses, the ports and
the host names are fixed), so :meth:`SlurmCluster.start` holds a machine-wide lock until
:meth:`SlurmCluster.stop`; a second test run waits for the first instead of breaking it, and
a cluster left behind by a killed run (its lock died with it) is torn down first.

Stdlib only: this runs before anything else is installed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

ROOT = Path("/tmp/hfhpc-slurm")

BRIDGE = "hfhpcbr0"
NET_PREFIX = "10.203.0"
CTL_ADDR = f"{NET_PREFIX}.1"
CTL_ALIAS = "hfhpc-ctl"
NODE_PREFIX = "hfhpc-n"  # node names, network namespaces and UTS host names alike
VETH_PREFIX = "hfhpc-v"  # host end of each node's veth pair
HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARKER = "# hfhpc-slurm test cluster"

# Ports away from the SLURM defaults (6817-6819) and MariaDB's 3306, so that a system
# installation on the same machine is never disturbed.
SLURMCTLD_PORT = 6917
SLURMD_PORT = 6918
HOST_SLURMD_PORT_BASE = 6930  # without namespaces every slurmd needs its own port
SLURMDBD_PORT = 6919
MARIADB_PORT = 6920

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "slurmdbd", "mariadb-server")
FAKE_GPUS_PER_NODE = 2

TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "TIMEOUT",
    }
)

# Environment variables that would make client commands talk about another job or cluster
# (tests may themselves run inside a SLURM job, or a human may have SBATCH_* defaults).
_FOREIGN_ENV = re.compile(r"^(SLURM|SBATCH|SALLOC|SRUN|SQUEUE|SINFO|SACCT|SCONTROL)_")
# Set in every daemon's environment (and so in every slurmstepd's): how stop() finds job
# step processes that outlived their slurmd.
_MARKER_VAR = "HFHPC_SLURM_STATE"
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Lock files this process holds. flock() also conflicts between two descriptors of one
# process, so a second start() here would wait for itself: it fails at once instead.
_LOCKS_HELD_HERE: set[Path] = set()


class SlurmClusterError(RuntimeError):
    """The cluster could not be installed, started or used; the message says why."""


# --------------------------------------------------------------------------- helpers


def _run(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run a short command, capturing its output; raise with that output if it fails."""
    try:
        proc = subprocess.run(
            list(cmd),
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise SlurmClusterError(f"{' '.join(cmd)} did not finish in {timeout} s") from exc
    if check and proc.returncode != 0:
        raise SlurmClusterError(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}".rstrip()
        )
    return proc


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` runs; a zombie (which nobody reaps on this machine) counts as dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The command name in parentheses may itself contain spaces or parentheses.
    return stat[stat.rindex(")") + 2] not in "ZX"


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _parent_map() -> dict[int, int]:
    parents = {}
    for pid in _all_pids():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        parents[pid] = int(stat[stat.rindex(")") + 2 :].split()[1])
    return parents


def _descendants(roots: Iterable[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in _parent_map().items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _marked_pids(path: Path, *, exact: bool = True) -> set[int]:
    """Processes of the cluster whose state dir is ``path``, found by their environment.

    Daemons and the slurmstepd they spawn carry ``HFHPC_SLURM_STATE``; job processes carry
    the ``SLURM_CONF`` of the submitter plus a ``SLURM_JOB_ID`` (which test processes that
    merely talk to the cluster lack). That also finds job processes that left their step
    (``setsid``, double fork). With ``exact=False``: of any state dir under ``path``.
    """
    end = b"\0" if exact else b""
    daemon = f"{_MARKER_VAR}={path}".encode() + end
    job_conf = f"SLURM_CONF={path}".encode() + (b"/etc/slurm.conf\0" if exact else b"/")
    found = set()
    for pid in _all_pids():
        try:
            environ = b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if b"\0" + daemon in environ or (b"\0" + job_conf in environ and b"\0SLURM_JOB_ID=" in environ):
            found.add(pid)
    return found


def _netns_pids(netns_names: Iterable[str]) -> set[int]:
    """Processes living in any of the named network namespaces (jobs included)."""
    inodes = set()
    for name in netns_names:
        try:
            inodes.add(os.stat(f"/run/netns/{name}").st_ino)
        except OSError:
            pass
    if not inodes:
        return set()
    found = set()
    for pid in _all_pids():
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino in inodes:
                found.add(pid)
        except OSError:
            pass
    return found


def _kill(pids: Iterable[int], timeout: float = 5.0) -> None:
    """SIGKILL ``pids`` (never this process or its parent) and wait until they are gone.

    No SIGTERM first: everything killed here belongs to a throwaway cluster whose state is
    deleted right after, and slurmctld alone would spend 1.5 s saving it on SIGTERM.
    """
    me = {os.getpid(), os.getppid()}
    pids = {p for p in pids if p not in me and p > 1 and _pid_alive(p)}
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = {p for p in pids if _pid_alive(p)}
        time.sleep(0.02)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"==> {path} <== (missing)"
    return "\n".join([f"==> {path} <=="] + text[-lines:])


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_for(what: str, predicate, timeout: float, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SlurmClusterError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- install


def _missing_packages() -> list[str]:
    proc = _run(
        ["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\n", *PACKAGES], check=False
    )
    installed = {
        line.split()[0]
        for line in proc.stdout.splitlines()
        if line.split()[1:] == ["installed"]
    }
    return [p for p in PACKAGES if p not in installed]


def install() -> list[str]:
    """Install the SLURM and MariaDB packages if missing; return what was installed.

    Idempotent and cheap when everything is present (one ``dpkg-query``). ``apt-get update``
    runs only if the first install attempt fails, because the package lists are usually
    fresh enough and an update costs more than the install itself.
    """
    missing = _missing_packages()
    if not missing:
        return []
    if os.geteuid() != 0:
        raise SlurmClusterError(f"packages {missing} are missing and only root can install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = [
        "apt-get", "install", "-y", "-q", "--no-install-recommends",
        "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold",
        *missing,
    ]  # fmt: skip
    # The packages' maintainer scripts would start system-wide slurmctld/slurmd/mariadb on the
    # default ports; a policy-rc.d that answers 101 ("forbidden") stops that, as in Docker.
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    if own_policy:
        policy.write_text("#!/bin/sh\n# hfhpc-slurm: no services during install\nexit 101\n")
        policy.chmod(0o755)
    try:
        first = _run(cmd, env=env, check=False, timeout=900)
        if first.returncode != 0:
            _run(["apt-get", "update", "-q"], env=env, timeout=900)
            _run(cmd, env=env, timeout=900)
    finally:
        if own_policy:
            policy.unlink(missing_ok=True)
    return missing


# --------------------------------------------------------------------------- /etc/hosts


def _hosts_rewrite(new_entries: Sequence[tuple[str, str]]) -> None:
    """Drop our marked lines from /etc/hosts and append ``new_entries`` (address, name).

    The file is rewritten in place, not replaced: in containers it is often a bind mount
    that a rename would fail on or silently detach from.
    """
    try:
        text = HOSTS_FILE.read_text()
    except FileNotFoundError:
        text = ""
    kept = [line for line in text.splitlines() if not line.rstrip().endswith(HOSTS_MARKER)]
    kept += [f"{addr}\t{name}\t{HOSTS_MARKER}" for addr, name in new_entries]
    new = "\n".join(kept) + "\n"
    if new != text:
        with open(HOSTS_FILE, "r+" if HOSTS_FILE.exists() else "w") as fh:
            fh.write(new)
            fh.truncate()


# --------------------------------------------------------------------------- network


def _iptables_rules() -> list[list[str]]:
    # With bridge-nf-call-iptables=1 (the default once br_netfilter is loaded) traffic between
    # two ports of the bridge traverses the iptables FORWARD chain, whose policy Docker & co
    # set to DROP. These rules let node-to-node traffic through whatever the policy is.
    return [
        ["FORWARD", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT"],
        ["INPUT", "-i", BRIDGE, "-j", "ACCEPT"],
    ]


def _net_teardown() -> None:
    """Remove our namespaces, veths, bridge and firewall rules; quiet when there are none."""
    for name in sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else []:
        if name.startswith(NODE_PREFIX):
            _run(["ip", "netns", "del", name], check=False)
    links = _run(["ip", "-o", "link", "show"], check=False).stdout
    for match in re.finditer(r"^\d+: ([^:@\s]+)", links, re.M):
        if match.group(1).startswith(VETH_PREFIX) or match.group(1) == BRIDGE:
            _run(["ip", "link", "del", match.group(1)], check=False)
    if shutil.which("iptables"):
        for rule in _iptables_rules():
            while _run(["iptables", "-C", *rule], check=False).returncode == 0:
                _run(["iptables", "-D", *rule], check=False)


def _net_setup(nodes: Sequence[str], addresses: Mapping[str, str]) -> None:
    ip = lambda *args: _run(["ip", *args])  # noqa: E731 - a readable local shorthand
    ip("link", "add", BRIDGE, "type", "bridge")
    ip("addr", "add", f"{CTL_ADDR}/24", "dev", BRIDGE)
    ip("link", "set", BRIDGE, "up")
    for i, node in enumerate(nodes, start=1):
        veth = f"{VETH_PREFIX}{i}"
        ip("netns", "add", node)
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", node)
        ip("link", "set", veth, "master", BRIDGE, "up")
        # `ip -n NS` configures the namespace from outside; nothing here uses `ip netns exec`,
        # whose /sys remount kills slurmd (see NOTES).
        ip("-n", node, "addr", "add", f"{addresses[node]}/24", "dev", "eth0")
        ip("-n", node, "link", "set", "eth0", "up")
        # Jobs bind to 127.0.0.1 (MASTER_ADDR=localhost, torch store on one node): needs lo.
        ip("-n", node, "link", "set", "lo", "up")
        # Deliberately no default route: a node can reach only the bridge's addresses.
    if shutil.which("iptables"):
        for rule in _iptables_rules():
            if _run(["iptables", "-C", *rule], check=False).returncode != 0:
                _run(["iptables", "-I", *rule])


_ECHO_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(1)
s.settimeout(10)
print("ready", flush=True)
conn, _ = s.accept()
conn.sendall(b"pong")
"""
_ECHO_CLIENT = """
import socket, sys, time
deadline = time.time() + 5
while True:
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1) as c:
            assert c.recv(4) == b"pong"
            break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(0.05)
"""


def _check_node_to_node(nodes: Sequence[str], port: int = 6999) -> None:
    """Fail early and clearly if the bridge does not forward between namespaces."""
    if len(nodes) < 2:
        return
    server = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{nodes[0]}", sys.executable, "-c", _ECHO_SERVER, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        server.stdout.readline()  # "ready"
        client = _run(
            ["nsenter", f"--net=/run/netns/{nodes[-1]}", sys.executable, "-c", _ECHO_CLIENT,
             nodes[0], str(port)],
            check=False, timeout=20,
        )  # fmt: skip
        if client.returncode != 0:
            raise SlurmClusterError(
                f"{nodes[-1]} cannot reach {nodes[0]}:{port} across bridge {BRIDGE} "
                f"(firewall FORWARD policy / bridge-nf-call-iptables?):\n{client.stderr}"
            )
    finally:
        server.kill()
        server.wait()


# --------------------------------------------------------------------------- the cluster


class SlurmCluster:
    """A SLURM cluster of ``nodes`` nodes with accounting, on this machine.

    Use :meth:`start` / :meth:`stop` (or ``with SlurmCluster().start(2) as c:``); hand
    :meth:`env` to every process that should talk to it.
    """

    def __init__(self, name: str = "hfhpc", root: Path | str = ROOT) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9]{0,30}", name):
            # ClusterName must be lower case; it also names database tables.
            raise ValueError(f"cluster name {name!r}: lower-case letters and digits only")
        self.name = name
        self.root = Path(root)
        self.state_dir = self.root / name
        self.nodes: list[str] = []
        self.addresses: dict[str, str] = {}
        self.netns = False
        # Seconds per phase of the last start(), e.g. {"install": 0.02, "mariadb": 1.1, ...}.
        self.timings: dict[str, float] = {}
        self._last_mark = 0.0
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ paths

    @property
    def conf(self) -> Path:
        return self.state_dir / "etc" / "slurm.conf"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def host_address(self) -> str:
        """Where jobs reach services on this machine (bind them to 0.0.0.0 or this address).

        Nodes in namespaces have their own loopback: 127.0.0.1 in a job is the node itself.
        """
        return CTL_ADDR if self.netns else "127.0.0.1"

    @property
    def _info_file(self) -> Path:
        return self.state_dir / "cluster.json"

    # ------------------------------------------------------------------ public API

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for clients (sbatch, srun, sacct, ...) and the jobs they submit.

        ``base`` defaults to ``os.environ``; SLURM variables inherited from elsewhere are
        dropped so that nothing points at another job or cluster.
        """
        base = os.environ if base is None else base
        env = {k: v for k, v in base.items() if not _FOREIGN_ENV.match(k)}
        env["SLURM_CONF"] = str(self.conf)
        # The SLURM clients live in /usr/bin and /usr/sbin, which a minimal PATH may lack.
        path = [p for p in env.get("PATH", "").split(":") if p]
        env["PATH"] = ":".join(path + [p for p in _SYSTEM_PATH.split(":") if p not in path])
        return env

    def start(self, nodes: int = 2, *, netns: bool | None = None, timeout: float = 90) -> "SlurmCluster":
        """Install if needed, tear down leftovers, write the configuration, start everything.

        ``netns`` defaults to True for more than one node: each node then gets its own
        network and UTS namespace. With ``netns=False`` all nodes share the host network
        (and host name), each slurmd on its own port.
        Returns once ``sinfo`` shows every node idle and ``sacct`` answers.
        """
        if nodes < 1 or nodes > 200:
            raise ValueError(f"nodes must be 1..200, not {nodes}")
        if os.geteuid() != 0:
            raise SlurmClusterError("a SLURM test cluster needs root (namespaces, daemons, /etc/hosts)")
        if self._lock_fd is not None:
            raise SlurmClusterError(f"cluster {self.name} is already started by this object")
        self.timings = {}
        self._last_mark = time.monotonic()
        install()
        self._mark("install")
        self.acquire_lock()
        self._mark("lock")
        try:
            cleanup_leftovers(self.root)
            self._mark("cleanup")
            self.netns = nodes > 1 if netns is None else netns
            self.nodes = [f"{NODE_PREFIX}{i}" for i in range(1, nodes + 1)]
            self.addresses = {
                n: (f"{NET_PREFIX}.{10 + i}" if self.netns else "127.0.0.1")
                for i, n in enumerate(self.nodes, start=1)
            }
            self._start(timeout)
        except BaseException as exc:
            report = self._log_tails()
            self._teardown()
            self.release_lock()
            if isinstance(exc, SlurmClusterError):
                raise SlurmClusterError(f"{exc}\n\n{report}") from exc
            raise
        return self

    def stop(self) -> None:
        """Kill every daemon and job, remove namespaces, bridge, hosts lines and state dir."""
        try:
            self._teardown()
        finally:
            self.release_lock()

    def detach(self) -> None:
        """Leave the cluster running after this process exits (the CLI's ``start``).

        A detached cluster is reused by the fixtures, and stopped by ``cli stop`` or by the
        next :meth:`start` of any process.
        """
        self._write_info(detached=True)
        self.release_lock()

    @classmethod
    def load(cls, name: str = "hfhpc", root: Path | str = ROOT) -> "tuple[SlurmCluster, dict] | None":
        """The cluster ``name`` as its state dir describes it (running or not), with that
        description (``nodes``, ``addresses``, ``netns``, ``owner_pid``, ``detached``);
        None without a state dir. The returned object does not own the cluster: its
        :meth:`stop` works only for a caller that may take the lock."""
        cluster = cls(name, root)
        try:
            info = json.loads(cluster._info_file.read_text())
        except (OSError, ValueError):
            return None
        cluster.nodes, cluster.addresses = info["nodes"], info["addresses"]
        cluster.netns = info["netns"]
        return cluster, info

    @classmethod
    def attach(cls, name: str = "hfhpc", root: Path | str = ROOT) -> "SlurmCluster | None":
        """The detached cluster ``name`` if it is up and answering, else None."""
        loaded = cls.load(name, root)
        if loaded is None or not loaded[1].get("detached") or not loaded[0].is_running():
            return None
        return loaded[0]

    def is_running(self) -> bool:
        """All daemons alive and slurmctld answering."""
        pidfiles = [self.run_dir / f"{d}.pid" for d in ("mariadb", "slurmdbd", "slurmctld")]
        pidfiles += [self.run_dir / f"slurmd-{n}.pid" for n in self.nodes]
        if not self.nodes or not all(_pid_alive(_read_pid(p) or 0) for p in pidfiles):
            return False
        return self.run("scontrol", "ping", check=False).returncode == 0

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 60, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a client command (``sinfo``, ``sacct``, ...) against this cluster."""
        return _run(cmd, env=self.env() if env is None else env, check=check, timeout=timeout)

    def sbatch(
        self,
        *args: str,
        script: str | None = None,
        cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> str:
        """Submit with ``sbatch --parsable`` (``script`` on stdin if given); return the job id."""
        proc = subprocess.run(
            ["sbatch", "--parsable", *args],
            input=script,
            capture_output=True,
            text=True,
            env=dict(self.env() if env is None else env),
            cwd=cwd,
            timeout=60,
        )
        if proc.returncode != 0:
            raise SlurmClusterError(f"sbatch {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def job_state(self, job_id: str | int, *, accounting: bool = False) -> str | None:
        """The job's state word (``RUNNING``, ``COMPLETED``, ...), None if not known yet.

        ``scontrol`` answers first and knows pending/running jobs; it forgets finished jobs
        after MinJobAge, when only ``sacct`` (which lags 0.4-3 s behind) still knows them.
        ``accounting=True`` asks ``sacct`` only.
        """
        if not accounting:
            proc = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
            match = re.search(r"\bJobState=(\S+)", proc.stdout)
            if match:
                return match.group(1)
        proc = self.run("sacct", "-X", "-n", "-P", "-o", "State", "-j", str(job_id), check=False)
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        # "CANCELLED by 0" -> CANCELLED; with several records (requeues) the last is current.
        return lines[-1].split()[0] if lines else None

    def wait_job(self, job_id: str | int, timeout: float = 60, *, accounting: bool = False) -> str:
        """Poll until the job reaches a terminal state and return it (e.g. ``COMPLETED``).

        With ``accounting=True`` the state comes from ``sacct``, so it is also in the
        database once this returns.
        """
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id, accounting=accounting)
            if state in TERMINAL_STATES:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout} s")
            time.sleep(0.2)

    def requeue(self, job_id: str | int, *, release: bool = True, timeout: float = 30) -> None:
        """``scontrol requeue`` the job; with ``release``, let it start again in ~1.5 s.

        A requeued job gets a BeginTime 2 minutes ahead (the credential lifetime); ``scontrol
        update StartTime=now`` once it is PENDING cuts that short. But slurmd refuses a
        launch whose credential is not newer, in whole seconds, than the revocation the
        requeue made ("Killing non-startable batch JobId=J: Job credential revoked", and the
        job ends FAILED), so the update waits for the next second to begin first.
        """
        self.run("scontrol", "requeue", str(job_id))
        if not release:
            return
        revoked_by = time.time()
        _wait_for(f"job {job_id} to be pending again",
                  lambda: self.job_state(job_id) == "PENDING", timeout)  # fmt: skip
        time.sleep(max(0.0, int(revoked_by) + 1.2 - time.time()))
        self.run("scontrol", "update", f"jobid={job_id}", "StartTime=now")

    def status(self) -> str:
        """Human-readable state: nodes from ``sinfo`` and the queue."""
        sinfo = self.run("sinfo", "-N", "-o", "%N %P %T %c %m %G", check=False)
        squeue = self.run("squeue", check=False)
        return f"state dir {self.state_dir}\n{sinfo.stdout}{sinfo.stderr}\n{squeue.stdout}{squeue.stderr}"

    def __enter__(self) -> "SlurmCluster":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ locking

    def acquire_lock(self, timeout: float = 1800) -> None:
        """Take the machine-wide cluster lock, waiting up to ``timeout`` s for its holder.

        :meth:`start` takes it and :meth:`stop` releases it; the kernel releases it when
        the holder dies, which is how a killed run's leftovers are recognised.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        lock_path = self.root / ".lock"
        if lock_path in _LOCKS_HELD_HERE:
            raise SlurmClusterError(
                "this process already runs a SLURM test cluster (use it, or stop it first)"
            )
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            if time.monotonic() >= deadline:
                os.close(fd)
                raise SlurmClusterError(
                    f"the SLURM test cluster is in use by pid {holder} (waited {timeout:.0f} s)"
                )
            if not told:
                print(f"waiting for the SLURM test cluster held by pid {holder}", file=sys.stderr)
                told = True
            time.sleep(1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        _LOCKS_HELD_HERE.add(lock_path)

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None
            _LOCKS_HELD_HERE.discard(self.root / ".lock")

    # ------------------------------------------------------------------ start

    def _daemon_env(self) -> dict[str, str]:
        # A small, fixed environment: daemons must not inherit a test's SLURM_* or venv.
        return {
            "PATH": _SYSTEM_PATH,
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "SLURM_CONF": str(self.conf),
            _MARKER_VAR: str(self.state_dir),
        }

    def _mark(self, phase: str) -> None:
        """Record how long ``phase`` took since the previous mark (see ``timings``)."""
        now = time.monotonic()
        self.timings[phase] = round(now - self._last_mark, 2)
        self._last_mark = now

    def _start(self, timeout: float) -> None:
        t0 = time.monotonic()
        for sub in ("etc", "log", "run", "ctld", "db", *(f"spool/{n}" for n in self.nodes)):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        self._write_configs()
        if self.netns:
            _net_setup(self.nodes, self.addresses)
        _hosts_rewrite(
            ([(CTL_ADDR, CTL_ALIAS)] if self.netns else [])
            + [(self.addresses[n], n) for n in self.nodes]
        )
        self._write_info(detached=False)
        self._mark("config+network")

        self._start_mariadb()
        self._mark("mariadb")
        self._start_daemon("slurmdbd", ["slurmdbd"])
        _wait_for("slurmdbd to listen", lambda: _tcp_open("127.0.0.1", SLURMDBD_PORT), 30)
        self._mark("slurmdbd")
        # No `sacctmgr add cluster`: slurmctld registers its cluster (and the root
        # association) itself, and the command would cost 2 s of table creation.
        self._start_daemon("slurmctld", ["slurmctld"])
        _wait_for("slurmctld to answer", lambda: self.run("scontrol", "ping", check=False).returncode == 0, 30)
        self._mark("slurmctld")
        for node in self.nodes:
            cmd = ["slurmd", "-N", node, "-f", str(self.conf)]
            if self.netns:
                # Own network namespace (made by `ip netns add`) plus a fresh UTS namespace
                # whose host name is the node name: `srun hostname` then tells nodes apart.
                cmd = ["nsenter", f"--net=/run/netns/{node}", "--", "unshare", "--uts", "--",
                       "sh", "-c", 'hostname "$0" && exec "$@"', node, *cmd]  # fmt: skip
            self._start_daemon(f"slurmd-{node}", cmd)
        remaining = max(10.0, timeout - (time.monotonic() - t0))
        try:
            _wait_for("all nodes idle in sinfo", self._all_idle, remaining, interval=0.2)
        except SlurmClusterError as exc:
            sinfo = self.run("sinfo", "-N", "-o", "%N %T %E", check=False)
            raise SlurmClusterError(f"{exc}; sinfo says:\n{sinfo.stdout}{sinfo.stderr}") from exc
        self._mark("slurmd")
        if self.netns:
            _check_node_to_node(self.nodes)
        _wait_for("sacct to answer", lambda: self.run("sacct", "-n", check=False).returncode == 0, 30)
        self._mark("checks")

    def _all_idle(self) -> bool:
        proc = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
        return set(states) == set(self.nodes) and all(s == "idle" for s in states.values())

    def _write_info(self, *, detached: bool) -> None:
        info = {
            "nodes": self.nodes,
            "addresses": self.addresses,
            "netns": self.netns,
            "owner_pid": os.getpid(),
            "detached": detached,
        }
        self._info_file.write_text(json.dumps(info, indent=1) + "\n")

    def _start_daemon(self, name: str, cmd: Sequence[str]) -> None:
        """Run a SLURM daemon that daemonizes itself and writes ``run/<name>.pid``."""
        out = self.log_dir / f"{name}.stdout"
        with open(out, "ab") as fh:
            # The daemons fork and detach (their stdio goes to /dev/null), so the foreground
            # process returns at once; its output holds configuration errors, if any.
            proc = subprocess.run(
                list(cmd), env=self._daemon_env(), stdin=subprocess.DEVNULL,
                stdout=fh, stderr=subprocess.STDOUT, timeout=60,
            )  # fmt: skip
        if proc.returncode != 0:
            raise SlurmClusterError(f"{name} exited {proc.returncode} at start:\n{_tail(out)}")
        pidfile = self.run_dir / f"{name}.pid"
        _wait_for(f"{pidfile}", lambda: _pid_alive(_read_pid(pidfile) or 0), 20)

    def _start_mariadb(self) -> None:
        datadir = self.state_dir / "db"
        sock = self.run_dir / "mariadb.sock"
        if not (datadir / "mysql").is_dir():
            # ~1 s. "normal" authentication gives passwordless root@127.0.0.1 over TCP,
            # which is what slurmdbd uses (a socket path cannot be configured for it).
            _run(
                ["mariadb-install-db", "--no-defaults", f"--datadir={datadir}", "--user=root",
                 "--auth-root-authentication-method=normal", "--skip-test-db",
                 "--innodb-log-file-size=16M"],
                timeout=120,
            )  # fmt: skip
        self._mark("mariadb-install-db")
        log = open(self.log_dir / "mariadb.stdout", "ab")
        with log:
            # mariadbd does not daemonize (mysqld_safe would); a new session keeps it out of
            # the caller's terminal signals, and it writes its own pid file.
            subprocess.Popen(
                ["mariadbd", "--no-defaults", f"--datadir={datadir}", f"--socket={sock}",
                 f"--port={MARIADB_PORT}", "--bind-address=127.0.0.1", "--skip-name-resolve",
                 f"--pid-file={self.run_dir / 'mariadb.pid'}", "--user=root",
                 f"--log-error={self.log_dir / 'mariadb.err'}", "--innodb-buffer-pool-size=64M",
                 "--innodb-log-file-size=16M", "--innodb-lock-wait-timeout=900",
                 # A throwaway database: no fsyncs, which make slurmdbd's table creation slow.
                 "--innodb-flush-method=nosync", "--innodb-flush-log-at-trx-commit=0",
                 "--innodb-doublewrite=0", "--skip-log-bin"],
                env=self._daemon_env(), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        _wait_for("mariadb to listen", lambda: _tcp_open("127.0.0.1", MARIADB_PORT), 60)

    def _write_configs(self) -> None:
        s = self.state_dir
        cpus = os.cpu_count() or 1
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        # Every slurmd sees the whole machine; 80 % of it per node leaves realistic --mem
        # requests schedulable. Nothing is enforced (no cgroups), so overlap is harmless.
        real_memory = max(1024, int(mem_mb * 0.8))
        ctl_addr = CTL_ADDR if self.netns else "127.0.0.1"
        node_lines = []
        for i, node in enumerate(self.nodes, start=1):
            port = SLURMD_PORT if self.netns else HOST_SLURMD_PORT_BASE + i
            node_lines.append(
                f"NodeName={node} NodeAddr={self.addresses[node]} Port={port} CPUs={cpus} "
                f"Boards=1 SocketsPerBoard=1 CoresPerSocket={cpus} ThreadsPerCore=1 "
                f"RealMemory={real_memory} Gres=gpu:{FAKE_GPUS_PER_NODE} State=UNKNOWN"
            )
        slurm_conf = f"""\
# Written by tests/cluster/slurm.py for a throwaway test cluster; rewritten on every start.
ClusterName={self.name}
# slurmctld accepts only its own host name here; the address is the one nodes use.
SlurmctldHost={socket.gethostname().split('.')[0]}({ctl_addr})
SlurmctldPort={SLURMCTLD_PORT}
SlurmdPort={SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
# No munge daemon to manage: this build has the "none" plugins, fine on one machine.
AuthType=auth/none
CredType=cred/none
StateSaveLocation={s}/ctld
SlurmdSpoolDir={s}/spool/%n
SlurmctldPidFile={s}/run/slurmctld.pid
SlurmdPidFile={s}/run/slurmd-%n.pid
SlurmctldLogFile={s}/log/slurmctld.log
SlurmdLogFile={s}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups on this machine: track processes via /proc, no task binding or limits.
ProctrackType=proctrack/linuxproc
# PMIx is not installed; "none" also spares every step a failing plugin load.
MpiDefault=none
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
MailProg=/bin/true
# The node list is authoritative, whatever hardware each slurmd detects.
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_min_interval=0,batch_sched_delay=0
JobRequeue=1
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=2
MinJobAge=30
OverTimeLimit=0
MessageTimeout=10
TreeWidth=64
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost={ctl_addr}
AccountingStoragePort={SLURMDBD_PORT}
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none
{chr(10).join(node_lines)}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
# A one-node partition, so that one cluster also serves "single node" tests.
PartitionName=one Nodes={self.nodes[0]} Default=NO MaxTime=INFINITE State=UP
"""
        first, last = 0, FAKE_GPUS_PER_NODE - 1
        # `File=` makes the gres plugin fill CUDA_VISIBLE_DEVICES; `Count=` alone marks the
        # node invalid. Any character devices do; no process opens them.
        gres_conf = f"AutoDetect=off\nNodeName={','.join(self.nodes)} Name=gpu File=/dev/tty[{first}-{last}]\n"
        slurmdbd_conf = f"""\
# Written by tests/cluster/slurm.py; slurmdbd insists on mode 0600 and owner SlurmUser.
AuthType=auth/none
DbdHost=localhost
DbdPort={SLURMDBD_PORT}
SlurmUser=root
DebugLevel=info
LogFile={s}/log/slurmdbd.log
PidFile={s}/run/slurmdbd.pid
StorageType=accounting_storage/mysql
# 127.0.0.1, not localhost: the client library would take "localhost" to mean the system
# socket /run/mysqld/mysqld.sock instead of our TCP port.
StorageHost=127.0.0.1
StoragePort={MARIADB_PORT}
StorageUser=root
StorageLoc=slurm_acct_db_{self.name}
"""
        etc = s / "etc"
        (etc / "slurm.conf").write_text(slurm_conf)
        (etc / "gres.conf").write_text(gres_conf)
        dbd = etc / "slurmdbd.conf"
        dbd.write_text(slurmdbd_conf)
        dbd.chmod(0o600)

    # ------------------------------------------------------------------ stop

    def _log_tails(self) -> str:
        logs = sorted(self.log_dir.glob("*")) if self.log_dir.is_dir() else []
        return "\n\n".join(_tail(p) for p in logs if p.stat().st_size) or "(no daemon logs)"

    def _teardown(self) -> None:
        _teardown_state_dir(self.state_dir, self.nodes)
        _net_teardown()
        _hosts_rewrite([])
        self.nodes, self.addresses = [], {}


def _teardown_state_dir(state_dir: Path, nodes: Sequence[str] = ()) -> None:
    """Stop everything that belongs to one state dir, then delete the dir."""
    run_dir = state_dir / "run"
    pidfiles = sorted(run_dir.glob("*.pid")) if run_dir.is_dir() else []
    daemon_pids = {pid for p in pidfiles if (pid := _read_pid(p))}
    # Signal a pid only if it carries our marker: a pid file can outlive its daemon by a
    # reboot, and pids are reused.
    _kill(daemon_pids & _marked_pids(state_dir))
    # Job steps (slurmstepd carries the daemons' marker) and their tasks; in namespace mode
    # also anything else still running inside a node's network namespace.
    strays = _marked_pids(state_dir)
    strays |= _descendants(strays)
    if nodes:
        strays |= _netns_pids(nodes)
    _kill(strays)
    shutil.rmtree(state_dir, ignore_errors=True)


def cleanup_leftovers(root: Path | str = ROOT) -> None:
    """Tear down whatever a previous (perhaps killed) run left: daemons, jobs, network, hosts.

    The caller must hold the cluster lock, so nothing torn down here is in use.
    """
    root = Path(root)
    if root.is_dir():
        for state_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            _teardown_state_dir(state_dir)
    # Processes started by a cluster whose state dir is already gone, or jobs in namespaces.
    netns = [n for n in (os.listdir("/run/netns") if os.path.isdir("/run/netns") else [])
             if n.startswith(NODE_PREFIX)]  # fmt: skip
    strays = _marked_pids(root, exact=False)
    strays |= _descendants(strays) | _netns_pids(netns)
    _kill(strays)
    _net_teardown()
    _hosts_rewrite([])
