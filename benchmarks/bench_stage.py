"""Staging throughput against a raw HTTP download of the same files from the same server.

Goal (issue: asset store): hfhpc stage ≥ 0.9× the raw download. Both write the bytes to disk on the
same filesystem; hfhpc also hashes every byte (sha256) and checks it against the listing.

    python benchmarks/bench_stage.py [--size-mib 1024] [--repeat 3]
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import versions, write_result  # noqa: E402

from hfhpc.store.importer import import_folder  # noqa: E402
from hfhpc.store.server import StoreServer  # noqa: E402


def raw_download(url: str, dest: Path) -> None:
    """What `curl -o` does: one GET, bytes straight to a file."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port)
    conn.request("GET", parts.path)
    resp = conn.getresponse()
    with open(dest, "wb") as f:
        shutil.copyfileobj(resp, f, 4 * 1024 * 1024)
    conn.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        src.mkdir()
        (src / "config.json").write_text("{}")
        with open(src / "model.safetensors", "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1024 * 1024))
        commit, _ = import_folder(tmp / "up", "model", "bench/big", src)
        size = (src / "model.safetensors").stat().st_size
        raw_s, stage_s, curl_s = [], [], []
        with StoreServer(tmp / "up") as server:
            url = f"{server.url}/bench/big/resolve/{commit}/model.safetensors"
            for i in range(args.repeat):
                # Every timed run starts with no dirty pages left by the previous one: otherwise
                # whichever runs last pays the kernel's writeback throttling for the others.
                os.sync()
                t = time.perf_counter()
                raw_download(url, tmp / f"raw{i}")
                raw_s.append(time.perf_counter() - t)
                (tmp / f"raw{i}").unlink()
                if shutil.which("curl"):
                    os.sync()
                    t = time.perf_counter()
                    subprocess.run(["curl", "-s", "-o", str(tmp / f"curl{i}"), url], check=True)
                    curl_s.append(time.perf_counter() - t)
                    (tmp / f"curl{i}").unlink()
                store = tmp / f"store{i}"
                env = dict(os.environ, HF_ENDPOINT=server.url)
                os.sync()
                t = time.perf_counter()
                subprocess.run([sys.executable, "-m", "hfhpc", "--store", str(store), "stage", "-q", "--model", "bench/big",
                                "--lock", str(tmp / "b.lock")], env=env, check=True, capture_output=True)
                stage_s.append(time.perf_counter() - t)
                shutil.rmtree(store)
                (tmp / "b.lock").unlink()
    mib = size / 2**20
    result = {
        "file_mib": round(mib),
        "raw_http_s": [round(x, 3) for x in raw_s],
        "curl_s": [round(x, 3) for x in curl_s],
        "hfhpc_stage_s": [round(x, 3) for x in stage_s],
        "raw_mib_per_s": round(mib / statistics.median(raw_s), 1),
        "hfhpc_mib_per_s": round(mib / statistics.median(stage_s), 1),
        "ratio_vs_raw": round(statistics.median(raw_s) / statistics.median(stage_s), 3),
        "goal_ratio": 0.9,
        "note": "hfhpc time is the whole `hfhpc stage` command (process start, API calls, sha256 of every byte, lockfile)",
        "versions": versions("huggingface_hub", "httpx2"),
    }
    if curl_s:
        result["ratio_vs_curl"] = round(statistics.median(curl_s) / statistics.median(stage_s), 3)
    path = write_result("stage_throughput", result)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
