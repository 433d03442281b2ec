"""A static scan of user scripts for the assets they load: models, datasets, metrics, downloads.

``hfhpc check script.py`` uses it on the login node to list what a script would fetch from the Hub
when it runs sealed. Nothing is executed: the script is parsed with :mod:`ast`, and each argument is
resolved when it is a literal, an f-string of constants, a constant assigned once in the module or
in the enclosing function, the default of an ``argparse`` option or of a dataclass field read as
``args.name`` (best effort: the command line may override it), or the default of
``os.environ.get``/``os.getenv`` (reported as dynamic, with the default). Anything else is dynamic:
a finding with ``dynamic=True`` and no ``repo_id``.

Only the standard library is imported here; transformers is imported, lazily, only to name the
default model of a task-only ``pipeline(task)``.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

FindingKind = Literal["model", "dataset", "metric", "download", "pipeline-default", "torchvision-download"]


@dataclass(frozen=True)
class Finding:
    """One asset a script loads, at ``filename:line``.

    ``detail`` holds the other arguments that select the asset, as ``key=value`` pairs joined by
    ``", "`` (``name=…, split=…`` for datasets, ``repo_type=…, filename=…`` for hub downloads,
    ``subfolder=…`` for models, ``config_name=…`` for metrics, ``root=…`` for torchvision datasets);
    for pipelines it is the task as written, with the component in brackets when it is not the
    model (``"text-classification (tokenizer)"``).
    """

    kind: FindingKind
    repo_id: str | None
    revision: str | None
    filename: str
    line: int
    call: str
    dynamic: bool = False
    detail: str = ""


# The builders that datasets ships: load_dataset("csv", data_files=…) reads local files.
PACKAGED_BUILDERS = frozenset(
    {
        "arrow", "audiofolder", "csv", "eval", "generator", "hdf5", "imagefolder", "json", "lance",
        "niftifolder", "pandas", "parquet", "pdffolder", "spark", "sql", "text", "videofolder",
        "webdataset", "xml",
    }
)  # fmt: skip

# pipeline()'s leading parameters, the same in transformers 4 and 5; the others are passed by keyword in practice.
PIPELINE_POSITIONAL = ("task", "model", "config", "tokenizer")
PIPELINE_COMPONENTS = (
    "model", "config", "tokenizer", "feature_extractor", "image_processor", "video_processor", "processor",
)  # fmt: skip

# Where evaluate looks up a bare module name, by module_type.
EVALUATE_PREFIXES = {
    "metric": "evaluate-metric",
    "comparison": "evaluate-comparison",
    "measurement": "evaluate-measurement",
}

_ENV_GETTERS = frozenset({"os.environ.get", "os.getenv", "environ.get", "getenv"})
_MAX_DEPTH = 16  # how many names deep a value is followed (NAME = OTHER = "x")


@dataclass(frozen=True)
class _Value:
    """A resolved argument: ``text`` is None when it cannot be known before the script runs."""

    text: str | None
    dynamic: bool

    @property
    def known(self) -> bool:
        return self.text is not None


_UNKNOWN = _Value(None, True)
_AMBIGUOUS: ast.expr = ast.Constant(value=...)  # a name bound more than once, or not to a value


def scan_file(path: str | os.PathLike[str]) -> list[Finding]:
    """The findings of the script at ``path``, in source order."""
    path = Path(path)
    return scan_source(path.read_text(encoding="utf-8", errors="replace"), str(path))


def scan_source(text: str, filename: str = "<string>") -> list[Finding]:
    """The findings of a script's source. Raises ``hfhpc.errors.UsageError`` if it does not parse."""
    try:
        tree = ast.parse(text, filename)
    except SyntaxError as exc:
        from hfhpc.errors import UsageError

        message = f"{filename}:{exc.lineno}: cannot parse the script: {exc.msg}"
        raise UsageError(message, "fix the syntax error, or leave the script out of the check") from exc
    base_dir = Path(filename).parent if filename and not filename.startswith("<") else None
    return _Scanner(filename, base_dir).scan(tree)


# --- scopes ------------------------------------------------------------------------------------------


class _Scope:
    """The names a module or function body binds: to one expression, or ambiguously."""

    def __init__(self, parent: _Scope | None):
        self.parent = parent
        self.bindings: dict[str, ast.expr] = {}

    def bind(self, name: str, value: ast.expr) -> None:
        self.bindings[name] = value if name not in self.bindings else _AMBIGUOUS

    def lookup(self, name: str) -> tuple[_Scope, ast.expr] | None:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.bindings:
                return scope, scope.bindings[name]
            scope = scope.parent
        return None

    @classmethod
    def of(cls, body: list[ast.stmt], parent: _Scope | None, params: ast.arguments | None = None) -> _Scope:
        scope = cls(parent)
        if params is not None:
            for arg in (*params.posonlyargs, *params.args, *params.kwonlyargs, params.vararg, params.kwarg):
                if arg is not None:
                    scope.bind(arg.arg, _AMBIGUOUS)
        for stmt in body:
            for node in _walk_scope(stmt):
                scope._collect(node)
        return scope

    def _collect(self, node: ast.AST) -> None:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    self.bind(target.id, node.value)
                else:
                    self._bind_ambiguous(target)
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            if isinstance(node.target, ast.Name):
                self.bind(node.target.id, node.value)
        elif isinstance(node, (ast.AugAssign, ast.For, ast.AsyncFor)):
            self._bind_ambiguous(node.target)
        elif isinstance(node, ast.withitem) and node.optional_vars is not None:
            self._bind_ambiguous(node.optional_vars)
        elif isinstance(node, ast.NamedExpr):
            self._bind_ambiguous(node.target)
        elif isinstance(node, (ast.ExceptHandler, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name:  # bound, but not to a value the scan can read
                self.bind(node.name, _AMBIGUOUS)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                self.bind((alias.asname or alias.name).split(".")[0], _AMBIGUOUS)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            for name in node.names:
                self.bind(name, _AMBIGUOUS)

    def _bind_ambiguous(self, target: ast.AST) -> None:
        for node in ast.walk(target):
            if isinstance(node, ast.Name):
                self.bind(node.id, _AMBIGUOUS)


def _walk_scope(node: ast.AST) -> Iterator[ast.AST]:
    """The nodes of one scope: a nested function, class or comprehension binds in its own."""
    yield node
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
        return
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            yield from _walk_scope(child)


# --- the scanner ---------------------------------------------------------------------------------


class _Scanner:
    def __init__(self, filename: str, base_dir: Path | None):
        self.filename = filename
        self.base_dir = base_dir
        self.findings: list[tuple[int, int, int, Finding]] = []
        self.imports: dict[str, str] = {}
        self.star_imports: set[str] = set()
        self.module = _Scope(None)
        # args.model → (default of --model, the scope of its add_argument); _AMBIGUOUS when two differ.
        self.option_defaults: dict[str, tuple[ast.expr, _Scope]] = {}

    def scan(self, tree: ast.Module) -> list[Finding]:
        self._collect_imports(tree)
        self.module = _Scope.of(tree.body, None)
        # Two passes: options may be declared after their use (a parse_args() defined below main()).
        self._visit(tree, self.module, self._collect_options)
        self._visit(tree, self.module, self._call)
        return [finding for *_, finding in sorted(self.findings, key=lambda item: item[:3])]

    # -- what the module knows ---------------------------------------------------------------------

    def _collect_imports(self, tree: ast.Module) -> None:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        self.imports[alias.asname] = alias.name
                    else:
                        top = alias.name.split(".")[0]
                        self.imports[top] = top
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    if alias.name == "*":
                        self.star_imports.add(node.module)
                    else:
                        self.imports[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def _collect_options(self, node: ast.AST, scope: _Scope) -> None:
        """``args.model`` → the default of ``--model``; ``model_args.model_name_or_path`` → the
        default of that dataclass field (HfArgumentParser scripts)."""
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "add_argument":
                dest, default = _argparse_dest(node), _keyword(node, "default")
                if dest and default is not None:
                    self._record_option(dest, default, scope)
            elif node.func.attr == "set_defaults":
                for kw in node.keywords:
                    if kw.arg:
                        self._record_option(kw.arg, kw.value, scope)
        elif isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value:
                    value: ast.expr | None = stmt.value
                    if isinstance(value, ast.Call) and self._qualname(value.func) in ("field", "dataclasses.field"):
                        value = _keyword(value, "default")
                    if value is not None:
                        self._record_option(stmt.target.id, value, scope)

    def _record_option(self, name: str, default: ast.expr, scope: _Scope) -> None:
        previous = self.option_defaults.get(name)
        if previous is not None and ast.dump(previous[0]) != ast.dump(default):
            default = _AMBIGUOUS  # two options of that name with different defaults
        self.option_defaults[name] = (default, scope)

    # -- walking ------------------------------------------------------------------------------------

    def _visit(self, node: ast.AST, scope: _Scope, handle: Callable[[ast.AST, _Scope], None]) -> None:
        """Call ``handle`` on every node below ``node``, with the scope its names resolve in."""
        for child in ast.iter_child_nodes(node):
            handle(child, scope)
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                for default in (*child.args.defaults, *(d for d in child.args.kw_defaults if d is not None)):
                    handle(default, scope)
                    self._visit(default, scope, handle)
                body = child.body if isinstance(child.body, list) else [ast.Expr(child.body)]
                inner = _Scope.of(body, scope, child.args)
                for stmt in body:
                    handle(stmt, inner)
                    self._visit(stmt, inner, handle)
            else:
                self._visit(child, scope, handle)

    def _add(self, node: ast.Call, finding: Finding) -> None:
        self.findings.append((node.lineno, node.col_offset, len(self.findings), finding))

    # -- calls --------------------------------------------------------------------------------------

    def _call(self, node: ast.AST, scope: _Scope) -> None:
        if not isinstance(node, ast.Call):
            return
        func = node.func
        qualname = self._qualname(func) or ""
        last = func.attr if isinstance(func, ast.Attribute) else qualname.rsplit(".", 1)[-1]
        if isinstance(func, ast.Attribute) and func.attr == "from_pretrained":
            self._from_pretrained(node, scope)
        elif self._is(qualname, ("transformers.pipeline", "transformers.pipelines.pipeline"), "transformers"):
            self._pipeline(node, scope)
        elif self._is(qualname, ("datasets.load_dataset", "datasets.load_dataset_builder")):
            self._load_dataset(node, scope)
        elif self._is(qualname, ("evaluate.load", "evaluate.loading.load"), "evaluate"):
            self._metric(node, _argument(node, 0, "path"), scope)
        elif self._is(qualname, ("evaluate.combine",), "evaluate"):
            self._combine(node, scope)
        elif last in ("snapshot_download", "hf_hub_download") and (qualname != last or self._unbound(last)):
            self._hub_download(node, scope, with_filename=last == "hf_hub_download")
        elif any(kw.arg == "download" and _is_true(kw.value) for kw in node.keywords):
            root = self._resolve(_argument(node, 0, "root"), scope)
            self._add(node, self._finding(node, "torchvision-download", None, None, _details(root=root)))

    def _is(self, qualname: str, names: tuple[str, ...], star_module: str | None = None) -> bool:
        """Whether the call is one of ``names`` (qualified through the imports). A bare name with no
        import matches too when it was star-imported from ``star_module``; distinctive names
        (``star_module`` None, e.g. ``load_dataset``) match whenever the script does not define them."""
        if qualname in names:
            return True
        bare = {name.rsplit(".", 1)[-1] for name in names}
        if qualname not in bare or not self._unbound(qualname):
            return False
        return star_module is None or star_module in self.star_imports

    def _unbound(self, name: str) -> bool:
        """Not imported, defined or assigned by the script itself."""
        return name not in self.imports and name not in self.module.bindings

    def _qualname(self, func: ast.expr) -> str | None:
        parts: list[str] = []
        while isinstance(func, ast.Attribute):
            parts.append(func.attr)
            func = func.value
        if not isinstance(func, ast.Name):
            return None
        parts.append(self.imports.get(func.id, func.id))
        return ".".join(reversed(parts))

    def _finding(
        self, node: ast.Call, kind: FindingKind, value: _Value | None, revision: _Value | None, detail: str = ""
    ) -> Finding:
        return Finding(
            kind=kind,
            repo_id=value.text if value is not None else None,
            revision=revision.text if revision is not None else None,
            filename=self.filename,
            line=node.lineno,
            call=ast.unparse(node.func),
            dynamic=value.dynamic if value is not None else False,
            detail=detail,
        )

    def _from_pretrained(self, node: ast.Call, scope: _Scope) -> None:
        owner = node.func.value if isinstance(node.func, ast.Attribute) else None
        owner_name = (self._qualname(owner) or "").rsplit(".", 1)[-1] if owner is not None else ""
        if owner_name.startswith("PeftModel"):  # PeftModel.from_pretrained(base_model, adapter_id)
            arg = _argument(node, 1, "model_id")
        else:
            arg = _argument(node, 0, "pretrained_model_name_or_path")
        value = self._resolve(arg, scope)
        if self._is_local(value):
            return
        subfolder = self._resolve(_keyword(node, "subfolder"), scope)
        revision = self._resolve(_keyword(node, "revision"), scope)
        self._add(node, self._finding(node, "model", value, revision, _details(subfolder=subfolder)))

    def _pipeline(self, node: ast.Call, scope: _Scope) -> None:
        args = {name: _argument(node, index, name) for index, name in enumerate(PIPELINE_POSITIONAL)}
        task = self._resolve(args["task"], scope)
        revision = self._resolve(_keyword(node, "revision"), scope)
        task_text = task.text or ""
        reported: set[str | None] = set()
        has_model = False
        for component in PIPELINE_COMPONENTS:
            expr = args.get(component) or _keyword(node, component)
            if expr is None or _is_none(expr):
                continue
            if component == "model":
                has_model = True
            if self._is_object(expr, scope):
                continue  # a loaded model or tokenizer: its from_pretrained call is a finding already
            value = self._resolve(expr, scope)
            if self._is_local(value) or (value.known and value.text in reported):
                continue
            reported.add(value.text)
            detail = task_text if component == "model" else f"{task_text} ({component})".lstrip()
            self._add(node, self._finding(node, "model", value, revision, detail))
        if has_model:
            return
        default = _default_pipeline_model(task.text) if task.known else None
        if default is None:
            # Unknown task, or transformers not installed: the default cannot be named.
            self._add(node, self._finding(node, "pipeline-default", _UNKNOWN, None, task_text))
        else:
            model, default_revision = (_Value(text, task.dynamic) for text in default)
            self._add(node, self._finding(node, "pipeline-default", model, default_revision, task_text))

    def _load_dataset(self, node: ast.Call, scope: _Scope) -> None:
        path = self._resolve(_argument(node, 0, "path"), scope)
        if path.known and (path.text in PACKAGED_BUILDERS or self._is_local(path)):
            return
        name = self._resolve(_argument(node, 1, "name"), scope)
        detail = _details(
            name=name,
            data_dir=self._resolve(_keyword(node, "data_dir"), scope),
            split=self._resolve(_keyword(node, "split"), scope),
        )
        self._add(node, self._finding(node, "dataset", path, self._resolve(_keyword(node, "revision"), scope), detail))

    def _metric(self, node: ast.Call, expr: ast.expr | None, scope: _Scope) -> None:
        value = self._resolve(expr, scope)
        if value.known and (self._is_local(value) or value.text.endswith(".py")):
            return
        if value.known and "/" not in value.text:
            module_type = self._resolve(_keyword(node, "module_type"), scope).text or "metric"
            value = _Value(f"{EVALUATE_PREFIXES.get(module_type, 'evaluate-metric')}/{value.text}", value.dynamic)
        config = self._resolve(_argument(node, 1, "config_name"), scope)
        revision = self._resolve(_keyword(node, "revision"), scope)
        self._add(node, self._finding(node, "metric", value, revision, _details(config_name=config)))

    def _combine(self, node: ast.Call, scope: _Scope) -> None:
        names = _argument(node, 0, "evaluations")
        if isinstance(names, (ast.List, ast.Tuple)):
            for element in names.elts:
                self._metric(node, element, scope)
        elif isinstance(names, ast.Dict):
            for element in names.values:
                self._metric(node, element, scope)
        else:
            self._metric(node, names, scope)

    def _hub_download(self, node: ast.Call, scope: _Scope, *, with_filename: bool) -> None:
        repo = self._resolve(_argument(node, 0, "repo_id"), scope)
        detail = _details(
            repo_type=self._resolve(_keyword(node, "repo_type"), scope),
            subfolder=self._resolve(_keyword(node, "subfolder"), scope),
            filename=self._resolve(_argument(node, 1, "filename"), scope) if with_filename else None,
        )
        self._add(node, self._finding(node, "download", repo, self._resolve(_keyword(node, "revision"), scope), detail))

    # -- values ---------------------------------------------------------------------------------------

    def _resolve(self, expr: ast.expr | None, scope: _Scope, depth: int = 0) -> _Value:
        if expr is None or depth > _MAX_DEPTH or expr is _AMBIGUOUS:
            return _UNKNOWN
        if isinstance(expr, ast.Constant):
            return _Value(expr.value, False) if isinstance(expr.value, str) else _UNKNOWN
        if isinstance(expr, ast.JoinedStr):
            return self._join(expr.values, scope, depth)
        if isinstance(expr, ast.FormattedValue):
            if expr.format_spec is not None or expr.conversion not in (-1, ord("s")):
                return _UNKNOWN
            return self._resolve(expr.value, scope, depth + 1)
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
            return self._join([expr.left, expr.right], scope, depth)
        if isinstance(expr, ast.Name):
            found = scope.lookup(expr.id)
            if found is None:
                return _UNKNOWN
            where, value = found
            return self._resolve(value, where, depth + 1)
        if isinstance(expr, ast.Attribute):
            leftmost: ast.expr = expr
            while isinstance(leftmost, ast.Attribute):
                leftmost = leftmost.value
            if isinstance(leftmost, ast.Name) and leftmost.id in self.imports:
                return _UNKNOWN  # an attribute of a module (os.sep, settings.MODEL)
            option = self.option_defaults.get(expr.attr)
            return self._resolve(option[0], option[1], depth + 1) if option is not None else _UNKNOWN
        if isinstance(expr, ast.Call) and self._qualname(expr.func) in _ENV_GETTERS:
            # The variable may be set on the cluster: the default is a guess, hence dynamic.
            default = self._resolve(_argument(expr, 1, "default"), scope, depth + 1)
            return _Value(default.text, True)
        return _UNKNOWN

    def _join(self, parts: list[ast.expr], scope: _Scope, depth: int) -> _Value:
        texts: list[str] = []
        dynamic = False
        for part in parts:
            value = self._resolve(part, scope, depth + 1)
            if not value.known:
                return _UNKNOWN
            texts.append(value.text)  # type: ignore[arg-type]
            dynamic = dynamic or value.dynamic
        return _Value("".join(texts), dynamic)

    def _is_object(self, expr: ast.expr, scope: _Scope, depth: int = 0) -> bool:
        """Whether ``expr`` is something a call built (a loaded model or tokenizer), not an id."""
        if isinstance(expr, ast.Call):
            return self._qualname(expr.func) not in _ENV_GETTERS
        if isinstance(expr, ast.Name) and depth < _MAX_DEPTH:
            found = scope.lookup(expr.id)
            if found is not None and found[1] is not _AMBIGUOUS:
                return self._is_object(found[1], found[0], depth + 1)
        return False

    def _is_local(self, value: _Value) -> bool:
        """A path rather than a repository id: transformers and datasets load those from disk."""
        text = value.text
        if not text:
            return False
        if text.startswith(("/", ".", "~")):
            return True
        candidates = [Path(text)] + ([self.base_dir / text] if self.base_dir is not None else [])
        return any(candidate.exists() for candidate in candidates)


# --- helpers ---------------------------------------------------------------------------------------


def _argument(node: ast.Call, index: int, keyword: str) -> ast.expr | None:
    """The argument at ``index`` or passed as ``keyword``; None when absent (or behind ``*args``)."""
    positional = node.args
    if index < len(positional) and not any(isinstance(a, ast.Starred) for a in positional[: index + 1]):
        return positional[index]
    return _keyword(node, keyword)


def _keyword(node: ast.Call, name: str) -> ast.expr | None:
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_true(expr: ast.expr) -> bool:
    return isinstance(expr, ast.Constant) and expr.value is True


def _is_none(expr: ast.expr) -> bool:
    return isinstance(expr, ast.Constant) and expr.value is None


def _details(**values: _Value | None) -> str:
    return ", ".join(f"{key}={value.text}" for key, value in values.items() if value is not None and value.known)


def _argparse_dest(node: ast.Call) -> str | None:
    dest = _keyword(node, "dest")
    if isinstance(dest, ast.Constant) and isinstance(dest.value, str):
        return dest.value
    options = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    for option in options:  # argparse: the first long option, else the first short one
        if option.startswith("--"):
            return option[2:].replace("-", "_")
    if options:
        return options[0].lstrip("-").replace("-", "_")
    return None


@cache
def _default_pipeline_model(task: str) -> tuple[str, str] | None:
    """The (model, revision) the installed transformers picks for ``pipeline(task)``, or None.

    Imported here only: ``transformers.pipelines`` takes seconds to import, and only a script with
    a task-only pipeline needs it.
    """
    try:
        from transformers import pipelines
    except Exception:  # not installed on this login node, or broken: the default is unknown
        return None
    task = getattr(pipelines, "TASK_ALIASES", {}).get(task, task)
    options: tuple[str, ...] | None = None
    if task.startswith("translation_"):  # translation_en_to_fr: defaults keyed by language pair
        source, _, target = task[len("translation_") :].partition("_to_")
        task, options = "translation", (source, target)
    entry = getattr(pipelines, "SUPPORTED_TASKS", {}).get(task)
    if not isinstance(entry, dict) or "default" not in entry:
        return None
    defaults = entry["default"]
    if options is not None:
        defaults = defaults.get(options, {})
    model = defaults.get("model")
    if isinstance(model, dict):  # transformers 4: {"pt": (id, revision), "tf": …}
        model = model.get("pt") or next(iter(model.values()), None)
    if isinstance(model, (tuple, list)) and len(model) == 2 and all(isinstance(x, str) for x in model):
        return model[0], model[1]
    return None
