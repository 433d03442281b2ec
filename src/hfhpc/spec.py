"""The job spec: YAML validated into typed models.

One model per concern; field descriptions drive the starter files and error messages. Unknown keys
are an error that lists the valid ones. ``train:`` and ``infer:`` pass extra keys through to TRL /
transformers, which validate them at run time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from hfhpc.errors import SpecError
from hfhpc.store.layout import repo_id_problem, revision_problem

RECIPES = ("sft", "infer", "evaluate", "classify", "script")
_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d{1,2}):(\d{2}):(\d{2})$|^(\d+)$")


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


class ModelRef(_Strict):
    """A model (or any Hub model repo) the job loads."""

    id: str = Field(description="Hub id, e.g. HuggingFaceH4/zephyr-7b-beta")
    revision: str = Field("main", description="branch, tag or commit sha")
    include: list[str] = Field(default_factory=list, description="glob patterns of files to stage (default: what loading needs)")

    _v_id = field_validator("id")(classmethod(lambda cls, v: _check_id(v)))
    _v_rev = field_validator("revision")(classmethod(lambda cls, v: _check_revision(v)))


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


class TrainSpec(BaseModel):
    """Training settings. Known keys are checked here; any other key passes through to TRL's
    ``SFTConfig`` / transformers' ``TrainingArguments``."""

    model_config = ConfigDict(extra="allow")

    max_length: int = Field(1024, ge=8, description="tokens per packed sequence")
    packing: bool = Field(True, description="pack documents; they never attend to each other")
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
    assistant_only_loss: bool | None = Field(None, description="train on assistant turns only (default: when the template allows)")
    chat_template: str | None = Field(None, description="template for base models without one: a name or a Jinja string")
    lora: dict[str, Any] | None = Field(None, description="peft LoraConfig fields; enables LoRA")
    attention: Literal["auto", "varlen", "sdpa", "flex_attention", "eager"] = Field(
        "auto", description="auto: variable-length FlashAttention over packed documents (PyTorch's, on GPU), else sdpa")


class InferSpec(BaseModel):
    """Inference settings: the pipeline task plus generation arguments passed through."""

    model_config = ConfigDict(extra="allow")

    task: str = Field("text-generation", description="transformers pipeline task")
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)


class LaunchSpec(_Strict):
    strategy: Literal["single", "ddp", "fsdp"] = Field("single", description="single | ddp | fsdp")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("bf16", description="no | bf16 | fp16")
    activation_checkpointing: bool = True
    keep_activations: int = Field(0, ge=0, description="with activation checkpointing under FSDP2 (sft): this many decoder layers keep their activations instead of recomputing them (faster, more memory)")
    fsdp_version: Literal[1, 2] | None = Field(None, description="FSDP implementation: 2 (per-parameter sharding, fully_shard) or 1 (flat parameters); default 2 for the built-in recipes, 1 for scripts")
    port: int | None = Field(None, ge=1024, le=65535, description="rendezvous port (default: derived from the job id)")
    node_local: bool = Field(True, description="copy the job's assets to node-local disk ($SLURM_TMPDIR) first")
    signal_delay_s: int | None = Field(None, ge=10, description="SIGUSR1 this long before the time limit (default: sized to the checkpoint)")


class Resources(_Strict):
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(1, ge=0, description="0 runs CPU ranks on gloo")
    procs_per_node: int | None = Field(None, ge=1, description="processes per node (default: one per GPU, 1 on CPU)")
    gpu_type: str | None = Field(None, description="e.g. a100 → --gres=gpu:a100:N")
    cpus_per_gpu: int = Field(8, ge=1, description="CPU cores per process")
    mem_gb: int | None = Field(None, ge=0, description="memory per node in GB (absent: estimated from the model and ranks; 0: all of each node's memory, as SLURM's --mem=0)")
    time: str = Field("0-01:00:00", description="wall time, D-HH:MM:SS or minutes")
    account: str | None = Field(None, description="SLURM account (--account)")
    partition: str | None = None
    qos: str | None = None
    extra_sbatch: list[str] = Field(default_factory=list, description="more #SBATCH options, verbatim")

    @field_validator("time")
    @classmethod
    def _time(cls, v: str) -> str:
        if not _TIME_RE.match(v.strip()):
            raise ValueError(f"{v!r} is not a SLURM time: use D-HH:MM:SS, HH:MM:SS or minutes")
        return v.strip()

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
        return parse_slurm_time(self.time)


def parse_slurm_time(value: str) -> int:
    m = _TIME_RE.match(value.strip())
    if not m:
        raise ValueError(value)
    if m.group(5):
        return int(m.group(5)) * 60
    days = int(m.group(1) or 0)
    return ((days * 24 + int(m.group(2))) * 60 + int(m.group(3))) * 60 + int(m.group(4))


class SiteSpec(_Strict):
    preamble: list[str] = Field(default_factory=list, description="shell lines the job runs first (modules, site setup)")
    venv: str | None = Field(None, description="virtualenv to activate (default: the one running hfhpc)")
    requirements: str | None = Field(None, description="requirements file: build the venv on node-local disk with pip --no-index")
    wheelhouse: str | None = Field(None, description="--find-links folder for that build")
    local_dir: str | None = Field(None, description="node-local folder (default: $SLURM_TMPDIR)")
    allow_hosts: list[str] = Field(default_factory=list, description="hosts the sealed job may reach (site services)")


class JobSpec(_Strict):
    name: str = Field(description="job name (letters, digits, '-', '_', '.')")
    recipe: Literal["sft", "infer", "evaluate", "classify", "script"] = Field(description="sft | infer | evaluate | classify | script")
    model: ModelRef | None = None
    dataset: DatasetRef | None = None
    datasets: list[DatasetRef] = Field(default_factory=list, description="more datasets (script recipe)")
    models: list[ModelRef] = Field(default_factory=list, description="more models (script recipe)")
    metrics: list[MetricRef] = Field(default_factory=list)
    train: TrainSpec = Field(default_factory=TrainSpec)
    infer: InferSpec = Field(default_factory=InferSpec)
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

    @model_validator(mode="after")
    def _recipe_needs(self) -> JobSpec:
        need: dict[str, tuple[str, ...]] = {
            "sft": ("model", "dataset"),
            "infer": ("model", "dataset"),
            "classify": ("model", "dataset"),
            "evaluate": (),
            "script": ("script",),
        }
        for key in need[self.recipe]:
            if getattr(self, key) is None:
                raise ValueError(f"recipe {self.recipe!r} needs `{key}:`")
        if self.recipe == "evaluate":
            if not self.metrics:
                raise ValueError("recipe 'evaluate' needs `metrics:`")
            if not self.predictions and not (self.model and self.dataset):
                raise ValueError("recipe 'evaluate' needs `predictions:` or both `model:` and `dataset:`")
        if self.launch.strategy == "fsdp" and self.resources.gpus_per_node == 0:
            raise ValueError("launch.strategy 'fsdp' needs GPUs: set resources.gpus_per_node, or use ddp on CPU")
        return self

    # -- derived ---------------------------------------------------------------------------
    @property
    def fsdp_version(self) -> int:
        """FSDP2 for the built-in recipes (measured faster, see docs/performance.md); a user's script
        keeps accelerate's own default, FSDP1, which scripts written for the page expect, and so does
        LoRA (a frozen half-precision base beside fp32 adapters, measured with FSDP1 only)."""
        if self.launch.fsdp_version is not None:
            return self.launch.fsdp_version
        return 1 if self.recipe == "script" or self.train.lora is not None else 2

    @property
    def per_layer_fsdp(self) -> bool:
        """Whether the sft recipe checkpoints and compiles each decoder layer itself (FSDP2, no LoRA:
        hfhpc.recipes.layers); only then does ``launch.keep_activations`` apply."""
        return (self.recipe == "sft" and self.launch.strategy == "fsdp" and self.fsdp_version == 2
                and self.train.lora is None)

    def all_models(self) -> list[ModelRef]:
        return ([self.model] if self.model else []) + list(self.models)

    def all_datasets(self) -> list[DatasetRef]:
        return ([self.dataset] if self.dataset else []) + list(self.datasets)

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


def spec_error_from(exc: ValidationError, path: str) -> SpecError:
    err = exc.errors()[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    key = _loc_str(loc)
    if err["type"] == "extra_forbidden":
        owner = _model_at(loc) or JobSpec
        valid = ", ".join(_valid_keys(owner))
        return SpecError(path, key, "unknown key", f"valid keys here: {valid}")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return SpecError(path, key, "required key is missing", f"add `{loc[-1]}:` (see `hfhpc init`)")
    if err["type"] == "literal_error":
        return SpecError(path, key, msg.replace("Input should be", "must be"))
    return SpecError(path, key, msg)


def parse_spec(data: Any, path: str = "<spec>") -> JobSpec:
    if not isinstance(data, dict):
        raise SpecError(path, "", "a job spec must be a YAML mapping", "start from `hfhpc init sft`")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise spec_error_from(e, path) from None


def load_spec(path: str | Path) -> JobSpec:
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise SpecError(str(p), "", "no such file", "write one with `hfhpc init RECIPE -o FILE`") from None
    except IsADirectoryError:
        raise SpecError(str(p), "", "is a folder, not a spec file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        raise SpecError(str(p), where, f"not valid YAML ({getattr(e, 'problem', e)})") from None
    spec = parse_spec(data, str(p))
    spec._source = p.absolute()
    return spec
