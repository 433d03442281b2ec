"""Small helpers shared by the tests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file (and link target) under ``folder`` → a digest: compares a store before and after."""
    out: dict[str, str] = {}
    if not folder.exists():
        return out
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            p = Path(root) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
