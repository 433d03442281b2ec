"""`hfhpc check` of a 7B-model spec with a warm verification cache. Goal (issue: offline): ≤ 5 s.

The store holds a Zephyr-7B-shaped model: three safetensors shards of 14.5 GB in all, with real
headers (every tensor of a 32-layer Mistral at bf16) over sparse data, plus config and tokenizer
files from the tiny demo model, and the demo chat dataset. The first check hashes every byte; the
second finds the verification cache warm and only stats files, reads the headers and runs the
sealed load probes.

    python benchmarks/bench_check.py
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from hfhpc.store.cache import link_snapshot, write_ref, write_tree  # noqa: E402
from hfhpc.store.importer import import_folder  # noqa: E402
from hfhpc.store.layout import FileEntry, git_blob_sha1, lfs_pointer, sha256_file  # noqa: E402

H, I, L, HEADS, KV, V = 4096, 14336, 32, 32, 8, 32000
MODEL_ID = "bench/zephyr-7b-shaped"


def mistral_tensors() -> list[tuple[str, list[int]]]:
    d = H // HEADS
    out = [("model.embed_tokens.weight", [V, H]), ("model.norm.weight", [H]), ("lm_head.weight", [V, H])]
    for i in range(L):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", [H, H]), (p + "self_attn.k_proj.weight", [KV * d, H]),
                (p + "self_attn.v_proj.weight", [KV * d, H]), (p + "self_attn.o_proj.weight", [H, H]),
                (p + "mlp.gate_proj.weight", [I, H]), (p + "mlp.up_proj.weight", [I, H]), (p + "mlp.down_proj.weight", [H, I]),
                (p + "input_layernorm.weight", [H]), (p + "post_attention_layernorm.weight", [H])]
    return out


def sparse_shards(folder: Path, n: int = 3) -> list[Path]:
    tensors = mistral_tensors()
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(tensors) // n)
    paths, index = [], {}
    for k in range(n):
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        header, offset = {}, 0
        for tname, shape in tensors[k * per:(k + 1) * per]:
            size = 2
            for s in shape:
                size *= s
            header[tname] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
            index[tname] = name
            offset += size
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        path = folder / name
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)  # sparse: the bytes are not what is measured
        paths.append(path)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return paths


def main() -> int:
    from hfhpc.demo.build import CHAT_DATASET_ID, build_chat_dataset, build_tiny_chat_model

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        src = build_tiny_chat_model(tmp / "tiny")
        (src / "model.safetensors").unlink()
        cfg = json.loads((src / "config.json").read_text())
        cfg.update(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=HEADS, num_key_value_heads=KV)
        (src / "config.json").write_text(json.dumps(cfg))
        store = tmp / "store"
        commit, small = import_folder(store, "model", MODEL_ID, src)
        # The shards go straight to their blobs (sparse; a copy would fill them in).
        entries = list(small)
        snap_files = sparse_shards(tmp / "shards")
        for path in [*snap_files, tmp / "shards" / "model.safetensors.index.json"]:
            size = path.stat().st_size
            sha = sha256_file(path)
            lfs = path.suffix == ".safetensors"
            e = FileEntry(path.name, size, git_blob_sha1(lfs_pointer(sha, size)) if lfs else git_blob_sha1(path.read_bytes()), sha if lfs else None)
            blob = store / "hub" / f"models--{MODEL_ID.replace('/', '--')}" / "blobs" / e.etag
            shutil.move(path, blob)
            link_snapshot(store, "model", MODEL_ID, commit, e)
            entries.append(e)
        write_tree(store, "model", MODEL_ID, commit, entries)
        write_ref(store, "model", MODEL_ID, "main", commit)
        dcommit, dentries = import_folder(tmp / "up", "dataset", CHAT_DATASET_ID, build_chat_dataset(tmp / "data"))
        spec = tmp / "zephyr.yaml"
        spec.write_text(f"name: z\nrecipe: sft\nmodel: {MODEL_ID}\ndataset: {{id: {CHAT_DATASET_ID}, split: train_sft, eval_split: test_sft}}\n"
                        "launch: {strategy: fsdp}\nresources: {gpus_per_node: 4}\n")
        from hfhpc.store.server import StoreServer

        env = dict(os.environ)
        with StoreServer(tmp / "up") as server:
            env["HF_ENDPOINT"] = server.url
            subprocess.run([sys.executable, "-m", "hfhpc", "--store", str(store), "stage", "-q", "--dataset", CHAT_DATASET_ID,
                            "--lock", str(tmp / "d.lock")], env=env, check=True, capture_output=True)
        # The model's lock entry, written as staging would have.
        from hfhpc.store.lock import LockedAsset, LockedFile, load_lock

        lock = load_lock(tmp / "d.lock")
        lock.path = tmp / "zephyr.lock"
        lock.put(LockedAsset("model", MODEL_ID, "main", commit, [], [
            LockedFile(e.path, e.size, e.lfs_sha256 or sha256_file(store / "hub" / f"models--{MODEL_ID.replace('/', '--')}" / "blobs" / e.etag), e.blob_id, e.lfs_sha256 is not None)
            for e in entries]))
        lock.save()
        total = sum(e.size for e in entries)
        times, outputs = [], []
        for _ in range(3):
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "hfhpc", "--store", str(store), "check", str(spec)],
                                 capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "HF_ENDPOINT"})
            times.append(time.perf_counter() - t)
            outputs.append(out.stdout.strip().splitlines()[-1])
            assert out.returncode == 0, out.stdout + out.stderr
    result = {
        "model_bytes": total,
        "cold_check_s": round(times[0], 2),
        "warm_check_s": [round(x, 2) for x in times[1:]],
        "goal_warm_s": 5.0,
        "last_line": outputs[-1],
        "note": "7.24B Mistral-shaped bf16 shards (sparse files with real headers); probes: config, tokenizer, 3 safetensors headers, 2 dataset splits",
    }
    print(write_result("check_7b", result).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
