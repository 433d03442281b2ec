"""The seal covers every child, not only Python: curl, wget and git under ``hfhpc exec`` are refused
what urllib in the same process is refused, a kept batch script finds the guard of the Python that
runs it, and a process that should be sealed refuses to start without its guard.

A real HTTP server on loopback counts the requests it gets: a refused client never reaches it.
"""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hfhpc.offline.seal import GUARD_DIR, SEALED_PROXY
from tests.conftest import REPO_ROOT, hfhpc


class _Counting(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.requests.append(self.path)  # type: ignore[attr-defined]
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class Server:
    def __init__(self) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
        self.httpd.requests = []  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[str]:
        return self.httpd.requests  # type: ignore[attr-defined]


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    thread = threading.Thread(target=srv.httpd.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def allow_spec(tmp_path: Path, *hosts: str) -> Path:
    spec = tmp_path / "allow.yaml"
    spec.write_text(
        "name: allow\nrecipe: script\nscript: x.py\nresources: {gpus_per_node: 0}\n"
        f"site: {{allow_hosts: [{', '.join(hosts)}]}}\n"
    )
    return spec


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


MIRROR = "mirror.test"  # a name outside the job: curl --resolve maps it to the loopback server


@needs_curl
def test_curl_under_exec_is_refused_what_urllib_is_refused(store: Path, server: Server) -> None:
    url = f"http://{MIRROR}:{server.port}"
    resolve = f"{MIRROR}:{server.port}:127.0.0.1"
    # curl directly, and curl started by the sealed Python through subprocess, next to urllib.
    code = textwrap.dedent(f"""
        import subprocess, urllib.request
        try:
            urllib.request.urlopen({url + '/urllib'!r}, timeout=20)
            print("urllib reached")
        except OSError as exc:
            print("urllib refused")
        rc = subprocess.run(["curl", "-sS", "-m", "20", "--resolve", {resolve!r}, {url + '/subprocess'!r}]).returncode
        print("curl exit", rc)
    """)
    out = hfhpc("--store", str(store), "exec", "--", "python", "-c", code)
    assert out.returncode == 0, out.stderr
    assert "urllib refused" in out.stdout
    # 7: could not connect (to the seal's proxy), at once; 28 would be a timeout.
    assert "curl exit 7" in out.stdout, out.stdout + out.stderr
    direct = hfhpc("--store", str(store), "exec", "--", "curl", "-sS", "-m", "20", "--resolve", resolve, url + "/direct")
    assert direct.returncode == 7, direct.stderr
    assert "127.0.0.1 port 0" in direct.stderr
    assert server.requests == []


@needs_curl
def test_curl_reaches_an_allowed_host_and_loopback(store: Path, server: Server, tmp_path: Path) -> None:
    spec = allow_spec(tmp_path, MIRROR)
    resolve = f"{MIRROR}:{server.port}:127.0.0.1"
    out = hfhpc("--store", str(store), "exec", "--spec", str(spec), "--",
                "curl", "-sS", "-m", "20", "--resolve", resolve, f"http://{MIRROR}:{server.port}/allowed")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ok"
    # Loopback is exempt from the proxy, as the job's own services there are from the socket rules.
    local = hfhpc("--store", str(store), "exec", "--", "curl", "-sS", "-m", "20", f"{server.url}/loopback")
    assert local.returncode == 0, local.stderr
    assert server.requests == ["/allowed", "/loopback"]


@needs_curl
@pytest.mark.skipif(shutil.which("wget") is None, reason="wget is not installed")
def test_the_callers_proxy_and_no_proxy_do_not_survive_the_seal(store: Path, server: Server) -> None:
    # The caller's environment names a working proxy (the server) and exempts every host: a
    # sealed child gets the seal's proxy, and an empty exemption list, instead.
    env = dict(os.environ, http_proxy=server.url, HTTP_PROXY=server.url, https_proxy=server.url,
               no_proxy="*", NO_PROXY="*")
    curl = hfhpc("--store", str(store), "exec", "--", "curl", "-sS", "-m", "20", "http://example.invalid/curl", env=env)
    wget = hfhpc("--store", str(store), "exec", "--", "wget", "-q", "-T", "20", "-t", "1", "-O", "-",
                 "http://example.invalid/wget", env=env)
    assert curl.returncode == 7, curl.stderr
    assert wget.returncode == 4, wget.stderr  # 4: network failure
    assert server.requests == []


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_under_exec_reaches_neither_the_host_nor_the_users_configured_proxy(store: Path, server: Server) -> None:
    home = Path(os.environ["HOME"])
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    resolve = ["-c", f"http.curloptResolve={MIRROR}:{server.port}:127.0.0.1"]
    url = f"http://{MIRROR}:{server.port}/repo"
    # Outside the seal git reaches the server: the test can tell.
    subprocess.run(["git", *resolve, "ls-remote", url], capture_output=True, timeout=60, env=env)
    assert server.requests
    server.requests.clear()

    out = hfhpc("--store", str(store), "exec", "--", "git", *resolve, "ls-remote", url, env=env, timeout=60)
    assert out.returncode != 0
    assert "127.0.0.1 port 0" in out.stderr, out.stderr
    # A user's git configuration that names a working proxy: git prefers it to the variables.
    (home / ".gitconfig").write_text(f"[http]\n\tproxy = {server.url}\n")
    out = hfhpc("--store", str(store), "exec", "--", "git", "ls-remote", "http://example.invalid/repo", env=env, timeout=60)
    assert out.returncode != 0
    assert "127.0.0.1 port 0" in out.stderr, out.stderr
    assert server.requests == []


def test_sealed_python_ignores_the_seals_proxy_and_judges_the_real_host(store: Path, server: Server, tmp_path: Path) -> None:
    # An allowed network (CIDR) is not something urllib's no_proxy understands: were the seal's
    # proxy visible to Python, urllib would send this request to it and fail.
    spec = allow_spec(tmp_path, "127.0.0.0/8")
    # (Loopback is in no_proxy anyway; the CIDR is what the guard must judge, the proxy must not.)
    code = textwrap.dedent(f"""
        import os, urllib.request
        assert os.environ["http_proxy"] == {SEALED_PROXY!r}
        print(sorted(urllib.request.getproxies()))
        print(urllib.request.urlopen({server.url + '/python'!r}, timeout=20).read().decode())
    """)
    out = hfhpc("--store", str(store), "exec", "--spec", str(spec), "--", "python", "-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["['no']", "ok"]  # no proxy left, only the seal's exemptions
    assert server.requests == ["/python"]


def test_bare_python_is_the_python_hfhpc_runs_with(store: Path, tmp_path: Path) -> None:
    # A PATH whose first python is another one (a system Python without the job's packages).
    other = tmp_path / "bin"
    other.mkdir()
    (other / "python").write_text("#!/bin/sh\necho other python\n")
    (other / "python").chmod(0o755)
    (other / "python3").symlink_to(other / "python")
    env = dict(os.environ, PATH=f"{other}{os.pathsep}{os.environ.get('PATH', '')}")
    for name in ("python", "python3"):
        out = hfhpc("--store", str(store), "exec", "--", name, "-c", "import sys; print(sys.executable)", env=env)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == sys.executable


# --- the guard of a kept batch script, and the start check ------------------------------------------

RENDER = """
import sys
from tests.unit.test_sbatch import CPU_2NODES, make_job
from hfhpc.launch.sbatch import render_sbatch
print(render_sbatch(make_job(CPU_2NODES), python=sys.argv[1]), end="")
"""

PROBE = """
import sys, urllib.request
guard = sys.modules.get("hfhpc_seal_guard")
print("guard", guard and guard.__file__)
try:
    urllib.request.urlopen(sys.argv[1], timeout=20)
    print("reached")
except OSError:
    print("refused")
"""


def _installation(root: Path) -> Path:
    """A copy of hfhpc's package under ``root``: an installation at another place."""
    shutil.copytree(Path(GUARD_DIR).parents[1], root / "hfhpc", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_a_kept_batch_script_finds_the_guard_after_the_installation_moved(tmp_path: Path, server: Server) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HFHPC_", "PYTHON"))}
    first = _installation(tmp_path / "first")
    # Written by the first installation...
    script = subprocess.run([sys.executable, "-c", RENDER, sys.executable], capture_output=True, text=True,
                            cwd=REPO_ROOT, env=dict(clean, PYTHONPATH=f"{first}{os.pathsep}{REPO_ROOT}"), check=True).stdout
    assert str(first) not in script  # no folder of the installation that wrote it
    # ...which is then upgraded into another place: the old folder is gone.
    shutil.rmtree(first)
    second = _installation(tmp_path / "second")
    head = script.split("# -- launch")[0]
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    body = head + f'python {probe} {server.url}/job\ncurl -sS -m 20 http://example.invalid/ || echo "curl exit $?"\n'
    out = subprocess.run(["bash", "-c", body], capture_output=True, text=True, timeout=120,
                         env=dict(clean, PYTHONPATH=str(second)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"guard {second}/hfhpc/offline/_guard/hfhpc_seal_guard.py", "refused", "curl exit 7"]
    assert server.requests == []


def test_a_batch_script_stops_when_the_jobs_python_has_no_hfhpc(tmp_path: Path) -> None:
    from tests.unit.test_sbatch import CPU_2NODES, make_job

    from hfhpc.launch.sbatch import render_sbatch

    bare = shutil.which("python3", path="/usr/bin:/bin")
    if bare is None:
        pytest.skip("no system python3")
    head = render_sbatch(make_job(CPU_2NODES), python=bare).split("# -- launch")[0]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HFHPC_", "PYTHON"))}
    out = subprocess.run(["bash", "-c", head + "echo RAN ON\n"], capture_output=True, text=True, timeout=60, env=clean)
    assert out.returncode == 1
    assert "RAN ON" not in out.stdout
    assert "cannot name hfhpc's seal guard" in out.stderr


@pytest.mark.parametrize("module", ["hfhpc.launch.node", "hfhpc.recipes.run", "hfhpc.offline.probe"])
def test_entry_points_refuse_to_run_unsealed_when_the_seal_is_asked_for(tmp_path: Path, module: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HFHPC_SEAL="1", PYTHONPATH=str(tmp_path / "gone" / "hfhpc" / "offline" / "_guard"))
    out = subprocess.run([sys.executable, "-m", module, str(tmp_path / "run")], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("hfhpc: error: HFHPC_SEAL=1 but the network guard is not installed")


def test_entry_points_start_when_sealed(tmp_path: Path) -> None:
    # The same entry point with the guard in force gets past the check (and fails on the missing
    # run folder instead).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HFHPC_SEAL="1", PYTHONPATH=GUARD_DIR)
    out = subprocess.run([sys.executable, "-m", "hfhpc.launch.node", str(tmp_path / "run")], capture_output=True,
                         text=True, timeout=120, env=env)
    assert "network guard is not installed" not in out.stderr


# --- hfhpc exec --netns -----------------------------------------------------------------------------

RAW_SOCKET = """
import _socket, sys
s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
s.settimeout(20)
try:
    s.connect(("127.0.0.1", int(sys.argv[1])))
    s.sendall(b"GET /raw HTTP/1.0\\r\\n\\r\\n")
    print("raw reached", s.recv(64)[:12])
except OSError as exc:
    print("raw refused", type(exc).__name__)
# The command's own loopback still works: a local rendezvous needs it.
srv = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
srv.bind(("127.0.0.1", 0))
srv.listen()
c = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
c.connect(srv.getsockname())
print("own loopback ok")
"""


def _user_namespaces() -> bool:
    from hfhpc.offline.netns import enter_private_network

    try:
        return subprocess.run(["true"], preexec_fn=enter_private_network).returncode == 0
    except subprocess.SubprocessError:
        return False


@pytest.mark.skipif(not _user_namespaces(), reason="this machine does not let users create namespaces")
def test_netns_stops_what_the_guard_cannot_see(store: Path, server: Server, tmp_path: Path) -> None:
    probe = tmp_path / "raw.py"
    probe.write_text(RAW_SOCKET)
    # Without the namespace, the C module under socket goes past the guard (documented).
    open_ = hfhpc("--store", str(store), "exec", "--", "python", str(probe), str(server.port))
    assert "raw reached" in open_.stdout, open_.stderr
    assert server.requests == ["/raw"]
    closed = hfhpc("--store", str(store), "exec", "--netns", "--", "python", str(probe), str(server.port))
    assert closed.returncode == 0, closed.stderr
    assert closed.stdout.splitlines() == ["raw refused ConnectionRefusedError", "own loopback ok"]
    assert server.requests == ["/raw"]  # nothing more


def test_netns_with_allowed_hosts_is_a_usage_error(store: Path, tmp_path: Path) -> None:
    spec = allow_spec(tmp_path, "mirror.local")
    out = hfhpc("--store", str(store), "exec", "--netns", "--spec", str(spec), "--", "true")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "hfhpc: error: --netns reaches no host, and the spec allows mirror.local; "
        "drop --netns, or run without the spec's allowed hosts"
    ]


def test_env_lines_carry_the_proxy_seal_with_the_jobs_nodes(tmp_path: Path) -> None:
    env = dict(os.environ, SLURM_JOB_NODELIST="gpu[1-2]", https_proxy="http://squid:3128", no_proxy="*")
    out = hfhpc("--store", str(tmp_path / "store"), "env", env=env)
    assert out.returncode == 0, out.stderr
    script = out.stdout + '\necho "$https_proxy|$no_proxy|$GIT_CONFIG_VALUE_0"\n'
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, check=True)
    assert res.stdout.strip() == f"{SEALED_PROXY}|localhost,127.0.0.1,127.0.0.0/8,::1,gpu1,gpu2|{SEALED_PROXY}"
