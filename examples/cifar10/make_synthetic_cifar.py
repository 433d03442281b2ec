#!/usr/bin/env python
"""Write a small, learnable stand-in for CIFAR-10 in the archive's own format.

    python make_synthetic_cifar.py DEST        # → DEST/cifar-10-batches-py/{data_batch_1,2, test_batch, batches.meta}

The files are the pickles of the official "python version" (a dict with b"data": uint8 N×3072 and
b"labels": list of ints), so cifar10_train.py reads them exactly as it reads the real data. Tests and
dry runs use them where the real archive cannot be downloaded.

Each class is a colour plus a stripe pattern (horizontal or vertical, of a class-specific period),
under per-image brightness jitter and heavy pixel noise: a CNN separates the classes in a couple of
epochs, a constant guess cannot (accuracy 0.1).
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np

LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def class_templates() -> np.ndarray:
    """One 3×32×32 float image per class, values in 0..255."""
    rows, cols = np.mgrid[0:32, 0:32]
    templates = np.empty((10, 3, 32, 32), dtype=np.float32)
    for k in range(10):
        # Colours spread around the hue circle; even classes have horizontal stripes, odd ones
        # vertical, with bands 1..5 pixels wide: no two classes share both colour and pattern.
        hue = 2 * np.pi * k / 10
        colour = 128 + 70 * np.cos(hue + np.array([0.0, 2.1, 4.2]))
        coord = rows if k % 2 == 0 else cols
        stripes = np.where((coord // (1 + k // 2)) % 2 == 0, 40.0, -40.0)
        templates[k] = colour[:, None, None] + stripes[None]
    return templates


def make_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 rows of 3072 values (1024 red, 1024 green, 1024 blue), as in the archive."""
    base = class_templates()[labels]
    brightness = rng.normal(0, 20, size=(len(labels), 1, 1, 1))
    noise = rng.normal(0, 50, size=base.shape)
    pixels = np.clip(base + brightness + noise, 0, 255).astype(np.uint8)
    return pixels.reshape(len(labels), 3072)


def write_batch(path: Path, name: str, labels: np.ndarray, rng: np.random.Generator) -> None:
    batch = {
        b"batch_label": name.encode(),
        b"labels": labels.tolist(),
        b"data": make_images(labels, rng),
        b"filenames": [f"synthetic_{name.replace(' ', '_')}_{i}.png".encode() for i in range(len(labels))],
    }
    with path.open("wb") as f:
        pickle.dump(batch, f, protocol=2)


def write_synthetic(dest: Path, train_batches: int = 2, per_batch: int = 256, test_size: int = 256, seed: int = 0) -> Path:
    """Write the batches into ``dest/cifar-10-batches-py`` and return that folder."""
    folder = Path(dest) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(1, train_batches + 1):
        labels = rng.permutation(np.arange(per_batch) % 10)  # balanced classes, shuffled
        write_batch(folder / f"data_batch_{i}", f"training batch {i} of {train_batches}", labels, rng)
    write_batch(folder / "test_batch", "testing batch 1 of 1", rng.permutation(np.arange(test_size) % 10), rng)
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in LABEL_NAMES], b"num_cases_per_batch": per_batch,
                     b"num_vis": 3072}, f, protocol=2)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dest", type=Path, help="the batches go into DEST/cifar-10-batches-py")
    p.add_argument("--train-batches", type=int, default=2)
    p.add_argument("--per-batch", type=int, default=256, help="images per training batch")
    p.add_argument("--test-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(write_synthetic(args.dest, args.train_batches, args.per_batch, args.test_size, args.seed))


if __name__ == "__main__":
    main()
