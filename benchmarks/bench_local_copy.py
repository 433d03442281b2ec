"""Node-local staging (the per-node copy of a job's assets to $SLURM_TMPDIR) against `cp -r` of the
same files. Goal (issue: launch): ≥ 0.9× the throughput of `cp -r`.

The asset is a model-shaped repository: a few large safetensors shards and small config files.
Each timed copy starts with the page cache dropped of dirty pages (os.sync) and goes to a fresh
destination on the same filesystem.

    python benchmarks/bench_local_copy.py [--shards 4] [--shard-mib 512] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from hfhpc.store.importer import import_folder  # noqa: E402
from hfhpc.store.local import copy_assets  # noqa: E402
from hfhpc.store.lock import LockedAsset, LockedFile  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--shard-mib", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        src.mkdir()
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            (src / name).write_text("{}" * 1000)
        for i in range(a.shards):
            with open(src / f"model-{i:05d}-of-{a.shards:05d}.safetensors", "wb") as f:
                for _ in range(a.shard_mib):
                    f.write(os.urandom(1 << 20))
        store = tmp / "store"
        commit, entries = import_folder(store, "model", "bench/sharded", src)
        asset = LockedAsset("model", "bench/sharded", "main", commit, [],
                            [LockedFile(e.path, e.size, e.lfs_sha256 or "0" * 64, e.blob_id, e.lfs_sha256 is not None) for e in entries])
        repo = store / "hub" / "models--bench--sharded"
        total = sum(e.size for e in entries)
        cp_s, ours_s = [], []
        for i in range(a.repeat):
            os.sync()
            t = time.perf_counter()
            subprocess.run(["cp", "-r", str(repo), str(tmp / f"cp{i}")], check=True)
            cp_s.append(time.perf_counter() - t)
            shutil.rmtree(tmp / f"cp{i}")
            os.sync()
            t = time.perf_counter()
            copy_assets(store, [asset], tmp / f"ours{i}", log=lambda s: None)
            ours_s.append(time.perf_counter() - t)
            shutil.rmtree(tmp / f"ours{i}")
    mib = total / 2**20
    result = {
        "bytes": total,
        "files": len(entries),
        "cp_r_s": [round(x, 3) for x in cp_s],
        "hfhpc_s": [round(x, 3) for x in ours_s],
        "cp_r_mib_per_s": round(mib / statistics.median(cp_s), 1),
        "hfhpc_mib_per_s": round(mib / statistics.median(ours_s), 1),
        "ratio_vs_cp_r": round(statistics.median(cp_s) / statistics.median(ours_s), 3),
        "goal_ratio": 0.9,
        "note": "same filesystem for source and destination (a cluster copies from Lustre to a local SSD)",
    }
    print(write_result("local_copy", result).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
