"""``hfhpc stage``: bring a spec's assets, or one named asset, into the store and lock them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hfhpc.errors import UsageError

DEFAULT_LOCK = "hfhpc.lock"  # where `stage --model/--dataset/--metric` writes without --lock


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", help="job spec (YAML); its lockfile is written beside it")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--model", metavar="ID", help="stage one model instead of a spec")
    what.add_argument("--dataset", metavar="ID", help="stage one dataset")
    what.add_argument("--metric", metavar="NAME", help="stage one Evaluate metric (`accuracy` = evaluate-metric/accuracy)")
    p.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    p.add_argument("--include", action="append", default=[], metavar="PATTERN", help="only files matching (repeatable)")
    p.add_argument("--config", metavar="NAME", help="dataset configuration to prepare")
    p.add_argument("--from", dest="from_path", metavar="PATH", help="import a git-lfs clone or folder instead of downloading")
    p.add_argument("--lock", metavar="FILE", help=f"lockfile for --model/--dataset/--metric (default: ./{DEFAULT_LOCK})")
    p.add_argument("--update", action="store_true", help="move to the newest commit of each revision and say what changed")
    p.add_argument("--repair", action="store_true", help="download again any file whose bytes no longer match the lockfile")
    p.add_argument("--workers", type=int, default=1, help="parallel downloads (default 1: kind to login nodes)")
    p.add_argument("--endpoint", metavar="URL", help="Hub or mirror to download from (default: $HF_ENDPOINT or the Hub)")
    p.add_argument("--xet", action="store_true", help="let huggingface_hub download with xet (off by default: it hangs on many login nodes)")
    p.add_argument("--no-prepare", action="store_true", help="skip making datasets and metrics loadable offline")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _adhoc(args: argparse.Namespace) -> tuple[str, str] | None:
    from hfhpc.spec import canonical_metric_id

    if args.model is not None:
        return "model", args.model
    if args.dataset is not None:
        return "dataset", args.dataset
    if args.metric is not None:
        return "metric", canonical_metric_id(args.metric)
    return None


def run(args: argparse.Namespace) -> int:
    from hfhpc import env as hfenv
    from hfhpc.store.fetch import AssetRequest
    from hfhpc.store.stage import import_local, stage, stage_spec

    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    adhoc = _adhoc(args)
    if adhoc and args.spec:
        raise UsageError("give a spec or --model/--dataset/--metric, not both")
    if not adhoc and not args.spec:
        raise UsageError("nothing to stage", "give a spec file, or --model/--dataset/--metric ID")
    if args.from_path and not adhoc:
        raise UsageError("--from needs --model, --dataset or --metric to name what it imports")
    common = dict(
        update=args.update,
        repair=args.repair,
        endpoint=hfenv.endpoint(given=args.endpoint),
        workers=args.workers,
        progress=not args.quiet and sys.stderr.isatty(),
        prepare=not args.no_prepare,
        xet=args.xet,
    )
    from hfhpc.store.location import store_for_staging

    if adhoc:
        kind, repo_id = adhoc
        lock_path = Path(args.lock or DEFAULT_LOCK).absolute()
        store = store_for_staging(lock_path, args.store)
        if args.from_path:
            report = import_local(store, kind, repo_id, Path(args.from_path), lock_path, args.revision)
        else:
            req = AssetRequest(kind, repo_id, args.revision, tuple(args.include))
            configs = {repo_id: [args.config]} if kind == "dataset" else None
            report = stage(store, [req], lock_path, dataset_configs=configs, **common)
    else:
        from hfhpc.spec import load_spec

        if args.include or args.revision != "main" or args.config or args.lock:
            raise UsageError("--include/--revision/--config/--lock apply to --model/--dataset/--metric; a spec sets them per asset")
        from hfhpc.preflight import check_trainer_keys
        from hfhpc.run.chain import model_bases, model_folders

        spec = load_spec(args.spec)
        # A misspelt train: key is refused before anything is downloaded; the fields read here are
        # remembered, so `run` and `submit` do not read them again (hfhpc.preflight).
        check_trainer_keys(spec)
        folders = model_folders(spec)  # a model from a run: that run's model/, checked before anything is staged
        store = store_for_staging(spec.lock_path(), args.store)
        bases = model_bases(spec, store)  # the base under a LoRA run's adapters, as that run pinned it
        report = stage_spec(spec, store, folders=folders, bases=bases, **common)
    print(render(report, store, default_lock=adhoc is not None and not args.lock))
    return 0


def render(report, store: Path, *, default_lock: bool = False) -> str:
    from hfhpc.store.stage import human_bytes

    lines = []
    for o in report.outcomes:
        a = o.asset
        if o.imported_from is not None:
            got = f", imported from {o.imported_from}"
        else:
            got = f", downloaded {human_bytes(o.downloaded_bytes)}" if o.downloaded_files else ", already staged"
        lines.append(f"{a.kind:<7} {a.id}@{a.revision} → {a.commit[:12]} ({len(a.files)} files, {human_bytes(a.total_bytes)}{got})")
        if o.base_of is not None:
            lines.append(f"        the base of the adapters of {o.base_of}, at the commit their run trained on")
        if o.changed:
            lines.append(f"        updated {o.previous_commit[:12]} → {a.commit[:12]}")
        for p in o.prepared:
            lines.append(f"        ready offline: {p}")
    lines.extend(f"warning: {w}" for w in report.warnings)
    lines.append(f"store:    {store}")
    where = " (the default in the current folder; --lock FILE to choose)" if default_lock else ""
    lines.append(f"lockfile: {report.lock_path}{where}")
    return "\n".join(lines)
