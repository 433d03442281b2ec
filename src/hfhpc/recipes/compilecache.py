"""Compiled kernels kept in the store: a job compiles once, every later start loads them.

``torch.compile`` caches what it builds (FX graphs, their backward, Triton kernels, autotuning) in a
node-local folder, ``/tmp`` by default: the next job lands on another node, or on a fresh ``/tmp``,
and compiles again — a minute or more for a 7B decoder layer, most of the time before its first step.

Here each rank loads the store's copy into its local cache before the first compiled call, and after
a step that compiled anything new, writes what it used back (PyTorch's portable "mega-cache":
``torch.compiler.save_cache_artifacts``). Files are per model commit, PyTorch build and GPU, and per
device index (compiled code names its device); each is written whole by one rank of the first node.
Nothing is shared through file locks, so any filesystem serves. A file that no longer matches the
code is ignored by PyTorch (it compiles, and writes a new one).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from hfhpc.recipes.common import log
from hfhpc.store.atomic import atomic_write_bytes

STEPS_SAVED_AFTER = 1  # the first step compiles forward and backward; later ones reuse them


def _device_tag() -> str:
    import torch

    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()  # the rank's device
        return f"{torch.cuda.get_device_name(index)}-cuda{index}"
    return "cpu"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def cache_file(root: Path, model_id: str, commit: str | None) -> Path:
    """This rank's file: ``root/<model>@<commit>/torch-<version>-<device>.bin``."""
    import torch

    model = _slug(model_id.replace("/", "--")) + (f"@{commit[:12]}" if commit else "")
    return root / model / (_slug(f"torch-{torch.__version__}-{_device_tag()}") + ".bin")


def _misses() -> int:
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_miss"] + counters["aot_autograd"]["autograd_cache_miss"]


def _hits() -> int:
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]


class CompileCache:
    """One rank's view of its file in the store. ``load()`` before compiling, ``save_if_new()`` after."""

    def __init__(self, path: Path, *, writer: bool) -> None:
        self.path = path
        self.writer = writer  # only the first node's ranks write (one per device index)
        self.loaded = 0
        self._misses_saved = 0

    def load(self) -> int:
        """Put the store's kernels into the local cache; the number of entries loaded."""
        import torch

        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            log(f"compile cache: none yet for this model, PyTorch and GPU ({self.path.name}); this job writes it")
            return 0
        except OSError as e:
            log(f"compile cache: cannot read {self.path} ({e.strerror}): compiling")
            return 0
        info = torch.compiler.load_cache_artifacts(data)
        if info is None:
            log(f"compile cache: {self.path} is not one this PyTorch reads: compiling, then replacing it")
            return 0
        self.loaded = sum(len(v) for v in vars(info).values() if isinstance(v, list))
        log(f"compile cache: {self.loaded} entries from {self.path} ({len(data) / 2**20:.1f} MiB)")
        return self.loaded

    def save_if_new(self) -> bool:
        """Write this process's kernels to the store when it compiled something the file lacked."""
        import torch

        misses = _misses()
        if misses == self._misses_saved:
            return False
        new, hits = misses - self._misses_saved, _hits()
        self._misses_saved = misses
        if not self.writer:
            return False
        result = torch.compiler.save_cache_artifacts()
        if result is None:
            return False
        data = result[0]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, data)
        except OSError as e:
            log(f"compile cache: cannot write {self.path} ({e.strerror}): the next job compiles again")
            return False
        log(f"compile cache: {new} graphs compiled, {hits} from the cache: saved {len(data) / 2**20:.1f} MiB "
            f"to {self.path} for the next start")
        return True

    def report(self) -> None:
        """One line after the first step: whether the kernels came from the cache."""
        misses, hits = _misses(), _hits()
        if misses == 0 and hits:
            log(f"compile cache: all {hits} graphs from the cache, nothing compiled")

    def callback(self):
        """A TrainerCallback: saves after the first step of this process and at the end of training."""
        from transformers import TrainerCallback

        cache = self

        class SaveCompiled(TrainerCallback):
            def __init__(self) -> None:
                self.steps = 0

            def on_step_end(self, args, state, control, **kw):
                self.steps += 1
                if self.steps == STEPS_SAVED_AFTER:
                    cache.report()
                    cache.save_if_new()

            def on_train_end(self, args, state, control, **kw):
                cache.save_if_new()

        return SaveCompiled()


def for_job(root: Path, model_id: str, commit: str | None) -> CompileCache:
    """This rank's cache. Every rank loads; ranks of the first node write (global rank == local rank)."""
    writer = int(os.environ.get("RANK", "0")) == int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    return CompileCache(cache_file(root, model_id, commit), writer=writer)
