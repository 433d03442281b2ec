#!/usr/bin/env python
"""Train a small CNN on CIFAR-10 with 🤗 Accelerate: the cluster wiki's example, without torchvision.

The same file runs unchanged on one CPU, on several CPU ranks and on GPUs across nodes::

    python cifar10_train.py --data-dir DATA/cifar-10-batches-py
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 cifar10_train.py ...
    accelerate launch --multi_gpu --num_processes 8 ... cifar10_train.py ...   (or `hfhpc submit cifar10.yaml`)

It reads the official "CIFAR-10 python version" archive (``data_batch_1`` … ``data_batch_5`` and
``test_batch``), which ``prepare_cifar10.sh`` fetches on a login node: compute nodes have no network,
so nothing here downloads anything.

Outputs, in ``--output-dir`` (hfhpc's run folder):
    metrics.jsonl   one JSON object per logging interval: step, epoch, loss, elapsed_s, samples_per_s
    model/          the trained weights (model.safetensors)
    summary.json    test_accuracy, epochs, world_size, steps
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# Per-channel statistics of the CIFAR-10 training set, the values the PyTorch examples normalize with.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
NUM_CLASSES = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("CIFAR10_DIR", "./data/cifar-10-batches-py")),
                   help="folder of data_batch_* and test_batch (default: $CIFAR10_DIR or ./data/cifar-10-batches-py)")
    # hfhpc sets HFHPC_RUN_DIR to the spec's output_dir, so a spec need not repeat it in args.
    p.add_argument("--output-dir", type=Path, default=Path(os.environ.get("HFHPC_RUN_DIR", "runs/cifar10")),
                   help="where metrics.jsonl, model/ and summary.json go (default: $HFHPC_RUN_DIR or runs/cifar10)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="images per process per step (global batch = this × processes)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--width", type=int, default=32, help="channels of the first conv block (the second has twice as many)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps, even mid-epoch")
    p.add_argument("--log-every", type=int, default=50, help="write a metrics line every N steps (and at each epoch end)")
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args(argv)


# -- data ----------------------------------------------------------------------------------

def find_batches(data_dir: Path) -> Path | None:
    """The folder holding the batches: ``data_dir`` itself, or the archive's folder inside it."""
    for folder in (data_dir, data_dir / "cifar-10-batches-py"):
        if (folder / "test_batch").is_file() and any(folder.glob("data_batch_*")):
            return folder
    return None


def load_batches(files: list[Path]) -> TensorDataset:
    """Read CIFAR-10 pickles into one normalized float tensor of N×3×32×32 images and their labels."""
    images, labels = [], []
    for path in files:
        with path.open("rb") as f:
            # The archive was pickled by Python 2: encoding="bytes" keeps its keys as b"data", b"labels".
            # pickle runs code from the file, so only read data you trust (prepare_cifar10.sh checks the md5).
            batch = pickle.load(f, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8))
        labels.extend(batch[b"labels"])
    # Each row is 1024 red, then 1024 green, then 1024 blue values of a row-major 32×32 image.
    x = torch.from_numpy(np.concatenate(images)).reshape(-1, 3, 32, 32).float().div_(255)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    # Normalizing once here, not per batch: the whole set fits in memory (50,000 images ≈ 600 MB) and
    # each step is then a plain tensor slice, with no per-image transform and no loader workers.
    x = (x - mean) / std
    return TensorDataset(x, torch.tensor(labels, dtype=torch.long))


# -- model ---------------------------------------------------------------------------------

class SmallCNN(nn.Module):
    """Two blocks of conv-conv-pool, then one linear layer: 32×32 → 16×16 → 8×8 → 10 logits."""

    def __init__(self, width: int = 32, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(3, width), block(width, 2 * width))
        self.classifier = nn.Linear(2 * width * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


# -- training ------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator) -> float:
    """Accuracy over the whole test set, whichever process saw which images."""
    model.eval()
    correct = total = 0
    for images, labels in loader:
        preds = model(images).argmax(dim=1)
        # gather_for_metrics drops the images that prepare() repeated to give every process a full
        # last batch, so each test image counts exactly once.
        preds, labels = accelerator.gather_for_metrics((preds, labels))
        correct += (preds == labels).sum().item()
        total += labels.numel()
    model.train()
    return correct / total


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    # Checked before Accelerator() so that a wrong path fails in a second, on every rank, with one line.
    data_dir = find_batches(args.data_dir)
    if data_dir is None:
        prepare = Path(__file__).resolve().with_name("prepare_cifar10.sh")
        print(f"error: no CIFAR-10 data in {args.data_dir} (need data_batch_* and test_batch): run "
              f"`{prepare} DEST` on a login node, then pass --data-dir DEST/cifar-10-batches-py "
              f"or set CIFAR10_DIR", file=sys.stderr)
        return 2

    accelerator = Accelerator()
    # The same seed on every process: identical initial weights, and the shuffling that prepare()
    # synchronizes across processes is reproducible.
    set_seed(args.seed)

    train_set = load_batches(sorted(data_dir.glob("data_batch_*")))
    test_set = load_batches([data_dir / "test_batch"])
    accelerator.print(f"{len(train_set)} training and {len(test_set)} test images from {data_dir}; "
                      f"{accelerator.num_processes} process(es) on {accelerator.device}")

    pin = accelerator.device.type == "cuda"
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, pin_memory=pin)
    test_loader = DataLoader(test_set, batch_size=256, pin_memory=pin)
    model = SmallCNN(args.width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    # prepare() wraps the model in DDP, moves it to this process's device, and gives each process its
    # own shard of every batch (the job a DistributedSampler does in plain PyTorch).
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)

    metrics_path = args.output_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        # This script does not resume, so a second run starts at step 0: lines of an earlier run
        # would make the log go back in time.
        metrics_path.unlink(missing_ok=True)
    start = time.perf_counter()

    def log_interval(step: int, epoch: int, sums: torch.Tensor, since: float) -> torch.Tensor:
        """Write one metrics line for the steps since the last one; returns fresh (zeroed) sums."""
        # Every process takes part in the reduce; only the main one writes.
        loss_sum, seen = accelerator.reduce(sums, reduction="sum").tolist()
        now = time.perf_counter()
        if accelerator.is_main_process:
            record = {"step": step, "epoch": epoch, "loss": round(loss_sum / seen, 5),
                      "elapsed_s": round(now - start, 3), "samples_per_s": round(seen / max(now - since, 1e-9), 1)}
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        return torch.zeros_like(sums)

    step = logged_step = epochs_run = 0
    accuracy = 0.0
    model.train()
    for epoch in range(1, args.epochs + 1):
        epochs_run = epoch
        # Loss and image counts stay on the device as (loss × images, images): no host sync per step.
        epoch_sums = torch.zeros(2, device=accelerator.device)
        interval_sums = torch.zeros(2, device=accelerator.device)
        interval_start = time.perf_counter()
        for images, labels in train_loader:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            step += 1

            batch_sums = torch.stack([loss.detach() * labels.numel(), loss.new_tensor(labels.numel())])
            epoch_sums += batch_sums
            interval_sums += batch_sums
            if step % args.log_every == 0:
                interval_sums = log_interval(step, epoch, interval_sums, interval_start)
                logged_step, interval_start = step, time.perf_counter()
            if args.max_steps is not None and step >= args.max_steps:
                break
        # Decided by the step count, which every process shares, so that all of them join the reduce.
        if step > logged_step:
            log_interval(step, epoch, interval_sums, interval_start)
            logged_step = step

        accuracy = evaluate(model, test_loader, accelerator)
        loss_sum, seen = accelerator.reduce(epoch_sums, reduction="sum").tolist()
        accelerator.print(f"epoch {epoch}/{args.epochs}  step {step}  train loss {loss_sum / seen:.4f}  "
                          f"test accuracy {accuracy:.4f}  ({time.perf_counter() - start:.1f} s)")
        if args.max_steps is not None and step >= args.max_steps:
            break

    # save_model gathers the weights from DDP and writes model.safetensors on the main process only.
    accelerator.wait_for_everyone()
    accelerator.save_model(model, args.output_dir / "model")
    if accelerator.is_main_process:
        summary = {"test_accuracy": accuracy, "epochs": epochs_run, "world_size": accelerator.num_processes, "steps": step}
        (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        accelerator.print(f"saved the model and summary to {args.output_dir}")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
