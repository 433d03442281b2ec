"""``hfhpc exec --netns``: a command in a network namespace of its own, where no host is reachable.

The guard and the proxy variables stop what goes through Python's modules and the clients that
honour proxies. A private network namespace stops everything else too (raw ``_socket``, ``ctypes``,
static binaries, DNS): the command sees one interface, its own loopback, and nothing beyond it. It
needs no privilege where the kernel lets users create user namespaces (most Linux distributions;
``kernel.unprivileged_userns_clone=0`` or an AppArmor restriction forbid it), and adds 0.06 s
to a command's start on a 2-core machine (``benchmarks/results/seal_children.json``). Opt-in,
because it also cuts what the seal lets through: the job's other nodes, the machine's own
loopback services and the allowed hosts.
"""

from __future__ import annotations

import os

from hfhpc.errors import UsageError

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


def enter_private_network() -> None:
    """Move this process into a new user and network namespace, as the same user, with loopback up.

    Meant for ``subprocess``'s ``preexec_fn`` (between fork and exec): the user namespace gives the
    capability to bring the new loopback up; it is dropped at exec, the user id stays the same.
    """
    import ctypes
    import fcntl
    import socket
    import struct

    uid, gid = os.getuid(), os.getgid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(probe.fileno(), _SIOCGIFFLAGS, request)[:18])[1]
        fcntl.ioctl(probe.fileno(), _SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | _IFF_UP))


def check_netns(allow_hosts: list[str]) -> None:
    """``UsageError`` when a namespace would cut hosts the spec allows."""
    if allow_hosts:
        raise UsageError(
            f"--netns reaches no host, and the spec allows {', '.join(allow_hosts)}",
            "drop --netns, or run without the spec's allowed hosts",
        )


def unavailable_error() -> UsageError:
    return UsageError(
        "--netns: this machine does not let users create a network namespace",
        "run without --netns (the seal still applies), or ask the administrators about user namespaces",
    )
