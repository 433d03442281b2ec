"""Reading a job spec's YAML without surprises.

A spec is small, hand-written data, so the reader refuses what such a file never needs and what
turns a typo or a hostile file into a hang or a silent change:
- anchors and aliases (a 1.3 KB "billion laughs" file under ``train:`` expands to gigabytes; an
  alias can also refer to itself);
- a key given twice in one mapping (YAML's last-one-wins would drop the first silently);
- nesting deeper than ``MAX_DEPTH`` (PyYAML builds nodes recursively: 20,000 levels overflow the stack);
- bytes that are not UTF-8.
Unquoted ``12:00:00`` stays the string it looks like: YAML 1.1 would read it as the base-60 integer
43200, and ``time: 1:00`` as 60.
"""

from __future__ import annotations

import re

import yaml

MAX_DEPTH = 64


class YamlProblem(ValueError):
    """What is wrong, and the line (1-based) where, when known."""

    def __init__(self, problem: str, line: int | None = None):
        super().__init__(problem)
        self.problem, self.line = problem, line


class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise YamlProblem("a mapping key must be a plain value", key_node.start_mark.line + 1) from None
            if key in seen:
                raise YamlProblem(f"key {key!r} is given twice (lines {seen[key]} and {key_node.start_mark.line + 1})",
                                  key_node.start_mark.line + 1)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


# SafeLoader's int and float resolvers without their base-60 forms.
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first, _resolvers in _Loader.yaml_implicit_resolvers.items():
    _resolvers[:] = [(tag, rx) for tag, rx in _resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$", re.X),
    list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _screen(text: str) -> None:
    """Walk the event stream (PyYAML's parser is iterative) before any node is built."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        line = event.start_mark.line + 1 if event.start_mark else None
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise YamlProblem("anchors and aliases (&name, *name) are not allowed in a job spec: write the values out", line)
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise YamlProblem(f"nested more than {MAX_DEPTH} levels deep", line)
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def loads(data: bytes | str):
    """The one document in ``data``; ``YamlProblem`` for anything a spec must not contain."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise YamlProblem(f"not UTF-8 text (byte {e.start} is {data[e.start:e.start + 1]!r}): save it as UTF-8") from None
    try:
        _screen(data)
        return yaml.load(data, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise YamlProblem(f"not valid YAML ({getattr(e, 'problem', None) or e})", mark.line + 1 if mark else None) from None
