"""The job spec: YAML validated into typed models.

One model per concern; field descriptions drive the starter files and error messages. Unknown keys
are an error that lists the valid ones. ``train:`` and ``infer:`` belong to the recipe: each recipe
(``hfhpc.registry``) names the model of its ``train:`` (a ``TrainBase``) and ``infer:``
sections; a key of another recipe's model is an error naming that recipe. Other ``train:`` keys pass
through to the recipe's trainer config, checked against its fields before a job is queued or started
(``hfhpc.preflight``); ``infer:`` keys pass through to the pipeline call.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, create_model, field_validator, model_serializer,
                      model_validator)

from hfhpc import slurmtime
from hfhpc.errors import SpecError
from hfhpc import registry
from hfhpc.store.layout import repo_id_problem, revision_problem

# Sanity bounds: far above any cluster, far below what a typo (an extra zero or ten) produces.
MAX_NODES = 10_000
MAX_PROCS_PER_NODE = 1_024
MAX_MEM_GB = 100_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_id(value: str) -> str:
    problem = repo_id_problem(value)
    if problem:
        raise ValueError(f"invalid repository id {value!r}: {problem}")
    return value


def _check_revision(value: str) -> str:
    problem = revision_problem(value)
    if problem:
        raise ValueError(f"invalid revision {value!r}: {problem}")
    return value


# The namespace of the ids under which finished runs' models are staged (``run/<folder name>``).
RUN_NAMESPACE = "run"


def run_model_id(from_run: str) -> str:
    """The store id of the model of the run folder ``from_run``: ``run/<the folder's name>``.

    Derived from the text alone (the spec's folder is not known while it validates), so the same
    spec names the same id wherever it is read; the lockfile pins the content under it.
    """
    if not from_run.strip() or "\0" in from_run:
        raise ValueError(f"from_run {from_run!r} is not a path: name a run folder, e.g. runs/zephyr-sft")
    name = PurePosixPath(os.path.normpath(from_run)).name
    if name in ("", ".", ".."):
        raise ValueError(f"from_run {from_run!r} does not end in a folder name: name the run folder itself, e.g. ../runs/zephyr-sft")
    problem = repo_id_problem(f"{RUN_NAMESPACE}/{name}")
    if problem:
        raise ValueError(f"the run folder's name {name!r} cannot name its staged model ({problem}): "
                         "rename the folder with letters, digits, '-', '_' and '.'")
    return f"{RUN_NAMESPACE}/{name}"


class ModelRef(_Strict):
    """A model the job loads: a Hub model repo (``id``) or the final model of a finished run (``from_run``)."""

    id: str = Field(description="Hub id, e.g. HuggingFaceH4/zephyr-7b-beta (or instead `from_run: RUN_DIR`, a finished run's model)")
    from_run: str | None = Field(None, description="instead of id: a finished run folder whose model/ the job starts from, e.g. runs/zephyr-sft (relative to the spec's folder; staged as the model run/<folder name>)")
    revision: str = Field("main", description="branch, tag or commit sha")
    include: list[str] = Field(default_factory=list, description="glob patterns of files to stage (default: what loading needs)")

    _v_id = field_validator("id")(classmethod(lambda cls, v: _check_id(v)))
    _v_rev = field_validator("revision")(classmethod(lambda cls, v: _check_revision(v)))

    @model_validator(mode="before")
    @classmethod
    def _one_source(cls, data: Any) -> Any:
        # The rest of hfhpc sees one model id: a run's model gets its derived id here, once, and every
        # command (stage, check, the lockfile, the node-local copy, the recipes) uses `id` unchanged.
        if not isinstance(data, dict):
            return data
        if data.get("from_run") is None:
            if "id" not in data:
                raise ValueError("give `id:` (a Hub model) or `from_run:` (a finished run folder)")
            return data
        if "id" in data:
            raise ValueError("give `id:` (a Hub model) or `from_run:` (a finished run folder), not both")
        if not isinstance(data["from_run"], str):
            raise ValueError("from_run must be the path of a run folder, e.g. runs/zephyr-sft")
        if data.get("revision", "main") != "main" or data.get("include"):
            raise ValueError("`revision:` and `include:` belong to a Hub model: `from_run:` stages the run's whole model/ folder")
        return {**data, "id": run_model_id(data["from_run"])}

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        # Written as the spec wrote it: a Hub model without `from_run` (job.json as before), a run's
        # model without its derived `id` (job.json reads back through _one_source).
        out = handler(self)
        out.pop("from_run" if self.from_run is None else "id", None)
        return out


class DatasetRef(_Strict):
    """A Hub dataset, loaded with ``load_dataset(id, config, split=…)``."""

    id: str = Field(description="Hub id, e.g. HuggingFaceH4/ultrachat_200k")
    revision: str = Field("main", description="branch, tag or commit sha")
    config: str | None = Field(None, description="configuration name (second argument of load_dataset)")
    split: str = Field("train", description="training (or input) split")
    eval_split: str | None = Field(None, description="evaluation split")
    splits: list[str] = Field(default_factory=list, description="every split to prepare (default: split and eval_split)")
    include: list[str] = Field(default_factory=list, description="glob patterns of files to stage (default: all data files)")
    text_column: str | None = Field(None, description="input column for infer/classify (default: guessed)")
    label_column: str | None = Field(None, description="label column for classify/evaluate")
    max_samples: int | None = Field(None, ge=1, description="use only the first N rows of each split")

    _v_id = field_validator("id")(classmethod(lambda cls, v: _check_id(v)))
    _v_rev = field_validator("revision")(classmethod(lambda cls, v: _check_revision(v)))

    def all_splits(self) -> list[str]:
        wanted = list(self.splits) or [s for s in (self.split, self.eval_split) if s]
        return list(dict.fromkeys(wanted))


class MetricRef(_Strict):
    """An Evaluate metric. A bare name like ``accuracy`` means ``evaluate-metric/accuracy``."""

    id: str
    revision: str = "main"

    @field_validator("id")
    @classmethod
    def _canonical(cls, v: str) -> str:
        v = canonical_metric_id(v)
        return _check_id(v)

    _v_rev = field_validator("revision")(classmethod(lambda cls, v: _check_revision(v)))


def canonical_metric_id(name: str) -> str:
    return name if "/" in name else f"evaluate-metric/{name}"


class TrainBase(BaseModel):
    """Training settings every training recipe shares. A recipe's ``train`` model subclasses it and
    adds its own; any other key passes through to the recipe's trainer config."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, validate_assignment=True)

    epochs: float = Field(1.0, gt=0, description="passes over the training split")
    max_steps: int = Field(-1, description="stop after this many optimizer steps (-1: from epochs)")
    learning_rate: float = Field(2.0e-5, gt=0, description="peak learning rate")
    per_device_batch_size: int = Field(4, ge=1, description="sequences per process per step")
    gradient_accumulation_steps: int = Field(1, ge=1)
    seed: int = 42
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(500, ge=1, description="checkpoint every N steps")
    save_total_limit: int = Field(2, ge=1, description="complete checkpoints kept")
    eval_steps: int | None = Field(None, ge=1)
    lora: dict[str, Any] | None = Field(None, description="peft LoraConfig fields; enables LoRA")

    @field_validator("max_steps")
    @classmethod
    def _max_steps(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError(f"{v} steps: use -1 (from epochs) or a number of steps >= 1")
        return v


class LaunchSpec(_Strict):
    strategy: Literal["single", "ddp", "fsdp"] = Field("single", description="single | ddp | fsdp")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("bf16", description="no | bf16 | fp16")
    activation_checkpointing: bool = True
    keep_activations: int = Field(0, ge=0, description="with activation checkpointing (sft and dpo; not under FSDP1): this many decoder layers keep their activations instead of recomputing them (faster, more memory)")
    fsdp_version: Literal[1, 2] | None = Field(None, description="FSDP implementation: 2 (per-parameter sharding, fully_shard) or 1 (flat parameters); default 2 for the built-in recipes, 1 for scripts")
    port: int | None = Field(None, ge=1024, le=65535, description="rendezvous port (default: derived from the job id)")
    node_local: bool = Field(True, description="copy the job's assets to node-local disk ($SLURM_TMPDIR) first")
    signal_delay_s: int | None = Field(None, ge=10, description="SIGUSR1 this long before the time limit (default: sized to the checkpoint)")


class Resources(_Strict):
    nodes: int = Field(1, ge=1, le=MAX_NODES)
    gpus_per_node: int = Field(1, ge=0, le=MAX_PROCS_PER_NODE, description="0 runs CPU ranks on gloo")
    procs_per_node: int | None = Field(None, ge=1, le=MAX_PROCS_PER_NODE, description="processes per node (default: one per GPU, 1 on CPU)")
    gpu_type: str | None = Field(None, description="e.g. a100 → --gres=gpu:a100:N")
    cpus_per_gpu: int = Field(8, ge=1, le=MAX_PROCS_PER_NODE, description="CPU cores per process")
    mem_gb: int | None = Field(None, ge=0, le=MAX_MEM_GB, description="memory per node in GB (absent: estimated from the model and ranks; 0: all of each node's memory, as SLURM's --mem=0)")
    time: str = Field("0-01:00:00", description="wall time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    account: str | None = Field(None, description="SLURM account (--account)")
    partition: str | None = None
    qos: str | None = None
    extra_sbatch: list[str] = Field(default_factory=list, description="more #SBATCH options, verbatim")

    @field_validator("time", mode="before")
    @classmethod
    def _time(cls, v: Any) -> str:
        # `time: 60` is a YAML integer: minutes, as sbatch reads it.
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str):
            raise ValueError(f"{v!r} is not a SLURM time: use {slurmtime.FORMS}")
        slurmtime.parse(v)
        return v.strip()

    @field_validator("gpu_type")
    @classmethod
    def _gpu_type(cls, v: str | None) -> str | None:
        # It becomes one field of --gres=gpu:TYPE:N: a ':' or ',' would write another request.
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", v):
            raise ValueError(f"{v!r} is not a GPU type: use one name like a100 or h100_80gb (letters, digits, '_', '.', '-')")
        return v

    @property
    def procs(self) -> int:
        if self.procs_per_node:
            return self.procs_per_node
        return self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs

    @property
    def time_s(self) -> int:
        return slurmtime.parse(self.time)


class SiteSpec(_Strict):
    preamble: list[str] = Field(default_factory=list, description="shell lines the job runs first (modules, site setup)")
    venv: str | None = Field(None, description="virtualenv to activate (default: the one running hfhpc)")
    requirements: str | None = Field(None, description="requirements file: build the venv on node-local disk with pip --no-index")
    wheelhouse: str | None = Field(None, description="--find-links folder for that build")
    local_dir: str | None = Field(None, description="node-local folder (default: $SLURM_TMPDIR)")
    allow_hosts: list[str] = Field(default_factory=list, description="hosts the sealed job may reach (site services)")


class JobSpec(_Strict):
    name: str = Field(description="job name (letters, digits, '-', '_', '.')")
    recipe: str = Field(description="what the job runs: `hfhpc init --help` lists the recipes")
    model: ModelRef | None = None
    dataset: DatasetRef | None = None
    datasets: list[DatasetRef] = Field(default_factory=list, description="more datasets (script recipe)")
    models: list[ModelRef] = Field(default_factory=list, description="more models (script recipe)")
    metrics: list[MetricRef] = Field(default_factory=list)
    # The recipe's own models (see job_model); None where the recipe takes no such section.
    train: TrainBase | None = Field(None, description="training settings (the recipe's own; other keys pass through to its trainer config)")
    infer: BaseModel | None = Field(None, description="pipeline settings (recipes infer and evaluate)")
    launch: LaunchSpec = Field(default_factory=LaunchSpec)
    resources: Resources = Field(default_factory=Resources)
    site: SiteSpec = Field(default_factory=SiteSpec)
    output_dir: str | None = Field(None, description="run directory (default: runs/<name>)")
    script: str | None = Field(None, description="the user script (recipe: script)")
    args: list[str] = Field(default_factory=list, description="arguments for the script")
    predictions: str | None = Field(None, description="predictions.jsonl to score (recipe: evaluate)")

    # Where the spec came from; set by load_spec, not a YAML key.
    _source: Path | None = PrivateAttr(None)

    @property
    def source(self) -> Path | None:
        return self._source

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", v):
            raise ValueError(f"{v!r} is not a job name: use letters, digits, '-', '_' and '.'")
        return v

    @field_validator("model", mode="before")
    @classmethod
    def _model_str(cls, v: Any) -> Any:
        return {"id": v} if isinstance(v, str) else v

    @field_validator("models", "datasets", mode="before")
    @classmethod
    def _refs_str(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"id": x} if isinstance(x, str) else x for x in v]
        return v

    @field_validator("dataset", mode="before")
    @classmethod
    def _dataset_str(cls, v: Any) -> Any:
        return {"id": v} if isinstance(v, str) else v

    @field_validator("metrics", mode="before")
    @classmethod
    def _metrics_str(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"id": x} if isinstance(x, str) else x for x in v]
        return v

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> JobSpec:
        # JobSpec itself validates as the model of the spec's recipe, whoever calls it.
        if cls is JobSpec and isinstance(obj, dict) and isinstance(obj.get("recipe"), str) and obj["recipe"] in registry.names():
            return job_model(obj["recipe"]).model_validate(obj, **kwargs)
        return super().model_validate(obj, **kwargs)

    @field_validator("recipe")
    @classmethod
    def _recipe(cls, v: str) -> str:
        known = registry.names()
        if v not in known:
            raise ValueError(f"must be {_either(known)}{did_you_mean(v, known)}")
        return v

    @model_validator(mode="after")
    def _recipe_needs(self) -> JobSpec:
        recipe = registry.get(self.recipe)
        for key in recipe.needs:
            if getattr(self, key) in (None, [], ""):
                raise ValueError(f"recipe {self.recipe!r} needs `{key}:`")
        if recipe.check is not None:
            recipe.check(self)
        if self.launch.strategy == "fsdp" and self.resources.gpus_per_node == 0:
            raise ValueError("launch.strategy 'fsdp' needs GPUs: set resources.gpus_per_node, or use ddp on CPU")
        sources: dict[str, str | None] = {}
        for m in self.all_models():
            # One id is one asset: two runs of the same folder name (or a run and a Hub model) cannot share it.
            run = os.path.normpath(m.from_run) if m.from_run is not None else None
            if sources.setdefault(m.id, run) != run:
                raise ValueError(f"two models would be staged as {m.id} ({sources[m.id] or 'the Hub model'} and {m.from_run or 'the Hub model'}): "
                                 "give the run folders different names")
        return self

    # -- derived ---------------------------------------------------------------------------
    @property
    def fsdp_version(self) -> int:
        """FSDP2 for the built-in recipes, full fine-tuning and LoRA: it takes the recipes' compiled
        layers (measured faster for full fine-tuning, docs/performance.md); a user's script keeps
        accelerate's own default, FSDP1, which scripts written for the page expect."""
        if self.launch.fsdp_version is not None:
            return self.launch.fsdp_version
        return registry.get(self.recipe).fsdp_version

    def all_models(self) -> list[ModelRef]:
        return ([self.model] if self.model else []) + list(self.models)

    def all_datasets(self) -> list[DatasetRef]:
        refs = ([self.dataset] if self.dataset else []) + list(self.datasets)
        more = registry.get(self.recipe).datasets
        return refs + (list(more(self)) if more else [])

    def base_dir(self) -> Path:
        return self.source.parent if self.source else Path.cwd()

    def resolve_path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir() / p)

    def run_dir(self) -> Path:
        return Path(os.path.normpath(self.resolve_path(self.output_dir or f"runs/{self.name}").absolute()))

    def lock_path(self) -> Path:
        if self.source is None:
            return Path.cwd() / f"{self.name}.lock"
        return lock_path_for(self.source)

    def stage_command(self, flag: str = "") -> str:
        """The command that stages this spec (a fix that error messages name), ready to paste."""
        return f"hfhpc stage {shlex.quote(str(self.source)) if self.source else 'SPEC'}{flag}"


def lock_path_for(spec_path: Path) -> Path:
    """``job.yaml`` → ``job.lock`` beside it."""
    return spec_path.with_suffix(".lock")


# -- loading -------------------------------------------------------------------------------

def _valid_keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _model_at(loc: tuple, root: type[BaseModel] = JobSpec) -> type[BaseModel] | None:
    """The pydantic model that owns the key at ``loc`` (to list its valid keys)."""
    current: Any = root
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        field = current.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        current = _unwrap_model(ann)
    return current


def _unwrap_model(ann: Any) -> type[BaseModel] | None:
    import typing

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in typing.get_args(ann):
        found = _unwrap_model(arg)
        if found:
            return found
    return None


def _loc_str(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def did_you_mean(word: Any, choices: list[str]) -> str:
    """``" (did you mean `x`?)"`` for the closest choice, or nothing."""
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _either(names: list[str]) -> str:
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _both(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


@cache
def job_model(recipe: str) -> type[JobSpec]:
    """JobSpec with the ``train:`` and ``infer:`` sections of ``recipe``'s own models."""
    r = registry.get(recipe)
    fields: dict[str, Any] = {}
    for section in ("train", "infer"):
        model = getattr(r, section)
        if model is not None:
            fields[section] = (model, Field(default_factory=model, description=JobSpec.model_fields[section].description))
        else:
            fields[section] = (None, None)
    for section, model in r.sections.items():
        fields[section] = (model | None, Field(None, description=(model.__doc__ or "").strip().split("\n")[0]))
    return create_model(f"{recipe.title().replace('_', '')}JobSpec", __base__=JobSpec, __module__=__name__, **fields)


def _foreign_keys(data: dict, path: str) -> None:
    """Refuse ``train:``/``infer:`` keys the recipe does not own: name the recipe that does."""
    name = data.get("recipe")
    if not isinstance(name, str) or name not in registry.names():
        return
    recipe = registry.get(name)
    for section in data:
        owners = registry.section_owners(section) if isinstance(section, str) else []
        if owners and section not in recipe.sections:
            raise SpecError(path, section, f"`{section}:` belongs to recipe {_both(owners)}, not {name}",
                            f"remove `{section}:`")
    for section in ("train", "infer"):
        value = data.get(section)
        if value is None:
            continue
        model = getattr(recipe, section)
        if model is None:
            owners = [n for n, r in registry.recipes().items() if getattr(r, section) is not None]
            raise SpecError(path, section, f"`{section}:` belongs to recipe {_both(owners)}, not {name}",
                            f"remove `{section}:`" + (" (a seed goes in `infer: {seed: …}`)" if section == "train" and recipe.infer else ""))
        if not isinstance(value, dict):
            continue
        for key in value:
            if not isinstance(key, str) or key in model.model_fields:
                continue
            owners = [n for n in registry.owners(section, key) if n != name]
            if owners:
                raise SpecError(path, f"{section}.{key}", f"`{key}` belongs to recipe {_both(owners)}, not {name}",
                                f"remove it; {name}'s own keys: {', '.join(model.model_fields)}")
            if section == "train" and recipe.trainer_config is None:
                raise SpecError(path, f"{section}.{key}", f"unknown key{did_you_mean(key, list(model.model_fields))}",
                                f"valid keys here: {', '.join(model.model_fields)}")


def spec_error_from(exc: ValidationError, path: str, root: type[BaseModel] = JobSpec) -> SpecError:
    err = exc.errors()[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    key = _loc_str(loc)
    if err["type"] == "extra_forbidden":
        owner = _model_at(loc, root) or root
        valid = _valid_keys(owner)
        return SpecError(path, key, f"unknown key{did_you_mean(loc[-1], valid)}", f"valid keys here: {', '.join(valid)}")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return SpecError(path, key, "required key is missing", f"add `{loc[-1]}:` (see `hfhpc init`)")
    if err["type"] == "literal_error":
        return SpecError(path, key, msg.replace("Input should be", "must be"))
    if err["type"] == "finite_number":
        return SpecError(path, key, "must be a finite number")
    return SpecError(path, key, msg)


def parse_spec(data: Any, path: str = "<spec>") -> JobSpec:
    if not isinstance(data, dict):
        raise SpecError(path, "", "a job spec must be a YAML mapping", "start from `hfhpc init --help`")
    # `train:` or `infer:` left empty in YAML is null: the recipe's defaults.
    data = {k: v for k, v in data.items() if not (k in ("train", "infer") and v is None)}
    _foreign_keys(data, path)
    recipe = data.get("recipe")
    model = job_model(recipe) if isinstance(recipe, str) and recipe in registry.names() else JobSpec
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise spec_error_from(e, path, model) from None


def load_spec(path: str | Path) -> JobSpec:
    from hfhpc.specyaml import YamlProblem, loads

    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise SpecError(str(p), "", "no such file", "write one with `hfhpc init RECIPE -o FILE`") from None
    except IsADirectoryError:
        raise SpecError(str(p), "", "is a folder, not a spec file") from None
    except OSError as e:
        raise SpecError(str(p), "", f"cannot be read ({e.strerror or e})") from None
    try:
        data = loads(raw)
    except YamlProblem as e:
        raise SpecError(str(p), f"line {e.line}" if e.line else "", e.problem) from None
    spec = parse_spec(data, str(p))
    spec._source = p.absolute()
    return spec
