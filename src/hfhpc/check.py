"""``hfhpc check``: prove that a job will run offline, before it waits hours in a queue.

1. the store against the lockfile (sizes always, sha256 when a blob changed since last verified);
2. a sealed, offline child loads each asset the way the recipes will (``hfhpc.offline.probe``);
3. user scripts are scanned for what they load, and each literal id is looked up in the store.

Every problem carries the exact ``hfhpc stage …`` command that fixes it.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from hfhpc import registry
from hfhpc.assets import ADAPTER_CONFIG
from hfhpc.offline.environ import offline_environ
from hfhpc.spec import JobSpec, canonical_metric_id
from hfhpc.store import readonly
from hfhpc.store.cache import snapshot_dir
from hfhpc.store.layout import dataset_arrow_dir, read_ref
from hfhpc.store.lock import LockedAsset, base_chain, load_lock
from hfhpc.store.prepare import metric_module_dir, prepared_splits
from hfhpc.store.stage import requests_from_spec
from hfhpc.store.verify import Problem, VerifyCache, stage_command, verify_asset

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model")


@dataclass
class CheckReport:
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    assets: int = 0
    bytes: int = 0
    probes: int = 0
    seconds: float = 0.0

    @property
    def ready(self) -> bool:
        return not self.problems


@dataclass
class _Plan:
    models: list[dict] = field(default_factory=list)
    datasets: list[dict] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    train: dict | None = None  # {"config", "keys"}: pass-through train keys to check against the trainer config
    recipe: dict | None = None  # {"target", "args"}: the recipe's own sealed probe (Recipe.offline_check)
    fixes: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, id) → fix command
    # Assets that staging again would leave as they are: their load failures need another fix.
    staged_as_is: set[tuple[str, str]] = field(default_factory=set)

    def empty(self) -> bool:
        return not (self.models or self.datasets or self.metrics or self.train or self.recipe)

    def add_model(self, store: Path, repo_id: str, commit: str, fix: str, bases: list[LockedAsset] | None = None) -> None:
        snap = snapshot_dir(store, "model", repo_id, commit)
        has_config = (snap / "config.json").exists()
        adapters = not has_config and (snap / ADAPTER_CONFIG).exists()  # a LoRA run's model: its base is probed on its own
        entry = {
            "id": repo_id,
            "commit": commit,
            "config": has_config,
            "adapters": adapters,
            "bases": [[b.id, b.commit] for b in bases or []],
            "tokenizer": any((snap / name).exists() for name in TOKENIZER_FILES),
            "weights": sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*.safetensors")),
        }
        if has_config or adapters:
            self.models.append(entry)
        self.fixes[("model", repo_id)] = fix


def _check_locked(spec: JobSpec, store: Path, report: CheckReport, plan: _Plan, full: bool = False) -> None:
    lock = load_lock(spec.lock_path(), missing_ok=True)
    cache = VerifyCache(store, full=full)
    dataset_refs = {d.id: d for d in spec.all_datasets()}
    from_runs = {("model", m.id): m for m in spec.all_models() if m.from_run is not None}
    pinned: list[LockedAsset] = []
    for req in requests_from_spec(spec):
        locked = lock.get(*req.key)
        if locked is None:
            report.problems.append(Problem(req.kind, req.repo_id, "lockfile", "not staged", spec.stage_command()))
            continue
        if locked.revision != req.revision or locked.include != list(req.include):
            report.problems.append(
                Problem(req.kind, req.repo_id, "lockfile",
                        f"the spec asks for {req.revision} {list(req.include) or ''}, the lockfile has {locked.revision} {locked.include or ''}".replace(" ''", ""),
                        spec.stage_command())
            )
            continue
        pinned.append(locked)
    # The models under adapters (a LoRA run's model, LockedAsset.base) are the job's assets too.
    seen = {locked.key for locked in pinned}
    for locked in list(pinned):
        try:
            bases = base_chain(locked, lock.assets)
        except ValueError as e:
            report.problems.append(Problem("model", locked.id, "lockfile", str(e), spec.stage_command()))
            continue
        pinned += [b for b in bases if b.key not in seen]
        seen |= {b.key for b in bases}
    for locked in pinned:
        report.assets += 1
        report.bytes += locked.total_bytes
        problems = verify_asset(store, locked, cache)
        for p in problems:
            fix = spec.stage_command(" --repair") if p.fix.endswith("--repair") else spec.stage_command()
            report.problems.append(Problem(p.kind, p.repo_id, p.what, p.reason, fix))
        if locked.key in from_runs:
            _check_run_model(spec, from_runs[locked.key], locked, cache, report)
        if problems:
            continue
        _plan_locked(store, locked, dataset_refs.get(locked.id), plan, spec.stage_command(), lock.assets)
    cache.save()


def _check_run_model(spec: JobSpec, ref, locked: LockedAsset, cache: VerifyCache, report: CheckReport) -> None:
    """A model taken from a run: that run's ``model/`` must still hold what the lockfile pinned, or the
    job would start from an older model than the folder the spec names."""
    from hfhpc.errors import RunModelError
    from hfhpc.run.chain import changes, run_model_folder

    try:
        folder = run_model_folder(spec, ref)
    except RunModelError as e:
        # The staged copy is intact (verified above) and is what the job loads: it can still run.
        report.warnings.append(f"model {locked.id}: {e.message}; the job starts from the copy staged at {locked.commit[:12]}")
        return
    changed = changes(folder, locked, cache)
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        report.problems.append(Problem("model", locked.id, str(folder),
                                       f"changed since it was staged ({shown}); the job would start from the staged copy",
                                       spec.stage_command()))


def _plan_locked(store: Path, locked: LockedAsset, dref, plan: _Plan, fix: str, pinned: list[LockedAsset]) -> None:
    """Plan the load probes of an asset whose locked files all verified.

    Staging it again is a no-op unless it would prepare something (a dataset's Arrow cache, a
    metric's module): only then is ``hfhpc stage`` the fix for a failed load.
    """
    if locked.kind == "model":
        try:
            bases = base_chain(locked, pinned)
        except ValueError:
            bases = []  # reported as a lockfile problem already
        plan.add_model(store, locked.id, locked.commit, fix, bases)
        plan.staged_as_is.add(locked.key)
    elif locked.kind == "dataset":
        config = dref.config if dref else None
        splits = dref.all_splits() if dref else []
        plan.datasets.append({"id": locked.id, "commit": locked.commit, "config": config, "splits": splits})
        plan.fixes[("dataset", locked.id)] = fix
        if prepared_splits(store, locked, config) is not None:
            plan.staged_as_is.add(locked.key)
    else:
        plan.metrics.append({"id": locked.id})
        plan.fixes[("metric", locked.id)] = fix
        if metric_module_dir(store, locked.id).is_dir():
            plan.staged_as_is.add(locked.key)


def _not_a_staging_fix(store: Path, repro: str) -> str:
    """The fix for a load that fails although every locked file is there: show the whole error."""
    how = f"; the whole error: hfhpc --store {shlex.quote(str(store))} exec -- python -c {shlex.quote(repro)}" if repro else ""
    return f"not fixed by staging (every locked file is in the store, intact){how}"


def _probe(store: Path, plan: _Plan, allow_hosts: list[str], report: CheckReport) -> None:
    """Run the load probes in sealed children, in parallel."""
    if plan.empty():
        return
    env = offline_environ(store, allow_hosts=allow_hosts)
    env.update(
        HF_HUB_DISABLE_PROGRESS_BARS="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
        TRANSFORMERS_VERBOSITY="error", DATASETS_VERBOSITY="error",
    )
    # One child per library: their imports (transformers+torch ~3-4 s, datasets ~1.3 s, evaluate
    # ~5 s) dominate, and in parallel the check costs the slowest of them, not their sum.
    groups = [
        {"models": plan.models, "train": plan.train},
        {"datasets": plan.datasets},
        {"metrics": plan.metrics},
        {"recipe": plan.recipe},
    ]
    groups = [g for g in groups if any(g.values())]
    with tempfile.TemporaryDirectory(prefix="hfhpc-check-") as tmp:
        if not readonly.is_writable(store):
            env.update(readonly.scratch_environ(store, Path(tmp) / "scratch"))
        running = []
        for i, group in enumerate(groups):
            plan_file, result_file = Path(tmp) / f"plan{i}.json", Path(tmp) / f"result{i}.json"
            plan_file.write_text(json.dumps(group))
            proc = subprocess.Popen(
                [sys.executable, "-m", "hfhpc.offline.probe", str(plan_file), str(result_file)],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )
            running.append((proc, result_file))
        results = []
        for proc, result_file in running:
            _, stderr = proc.communicate()
            if proc.returncode != 0 or not result_file.exists():
                tail = (stderr.strip().splitlines() or ["no output"])[-1]
                report.problems.append(Problem("probe", "-", "sealed loader", f"crashed: {tail}", "run `hfhpc doctor`; report the error"))
                continue
            results.extend(json.loads(result_file.read_text()))
    report.probes += len(results)
    seen: set[tuple] = set()
    for r in results:
        if not r["error"] or (r["kind"], r["id"], r["what"], r["error"]) in seen:
            continue  # the spec and a script of it may name the same asset: one problem, once
        seen.add((r["kind"], r["id"], r["what"], r["error"]))
        if r.get("cause") == "spec":
            fix = f"edit the spec's {r['id']}: keys" if r["kind"] == "spec" else "edit the spec: name a split the dataset has"
            report.problems.append(Problem(r["kind"], r["id"], r["what"], r["error"], fix))
            continue
        if r.get("fix"):
            fix = r["fix"]
        elif (r["kind"], r["id"]) in plan.staged_as_is:
            fix = _not_a_staging_fix(store, r.get("repro", ""))
        else:
            fix = plan.fixes.get((r["kind"], r["id"]), f"hfhpc stage --{r['kind']} {shlex.quote(r['id'])}")
        report.problems.append(Problem(r["kind"], r["id"], r["what"], f"fails offline: {r['error']}", fix))


# -- scripts ---------------------------------------------------------------------------------

def _check_findings(store: Path, findings: list, report: CheckReport, plan: _Plan) -> None:
    seen: set[tuple[str, str | None, str | None]] = set()
    for f in findings:
        where = f"{f.filename}:{f.line}"
        if f.dynamic:
            if f.repo_id:
                report.warnings.append(f"{where}: {f.call}(…) takes its id at run time; checked its default {f.repo_id!r}")
            else:
                report.warnings.append(f"{where}: {f.call}(…) takes its id at run time; cannot check it (stage it and list it in the spec)")
                continue
        elif not f.repo_id and f.kind != "torchvision-download":
            continue
        key = (f.kind, f.repo_id, getattr(f, "revision", None))
        if key in seen:
            continue
        seen.add(key)
        if f.kind == "pipeline-default":
            report.problems.append(Problem(
                "model", f.repo_id, where,
                f"pipeline({f.detail!r}) with no model= would download the default model {f.repo_id}",
                f"pass model={f.repo_id!r} (and a tokenizer) explicitly, then hfhpc stage --model {f.repo_id}",
            ))
        elif f.kind == "torchvision-download":
            report.warnings.append(f"{where}: {f.call}(download=True) downloads when its files are missing: run it once on a login node into a shared folder")
        elif f.kind in ("model", "download"):
            repo_type = _repo_type_of(f)
            _check_repo(store, repo_type, f.repo_id, f.revision, where, report, plan)
        elif f.kind == "dataset":
            config = _config_of(f)
            if not _dataset_ready(store, f.repo_id, config):
                fix = f"hfhpc stage --dataset {shlex.quote(f.repo_id)}" + (f" --config {shlex.quote(config)}" if config else "")
                report.problems.append(Problem("dataset", f.repo_id, where, "not staged (load_dataset would need the network)", fix))
            else:
                commit = read_ref(store, "dataset", f.repo_id, f.revision or "main")
                split = _split_of(f)
                if split:
                    plan.datasets.append({"id": f.repo_id, "commit": commit, "config": config, "splits": [split]})
                    plan.fixes[("dataset", f.repo_id)] = f"hfhpc stage --dataset {shlex.quote(f.repo_id)}"
        elif f.kind == "metric":
            mid = canonical_metric_id(f.repo_id)
            if not metric_module_dir(store, mid).is_dir():
                report.problems.append(Problem("metric", mid, where, "not staged", f"hfhpc stage --metric {shlex.quote(f.repo_id)}"))
            else:
                plan.metrics.append({"id": f.repo_id})
                plan.fixes[("metric", f.repo_id)] = f"hfhpc stage --metric {shlex.quote(f.repo_id)}"


def _repo_type_of(f) -> str:
    detail = (f.detail or "").lower()
    for t in ("dataset", "space"):
        if f"repo_type={t}" in detail.replace("'", "").replace('"', "").replace(" ", "") or detail == t:
            return t
    return "model"


def _config_of(f) -> str | None:
    return _detail_field(f.detail, "name") or _detail_field(f.detail, "config")


def _split_of(f) -> str | None:
    return _detail_field(f.detail, "split")


def _detail_field(detail: str | None, key: str) -> str | None:
    """Findings describe extra arguments as ``key=value`` pairs separated by commas."""
    for part in (detail or "").split(","):
        k, _, v = part.strip().partition("=")
        if k.strip() == key and v.strip():
            return v.strip().strip("'\"")
    return None


def _dataset_ready(store: Path, repo_id: str, config: str | None) -> bool:
    base = dataset_arrow_dir(store, repo_id, config)
    return any((p / "dataset_info.json").is_file() for p in base.glob("*/*"))


def _check_repo(store: Path, repo_type: str, repo_id: str, revision: str | None, where: str, report: CheckReport, plan: _Plan) -> None:
    kind = {"model": "model", "dataset": "dataset", "space": "metric"}[repo_type]
    fix = stage_command(LockedAsset(kind, repo_id, revision or "main", "0" * 40))
    commit = read_ref(store, repo_type, repo_id, revision or "main")
    if commit is None:
        report.problems.append(Problem(kind, repo_id, where, "not staged", fix))
        return
    if repo_type == "model":
        plan.add_model(store, repo_id, commit, fix)


def check(
    store: Path,
    spec: JobSpec | None = None,
    scripts: list[Path] | None = None,
    *,
    probe: bool = True,
    full: bool = False,
) -> CheckReport:
    """``full``: re-hash every file instead of trusting the hashes remembered by (size, mtime, inode)."""
    t0 = time.perf_counter()
    report = CheckReport()
    plan = _Plan()
    scripts = list(scripts or [])
    allow: list[str] = []
    if spec is not None:
        allow = list(spec.site.allow_hosts)
        _check_locked(spec, store, report, plan, full=full)
        extra = sorted((getattr(spec.train, "model_extra", None) or {}).keys())
        trainer_config = registry.get(spec.recipe).trainer_config
        if trainer_config and extra:
            plan.train = {"config": trainer_config, "keys": extra}
        offline_check = registry.get(spec.recipe).offline_check
        if offline_check is not None:
            problems, plan.recipe = offline_check(spec, store)
            report.problems += [Problem(*p) for p in problems]
        if spec.script:
            scripts.insert(0, spec.resolve_path(spec.script))
    if scripts:
        from hfhpc.errors import UsageError
        from hfhpc.offline.scan import scan_file

        findings = []
        for s in scripts:
            if not Path(s).is_file():
                raise UsageError(f"{s}: no such script", "pass the path of a Python file")
            findings.extend(scan_file(Path(s)))
        _check_findings(store, findings, report, plan)
    if probe:
        _probe(store, plan, allow, report)
    report.seconds = time.perf_counter() - t0
    return report


def render(report: CheckReport) -> str:
    from hfhpc.store.stage import human_bytes

    lines = [f"warning: {w}" for w in report.warnings]
    if report.ready:
        probes = f"{report.probes} sealed load probes passed" if report.probes else "no load probes run"
        lines.append(f"ready: {report.assets} assets verified ({human_bytes(report.bytes)}), {probes} in {report.seconds:.1f} s")
    else:
        lines.append(f"not ready: {len(report.problems)} problem{'s' if len(report.problems) != 1 else ''} (the job would fail offline)")
        lines.extend(f"  {p.render()}" for p in report.problems)
        fixes = list(dict.fromkeys(p.fix for p in report.problems))
        lines.append("to fix, on a login node:")
        lines.extend(f"  {f}" for f in fixes)
    return "\n".join(lines)


