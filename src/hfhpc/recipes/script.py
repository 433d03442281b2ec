"""``recipe: script``: the user's own script, started on every rank with the job's launcher, sealed
and offline, in the spec's folder (the page's CIFAR-10 accelerate example: ``examples/cifar10/``).

hfhpc does not run a recipe body here: ``hfhpc.launch.node`` starts ``script`` with ``args`` in place
of ``python -m hfhpc.recipes.run``. The spec lists what the script loads from the Hub under
``model``/``models``, ``datasets`` and ``metrics``, so that ``stage`` fetches it and ``check`` proves
it loads offline (``check`` also scans the script for loads the spec forgot).
"""

from __future__ import annotations

from hfhpc.registry import Recipe

RECIPE = Recipe(
    name="script",
    summary="your own training script, launched on every rank sealed and offline (accelerate or torchrun)",
    needs=("script",),
    train=None,
    trainer_config=None,
    starter={
        "name": "vit-cifar10",
        "recipe": "script",
        "script": "train.py",
        "args": ["--epochs", "5"],
        "models": ["google/vit-base-patch16-224-in21k"],
        "datasets": ["uoft-cs/cifar10"],
        "launch": {"strategy": "ddp"},
        "resources": {"nodes": 2, "gpus_per_node": 4, "time": "0-01:00:00", "account": "def-someone"},
        "output_dir": "runs/vit-cifar10",
    },
    # Accelerate's own default, which scripts written for the page expect.
    fsdp_version=1,
    user_script=True,
)
