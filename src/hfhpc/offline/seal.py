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

import ipaddress
import itertools
import os
import re
from collections.abc import Callable, Iterable, Mapping

GUARD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_guard")
"""The folder a sealed child has first on ``PYTHONPATH``."""

REFUSAL_LINE = (
    "hfhpc: sealed: refused network access to {host} "
    "(a file, dataset or metric is probably missing from the store: run `hfhpc check`)"
)

# The variables the guard reads at run time (the job's variables, not hfhpc's).
NODELIST_VARS = ("SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_STEP_NODELIST")
NODE_NAME_VARS = ("SLURMD_NODENAME", "MASTER_ADDR", "SLURM_LAUNCH_NODE_IPADDR")

MAX_HOSTLIST = 1_000_000  # a larger expansion is a typo, not a cluster

_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
_NAME_RE = re.compile(r"^(\*\.)?[a-z0-9_]([a-z0-9_-]*)(\.[a-z0-9_]([a-z0-9_-]*))*$")
_BRACKET_RE = re.compile(r"(\[[^\[\]]*\])")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def refusal_line(host: str) -> str:
    """The line a sealed process writes to stderr the first time it refuses ``host``."""
    return REFUSAL_LINE.format(host=host)


# --- SLURM host lists ------------------------------------------------------------------------------


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a SLURM host list (``n[01-03,7],gpu5``) into host names, in order, without duplicates.

    Follows ``scontrol show hostnames``: commas inside brackets separate ranges, several bracket
    groups in one name expand as a product (``r[1-2]n[1-2]``), and a range keeps the zero padding of
    its lower bound (``[08-10]`` gives ``08 09 10``). Raises ``ValueError`` on malformed input.
    """
    hosts: list[str] = []
    seen: set[str] = set()
    for item in _split_top_level(hostlist):
        for host in _expand_item(item):
            if host not in seen:
                seen.add(host)
                hosts.append(host)
                if len(hosts) > MAX_HOSTLIST:
                    raise ValueError(f"host list {hostlist[:80]!r} expands to more than {MAX_HOSTLIST} hosts")
    return hosts


def _split_top_level(hostlist: str) -> list[str]:
    """Split on commas and spaces that are not inside brackets."""
    items: list[str] = []
    depth = 0
    current: list[str] = []
    for char in hostlist:
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested brackets in host list {hostlist!r}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {hostlist!r}")
        if depth == 0 and (char == "," or char.isspace()):
            if current:
                items.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise ValueError(f"unbalanced '[' in host list {hostlist!r}")
    if current:
        items.append("".join(current))
    return items


def _expand_item(item: str) -> list[str]:
    parts = _BRACKET_RE.split(item)
    choices: list[list[str]] = []
    for index, part in enumerate(parts):
        if index % 2 == 0:  # literal text between bracket groups
            if "[" in part or "]" in part:
                raise ValueError(f"malformed host list item {item!r}")
            choices.append([part])
        else:
            choices.append(_expand_ranges(part[1:-1], item))
    return ["".join(combo) for combo in itertools.product(*choices)]


def _expand_ranges(spec: str, item: str) -> list[str]:
    values: list[str] = []
    for chunk in spec.split(","):
        chunk = chunk.strip()
        low, sep, high = chunk.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"malformed range {chunk!r} in host list item {item!r}")
        if not sep:
            values.append(low)
            continue
        start, stop = int(low), int(high)
        if stop < start:
            raise ValueError(f"descending range {chunk!r} in host list item {item!r}")
        if stop - start >= MAX_HOSTLIST:
            raise ValueError(f"range {chunk!r} in host list item {item!r} is too large")
        width = len(low)  # SLURM pads to the width of the lower bound
        values.extend(f"{number:0{width}d}" for number in range(start, stop + 1))
    return values


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


def job_host_names(environ: Mapping[str, str]) -> list[str]:
    """The job's own nodes as the job's variables name them (names or IPs). A malformed node list is
    ignored rather than raised: the guard runs in every process and must not break start-up."""
    names: list[str] = []
    for var in NODELIST_VARS:
        value = environ.get(var, "").strip()
        if value:
            try:
                names.extend(expand_hostlist(value))
            except ValueError:
                continue
    for var in NODE_NAME_VARS:
        value = environ.get(var, "").strip()
        if value:
            names.append(value)
    return names


def policy_key(environ: Mapping[str, str]) -> tuple[str | None, ...]:
    """The variables a policy is built from: a script may set ``MASTER_ADDR`` after start-up."""
    return tuple(environ.get(var) for var in (*NODELIST_VARS, *NODE_NAME_VARS, "HFHPC_SEAL_ALLOW"))


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
    "http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "rsync_proxy",
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
    entries: list[str] = []
    for entry in (*LOOPBACK_NO_PROXY, *(e[1:] if e.startswith("*.") else e for e in allowed)):
        if entry not in entries:
            entries.append(entry)
    size = sum(len(e) + 1 for e in entries)
    for host in job_hosts:
        host = _normalize_name(host)
        if host and host not in entries and size + len(host) + 1 <= MAX_NO_PROXY:
            entries.append(host)
            size += len(host) + 1
    return ",".join(entries)
