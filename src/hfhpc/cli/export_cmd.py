"""``hfhpc export RUN_DIR``: a run's checkpoint as a plain Hugging Face model (FSDP shards merged)."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="the run folder (output_dir of the job)")
    p.add_argument("--checkpoint", metavar="N|PATH", help="which checkpoint: a step, a folder (default: the newest complete one)")
    p.add_argument("-o", "--output", type=Path, metavar="DIR", help="where to write the model (default: RUN_DIR/export/checkpoint-N)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(args: argparse.Namespace) -> int:
    from hfhpc.export import export_checkpoint

    result = export_checkpoint(args.run_dir, checkpoint=args.checkpoint, output=args.output, overwrite=args.overwrite)
    size = sum(result.files.values())
    how = {"fsdp-sharded": "FSDP shards merged", "fsdp-full": "FSDP full state converted", "torch-bin": "converted",
           "safetensors": "copied", "adapter": "LoRA adapter copied (load it with peft)"}[result.source]
    print(f"exported {result.checkpoint.name} ({how}) to {result.output}: {len(result.files)} files, {size / 2**20:.1f} MiB")
    return 0
