"""``hfhpc plan SPEC``: memory per GPU, tokens, wall time and the resources to ask for (fine-tuning;
for ``recipe: infer``, memory, rows at once and the generation time: ``hfhpc.plan.infer``).

Runs on a login node from staged files alone: no torch, no GPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def configure(p: argparse.ArgumentParser) -> None:
    from hfhpc.plan import GPUS

    p.add_argument("spec", metavar="SPEC", help="the job spec (.yaml)")
    p.add_argument("--gpu", choices=sorted(GPUS), help="GPU kind (default: resources.gpu_type, else h100)")
    p.add_argument("--model-config", type=Path, metavar="PATH",
                   help="the model's config.json (or its folder), when the model is not staged")
    p.add_argument("--weights-dtype", choices=("bf16", "fp32"),
                   help="dtype the weights are loaded in (default: the sft recipe's, bf16 under mixed precision)")
    p.add_argument("--results", type=Path, metavar="DIR",
                   help="measured benchmark results (default: benchmarks/results of the hfhpc checkout)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    from hfhpc.plan import make_plan, render_plan
    from hfhpc.spec import load_spec
    from hfhpc.store.location import store_for_spec

    from hfhpc.recipes.infer import RECIPE as INFER

    spec = load_spec(args.spec)
    if spec.recipe == INFER.name:
        from hfhpc.plan.infer import make_infer_plan, render_infer_plan

        found = make_infer_plan(spec, store_for_spec(spec, args.store), gpu=args.gpu, model_config=args.model_config)
        print(json.dumps(found.to_json(), indent=2) if args.json else render_infer_plan(found))
        return 0
    plan = make_plan(spec, store_for_spec(spec, args.store), gpu=args.gpu, model_config=args.model_config,
                     results_dir=args.results, weights_dtype=args.weights_dtype)
    print(json.dumps(plan.to_json(), indent=2) if args.json else render_plan(plan))
    return 0
