"""Compiled kernels kept in the store: a job compiles once, every later start loads them.

``torch.compile`` caches what it builds (FX graphs, their backward, Triton kernels, autotuning) in a
node-local folder, ``/tmp`` by default: the next job lands on another node, or on a fresh ``/tmp``,
and compiles again — a minute or more for a 7B decoder layer, most of the time before its first step.

Here each rank loads the store's copy into its local cache before the first compiled call, and after
a step whose kernels the store does not hold yet (compiled now, or found in the node's own cache),
writes what it used back (PyTorch's portable "mega-cache":
``torch.compiler.save_cache_artifacts``). Files are per model commit, PyTorch build and GPU, and per
device index (compiled code names its device); each is written whole by one rank of the first node,
and a job that found everything in the store writes nothing. Nothing is shared through file locks,
so any filesystem serves. A file that no longer matches the code is ignored by PyTorch (it
compiles, and writes a new one).

The files hold code (generated Python and GPU binaries) that every job of the model runs: trust
them as the store is trusted, like a virtualenv kept on the same filesystem.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

from hfhpc.recipes.common import log
from hfhpc.atomic import atomic_write_bytes



def _device_tag() -> str:
    import torch

    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()  # the rank's device
        return f"{torch.cuda.get_device_name(index)}-cuda{index}"
    return "cpu"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def cache_files(root: Path, model_id: str, commit: str | None) -> tuple[Path, str]:
    """This rank's folder and file-name prefix: ``root/<model>@<commit>/torch-<version>-<device>-``."""
    import torch

    model = _slug(model_id.replace("/", "--")) + (f"@{commit[:12]}" if commit else "")
    return root / model, _slug(f"torch-{torch.__version__}-{_device_tag()}") + "-"


def _misses() -> int:
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_miss"] + counters["aot_autograd"]["autograd_cache_miss"]


def _hits() -> int:
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]


def _keys(groups) -> frozenset[str]:
    """``kind:key`` of every entry, from a mapping of kind to its entries' keys."""
    return frozenset(f"{kind}:{key}" for kind, keys in groups.items() for key in keys)


def _whole(data: bytes) -> tuple[bytes, frozenset[str]] | None:
    """The process's artifacts as one group per kind, and their keys; None where this PyTorch lacks
    the (private) serializer this relies on.

    ``save_cache_artifacts`` returns everything since the process started, as one (kind, entries)
    group per kind per call; ``load_cache_artifacts`` reads the groups into a dict, so a file written
    by a second save loads only that save's entries of each kind, and the first step's kernels would
    be lost. Merged, the file loads whole.
    """
    try:
        from torch.compiler._cache import _deserialize_single_cache, _serialize_single_cache
        from torch.utils._appending_byte_serializer import AppendingByteSerializer
    except ImportError:
        return None
    merged: dict[str, dict[str, object]] = {}
    for kind, entries in AppendingByteSerializer.to_list(data, deserialize_fn=_deserialize_single_cache):
        for entry in entries:
            merged.setdefault(kind, {}).setdefault(entry.key, entry)
    out = AppendingByteSerializer(serialize_fn=_serialize_single_cache)
    out.extend((kind, list(entries.values())) for kind, entries in merged.items())
    return out.to_bytes(), _keys(merged)


class CompileCache:
    """One rank's files in the store. ``load()`` before compiling, ``save_if_new()`` after a step.

    Each job whose kernels the store's files lack adds one file holding everything it used (what it
    found in a cache and what it compiled); files whose entries are all in the new one are then
    removed. So jobs of different shapes (another ``max_length``, kept layers) add to the cache, not
    replace it, and a job that only grew what an earlier one had replaces that file.
    """

    def __init__(self, folder: Path, prefix: str, *, writer: bool) -> None:
        self.folder, self.prefix = folder, prefix
        self.writer = writer  # only the first node's ranks write (one per device index)
        self.loaded = 0
        self._files: dict[Path, frozenset[str]] = {}  # read or written, with their entries
        self._counts_saved = (0, 0)  # graphs compiled, graphs found in a cache, at the last save

    def load(self) -> int:
        """Put the store's kernels into the local cache; the number of entries loaded."""
        import torch

        files = sorted(self.folder.glob(f"{self.prefix}*.bin"))
        if not files:
            log(f"compile cache: none yet for this model, PyTorch and GPU ({self.prefix}*.bin); this job writes it")
            return 0
        kinds: dict[str, int] = {}
        size = 0
        for path in files:
            try:
                data = path.read_bytes()
            except OSError as e:  # another job's cleanup, or an unreadable file: compile instead
                log(f"compile cache: cannot read {path} ({e.strerror}): skipped")
                continue
            info = torch.compiler.load_cache_artifacts(data)
            if info is None:
                log(f"compile cache: {path} is not one this PyTorch reads: skipped (a new file replaces it)")
                self._files[path] = frozenset()
                continue
            self._files[path] = _keys(info.artifacts)
            size += len(data)
            for kind, keys in info.artifacts.items():
                kinds[kind] = kinds.get(kind, 0) + len(keys)
        self.loaded = sum(kinds.values())
        what = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
        log(f"compile cache: {self.loaded} entries ({what}) from {len(files)} file(s) in {self.folder} ({size / 2**20:.1f} MiB)")
        return self.loaded

    def save_if_new(self) -> Path | None:
        """Write this process's kernels to the store unless its files hold them all; the file written."""
        import torch

        counts = (_misses(), _hits())
        if counts == self._counts_saved:  # nothing compiled or looked up since the last save
            return None
        new = counts[0] - self._counts_saved[0]
        self._counts_saved = counts
        if not self.writer:
            return None
        result = torch.compiler.save_cache_artifacts()
        if result is None:
            return None
        whole = _whole(result[0])
        # Without the merge, only this file's newest groups would load: keep every older file then.
        data, keys, replaces = (*whole, True) if whole else (result[0], _keys(result[1].artifacts), False)
        if keys <= frozenset().union(*self._files.values()):
            return None  # the store's files hold all of it (what came from this node's own cache too)
        path = self.folder / f"{self.prefix}{hashlib.sha256(''.join(sorted(keys)).encode()).hexdigest()[:16]}.bin"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
        except OSError as e:
            log(f"compile cache: cannot write {path} ({e.strerror}): the next job compiles again")
            return None
        for old, old_keys in list(self._files.items()):
            if replaces and old != path and old_keys <= keys:  # everything in it is in the new file
                old.unlink(missing_ok=True)
                del self._files[old]
        self._files[path] = keys
        log(f"compile cache: {new} graphs compiled, {counts[1]} from the cache: saved {len(data) / 2**20:.1f} MiB "
            f"to {path} for the next start")
        return path

    def report(self, step_s: float | None = None) -> None:
        """One line after the first compiled step: how long it took, how much of it was compiling, and whether
        the kernels came from the cache."""
        from torch._dynamo.utils import compilation_time_metrics as times

        def total(name: str) -> float:
            return sum(times.get(name, ()))

        step = f"first compiled step {step_s:.1f} s, of which " if step_s is not None else ""
        log(f"compile: {step}{total('_compile.compile_inner'):.1f} s compiling (tracing "
            f"{total('bytecode_tracing'):.1f} s, backend {total('OutputGraph.call_user_compiler'):.1f} s, "
            f"backward {total('compile_fx.<locals>.bw_compiler'):.1f} s)")
        misses, hits = _misses(), _hits()
        if misses == 0 and hits:
            log(f"compile cache: all {hits} graphs from the cache, nothing compiled")

    def callback(self):
        """A TrainerCallback: reports and saves after the first step that compiled (or looked kernels
        up) — the first step, or a later one when the layers are compiled mid-run — and at the end of
        training."""
        from transformers import TrainerCallback

        cache = self

        class SaveCompiled(TrainerCallback):
            def __init__(self) -> None:
                self.done = False
                self.t0 = None

            def on_step_begin(self, args, state, control, **kw):
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                if not self.done and (_misses() or _hits()):
                    self.done = True
                    cache.report(time.perf_counter() - self.t0 if self.t0 is not None else None)
                    cache.save_if_new()

            def on_train_end(self, args, state, control, **kw):
                cache.save_if_new()

        return SaveCompiled()


def for_job(root: Path, model_id: str, commit: str | None) -> CompileCache:
    """This rank's cache. Every rank loads; ranks of the first node write (global rank == local rank)."""
    writer = int(os.environ.get("RANK", "0")) == int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    return CompileCache(*cache_files(root, model_id, commit), writer=writer)
