"""The network seal of the processes hfhpc starts: which hosts they may reach, and the variables that
switch the seal on.

A sealed process runs the guard in ``_guard/`` at interpreter start (it is put first on
``PYTHONPATH``, and its ``sitecustomize`` imports ``hfhpc_seal_guard``). The guard enforces the
policy defined here:

* Name look-ups and TCP connects may reach loopback, this machine, the job's own nodes
  (``SLURM_JOB_NODELIST``, ``MASTER_ADDR``) and the hosts of ``HFHPC_SEAL_ALLOW``: distributed
  rendezvous keeps working, everything else is refused at once.
* HTTP(S) requests may reach the hosts of ``HFHPC_SEAL_ALLOW`` only, loopback included: a Hub
  mirror could listen on loopback, and a sealed job must need nothing from any hub.

Programs that are not Python get the proxy variables instead (:data:`SEALED_PROXY`,
:func:`no_proxy_value`): any host but loopback, the job's nodes and the allowed hosts is refused
at once by the clients that honour them. :mod:`hfhpc.offline.environ` builds a child's variables.

This module is also loaded by the guard *by file path*, in children that may not be able to import
``hfhpc`` at all, so it imports nothing but the standard library at module level.
"""

from __future__ import annotations

import importlib
import importlib.util
import ipaddress
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping

GUARD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_guard")
"""The folder a sealed child has first on ``PYTHONPATH``."""

REFUSAL_LINE = (
    "hfhpc: sealed: refused network access to {host} "
    "(a file, dataset or metric is probably missing from the store: run `hfhpc check`)"
)

# Besides the job environment's variables, the guard reads these at run time.
SEAL_VARS = ("MASTER_ADDR", "HFHPC_SEAL_ALLOW")

_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
_NAME_RE = re.compile(r"^(\*\.)?[a-z0-9_]([a-z0-9_-]*)(\.[a-z0-9_]([a-z0-9_-]*))*$")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def refusal_line(host: str) -> str:
    """The line a sealed process writes to stderr the first time it refuses ``host``."""
    return REFUSAL_LINE.format(host=host)


# --- Allowed hosts ----------------------------------------------------------------------------------


def normalize_host_entry(entry: str) -> str:
    """One allow-list entry as the guard compares it: a lower-case name, ``*.suffix``, IP or CIDR.

    URLs (``http://mirror:8080/x``) and ``host:port`` are reduced to the host, since a spec author
    will paste either. Raises ``ValueError`` for anything that is not a host.
    """
    value = entry.strip()
    if "://" in value:
        from urllib.parse import urlsplit

        value = urlsplit(value).hostname or ""
    elif value.startswith("["):  # [v6] or [v6]:port
        value = value[1 : value.find("]")] if "]" in value else ""
    elif value.count(":") == 1 and value.rsplit(":", 1)[1].isdigit():
        value = value.rsplit(":", 1)[0]
    value = value.lower().rstrip(".")
    if not value:
        raise ValueError(f"{entry!r} is not a host name, IP address or network")
    try:
        if "/" in value:
            return str(ipaddress.ip_network(value, strict=False))
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not _NAME_RE.match(value):
        raise ValueError(f"{entry!r} is not a host name, IP address or network")
    return value


def parse_ip(host: str) -> IPAddress | None:
    """``host`` as an IP address (IPv4-mapped IPv6 unwrapped, brackets allowed), or None for a name."""
    if not host or not (host[0].isdigit() or ":" in host or host[0] == "["):
        return None  # fast path for the common case, a name starting with a letter
    try:
        # Without the zone of a link-local address ("fe80::1%eth0"): the same address either way.
        ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None  # a name such as "3com.example" that merely starts with a digit
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _normalize_name(host: str) -> str:
    return host.strip().lower().rstrip(".")


class AllowList:
    """The hosts of ``HFHPC_SEAL_ALLOW``: exact names, ``*.suffix`` wildcards, IPs and networks."""

    def __init__(self, entries: Iterable[str] = ()):
        self.names: set[str] = set()
        self.suffixes: list[str] = []
        self.networks: list[IPNetwork] = []
        for entry in entries:
            value = normalize_host_entry(entry)
            if value.startswith("*."):
                self.suffixes.append(value[1:])  # keep the dot: "*.x.org" matches "a.x.org", not "x.org"
            elif value[0].isdigit() or ":" in value:
                try:
                    self.networks.append(ipaddress.ip_network(value, strict=False))
                except ValueError:
                    self.names.add(value)  # a name such as "3com.example"
            else:
                self.names.add(value)

    @classmethod
    def from_value(cls, value: str, *, strict: bool = False) -> AllowList:
        """Parse a comma-separated list; unless ``strict``, skip invalid entries (the guard must never
        stop a process from starting because of a typo in a variable)."""
        entries = [part for part in (p.strip() for p in value.split(",")) if part]
        if strict:
            return cls(entries)
        valid = []
        for entry in entries:
            try:
                normalize_host_entry(entry)
            except ValueError:
                continue
            valid.append(entry)
        return cls(valid)

    def matches(self, host: str) -> bool:
        ip = parse_ip(host)
        if ip is not None:
            return self.matches_ip(ip)
        name = _normalize_name(host)
        return name in self.names or any(name.endswith(suffix) for suffix in self.suffixes)

    def matches_ip(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self.networks)


# --- The policy -------------------------------------------------------------------------------------


def _scheduler_environment():
    """:mod:`hfhpc.scheduler.environment`, also where this file was loaded by path by the guard of
    a Python that cannot import hfhpc: the package is then loaded from the files next to this one."""
    try:
        return importlib.import_module("hfhpc.scheduler.environment")
    except ImportError:
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        spec = importlib.util.spec_from_file_location("hfhpc", os.path.join(package, "__init__.py"),
                                                      submodule_search_locations=[package])
        if spec is None or spec.loader is None:
            raise
        module = importlib.util.module_from_spec(spec)
        sys.modules["hfhpc"] = module
        spec.loader.exec_module(module)
        return importlib.import_module("hfhpc.scheduler.environment")


def job_host_names(environ: Mapping[str, str]) -> list[str]:
    """The job's own nodes as the job environment names them (names or IPs), and ``MASTER_ADDR``.
    A malformed node list is ignored rather than raised: the guard runs in every process and must
    not break start-up."""
    names = _scheduler_environment().JobEnvironment.from_environ(environ).peer_hosts()
    master = environ.get("MASTER_ADDR", "").strip()
    return names + [master] if master else names


def policy_key(environ: Mapping[str, str]) -> tuple[str | None, ...]:
    """The variables a policy is built from: a script may set ``MASTER_ADDR`` after start-up."""
    return (*_scheduler_environment().variables_read(environ), *(environ.get(var) for var in SEAL_VARS))


Resolver = Callable[[str], Iterable[str]]


class SealPolicy:
    """Decides, for a sealed process, which look-ups, connects and HTTP requests may go through.

    ``resolve`` turns a name into addresses *without* going through the seal; it is only called
    when a connect to an address nobody looked up needs the job's nodes resolved (lazily, once).
    """

    def __init__(
        self,
        allow: AllowList,
        job_hosts: Iterable[str] = (),
        *,
        hostname: str = "",
        resolve: Resolver | None = None,
        local_addresses: Callable[[], Iterable[str]] | None = None,
    ):
        self.allow = allow
        self._resolve = resolve
        self._local_addresses = local_addresses
        self._job_hosts = [h for h in (*job_hosts, hostname) if h]
        self._names: set[str] = set(_LOCAL_NAMES)
        self._short_names: set[str] = set()
        self._addresses: set[str] = set()
        for host in self._job_hosts:
            ip = parse_ip(host)
            if ip is not None:
                self._addresses.add(str(ip))
                continue
            name = _normalize_name(host)
            self._names.add(name)
            # A node listed as "n01" is reached as "n01.cluster.local" too, and the other way round.
            self._short_names.add(name.split(".", 1)[0])
        self._job_resolved = resolve is None and local_addresses is None
        self.key: tuple[str | None, ...] = ()

    @classmethod
    def from_environ(
        cls,
        environ: Mapping[str, str],
        *,
        hostname: str = "",
        resolve: Resolver | None = None,
        local_addresses: Callable[[], Iterable[str]] | None = None,
    ) -> SealPolicy:
        policy = cls(
            AllowList.from_value(environ.get("HFHPC_SEAL_ALLOW", "")),
            job_host_names(environ),
            hostname=hostname,
            resolve=resolve,
            local_addresses=local_addresses,
        )
        policy.key = policy_key(environ)
        return policy

    def http_allowed(self, host: str) -> bool:
        """HTTP goes to the allow list only: loopback is no exception (a mirror may run there)."""
        return self.allow.matches(host)

    def lookup_allowed(self, host: str) -> bool:
        """May ``host`` be resolved? IP literals need no DNS: their connect is checked instead."""
        if parse_ip(host) is not None:
            return True
        name = _normalize_name(host)
        if name in self._names or name.endswith(".localhost"):
            return True
        if name.split(".", 1)[0] in self._short_names:
            return True
        return self.allow.matches(name)

    def connect_allowed(self, host: str) -> bool:
        """May a TCP connection go to ``host`` (an address, or a name the C library will resolve)?"""
        ip = parse_ip(host)
        if ip is None:
            return self.lookup_allowed(host)
        if ip.is_loopback or ip.is_unspecified:
            return True
        key = str(ip)
        if key in self._addresses or self.allow.matches_ip(ip):
            return True
        if not self._job_resolved:
            self._resolve_job_hosts()
            return key in self._addresses
        return False

    def remember(self, addresses: Iterable[str]) -> None:
        """Addresses an allowed look-up returned: connects to them are allowed."""
        for address in addresses:
            ip = parse_ip(address)
            if ip is not None:
                self._addresses.add(str(ip))

    def remembered(self) -> list[str]:
        """The addresses allowed so far beyond the job's own (carried over when rebuilt)."""
        return sorted(self._addresses)

    def _resolve_job_hosts(self) -> None:
        # Done once, and only when a connect goes to an address no allowed look-up returned (such
        # as a peer's address received over a store): a job that only uses names never pays for it.
        self._job_resolved = True
        if self._resolve is not None:
            for host in self._job_hosts:
                if parse_ip(host) is None:
                    try:
                        self.remember(self._resolve(host))
                    except OSError:
                        continue
        if self._local_addresses is not None:
            try:
                self.remember(self._local_addresses())
            except OSError:
                pass


def interface_addresses() -> list[str]:
    """This machine's interface addresses (Linux; elsewhere an empty list), without any DNS.

    A node often has several networks (Ethernet, InfiniBand) and its name resolves to one of them,
    so a connect to its own address on another network is only recognised this way.
    """
    import socket

    addresses: list[str] = []
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as lines:
            for line in lines:
                raw = line.split()[0]
                addresses.append(str(ipaddress.IPv6Address(int(raw, 16))))
    except (OSError, ValueError, IndexError):
        pass
    try:
        import fcntl
        import struct

        siocgifaddr = 0x8915
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            for _, name in socket.if_nameindex():
                try:
                    packed = fcntl.ioctl(probe.fileno(), siocgifaddr, struct.pack("256s", name[:15].encode()))
                except OSError:
                    continue  # an interface without an IPv4 address
                addresses.append(socket.inet_ntoa(packed[20:24]))
    except (ImportError, OSError, AttributeError):
        pass
    return addresses


# --- What non-Python children see -------------------------------------------------------------------

SEALED_PROXY = "http://127.0.0.1:0"
"""The proxy of every protocol in a sealed environment. Nothing can listen on port 0, so a connect
to it is refused at once (curl, wget and git fail in milliseconds): curl, wget, git and every other
client that honours the proxy variables fail fast for any host ``no_proxy`` does not exempt. The
guard hides it from Python's own clients, which it checks itself."""

PROXY_VARS = (
    "http_proxy", "https_proxy", "ftp_proxy", "all_proxy",
    "HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "ALL_PROXY",
)  # fmt: skip
NO_PROXY_VARS = ("no_proxy", "NO_PROXY")


LOOPBACK_NO_PROXY = ("localhost", "127.0.0.1", "127.0.0.0/8", "::1")
MAX_NO_PROXY = 64 * 1024  # characters: a variable must stay far below Linux's 128 KiB per string


def no_proxy_value(allowed: Iterable[str], job_hosts: Iterable[str] = ()) -> str:
    """``no_proxy`` of a sealed environment: the hosts that HTTP clients other than Python's reach
    without the seal's proxy.

    Loopback, the job's own nodes and the allowed hosts: what the socket rules let through, so a
    service on loopback or on another node of the job (a gRPC or HTTP one of the job's own) keeps
    working. A ``*.x.org`` wildcard becomes ``.x.org``, which curl and wget also match against
    ``x.org`` itself. Node names past :data:`MAX_NO_PROXY` characters are left out: such nodes are
    refused at once, never waited on.
    """
    entries = list(dict.fromkeys((*LOOPBACK_NO_PROXY, *(e[1:] if e.startswith("*.") else e for e in allowed))))
    seen = set(entries)
    size = sum(len(e) + 1 for e in entries)
    for host in job_hosts:
        host = _normalize_name(host)
        if host and host not in seen and size + len(host) + 1 <= MAX_NO_PROXY:
            entries.append(host)
            seen.add(host)
            size += len(host) + 1
    return ",".join(entries)
