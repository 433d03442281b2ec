"""SLURM's compact host lists (``n[01-03,7],gpu5``), expanded as ``scontrol show hostnames`` does.

The one parser of host lists: the job environment reads the job's nodes with it, and the network
seal (loaded by file path in children that may not import hfhpc) uses it too, so it imports nothing
but the standard library.
"""

from __future__ import annotations

import itertools
import re

MAX_HOSTLIST = 1_000_000  # a larger expansion is a typo, not a cluster

_BRACKET_RE = re.compile(r"(\[[^\[\]]*\])")


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
