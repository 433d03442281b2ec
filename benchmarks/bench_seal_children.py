"""What sealing a non-Python child costs: how fast curl, wget and git are refused through the seal's
proxy (port 0 of loopback), and what ``hfhpc exec --netns`` adds to starting a command (a new user
and network namespace, loopback brought up).

    python benchmarks/bench_seal_children.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from hfhpc.offline.environ import seal_environ  # noqa: E402
from hfhpc.offline.netns import enter_private_network  # noqa: E402

CLIENTS = {
    "curl": ["curl", "-sS", "-m", "30", "http://example.invalid/"],
    "wget": ["wget", "-q", "-T", "30", "-t", "1", "-O", "/dev/null", "http://example.invalid/"],
    "git": ["git", "ls-remote", "http://example.invalid/repo"],
}


def timed(cmd: list[str], repeat: int, **kwargs) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, capture_output=True, **kwargs)
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    env = dict(os.environ)
    env.update(seal_environ(env))
    result: dict[str, object] = {}
    for name, cmd in CLIENTS.items():
        if shutil.which(cmd[0]):
            result[f"{name}_refused_s_median"] = round(statistics.median(timed(cmd, args.repeat, env=env)), 4)
    plain = timed(["/bin/true"], args.repeat)
    result["true_s_median"] = round(statistics.median(plain), 4)
    try:
        netns = timed(["/bin/true"], args.repeat, preexec_fn=enter_private_network)
        result["true_in_netns_s_median"] = round(statistics.median(netns), 4)
    except subprocess.SubprocessError:
        result["true_in_netns_s_median"] = None  # no user namespaces on this machine
    result["note"] = "refusal times include the client's own start; netns = unshare(CLONE_NEWUSER|CLONE_NEWNET) + lo up"
    print(write_result("seal_children", result).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
