"""The network seal: the policy in-process, the guard in real sealed child processes."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from hfhpc.env import OFFLINE_VARS
from hfhpc.errors import SealNotActiveError, UsageError
from hfhpc.offline.environ import offline_environ, seal_environ
from hfhpc.offline.seal import (
    GUARD_DIR,
    MAX_NO_PROXY,
    SEALED_PROXY,
    AllowList,
    SealPolicy,
    no_proxy_value,
    normalize_host_entry,
    refusal_line,
)

# --- allow lists, the policy, the environment -----------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("HF-Mirror.Example.org.", "hf-mirror.example.org"),
        ("http://mirror.local:8080/path", "mirror.local"),
        ("mirror.local:8080", "mirror.local"),
        ("127.0.0.1:8000", "127.0.0.1"),
        ("[::1]:8000", "::1"),
        ("10.1.2.3/8", "10.0.0.0/8"),
        ("*.Example.org", "*.example.org"),
    ],
)
def test_normalize_host_entry(entry: str, expected: str) -> None:
    assert normalize_host_entry(entry) == expected


@pytest.mark.parametrize("bad", ["", "bad host", "a,b", "http://", "x/y"])
def test_normalize_host_entry_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_host_entry(bad)


def test_allow_list_matching() -> None:
    allow = AllowList(["mirror.local", "*.example.org", "10.0.0.0/8", "::1"])
    assert allow.matches("MIRROR.local.")
    assert allow.matches("a.example.org") and not allow.matches("example.org")
    assert allow.matches("10.2.3.4") and allow.matches("::ffff:10.2.3.4")
    assert allow.matches("[::1]") and not allow.matches("127.0.0.1")
    assert not allow.matches("huggingface.co")
    # The variable the guard reads: an invalid entry is skipped, never fatal at start-up.
    assert AllowList.from_value("mirror.local, bad host,,").names == {"mirror.local"}
    with pytest.raises(ValueError):
        AllowList.from_value("bad host", strict=True)


def test_policy_socket_and_http_rules() -> None:
    resolved: list[str] = []

    def resolve(name: str) -> list[str]:
        resolved.append(name)
        return {"n02": ["10.9.0.2"], "gpu5.cluster": ["10.9.0.5"]}.get(name, [])

    environ = {
        "SLURM_JOB_NODELIST": "n[01-02],gpu5.cluster",
        "MASTER_ADDR": "10.9.0.1",
        "HFHPC_SEAL_ALLOW": "mirror.local,192.168.7.0/24",
    }
    policy = SealPolicy.from_environ(environ, hostname="login7", resolve=resolve, local_addresses=lambda: ["10.8.0.7"])

    # Look-ups: loopback names, this machine, the job's nodes (long and short forms), the allow list.
    for name in ("localhost", "ip6-localhost", "x.localhost", "login7", "n01", "N02.cluster.", "gpu5", "mirror.local"):
        assert policy.lookup_allowed(name), name
    for name in ("huggingface.co", "cdn-lfs.hf.co", "n03", "mirror.local.evil"):
        assert not policy.lookup_allowed(name), name
    assert policy.lookup_allowed("1.2.3.4")  # no DNS for a literal: its connect is checked

    # Connects: loopback always; MASTER_ADDR and allowed networks without any resolution.
    assert policy.connect_allowed("127.0.0.5") and policy.connect_allowed("::1") and policy.connect_allowed("0.0.0.0")
    assert policy.connect_allowed("10.9.0.1") and policy.connect_allowed("192.168.7.20")
    assert resolved == []
    # An address an allowed look-up returned.
    policy.remember(["10.9.0.3"])
    assert policy.connect_allowed("10.9.0.3")
    # A node's address nobody looked up: the node names are resolved once, then remembered.
    assert policy.connect_allowed("10.9.0.2") and policy.connect_allowed("10.9.0.5")
    assert policy.connect_allowed("10.8.0.7")  # this machine's own interface
    assert sorted(resolved) == ["gpu5.cluster", "login7", "n01", "n02"]
    assert not policy.connect_allowed("8.8.8.8") and not policy.connect_allowed("2606:4700::1")
    assert not policy.connect_allowed("huggingface.co")

    # HTTP: the allow list only, loopback included.
    assert policy.http_allowed("mirror.local") and policy.http_allowed("192.168.7.1")
    for host in ("127.0.0.1", "localhost", "::1", "n01", "huggingface.co"):
        assert not policy.http_allowed(host), host


def test_malformed_nodelist_does_not_break_the_policy() -> None:
    policy = SealPolicy.from_environ({"SLURM_JOB_NODELIST": "n[01-", "SLURMD_NODENAME": "n01"})
    assert policy.lookup_allowed("n01") and not policy.lookup_allowed("huggingface.co")


def test_seal_environ() -> None:
    env = {"PYTHONPATH": os.pathsep.join(["/opt/site", GUARD_DIR, "/opt/more"])}
    sealed = seal_environ(env, allow_hosts=["Mirror.Local", "http://mirror.local:8080", "10.0.0.0/8"])
    assert {k: sealed[k] for k in ("PYTHONPATH", "HFHPC_SEAL", "HFHPC_SEAL_ALLOW")} == {
        "PYTHONPATH": os.pathsep.join([GUARD_DIR, "/opt/site", "/opt/more"]),
        "HFHPC_SEAL": "1",
        "HFHPC_SEAL_ALLOW": "mirror.local,10.0.0.0/8",
    }
    assert seal_environ({})["PYTHONPATH"] == GUARD_DIR
    assert seal_environ({"HFHPC_SEAL_ALLOW": "old.host"})["HFHPC_SEAL_ALLOW"] == ""
    with pytest.raises(UsageError):
        seal_environ({}, allow_hosts=["not a host"])


def test_seal_environ_sends_other_clients_to_a_refusing_proxy_except_loopback_nodes_and_allowed() -> None:
    env = {"SLURM_JOB_NODELIST": "gpu[01-02]", "SLURMD_NODENAME": "gpu01", "no_proxy": "*", "https_proxy": "http://squid:3128"}
    sealed = seal_environ(env, allow_hosts=["*.internal.org", "10.1.0.0/16"])
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "ftp_proxy"):
        assert sealed[var] == SEALED_PROXY
    assert sealed["no_proxy"] == sealed["NO_PROXY"] == "localhost,127.0.0.1,127.0.0.0/8,::1,.internal.org,10.1.0.0/16,gpu01,gpu02"
    # git's own http.proxy setting is overridden, after the caller's command-line configuration.
    assert {k: v for k, v in sealed.items() if k.startswith("GIT_")} == {
        "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "http.proxy", "GIT_CONFIG_VALUE_0": SEALED_PROXY,
    }
    theirs = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "user.name", "GIT_CONFIG_VALUE_0": "me"}
    again = seal_environ(theirs)
    assert (again["GIT_CONFIG_COUNT"], again["GIT_CONFIG_KEY_1"]) == ("2", "http.proxy")
    assert "GIT_CONFIG_COUNT" not in seal_environ({**theirs, **again})  # sealing twice adds nothing


def test_no_proxy_stays_a_size_a_variable_can_hold() -> None:
    value = no_proxy_value([], (f"node{i:06d}" for i in range(20_000)))
    assert len(value) <= MAX_NO_PROXY
    assert value.startswith("localhost,") and ",node000000," in value


def test_a_missing_guard_is_an_error_not_an_unsealed_child(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import hfhpc.offline.guard_path

    monkeypatch.setattr(hfhpc.offline.guard_path, "GUARD_DIR", str(tmp_path / "gone"))
    with pytest.raises(SealNotActiveError):
        offline_environ(tmp_path, base={})
    assert offline_environ(tmp_path, base={}, seal=False)["HF_HUB_OFFLINE"] == "1"


def test_offline_environ_seals(tmp_path: Path) -> None:
    env = offline_environ(tmp_path, base={"PYTHONPATH": "/opt/site"}, allow_hosts=["mirror.local"])
    assert env["PYTHONPATH"].split(os.pathsep) == [GUARD_DIR, "/opt/site"]
    assert env["HFHPC_SEAL"] == "1" and env["HFHPC_SEAL_ALLOW"] == "mirror.local"
    assert Path(GUARD_DIR, "sitecustomize.py").is_file()


# --- sealed child processes -------------------------------------------------------------------------

REFUSED_LOOPBACK = refusal_line("127.0.0.1")


class _Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_server() -> Iterator[int]:
    """A live HTTP server on loopback: what a Hub mirror on the compute node would look like."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def clean_environ() -> dict[str, str]:
    """This process's environment without the variables of a SLURM job, the hub or hfhpc: a test
    run inside a job (or with a seal around it) must not change what the children see."""
    prefixes = ("SLURM_", "HF_", "HFHPC_", "HUGGINGFACE_", "MASTER_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes) and k != "PYTHONPATH"}


def sealed_env(store: Path, allow_hosts: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    env = offline_environ(store, base=clean_environ(), allow_hosts=list(allow_hosts))
    env.update(extra)
    return env


def run_child(code: str, env: Mapping[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def child_json(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# Each client in the child: the outcome, the exception type and how long the attempt took.
HTTP_CLIENTS = """
import asyncio, json, sys, time, urllib.request
import aiohttp, httpx2, requests, urllib3

url = sys.argv[1] if len(sys.argv) > 1 else URL

def via_urllib():
    return urllib.request.urlopen(url, timeout=10).status

def via_urllib3():
    return urllib3.PoolManager().request("GET", url, timeout=10).status

def via_requests():
    return requests.get(url, timeout=10).status_code

def via_httpx2():
    return httpx2.get(url, timeout=10).status_code

def via_httpx2_async():
    async def get():
        async with httpx2.AsyncClient() as client:
            return (await client.get(url, timeout=10)).status_code
    return asyncio.run(get())

def via_aiohttp():
    async def get():
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as response:
                return response.status
    return asyncio.run(get())

results = {}
for name, call in list(globals().items()):
    if name.startswith("via_"):
        start = time.perf_counter()
        try:
            outcome = call()
        except Exception as exc:
            outcome = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
        results[name[4:]] = [outcome, time.perf_counter() - start]
print(json.dumps(results))
"""


def test_http_to_live_loopback_server_is_refused_at_once(tmp_path: Path, http_server: int) -> None:
    url = f"http://127.0.0.1:{http_server}/"
    result = run_child(f"URL = {url!r}\n" + HTTP_CLIENTS, sealed_env(tmp_path))
    results = child_json(result)
    assert set(results) == {"urllib", "urllib3", "requests", "httpx2", "httpx2_async", "aiohttp"}
    for client, (outcome, _seconds) in results.items():
        assert isinstance(outcome, str) and "refused: this process is sealed by hfhpc" in outcome, (client, outcome)
    # One line on stderr, the first time only, however many clients tried.
    assert result.stderr.count(REFUSED_LOOPBACK) == 1, result.stderr


def test_error_types(tmp_path: Path, http_server: int) -> None:
    """The types callers rely on: OSError everywhere, OfflineModeIsEnabled once huggingface_hub is
    loaded (no hub retries), a requests RequestException that is not a requests ConnectionError
    (no retry loops around requests)."""
    code = f"""
    import json, socket, requests, httpx2
    import huggingface_hub.errors as hub_errors
    out = {{}}
    try:
        httpx2.get("http://127.0.0.1:{http_server}/")
    except Exception as exc:
        out["httpx2"] = [isinstance(exc, ConnectionRefusedError), isinstance(exc, hub_errors.OfflineModeIsEnabled),
                         isinstance(exc, httpx2.TransportError), exc.errno, exc.host]
    try:
        requests.get("http://127.0.0.1:{http_server}/")
    except Exception as exc:
        out["requests"] = [isinstance(exc, OSError), isinstance(exc, requests.RequestException),
                           isinstance(exc, requests.ConnectionError), exc.response, exc.request.url]
    print(json.dumps(out))
    """
    out = child_json(run_child(code, sealed_env(tmp_path)))
    assert out == {
        "httpx2": [True, True, False, 111, "127.0.0.1"],
        "requests": [True, True, False, None, f"http://127.0.0.1:{http_server}/"],
    }


def test_allowed_http_host_is_reachable(tmp_path: Path, http_server: int) -> None:
    url = f"http://127.0.0.1:{http_server}/"
    result = run_child(f"URL = {url!r}\n" + HTTP_CLIENTS, sealed_env(tmp_path, ("127.0.0.1",)))
    results = child_json(result)
    assert {client: outcome for client, (outcome, _) in results.items()} == dict.fromkeys(results, 200)
    assert "hfhpc: sealed" not in result.stderr


def test_python_clients_ignore_the_seals_proxy(tmp_path: Path) -> None:
    # 127.0.0.2 is allowed through a network, which urllib's and aiohttp's no_proxy matching does not
    # understand: a client that used the seal's proxy would fail here.
    server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), _Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.2:{server.server_address[1]}/"
        env = sealed_env(tmp_path, ("127.0.0.0/24",))
        assert env["http_proxy"] == SEALED_PROXY and "127.0.0.2" not in env["no_proxy"].split(",")
        result = run_child(f"URL = {url!r}\n" + HTTP_CLIENTS, env)
    finally:
        server.shutdown()
        server.server_close()
    results = child_json(result)
    assert {client: outcome for client, (outcome, _) in results.items()} == dict.fromkeys(results, 200)


def test_tcp_rendezvous_on_loopback_and_node_names_works(tmp_path: Path, http_server: int) -> None:
    code = f"""
    import json, socket
    out = {{}}
    # A listener of the test process, by address and by name (what a rendezvous client does).
    for host in ("127.0.0.1", "localhost", socket.gethostname()):
        with socket.create_connection((host, {http_server}), timeout=5) as sock:
            out[host] = sock.getpeername()[0].startswith("127.")
    # A listener of this process, found through getaddrinfo (the Python side of a rendezvous).
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    family, kind, proto, _, address = socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM)[0]
    client = socket.socket(family, kind, proto)
    out["connect_ex"] = client.connect_ex(address)
    peer, _ = server.accept()
    client.sendall(b"ping")
    out["received"] = peer.recv(4).decode()
    print(json.dumps(out))
    """
    result = run_child(code, sealed_env(tmp_path))
    out = child_json(result)
    assert out == {
        "127.0.0.1": True,
        "localhost": True,
        socket.gethostname(): True,
        "connect_ex": 0,
        "received": "ping",
    }
    assert "hfhpc: sealed" not in result.stderr


def test_name_lookups_and_connects_elsewhere_are_refused_at_once(tmp_path: Path) -> None:
    code = """
    import errno, json, socket, time
    out = {}
    def attempt(name, call):
        start = time.perf_counter()
        try:
            call()
            out[name] = ["ok", 0]
        except OSError as exc:
            out[name] = [f"{type(exc).__name__}:{exc.errno}", time.perf_counter() - start]
    attempt("getaddrinfo", lambda: socket.getaddrinfo("huggingface.co", 443))
    attempt("gethostbyname", lambda: socket.gethostbyname("huggingface.co"))
    attempt("gethostbyname_ex", lambda: socket.gethostbyname_ex("cdn-lfs.huggingface.co"))
    attempt("create_connection", lambda: socket.create_connection(("huggingface.co", 443), timeout=5))
    attempt("connect_by_name", lambda: socket.socket().connect(("huggingface.co", 443)))
    attempt("connect_ip", lambda: socket.create_connection(("8.8.8.8", 53), timeout=5))
    sock = socket.socket()
    out["connect_ex"] = sock.connect_ex(("8.8.4.4", 53)) == errno.ECONNREFUSED
    print(json.dumps(out))
    """
    result = run_child(code, sealed_env(tmp_path))
    out = child_json(result)
    assert out.pop("connect_ex") is True
    eai_noname = socket.EAI_NONAME
    expected = {
        "getaddrinfo": f"gaierror:{eai_noname}",
        "gethostbyname": f"gaierror:{eai_noname}",
        "gethostbyname_ex": f"gaierror:{eai_noname}",
        "create_connection": f"gaierror:{eai_noname}",
        "connect_by_name": "NetworkSealedError:111",
        "connect_ip": "NetworkSealedError:111",
    }
    assert {name: outcome for name, (outcome, _) in out.items()} == expected
    for host in ("huggingface.co", "cdn-lfs.huggingface.co", "8.8.8.8", "8.8.4.4"):
        assert result.stderr.count(refusal_line(host)) == 1, (host, result.stderr)


def test_master_addr_set_by_the_script_is_allowed(tmp_path: Path) -> None:
    """A script may set MASTER_ADDR itself, after its process made its first network decision.
    (The guard's decisions are asked directly: a real look-up of a made-up name could hang.)"""
    code = """
    import json, os, socket
    import hfhpc_seal_guard as guard
    socket.getaddrinfo("localhost", 80)  # the first decision builds the policy
    out = []
    for master in ("10.255.0.1", "head-node.cluster"):  # no look-up of the made-up name
        before = guard.allowed("lookup_allowed", master) and guard.allowed("connect_allowed", master)
        os.environ["MASTER_ADDR"] = master
        out.append([before, guard.allowed("lookup_allowed", master), guard.allowed("connect_allowed", master)])
    print(json.dumps(out))
    """
    assert child_json(run_child(code, sealed_env(tmp_path))) == [[False, True, True], [False, True, True]]


GLOO_RANK = """
import os, torch, torch.distributed as dist
dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=2, init_method="env://")
tensor = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(tensor)
print(f"rank {dist.get_rank()} sum {tensor.item()}")
dist.destroy_process_group()
"""


def test_gloo_rendezvous_under_the_seal(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", GLOO_RANK],
            env=sealed_env(tmp_path, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    for rank, (proc, (stdout, stderr)) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, stderr
        assert f"rank {rank} sum 3.0" in stdout
        assert "hfhpc: sealed" not in stderr


def test_user_sitecustomize_still_runs(tmp_path: Path) -> None:
    user_site = tmp_path / "user_site"
    user_site.mkdir()
    (user_site / "sitecustomize.py").write_text(
        "import os, socket\n"
        "os.environ['USER_SITECUSTOMIZE'] = 'ran'\n"
        "try:\n"
        "    socket.getaddrinfo('huggingface.co', 443)\n"
        "    os.environ['USER_SITECUSTOMIZE_NET'] = 'open'\n"
        "except OSError:\n"
        "    os.environ['USER_SITECUSTOMIZE_NET'] = 'sealed'\n"
    )
    base = dict(clean_environ(), PYTHONPATH=str(user_site))
    env = offline_environ(tmp_path / "store", base=base)
    code = """
    import json, os, sys, sitecustomize
    print(json.dumps([os.environ.get("USER_SITECUSTOMIZE"), os.environ.get("USER_SITECUSTOMIZE_NET"),
                      sitecustomize.__file__, "hfhpc_seal_guard" in sys.modules]))
    """
    expected = ["ran", "sealed", str(user_site / "sitecustomize.py"), True]
    assert child_json(run_child(code, env)) == expected
    # The guard folder listed twice must not make the guard chain to itself.
    env["PYTHONPATH"] = os.pathsep.join([GUARD_DIR, GUARD_DIR, str(user_site)])
    assert child_json(run_child(code, env)) == expected


def test_guard_is_lazy_and_can_be_switched_off(tmp_path: Path) -> None:
    code = """
    import json, sys
    print(json.dumps([name in sys.modules for name in
                      ("hfhpc_seal_guard", "socket", "http.client", "_hfhpc_seal_policy", "ipaddress")]))
    """
    # Sealed: the guard is there, but no networking module, nor the policy, was imported for it.
    assert child_json(run_child(code, sealed_env(tmp_path))) == [True, False, False, False, False]
    assert child_json(run_child(code, sealed_env(tmp_path, HFHPC_SEAL="0")))[0] is False


def test_install_patches_modules_imported_before_it_and_survives_changed_internals(tmp_path: Path) -> None:
    code = """
    import json, socket, types
    import hfhpc_seal_guard as guard
    guard.install()  # socket was imported first (a .pth file may do that): patched now
    try:
        socket.getaddrinfo("huggingface.co", 443)
        refused = False
    except socket.gaierror:
        refused = True
    # A library whose internals moved: the import must still work.
    guard._apply(guard._patch_aiohttp, types.ModuleType("aiohttp.connector"))
    print(json.dumps(refused))
    """
    result = run_child(code, sealed_env(tmp_path, HFHPC_SEAL="0"))
    assert child_json(result) is True
    assert "hfhpc: sealed: could not guard aiohttp.connector (AttributeError" in result.stderr


# --- the Hugging Face stack under the seal, without the offline variables ----------------------------

HUB_CHILD = """
import json, time
import transformers
from transformers import AutoConfig, pipeline

out = {}
# A cached asset still loads: the refusal is an "offline" error, so the hub falls back to the cache.
config = AutoConfig.from_pretrained("hfhpc-test/tiny-config")
out["cached_config"] = config.hidden_size

start = time.perf_counter()
try:
    pipeline("text-classification")
    out["pipeline"] = "loaded"
except Exception as exc:
    out["pipeline"] = f"{type(exc).__name__}: {exc}"
    causes = []
    while exc is not None:
        causes.append(type(exc).__name__)
        exc = exc.__cause__
    out["causes"] = causes
out["pipeline_seconds"] = time.perf_counter() - start
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def hub_child(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    store = tmp_path_factory.mktemp("store")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = store / "hub" / "models--hfhpc-test--tiny-config"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 24}))
    env = offline_environ(store, base=clean_environ())
    for var in OFFLINE_VARS:  # what a user's own script would see after forgetting them
        env.pop(var, None)
    return run_child(HUB_CHILD, env, timeout=300)


def test_pipeline_without_model_fails_fast_under_the_seal(hub_child: subprocess.CompletedProcess[str]) -> None:
    """Unsealed, this retries for ≈27 s (huggingface_hub's backoff on connection errors)."""
    out = child_json(hub_child)
    assert out["pipeline"].startswith("OSError: We couldn't connect to 'https://huggingface.co'"), out
    # No retry loop: huggingface_hub says "Retrying" before each backoff.
    assert "Retrying" not in hub_child.stderr, hub_child.stderr
    # Refused by the HTTP guard, before any DNS: not a failed look-up (httpx2 ConnectError).
    assert out["causes"] == ["OSError", "LocalEntryNotFoundError", "NetworkSealedError"], out
    assert hub_child.stderr.count(refusal_line("huggingface.co")) == 1, hub_child.stderr


def test_cached_asset_loads_under_the_seal_without_offline_variables(
    hub_child: subprocess.CompletedProcess[str],
) -> None:
    assert child_json(hub_child)["cached_config"] == 24


def _hfhpc_imports(path: Path) -> set[str]:
    """Every hfhpc module ``path`` imports, at module level or inside a function."""
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hfhpc"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("hfhpc"))
    return names


def test_env_names_and_reads_and_the_seal_never_imports_it_back() -> None:
    import hfhpc.env
    import hfhpc.offline.seal

    # env.py: names and readers, nothing that needs the seal; seal.py: the policy, which the guard
    # loads by path, needs none of env's names. No circle between them.
    assert _hfhpc_imports(Path(hfhpc.env.__file__)) <= {"hfhpc.errors"}
    assert not {"hfhpc.env", "hfhpc.errors", "hfhpc.offline.environ"} & _hfhpc_imports(Path(hfhpc.offline.seal.__file__))
