"""SLURM durations, read and written in one place.

``parse`` reads a time limit as a spec gives it, in every form ``sbatch --time`` accepts: ``minutes``,
``minutes:seconds``, ``hours:minutes:seconds``, ``days-hours``, ``days-hours:minutes`` and
``days-hours:minutes:seconds``. ``parse_reported`` reads what ``scontrol``/``sacct`` print (the same
forms, with fractional seconds, or words such as ``UNLIMITED``). ``format`` writes ``D-HH:MM:SS``.
"""

from __future__ import annotations

import math
import re

_FORMS = re.compile(
    r"^(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"  # D-HH[:MM[:SS]]
    r"|(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)"                               # HH:MM:SS
    r"|(?P<mm>\d+):(?P<ss>\d+)"                                        # MM:SS
    r"|(?P<minutes>\d+))$"                                              # minutes
)
FORMS = "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
MAX_S = 366 * 86400  # no site grants more; a larger value is a typo


def _seconds(text: str) -> int:
    m = _FORMS.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a SLURM time: use {FORMS}")
    g = {k: int(v) for k, v in m.groupdict().items() if v is not None}

    def below(value: int, limit: int, what: str) -> int:
        if value >= limit:
            raise ValueError(f"{text!r} is not a SLURM time: {what} {value} is not below {limit}")
        return value

    if "days" in g:
        hours = below(g["dh"], 24, "hours")
        minutes = below(g.get("dm", 0), 60, "minutes")
        seconds = below(g.get("ds", 0), 60, "seconds")
        return ((g["days"] * 24 + hours) * 60 + minutes) * 60 + seconds
    if "h" in g:
        return (g["h"] * 60 + below(g["m"], 60, "minutes")) * 60 + below(g["s"], 60, "seconds")
    if "mm" in g:
        return g["mm"] * 60 + below(g["ss"], 60, "seconds")
    return g["minutes"] * 60


def parse(text: str) -> int:
    """A time limit in seconds; ``ValueError`` (one line, naming the accepted forms) otherwise."""
    seconds = _seconds(str(text))
    if seconds <= 0:
        raise ValueError(f"{text!r} is no time at all: give a positive time limit")
    if seconds > MAX_S:
        raise ValueError(f"{text!r} is more than a year: check the time limit")
    return seconds


def parse_reported(text: str) -> int | None:
    """A duration as SLURM reports it (``1-02:03:04``, ``05:07``, ``00:01:02.345``), in whole seconds;
    None for ``UNLIMITED``, ``Partition_Limit``, ``INVALID`` and other words."""
    whole = text.strip().split(".", 1)[0]
    try:
        return _seconds(whole) if whole else None
    except ValueError:
        return None


def format(seconds: float) -> str:  # noqa: A001 - the module's name qualifies it: slurmtime.format
    """``D-HH:MM:SS``, rounded up to the second."""
    s = int(math.ceil(seconds))
    days, s = divmod(s, 86400)
    return f"{days}-{s // 3600:02}:{s % 3600 // 60:02}:{s % 60:02}"
