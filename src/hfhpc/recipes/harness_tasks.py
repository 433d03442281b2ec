"""What lm-evaluation-harness tasks load, told by the harness's own task registry, without the network.

The harness builds a task by calling ``datasets.load_dataset(dataset_path, dataset_name,
**dataset_kwargs)`` while it constructs it, so asking "what does ``mmlu`` need?" the usual way
downloads it. Here the registry (``TaskManager``: its YAML index, groups, tags, includes and
overrides, all read from the installed package) builds the tasks with a task class that records its
configuration instead of loading data. The answer — one :class:`TaskData` per leaf task — is what
``hfhpc stage`` stages (the datasets, each configuration prepared so that the harness's own
``load_dataset`` call works offline) and what ``hfhpc check`` then builds for real, sealed.

Resolution runs in a child process (the registry indexes ~14,000 YAML files: ~16 s of CPU) and is
cached per (harness version, tasks, custom task files); this module's front needs only the standard
library, so the login-node path imports neither lm_eval nor torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from hfhpc.errors import HfhpcError

HARNESS_DIST = "lm_eval"
HARNESS_VERSION = "0.4.13"  # the version tested and pinned in the `harness` extra


@dataclass(frozen=True)
class TaskData:
    """One leaf task and the dataset it loads."""

    task: str
    path: str | None  # dataset_path: a Hub dataset id (or a local builder, refused)
    name: str | None  # dataset_name: the configuration
    splits: tuple[str, ...]
    kwargs: dict | None = None  # dataset_kwargs passed to load_dataset
    refusal: str | None = None  # why hfhpc cannot run this task offline


class HarnessError(HfhpcError):
    pass


def harness_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version(HARNESS_DIST)
    except metadata.PackageNotFoundError:
        return None


def _missing_harness() -> HarnessError:
    return HarnessError(
        "lm-evaluation-harness is not installed in this Python: hfhpc needs it to resolve the tasks",
        f"pip install 'hfhpc[harness]' (lm_eval=={HARNESS_VERSION}) into the environment that runs hfhpc",
    )


def _cache_key(tasks: list[str], include: list[Path], version: str) -> str:
    h = hashlib.sha256(json.dumps([version, tasks]).encode())
    for folder in include:
        for f in sorted(Path(folder).rglob("*")) if Path(folder).is_dir() else [Path(folder)]:
            if f.is_file() and f.suffix in (".yaml", ".yml", ".py"):
                h.update(str(f.relative_to(folder if Path(folder).is_dir() else f.parent)).encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:24]


def resolve(tasks: list[str], include: list[Path], cache_dir: Path | None = None) -> list[TaskData]:
    """The leaf tasks of ``tasks`` (names of tasks, groups or tags; ``include`` folders add custom
    task YAMLs) and the datasets they load, from the cache or a child process."""
    version = harness_version()
    if version is None:
        raise _missing_harness()
    # A task given as a YAML file is hashed with the folders: editing it resolves it again.
    key = _cache_key(tasks, list(include) + [Path(t) for t in tasks if Path(t).is_file()], version)
    cached = Path(cache_dir) / f"{key}.json" if cache_dir else None
    if cached is not None and cached.is_file():
        try:
            return [_task_data(d) for d in json.loads(cached.read_text())]
        except (OSError, ValueError, TypeError, KeyError):
            pass
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_TOKEN")}
    # The registry needs no network; make sure nothing it imports tries.
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "hfhpc.recipes.harness_tasks", "resolve", json.dumps(
            {"tasks": tasks, "include": [str(p) for p in include]})],
        capture_output=True, text=True, env=env, timeout=900,
    )
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"exit {proc.returncode}"
        raise HarnessError(f"lm-evaluation-harness could not resolve the tasks {', '.join(tasks)}: {detail}",
                           "check the task names (`lm_eval ls tasks`) and the custom task files")
    found = [_task_data(d) for d in json.loads(proc.stdout.strip().splitlines()[-1])]
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps([asdict(t) for t in found]))
            os.replace(tmp, cached)
        except OSError:
            pass  # a read-only store: resolve again next time
    return found


def resolve_spec(spec) -> list[TaskData]:
    """The spec's harness tasks, resolved (cached in hfhpc's state folder)."""
    from hfhpc import env as hfenv
    from hfhpc.recipes.harness import task_arguments

    tasks, include = task_arguments(spec)
    return resolve(tasks, [Path(p) for p in include], cache_dir=hfenv.state_dir() / "harness-tasks")


def task_datasets(spec) -> list:
    """One ``DatasetRef`` per (dataset, configuration) the spec's tasks load; refused tasks are left
    out here (``check`` and ``stage`` name them)."""
    from hfhpc.spec import DatasetRef
    from hfhpc.store.layout import repo_id_problem

    refs: dict[tuple[str, str | None], DatasetRef] = {}
    for t in resolve_spec(spec):
        if t.refusal or not t.path or repo_id_problem(t.path):
            continue
        key = (t.path, t.name)
        splits = list(dict.fromkeys([*(refs[key].splits if key in refs else []), *t.splits]))
        refs[key] = DatasetRef(id=t.path, config=t.name, split=splits[0] if splits else "train", splits=splits)
    return list(refs.values())


def refused(spec) -> list[tuple[str, str]]:
    """(task, why) for every task of the spec that cannot run sealed."""
    from hfhpc.store.layout import repo_id_problem

    out = []
    for t in resolve_spec(spec):
        why = t.refusal or (f"dataset_path {t.path!r} is not a Hub dataset id" if t.path and repo_id_problem(t.path) else None)
        if why:
            out.append((t.task, why))
    return out


def _task_data(d: dict) -> TaskData:
    return TaskData(d["task"], d.get("path"), d.get("name"), tuple(d.get("splits") or ()), d.get("kwargs"), d.get("refusal"))


# -- the child: the harness's registry with a recording task class ------------------------------------

def _refusal(config, cls_name: str | None) -> str | None:
    if cls_name:
        return f"a Python task class ({cls_name}) whose downloads hfhpc cannot tell offline"
    if config.custom_dataset is not None:
        return "a custom_dataset function: hfhpc cannot tell what it loads"
    path = config.dataset_path
    if not path:
        return "no dataset_path"
    if path.endswith(".py") or (Path(path).exists() and not Path(path).is_dir()):
        return f"a dataset script ({path}): remote code cannot run sealed"
    kwargs = config.dataset_kwargs or {}
    if kwargs.get("trust_remote_code"):
        return "trust_remote_code: a dataset script cannot run sealed"
    return None


def _record_tasks(tasks: list[str], include: list[str]) -> list[dict]:
    import lm_eval.tasks._factory as factory
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.config.task import TaskConfig
    from lm_eval.tasks import TaskManager

    found: list[dict] = []

    def record(config, cls_name: str | None = None) -> None:
        splits = [s for s in (config.training_split, config.validation_split, config.test_split,
                              config.fewshot_split) if s]
        found.append({"task": config.task, "path": config.dataset_path, "name": config.dataset_name,
                      "splits": list(dict.fromkeys(splits)), "kwargs": config.dataset_kwargs,
                      "refusal": _refusal(config, cls_name)})

    class Recorded(ConfigurableTask):
        """Takes the task's final configuration (includes and overrides applied) and loads nothing."""

        def __init__(self, data_dir=None, cache_dir=None, download_mode=None, config=None):
            cfg = dict(config or {})
            cls = cfg.pop("class", None)
            self._config = TaskConfig(**cfg)
            record(self._config, getattr(cls, "__name__", None) if cls is not None else None)

    factory.ConfigurableTask = Recorded
    # Python task classes (``class:`` in the YAML) construct themselves and download on the way:
    # route them through the recorder too, named, so that they are refused rather than fetched.
    build_task = factory.TaskFactory._build_task

    def _build_task(self, entry, overrides):
        cfg = self._load_full_config(entry, overrides)
        if "class" in cfg:
            return Recorded(config={k: v for k, v in cfg.items() if k not in ("tag", "group", "task_list")})
        return build_task(self, entry, overrides)

    factory.TaskFactory._build_task = _build_task
    manager = TaskManager(include_path=include or None)
    unknown = [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]
    if unknown:
        raise SystemExit(f"unknown task(s): {', '.join(unknown)}")
    manager.load(tasks)
    # A task named twice (in a group and alone) is built twice; the harness itself refuses that.
    return list({d["task"]: d for d in found}.values())


def build_sealed(tasks: list[str], include: list[str]) -> list[dict]:
    """Build every task for real, as the run will (``load_dataset`` offline from the store): one
    result per task name given, with the first error of the first task that fails."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include or None)
    results = []
    for name in tasks:
        try:
            built = manager.load([name])
            results.append({"task": name, "error": None, "leaves": sorted(built["tasks"])})
        except Exception as e:  # noqa: BLE001 - each failure is a finding
            text = str(e).strip().splitlines()
            results.append({"task": name, "error": f"{type(e).__name__}: {text[0] if text else ''}"})
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verb, payload = argv[0], json.loads(argv[1])
    import logging

    logging.disable(logging.WARNING)
    if verb == "resolve":
        out = _record_tasks(payload["tasks"], payload["include"])
    elif verb == "build":
        out = build_sealed(payload["tasks"], payload["include"])
    else:
        raise SystemExit(f"unknown verb {verb!r}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# -- what `hfhpc check` adds for recipe harness (Recipe.offline_check) -------------------------------

def offline_check(spec, store: Path) -> tuple[list[tuple[str, str, str, str, str]], dict]:
    """Refuse the tasks that cannot run sealed; build the rest in the sealed probe child (which finds
    the store itself)."""
    from hfhpc.recipes.harness import task_arguments

    fix_task = "remove the task from harness.tasks, or give a task YAML that loads a Hub dataset"
    problems = [("task", task, "lm-evaluation-harness", f"cannot run sealed: {why}", fix_task)
                for task, why in refused(spec)]
    tasks, include = task_arguments(spec)
    stage = spec.stage_command()
    return problems, {"target": "hfhpc.recipes.harness_tasks:sealed_probe",
                      "args": {"tasks": tasks, "include": include, "fix": stage,
                               "keys": sorted((spec.harness.model_extra or {}).keys())}}


def sealed_probe(tasks: list[str], include: list[str], fix: str, keys: list[str]) -> list[dict]:
    """In the sealed child: build every task as the run will, check the pass-through keys."""
    import time

    from hfhpc.recipes.harness import HarnessSpec, unknown_arguments

    t = time.perf_counter()
    results = [{"kind": "task", "id": r["task"], "what": "lm-evaluation-harness task", "error": r["error"],
                "cause": "store", "fix": fix, "seconds": round(time.perf_counter() - t, 3)}
               for r in build_sealed(tasks, include)]
    if keys:
        unknown = unknown_arguments(HarnessSpec(tasks=["-"], **{k: None for k in keys}))
        results.append({"kind": "spec", "id": "harness", "what": "pass-through keys", "cause": "spec", "seconds": 0.0,
                        "error": f"not an argument of lm_eval.simple_evaluate (or set by hfhpc): {', '.join(unknown)}"
                        if unknown else None})
    return results
