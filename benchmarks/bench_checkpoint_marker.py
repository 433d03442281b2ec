"""What recording sha256 in the checkpoint marker costs: a checkpoint-shaped folder is written (so
its bytes are in the page cache, as right after a save), then the marker is written the old way
(fsync every file, sizes only) and the new way (:func:`hfhpc.run.checkpoints.write_marker`: one
read per file, hashing and fsyncing it, in parallel threads), and the verification a resume does
(:func:`hfhpc.run.checkpoints.problem` with ``verify=True``) is timed too.

    python benchmarks/bench_checkpoint_marker.py DIR [--gb 13] [--files 6]

The default is about the checkpoint of a 1.1B model trained with AdamW (fp32 weights 4.4 GB,
optimizer states 8.8 GB): a model file, an optimizer file and the small files, split like the Trainer's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from hfhpc.run import checkpoints  # noqa: E402

CHUNK = 64 << 20


def make_checkpoint(folder: Path, gb: float, files: int) -> int:
    folder.mkdir(parents=True)
    total = int(gb * 1e9)
    big = [("model.safetensors", total // 3)] + [(f"optimizer-{i}.pt", (total - total // 3) // (files - 1)) for i in range(files - 1)]
    block = os.urandom(CHUNK)
    for name, size in big:
        with open(folder / name, "wb") as f:
            left = size
            while left > 0:
                f.write(block[:min(CHUNK, left)])
                left -= CHUNK
    for name in ("trainer_state.json", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        (folder / name).write_bytes(os.urandom(16 << 10))
    return sum(p.stat().st_size for p in folder.iterdir())


def fsync_only(folder: Path) -> None:
    for p in folder.iterdir():
        checkpoints.fsync_file(p)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("--gb", type=float, default=13.0)
    ap.add_argument("--files", type=int, default=6)
    args = ap.parse_args()
    results = {}
    for step, how in enumerate(("fsync_only", "write_marker_sha256", "verify_on_resume"), 1):
        folder = args.dir / f"checkpoint-{step}"
        shutil.rmtree(folder, ignore_errors=True)
        size = make_checkpoint(folder, args.gb, args.files)
        if how == "verify_on_resume":
            checkpoints.write_marker(folder, step)
            t = time.perf_counter()
            assert checkpoints.problem(folder, verify=True) is None
        else:
            t = time.perf_counter()
            fsync_only(folder) if how == "fsync_only" else checkpoints.write_marker(folder, step)
        seconds = time.perf_counter() - t
        results[how] = {"seconds": round(seconds, 3), "gb_per_s": round(size / 1e9 / seconds, 2)}
        print(how, results[how], flush=True)
        shutil.rmtree(folder, ignore_errors=True)
    path = write_result("checkpoint_marker", {
        "checkpoint_gb": round(size / 1e9, 2), "files": args.files + 4, "threads": checkpoints.HASH_THREADS,
        "cpus": len(os.sched_getaffinity(0)), "filesystem": str(args.dir), "results": results,
        "note": "bytes freshly written (page cache warm), as right after a save; verify_on_resume reads the same warm cache",
    })
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
