"""Scoring with staged Evaluate metrics: the one module of the recipes that touches Evaluate.

Evaluate's last release was 0.4.6 (2025-09) and it is barely maintained, so the recipes never call
it directly: they get a plain ``score(predictions, references) -> {name: value}`` from
:func:`load_metrics`, and replacing Evaluate later means changing this file only.

Metrics load with ``evaluate.load(canonical id)``, the call ``hfhpc check`` probes (through
:func:`hfhpc.assets.load_metric`), so a passing check means these loads work offline. They also keep
their inputs in memory: by default ``compute`` writes Arrow files guarded by file locks under
``HF_HOME/metrics``, that is into the store, which may be read-only or on Lustre, where locks are
unreliable; and the ranks of a job would all contend for the same file name.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

# score(predictions, references) -> {result name: value}
Scorer = Callable[[Sequence[Any], Sequence[Any]], dict[str, Any]]

_INTEGER_DTYPES = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}


def _wants_class_ids(module: Any) -> bool:
    """True when the metric reads predictions as integer class ids (accuracy, f1, precision, …).

    Evaluate declares inputs as datasets Features, one set per input format; the first is the
    default format (the multilabel one comes second for accuracy and f1).
    """
    features = module.features[0] if isinstance(module.features, list) else module.features
    predictions = features.get("predictions") if features is not None else None
    return getattr(predictions, "dtype", None) in _INTEGER_DTYPES


def _as_class_ids(predictions: Sequence[Any], references: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Label names → ids, numbered in sorted order of the names seen (so for a binary f1 the
    positive class is the name that sorts last: "positive" after "negative", "pos" after "neg").
    Integers are class ids already and stay as they are."""
    def is_id(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    index = {name: i for i, name in enumerate(sorted({str(v) for v in [*predictions, *references] if not is_id(v)}))}

    def encode(v: Any) -> int:
        return v if is_id(v) else index[str(v)]

    return [encode(v) for v in predictions], [encode(v) for v in references]


def _plain(value: Any) -> Any:
    """numpy scalars and arrays → Python numbers and lists, so results serialize as JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _CachedModuleNotice(logging.Filter):
    """Drops Evaluate's warning that it uses "the latest cached version of the module … since it
    couldn't be found locally … or remotely": offline, a staged metric always loads that way, and the
    warning reads like a failure in every run's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Using the latest cached version of the module")


def load_metrics(ids: Sequence[str]) -> Scorer:
    """Load every metric once; return a function that scores with all of them.

    Each metric gets its inputs in the form it declares: label names become class ids for the
    classification metrics, while text metrics (exact_match, bleu, rouge …) see the strings. That is
    why this does not use ``evaluate.combine``, which hands every metric the same inputs. Results
    merge as ``combine`` merges them: a name that several metrics report (two metrics that both
    return ``score``) is prefixed with each metric's name, any other stays as it is.
    """
    import evaluate

    loading = logging.getLogger("evaluate.loading")
    if not any(isinstance(f, _CachedModuleNotice) for f in loading.filters):
        loading.addFilter(_CachedModuleNotice())
    modules = [(metric_id.split("/")[-1], evaluate.load(metric_id, keep_in_memory=True)) for metric_id in ids]

    def score(predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, Any]:
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        per_metric = []
        for name, module in modules:
            preds, refs = list(predictions), list(references)
            if _wants_class_ids(module):
                preds, refs = _as_class_ids(preds, refs)
            per_metric.append((name, module.compute(predictions=preds, references=refs) or {}))
        shared = {k for k, n in Counter(k for _, result in per_metric for k in result).items() if n > 1}
        merged = {}
        for name, result in per_metric:
            for key, value in result.items():
                merged[f"{name}_{key}" if key in shared else key] = _plain(value)
        return merged

    return score
