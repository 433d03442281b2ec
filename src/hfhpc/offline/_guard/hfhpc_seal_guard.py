"""The runtime of hfhpc's network seal, installed by ``sitecustomize`` in every sealed Python process.

It runs at the start of every interpreter of a job (torchrun and accelerate children inherit the
environment), so installing it must cost next to nothing: it only puts an import hook on
``sys.meta_path``. The networking modules are patched when, and if, they are imported:

* ``socket``: name look-ups (``getaddrinfo``, ``gethostbyname[_ex]``; ``create_connection`` goes
  through them) and TCP connects (``socket.connect[_ex]``) follow the socket rules of
  :mod:`hfhpc.offline.seal`: loopback, this machine, the job's nodes and the allowed hosts.
* ``http.client`` (urllib), ``urllib3``, ``requests``, ``httpcore``/``httpcore2`` (httpx/httpx2) and
  ``aiohttp``: an HTTP request goes only to an allowed host, loopback included.

A refused attempt fails at once, and the first refusal of each host writes one line to stderr.

The proxy variables of a sealed environment point at a proxy that refuses every connection, for
the programs that are not Python (curl, wget, git). ``urllib.request.getproxies`` (which urllib,
requests, httpx and aiohttp read) leaves that proxy out, so Python's clients go direct and the rules
above judge the real host.

The policy itself lives in ``hfhpc/offline/seal.py`` and is loaded by file path the first time a
decision is needed, so the guard works in any Python that can read hfhpc's files, even one that
cannot import ``hfhpc``.
"""

# No ``from __future__ import annotations``: importing __future__ alone would cost half a millisecond
# at every interpreter start. The annotations below are valid at run time on Python >= 3.10.
import errno
import os
import sys

_MARK = "_hfhpc_sealed"
_POLICY_MODULE = "_hfhpc_seal_policy"


class NetworkSealedError(ConnectionRefusedError):
    """A sealed process tried to reach a host it may not reach.

    A ``ConnectionRefusedError`` (so an ``OSError``/``ConnectionError``): code that handles a host
    being down handles it. When ``huggingface_hub`` is loaded, the error raised is a subclass that
    is also its ``OfflineModeIsEnabled`` (see :func:`_error_class`).
    """

    host: str = ""


_policy_instance = None
_warned: set[str] = set()
_error_classes: dict[tuple, type] = {}


def _policy():  # -> hfhpc.offline.seal.SealPolicy
    global _policy_instance
    if _policy_instance is None:
        import _socket

        seal = _seal_module()
        _policy_instance = seal.SealPolicy.from_environ(
            os.environ,
            hostname=_socket.gethostname(),
            resolve=_resolve,
            local_addresses=seal.interface_addresses,
        )
    return _policy_instance


def allowed(rule: str, host: str) -> bool:
    """Ask the policy (``rule``: http_allowed, lookup_allowed, connect_allowed) about ``host``.

    Before a refusal, the policy is rebuilt if the job's variables changed since it was built: a
    script may set ``MASTER_ADDR`` itself, after the first network call of its process.
    """
    global _policy_instance
    policy = _policy()
    if getattr(policy, rule)(host):
        return True
    if policy.key == _seal_module().policy_key(os.environ):
        return False
    old, _policy_instance = policy, None
    policy = _policy()
    policy.remember(old.remembered())
    return getattr(policy, rule)(host)


def _seal_module():  # -> the module hfhpc/offline/seal.py
    seal = sys.modules.get("hfhpc.offline.seal") or sys.modules.get(_POLICY_MODULE)
    if seal is not None:
        return seal
    from importlib.util import module_from_spec, spec_from_file_location

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "seal.py")
    spec = spec_from_file_location(_POLICY_MODULE, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"hfhpc seal: cannot load the policy from {path}")
    module = module_from_spec(spec)
    sys.modules[_POLICY_MODULE] = module
    spec.loader.exec_module(module)
    return module


def _resolve(host: str) -> list[str]:
    # The C function, which the seal never patches: the policy resolves the job's own node names.
    import _socket

    return [info[4][0] for info in _socket.getaddrinfo(host, None, 0, _socket.SOCK_STREAM)]


def _error_class(extra_bases=()):
    """The class to raise: ours, plus the "offline" types of the libraries loaded in this process.

    Why: huggingface_hub retries ``httpx.ConnectError``/``NetworkError``/timeouts with exponential
    backoff (≈27 s before ``pipeline()`` gives up) but treats its ``OfflineModeIsEnabled`` as "no
    network, use the cache": no retry, the cached file if there is one, else the usual "couldn't
    connect" error at once. transformers, datasets and evaluate handle it the same way. Any other
    type would either be retried or skip that cache fallback.
    """
    bases = [NetworkSealedError]
    hub_errors = sys.modules.get("huggingface_hub.errors")
    offline = getattr(hub_errors, "OfflineModeIsEnabled", None)
    if isinstance(offline, type) and issubclass(offline, OSError):
        bases.append(offline)
    bases.extend(extra_bases)
    key = tuple(bases)
    if len(key) == 1:
        return NetworkSealedError
    cls = _error_classes.get(key)
    if cls is None:
        cls = type("NetworkSealedError", key, {"__module__": __name__})
        _error_classes[key] = cls
    return cls


def report(host: str) -> None:
    """Write the refusal line for ``host`` to stderr, the first time only."""
    if host in _warned:
        return
    _warned.add(host)
    try:
        sys.stderr.write(_seal_module().refusal_line(host) + "\n")
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass  # no usable stderr (closed, or None under pythonw): the exception still says it


def refuse(host: str, extra_bases: tuple = ()) -> NetworkSealedError:
    """Report the refusal of ``host`` and return the error to raise (also an instance of
    ``extra_bases``, exception classes derived from ``OSError``)."""
    report(host)
    error = _error_class(extra_bases)(
        errno.ECONNREFUSED,
        f"network access to {host!r} refused: this process is sealed by hfhpc "
        "(a file, dataset or metric is probably missing from the store: run `hfhpc check`)",
    )
    error.host = host
    return error


def _host_text(host: object) -> str:
    if isinstance(host, (bytes, bytearray)):
        host = bytes(host).decode("ascii", "replace")
    return str(host).strip("[]")


def check_http(host: object, extra_bases: tuple = ()) -> None:
    """Raise unless an HTTP request may go to ``host``."""
    text = _host_text(host)
    if not allowed("http_allowed", text):
        raise refuse(text, extra_bases)


# --- socket ---------------------------------------------------------------------------------------


def _patch_socket(mod) -> None:
    sock_cls = mod.socket
    if getattr(sock_cls.connect, _MARK, False):
        return
    connect, connect_ex = sock_cls.connect, sock_cls.connect_ex
    getaddrinfo, gethostbyname, gethostbyname_ex = mod.getaddrinfo, mod.gethostbyname, mod.gethostbyname_ex
    inet, inet6, stream = mod.AF_INET, mod.AF_INET6, mod.SOCK_STREAM

    def check_connect(sock, address) -> None:
        # AF_UNIX and other families never leave the machine. A UDP connect sends nothing: it is
        # how libraries find their own outgoing address ("connect to 8.8.8.8, read getsockname").
        if sock.family not in (inet, inet6) or sock.type != stream or not isinstance(address, tuple):
            return
        host = _host_text(address[0])
        if not allowed("connect_allowed", host):
            raise refuse(host)

    def check_lookup(host, flags: int = 0) -> str | None:
        """The name to remember the answers of, None when no DNS is involved; raises if refused."""
        if host is None or (flags & mod.AI_NUMERICHOST):
            return None
        name = _host_text(host)
        if not name or _seal_module().parse_ip(name) is not None:
            return None  # an address literal: nothing is looked up, and its connect is checked
        if not allowed("lookup_allowed", name):
            report(name)  # look-ups fail with the type their callers expect: gaierror
            raise mod.gaierror(mod.EAI_NONAME, f"name look-up of {name!r} refused: this process is sealed by hfhpc")
        return name

    def sealed_connect(self, address):
        check_connect(self, address)
        return connect(self, address)

    def sealed_connect_ex(self, address):
        try:
            check_connect(self, address)
        except NetworkSealedError:
            return errno.ECONNREFUSED
        return connect_ex(self, address)

    def sealed_getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        name = check_lookup(host, flags)
        result = getaddrinfo(host, port, family, type, proto, flags)
        if name is not None:
            _policy().remember(info[4][0] for info in result if isinstance(info[4][0], str))
        return result

    def sealed_gethostbyname(hostname):
        name = check_lookup(hostname)
        address = gethostbyname(hostname)
        if name is not None:
            _policy().remember([address])
        return address

    def sealed_gethostbyname_ex(hostname):
        name = check_lookup(hostname)
        result = gethostbyname_ex(hostname)
        if name is not None:
            _policy().remember(result[2])
        return result

    for wrapper, original in (
        (sealed_connect, connect),
        (sealed_connect_ex, connect_ex),
        (sealed_getaddrinfo, getaddrinfo),
        (sealed_gethostbyname, gethostbyname),
        (sealed_gethostbyname_ex, gethostbyname_ex),
    ):
        _wraps(wrapper, original)
    sock_cls.connect = sealed_connect
    sock_cls.connect_ex = sealed_connect_ex
    # socket.create_connection resolves with the module's getaddrinfo and connects with
    # socket.connect, both patched here: it needs no wrapper of its own.
    mod.getaddrinfo = sealed_getaddrinfo
    mod.gethostbyname = sealed_gethostbyname
    mod.gethostbyname_ex = sealed_gethostbyname_ex


# --- HTTP clients -------------------------------------------------------------------------------


def _patch_http_client(mod) -> None:
    """http.client, hence urllib.request: the target is the tunnel host when a proxy is used."""
    cls = mod.HTTPConnection
    if getattr(cls.connect, _MARK, False):
        return
    connect = cls.connect

    def sealed_connect(self):
        check_http(self._tunnel_host or self.host)
        return connect(self)

    cls.connect = _wraps(sealed_connect, connect)


def _patch_urllib3(mod) -> None:
    """urllib3 used directly opens its sockets in ``_new_conn``, not in http.client's connect."""
    cls = mod.HTTPConnection
    if getattr(cls._new_conn, _MARK, False):
        return
    new_conn = cls._new_conn
    new_connection_error = sys.modules["urllib3.exceptions"].NewConnectionError  # imported by urllib3.connection

    def sealed_new_conn(self):
        try:
            check_http(getattr(self, "_tunnel_host", None) or self.host)
        except NetworkSealedError as exc:
            # The type urllib3 expects for "could not connect"; its own retries of it are immediate.
            raise new_connection_error(self, f"Failed to establish a new connection: {exc}") from exc
        return new_conn(self)

    cls._new_conn = _wraps(sealed_new_conn, new_conn)


def _patch_requests(mod) -> None:
    """requests: refused before urllib3, with a ``RequestException`` that is *not* a
    ``requests.ConnectionError``. Why: urllib3 would wrap any error into one, and retry loops
    around requests (evaluate's ``_request_with_retry``: 0.5 s, 1 s, 2 s...) retry exactly
    ``ConnectionError``/``ConnectTimeout``, while handlers of optional calls catch
    ``RequestException`` or ``OSError``, which this error is."""
    cls = mod.HTTPAdapter
    if getattr(cls.send, _MARK, False):
        return
    send = cls.send
    request_exception = sys.modules["requests.exceptions"].RequestException

    def sealed_send(self, request, *args, **kwargs):
        from urllib.parse import urlsplit

        try:
            check_http(urlsplit(request.url).hostname or "", (request_exception,))
        except NetworkSealedError as exc:
            # What RequestException.__init__ would set (OSError's __init__ runs instead): handlers
            # read ``exc.response``.
            exc.request, exc.response = request, None
            raise
        return send(self, request, *args, **kwargs)

    cls.send = _wraps(sealed_send, send)


def _patch_httpcore_sync_pool(mod) -> None:
    """httpcore/httpcore2 (httpx/httpx2): every request, proxied or not, enters the pool with its
    target URL. The error is not an httpcore error on purpose: httpx maps those to ``ConnectError``,
    which huggingface_hub retries with backoff."""
    cls = mod.ConnectionPool
    if getattr(cls.handle_request, _MARK, False):
        return
    handle_request = cls.handle_request

    def sealed_handle_request(self, request):
        if getattr(self, "_uds", None) is None:  # a Unix socket is not the network
            check_http(request.url.host)
        return handle_request(self, request)

    cls.handle_request = _wraps(sealed_handle_request, handle_request)


def _patch_httpcore_async_pool(mod) -> None:
    cls = mod.AsyncConnectionPool
    if getattr(cls.handle_async_request, _MARK, False):
        return
    handle_async_request = cls.handle_async_request

    async def sealed_handle_async_request(self, request):
        if getattr(self, "_uds", None) is None:
            check_http(request.url.host)
        return await handle_async_request(self, request)

    cls.handle_async_request = _wraps(sealed_handle_async_request, handle_async_request)


def _patch_aiohttp(mod) -> None:
    cls = mod.BaseConnector
    if getattr(cls.connect, _MARK, False):
        return
    connect = cls.connect
    local = tuple(c for c in (getattr(mod, "UnixConnector", None), getattr(mod, "NamedPipeConnector", None)) if c)

    async def sealed_connect(self, req, *args, **kwargs):
        if not isinstance(self, local):
            check_http(req.url.host or "")
        return await connect(self, req, *args, **kwargs)

    cls.connect = _wraps(sealed_connect, connect)


def _patch_urllib_request(mod) -> None:
    """Leave the seal's own proxy out of the proxies Python's clients read from the environment."""
    if getattr(mod.getproxies_environment, _MARK, False):
        return
    from_environment = mod.getproxies_environment
    same = mod.getproxies is from_environment  # on Linux, getproxies *is* getproxies_environment

    def sealed_getproxies_environment():
        sealed = _seal_module().SEALED_PROXY
        return {scheme: url for scheme, url in from_environment().items() if url != sealed}

    mod.getproxies_environment = _wraps(sealed_getproxies_environment, from_environment)
    if same:
        mod.getproxies = mod.getproxies_environment
    else:
        getproxies = mod.getproxies

        def sealed_getproxies():
            sealed = _seal_module().SEALED_PROXY
            return {scheme: url for scheme, url in getproxies().items() if url != sealed}

        mod.getproxies = _wraps(sealed_getproxies, getproxies)


def installed() -> bool:
    """Whether this process is sealed: the import hook is in place."""
    return any(isinstance(finder, _PatchFinder) for finder in sys.meta_path)


def _wraps(wrapper, original):
    for attr in ("__name__", "__qualname__", "__doc__"):
        try:
            setattr(wrapper, attr, getattr(original, attr))
        except (AttributeError, TypeError):
            pass
    setattr(wrapper, _MARK, True)
    return wrapper


# Module → patch applied right after the module is executed.
PATCHES = {
    "socket": _patch_socket,
    "http.client": _patch_http_client,
    "urllib.request": _patch_urllib_request,
    "urllib3.connection": _patch_urllib3,
    "requests.adapters": _patch_requests,
    "httpcore._sync.connection_pool": _patch_httpcore_sync_pool,
    "httpcore._async.connection_pool": _patch_httpcore_async_pool,
    "httpcore2._sync.connection_pool": _patch_httpcore_sync_pool,
    "httpcore2._async.connection_pool": _patch_httpcore_async_pool,
    "aiohttp.connector": _patch_aiohttp,
}


class _PatchFinder:
    """A meta path finder that lets the other finders find the watched modules, then makes their
    loader patch each module as soon as it has been executed: nothing is imported ahead of need."""

    def find_spec(self, fullname, path=None, target=None):
        patch = PATCHES.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec  # a namespace package or a legacy loader: none of the watched modules
        exec_module = loader.exec_module

        def exec_and_patch(module) -> None:
            exec_module(module)
            _apply(patch, module)

        if isinstance(loader, type):  # a class used as loader (built-in, frozen): never mutate it
            spec.loader = _PatchingLoader(loader, exec_and_patch)
            return spec
        try:
            # Loaders of source files are one instance per spec: overriding the method on the
            # instance keeps the loader's type for anything that inspects ``module.__loader__``.
            loader.exec_module = exec_and_patch
        except AttributeError:
            spec.loader = _PatchingLoader(loader, exec_and_patch)
        return spec

    def invalidate_caches(self) -> None:
        pass


class _PatchingLoader:
    """Wraps a loader whose ``exec_module`` cannot be overridden; delegates everything else."""

    def __init__(self, loader, exec_module):
        self._loader = loader
        self.exec_module = exec_module

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def _apply(patch, module) -> None:
    """Patch ``module``; if its internals changed beyond what the patch knows, say so and go on:
    breaking the import would break the job, and the socket rules still hold."""
    try:
        patch(module)
    except Exception as exc:  # any failure of a patch must leave the import working
        try:
            sys.stderr.write(
                f"hfhpc: sealed: could not guard {module.__name__} ({type(exc).__name__}: {exc}); "
                "only the socket rules apply to it\n"
            )
        except (AttributeError, OSError, ValueError):
            pass


def install() -> None:
    """Seal this process: hook future imports, and patch the watched modules already imported."""
    if installed():
        return
    sys.meta_path.insert(0, _PatchFinder())
    for name, patch in PATCHES.items():
        module = sys.modules.get(name)
        if module is not None:
            _apply(patch, module)
