"""Strict YAML -> typed dataclass loading, validated once at the edge.

PyYAML gives no line numbers for values and dataclasses do no type checking, so this module
does both: it keeps each key's line from the YAML node tree, rejects unknown keys (a typo
must not pass silently), checks types, and reports every problem with `file:line: key`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from .errors import InputError, Problem

T = TypeVar("T")


def _node_to_python(node: yaml.Node, path: str, lines: dict[str, int], prefix: str = "") -> Any:
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            dotted = f"{prefix}.{key}" if prefix else key
            if key in out:
                raise InputError.at(path, "duplicate key", line=key_node.start_mark.line + 1, field=dotted)
            lines[dotted] = key_node.start_mark.line + 1
            out[key] = _node_to_python(value_node, path, lines, dotted)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_node_to_python(v, path, lines, f"{prefix}[{i}]") for i, v in enumerate(node.value)]
    return _scalar(node, path, prefix)


def _scalar(node: yaml.ScalarNode, path: str, key: str) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, TypeError) as exc:  # e.g. `!!int lots`, `!!python/name:...`
        problem = getattr(exc, "problem", None) or str(exc)
        raise InputError.at(path, f"invalid value {node.value!r} ({problem})", line=node.start_mark.line + 1, field=key or None) from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Parse a YAML mapping; return it and the line of every (dotted) key."""
    path = Path(path)
    if not path.is_file():
        raise InputError.at(path, "file not found" if not path.exists() else "not a regular file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError.at(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise InputError.at(path, f"YAML syntax error: {getattr(exc, 'problem', None) or exc}", line=line) from None
    if node is None:
        raise InputError.at(path, "empty file (expected a YAML mapping)")
    if not isinstance(node, yaml.MappingNode):
        raise InputError.at(path, "expected a YAML mapping at top level", line=node.start_mark.line + 1)
    lines: dict[str, int] = {}
    return _node_to_python(node, str(path), lines), lines


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        names = " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None))
        return names + (" (or null)" if type(None) in get_args(tp) else "")
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", Path: "a path"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


class _Ctx:
    def __init__(self, path: str, lines: dict[str, int]):
        self.path, self.lines, self.problems = path, lines, []

    def fail(self, key: str, message: str) -> None:
        line = self.lines.get(key)
        parent = key
        while line is None and "." in parent:
            parent = parent.rsplit(".", 1)[0]
            line = self.lines.get(parent)
        self.problems.append(Problem(self.path, line, key, message))


_MISSING = object()
_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _convert(value: Any, tp: Any, key: str, ctx: _Ctx) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        # `str | SomeDataclass`: a mapping is the dataclass, anything else the first plain type.
        mapped = [a for a in args if dataclasses.is_dataclass(a)]
        plain = [a for a in args if not dataclasses.is_dataclass(a)]
        if mapped and (isinstance(value, dict) or not plain):
            return _convert(value, mapped[0], key, ctx)
        return _convert(value, (plain or args)[0], key, ctx)
    bad = f"expected {_type_name(tp)}, got {value!r}"
    if origin is Literal:
        if value not in get_args(tp):
            ctx.fail(key, bad)
        return value
    if origin is list:
        if not isinstance(value, list):
            ctx.fail(key, bad)
            return value
        return [_convert(v, get_args(tp)[0], f"{key}[{i}]", ctx) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            ctx.fail(key, bad)
            return value
        return _build(tp, value, ctx, key)
    if tp is bool:
        if not isinstance(value, bool):
            ctx.fail(key, bad)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            ctx.fail(key, bad)
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads `1e-5` as a string; users mean a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            ctx.fail(key, bad)
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value.strip():
            ctx.fail(key, bad if not isinstance(value, str) else "expected a non-empty string")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value.strip():
            ctx.fail(key, f"expected a path, got {value!r}")
            return value
        return Path(value)
    return value


def _build(cls: type[T], data: dict[str, Any], ctx: _Ctx, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    # Fields marked internal (e.g. the file a config came from) are set by code, never by users.
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for key in data:
        if key not in fields:
            dotted = f"{prefix}.{key}" if prefix else key
            ctx.fail(dotted, "unknown key (expected one of: " + ", ".join(sorted(fields)) + ")")
    for name, f in fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        value = data.get(name, _MISSING)
        if value is _MISSING:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                ctx.fail(dotted, f"missing required key (expected {_type_name(hints[name])})")
            continue
        kwargs[name] = _convert(value, hints[name], dotted, ctx)
    if ctx.problems:
        return None  # type: ignore[return-value]
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        for key, message in check():
            ctx.fail(f"{prefix}.{key}" if prefix else key, message)
    return obj


def load_dataclass(cls: type[T], path: str | Path) -> T:
    """Load `path` into `cls`, or raise InputError listing every problem.

    A dataclass may define `validate() -> list[(key, message)]` for value checks beyond types.
    """
    data, lines = read_yaml(path)
    ctx = _Ctx(str(path), lines)
    obj = _build(cls, data, ctx)
    if ctx.problems:
        raise InputError(ctx.problems)
    return obj


def to_plain(obj: Any) -> Any:
    """Dataclass -> YAML/JSON-safe plain data (paths as strings)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
