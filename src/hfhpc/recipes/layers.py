"""The decoder layers of a causal LM: each checkpointed (or not) and compiled on its own.

Compiling regions, not the model: one decoder layer's graph is compiled once and serves every layer
(the layers share their code; their weights are graph inputs), so compile time does not grow with depth
and does not depend on what surrounds the layers (checkpointing on or off, batch composition). Under
FSDP2 this is also what keeps FSDP's hooks outside compiled code: FSDP2 makes every decoder layer a unit: its hooks gather the layer's weights before it runs and free
them after. Compiling the whole model, or a wrapper around the layer, puts those hooks inside the
compiled code; here each layer's ``forward`` is compiled, and the hooks stay outside it. Activation
checkpointing moves inside that ``forward`` (``torch.utils.checkpoint`` is traced with the layer, so
the compiler sees the recomputation), which is why the recipe does it here instead of accelerate.
One compiled graph, with dynamic shapes from the start (a packed row's length and document count
change every batch), serves every layer.

``keep`` layers (spread evenly) keep their activations instead of recomputing them: with memory to
spare, each one saves its forward pass a second time in the backward.

Parameter names, state dicts and checkpoints are unchanged: the layers stay the model's own modules,
with their class swapped for a subclass whose ``forward`` checkpoints.
"""

from __future__ import annotations

import functools

import torch


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers: modules of the classes it names in ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


@functools.cache
def _checkpointing_class(cls: type) -> type:
    """``cls`` with a ``forward`` that recomputes itself in the backward when ``hfhpc_recompute`` is set.
    Same name, so FSDP's wrap policy (by class name) still finds the layers."""
    from torch.utils.checkpoint import checkpoint

    def forward(self, *args, **kwargs):
        if self.hfhpc_recompute and torch.is_grad_enabled():
            return checkpoint(functools.partial(cls.forward, self), *args, use_reentrant=False,
                              preserve_rng_state=False, **kwargs)
        return cls.forward(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__, "__qualname__": cls.__qualname__})


def compile_settings() -> None:
    """Settings for compiling a model's layers, set once per process before the first compiled call.

    Float attributes of the modules (a norm's epsilon, attention's scaling and dropout) are
    constants, not graph inputs: as inputs, torch passes them as 0-dim CPU tensors, and the compiled
    graph then holds a CPU kernel, built with the host's C++ compiler on every node whose local
    compile cache lacks it (tens of seconds before the first step, and not in the store's cache).
    """
    torch._dynamo.config.specialize_float = True


def prepare_layers(model: torch.nn.Module, *, checkpoint: bool, keep: int = 0, compile: bool = False,
                   backend: str | object = "inductor") -> dict[str, int]:
    """Checkpoint all decoder layers but ``keep`` of them (when ``checkpoint``); compile each one's forward."""
    layers = decoder_layers(model)
    n = len(layers)
    keep = max(0, min(keep, n)) if checkpoint else n
    kept = {round((i + 0.5) * n / keep - 0.5) for i in range(keep)} if keep else set()
    for i, layer in enumerate(layers):
        layer.__class__ = _checkpointing_class(type(layer))
        layer.hfhpc_recompute = i not in kept
    compiled = compile_layers(layers, backend=backend) if compile else 0
    return {"layers": n, "checkpointed": n - len(kept), "compiled": compiled}


def compile_layers(layers: list[torch.nn.Module], *, backend: str | object = "inductor") -> int:
    """Compile each decoder layer's forward (at any point: before the first step or between two), with
    dynamic shapes from the start, so a new packed length or document count never compiles again.
    The number of layers compiled."""
    compile_settings()
    for layer in layers:
        if not getattr(layer, "hfhpc_compiled", False):
            layer.forward = torch.compile(layer.forward, dynamic=True, backend=backend)
            layer.hfhpc_compiled = True
    return len(layers)


def compile_when_it_pays(model: torch.nn.Module, *, steps_total: int, stored: bool, log, on_compile=None,
                         backend: str | object = "inductor"):
    """A TrainerCallback for ``train.torch_compile`` unset: the first steps run eager; after step
    :data:`~hfhpc.recipes.compiling.MEASURE_AT_STEP` of this process the eager step time decides
    (:func:`hfhpc.recipes.compiling.decide`, rank 0's measurement for every rank), and the layers are
    compiled before the next step when that pays. ``on_compile`` runs after compiling. The layers are
    found now, before FSDP2 renames their classes."""
    import time

    import torch.distributed as dist
    from transformers import TrainerCallback

    from hfhpc.recipes.compiling import MEASURE_AT_STEP, decide

    targets = decoder_layers(model)

    class CompileWhenItPays(TrainerCallback):
        def __init__(self) -> None:
            self.steps = 0
            self.t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.steps += 1
            if self.steps != MEASURE_AT_STEP:
                return
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            measured = [time.perf_counter() - self.t0]
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.broadcast_object_list(measured, src=0)  # one decision for all ranks
            left = max(0, (state.max_steps or steps_total) - state.global_step)
            choice = decide(None, steps_left=left, eager_step_s=measured[0], stored=stored)
            log(f"compile: {choice.line()}")
            if choice.compile:
                compile_layers(targets, backend=backend)
                if on_compile is not None:
                    on_compile()

    return CompileWhenItPays()


def compile_callbacks(job, model: torch.nn.Module, *, setting: bool | None, args, rows: int,
                      others: list[torch.nn.Module] = ()) -> tuple[object, list]:
    """For a recipe whose layers are its own (:func:`prepare_layers`) and may be compiled: the store's
    compiled kernels for this job's model, loaded now (:mod:`hfhpc.recipes.compilecache`), and the
    callbacks that save new ones and, with ``train.torch_compile`` unset (``setting`` None), compile
    ``model``'s layers and the ``others`` layers when the job's steps earn it back. ``args`` are the
    Trainer's arguments and ``rows`` the training rows (for the job's step count)."""
    from hfhpc.recipes import compilecache
    from hfhpc.recipes.common import log, prepared_root, steps_per_job

    cache = compilecache.for_job(prepared_root(job, "compiled"), job.spec.model.id, job.model_commit)
    cache.load()
    callbacks = [cache.callback()]
    if setting is None:
        steps = args.max_steps if args.max_steps > 0 else steps_per_job(args, rows)
        others = list(others)
        callbacks.append(compile_when_it_pays(model, steps_total=steps, stored=cache.loaded > 0, log=log,
                                              on_compile=(lambda: compile_layers(others)) if others else None))
    return cache, callbacks


def hand_to_fsdp2(trainer, half) -> None:
    """Before the Trainer wraps the model: FSDP2 checkpoints nothing itself (the recipe's layers do,
    inside their compiled forwards); with ``half`` (a half dtype) it computes and all-gathers in it and
    reduces gradients in fp32 (accelerate's default reduces in half precision)."""
    plugin = trainer.accelerator.state.fsdp_plugin
    plugin.activation_checkpointing = False
    if half is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32, output_dtype=half)
