"""Sealed load probes: ``python -m hfhpc.offline.probe PLAN.json RESULT.json``.

Started by ``check`` in a child whose environment is sealed and offline from the first import. It
loads each asset the way the recipes do (``hfhpc.assets``) and writes one result per probe.

Plan: ``{"models": [{"id", "commit", "adapters": bool, "bases": [[id, commit]…], "tokenizer": bool,
"weights": [relative paths]}],
"datasets": [{"id", "commit", "config", "splits": [...]}], "metrics": [{"id"}]}``
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path


class SpecMismatch(Exception):
    """The asset is there, but the spec asks for something it does not have."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def run_plan(plan: dict) -> list[dict]:
    from hfhpc import assets

    results: list[dict] = []

    def probe(kind: str, repo_id: str, what: str, fn: Callable[[], object], repro: str = "") -> None:
        t = time.perf_counter()
        cause = "store"
        try:
            fn()
            error = None
        except SpecMismatch as e:
            error, cause = str(e), "spec"
        except Exception as e:  # noqa: BLE001 - every failure is a finding to report, not a crash
            error = _first_line(e)
        results.append({
            "kind": kind, "id": repo_id, "what": what, "error": error, "cause": cause,
            "seconds": round(time.perf_counter() - t, 3), "repro": repro,
        })

    for m in plan.get("models", []):
        mid, commit, bases = m["id"], m.get("commit"), [tuple(b) for b in m.get("bases", [])]
        args = f"{mid!r}, revision={commit!r}"
        if m.get("adapters"):
            # LoRA adapters (a LoRA run's model): their settings as the job will read them before merging.
            probe("model", mid, assets.ADAPTER_CONFIG,
                  lambda: assets.adapter_settings(assets.model_file(mid, commit, assets.ADAPTER_CONFIG)),
                  f"from hfhpc import assets; assets.adapter_settings(assets.model_file({mid!r}, {commit!r}, {assets.ADAPTER_CONFIG!r}))")
        else:
            probe("model", mid, "config", lambda: assets.load_config(mid, commit),
                  f"from transformers import AutoConfig; AutoConfig.from_pretrained({args})")
        if m.get("tokenizer"):
            probe("model", mid, "tokenizer", lambda: assets.load_tokenizer(mid, commit, bases),
                  f"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained({args})")
        for rel in m.get("weights", []):

            def header(rel: str = rel) -> None:
                assets.safetensors_header(assets.model_file(mid, commit, rel))

            probe("model", mid, rel, header,
                  f"from huggingface_hub import hf_hub_download; hf_hub_download({mid!r}, {rel!r}, revision={commit!r})")
    for d in plan.get("datasets", []):
        for split in d.get("splits", []):
            did, commit, config = d["id"], d.get("commit"), d.get("config")
            what = f"split {split}" + (f" (config {config})" if config else "")

            def load(split: str = split, did: str = did, commit: str | None = commit, config: str | None = config) -> None:
                try:
                    assets.load_split(did, commit, split, config)
                except Exception:
                    # Tell a wrong split name (fix the spec) from a missing file (fix the store).
                    names = assets.split_names(did, commit, config)
                    if names is not None and split not in names:
                        raise SpecMismatch(f"no split {split!r}; the dataset has {', '.join(names)}") from None
                    raise

            probe("dataset", did, what, load,
                  f"import datasets; datasets.load_dataset({did!r}, {config!r}, split={split!r}, revision={commit!r})")
    train = plan.get("train")
    if train and train.get("keys"):

        def fields() -> None:
            unknown = assets.unknown_training_keys(train["config"], train["keys"])
            if unknown:
                raise SpecMismatch(
                    f"not a field of the trainer's config: {', '.join(unknown)} (check the spelling for this transformers/TRL version)"
                )

        probe("spec", "train", "pass-through keys", fields)
    if plan.get("recipe"):
        _probe_recipe(plan["recipe"], results)
    for mt in plan.get("metrics", []):
        probe("metric", mt["id"], "evaluate.load", lambda mid=mt["id"]: assets.load_metric(mid),
              f"import evaluate; evaluate.load({mt['id']!r})")
    return results


def _probe_recipe(group: dict, results: list[dict]) -> None:
    """A recipe's own sealed probe (``Recipe.offline_check``): ``module:function`` called with its args."""
    import importlib

    module_name, _, function = group["target"].partition(":")
    results.extend(getattr(importlib.import_module(module_name), function)(**group.get("args", {})))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from hfhpc.errors import HfhpcError
    from hfhpc.offline.guard_path import require_seal

    try:
        require_seal()  # a probe that passed unsealed would prove nothing
    except HfhpcError as exc:
        print(f"hfhpc: error: {exc.render()}", file=sys.stderr, flush=True)
        return exc.exit_code
    plan = json.loads(Path(argv[0]).read_text())
    results = run_plan(plan)
    Path(argv[1]).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
