"""The one schema layer: strict pydantic models, validated at the edge, problems named by file and line.

Every input fedprompt reads (site.yaml, federation.yaml, the round plan on the wire, the ledger, the
checkpoint, metrics.json) is a `Schema`: strict types (no "3" for 3, no 1 for true), no unknown keys
(a typo must not pass silently), a constraint on every field. A file's problems are all reported at
once as `file:line: field: problem (expected ...)`: pydantic's error locations are mapped to the lines
of the YAML node tree, which PyYAML keeps and pydantic never sees.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self, get_args, get_origin

import annotated_types
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
)

from .errors import InputError, Problem

# --- constrained types shared by the models ------------------------------------------------------

SHA256_PATTERN = r"^[0-9a-f]{64}$"
HOSPITAL_ID_PATTERN = r"^[A-Za-z0-9_-]+$"
_NON_EMPTY_PATTERN = r"\S"
# What a pattern means, for the message when a value does not match it.
_PATTERN_MEANING = {
    SHA256_PATTERN: "a sha256 hex digest (64 lowercase hex characters)",
    HOSPITAL_ID_PATTERN: "letters, digits, '-' or '_'",
    _NON_EMPTY_PATTERN: "a non-empty string",
}

NonEmptyStr = Annotated[str, Field(pattern=_NON_EMPTY_PATTERN)]
Sha256 = Annotated[str, Field(pattern=SHA256_PATTERN)]


def _as_path(value: Any) -> Path:
    # Strict mode takes only Path objects; YAML and the command line give strings.
    if isinstance(value, Path):
        return value
    if isinstance(value, str) and value.strip():
        return Path(value)
    raise ValueError(f"expected a path, got {value!r}")


def _resolved(value: Path, info: ValidationInfo) -> Path:
    # A file's relative paths are relative to that file's folder (the loader passes it), not to the cwd.
    base = (info.context or {}).get("base")
    return value if base is None else (value if value.is_absolute() else base / value).resolve()


LocalPath = Annotated[Path, BeforeValidator(_as_path), AfterValidator(_resolved)]


class Schema(BaseModel):
    """Strict, closed and immutable: a value is changed by validating a new object (`replaced`)."""

    model_config = ConfigDict(
        strict=True, extra="forbid", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True
    )

    def replaced(self, *, origin: str | None = None, **changes: Any) -> Self:
        """A copy with `changes`, validated by the same rules as a loaded file.

        InputError names `origin` (e.g. "--rounds") for a bad value, or else the field.
        """
        data = {**self.model_dump(), **changes}
        try:
            new = type(self).model_validate(data)
        except ValidationError as exc:
            where = origin or str(getattr(self, "source", None) or type(self).__name__)
            raise InputError(
                [Problem(where, None, None if origin else key, message) for key, message in issues(type(self), exc)]
            ) from None
        if self.__pydantic_private__:  # e.g. the file it came from
            new.__pydantic_private__ = dict(self.__pydantic_private__)
        return new

    @classmethod
    def issues_of(cls, data: Mapping[str, Any]) -> list[tuple[str, str]]:
        """(dotted field, message) for each problem of `data` as this model; none: it is valid."""
        try:
            cls.model_validate(data)
        except ValidationError as exc:
            return issues(cls, exc)
        return []

    @classmethod
    def check_field(cls, name: str, value: Any, *, origin: str) -> None:
        """One field's value by this model's rule for it, before there is a model (a command-line override)."""
        info = cls.model_fields[name]
        try:
            annotated: Any = Annotated[info.annotation, info]  # built at run time: no static type
            TypeAdapter(annotated, config=ConfigDict(strict=True, allow_inf_nan=False)).validate_python(value)
        except ValidationError as exc:
            raise InputError(
                [Problem(origin, None, None, _message(err, cls, (name,))) for err in exc.errors()]
            ) from None


class ConfigFile(Schema):
    """A YAML file a person writes (site.yaml, federation.yaml)."""

    _source: Path | None = PrivateAttr(None)

    @property
    def source(self) -> Path | None:
        """The file this was loaded from (None: built in code)."""
        return self._source

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Load `path`, or raise InputError listing every problem with its line.

        Relative paths in the file are resolved against the file's folder.
        """
        path = Path(path).resolve()
        data, lines = read_yaml(path)
        try:
            obj = cls.model_validate(data, context={"base": path.parent})
        except ValidationError as exc:
            raise InputError(
                [Problem(str(path), line_of(lines, key), key, message) for key, message in issues(cls, exc)]
            ) from None
        obj._source = path
        return obj


# --- YAML with line numbers -------------------------------------------------------------------------

# YAML 1.2 reads `1e-5` as a number; PyYAML (YAML 1.1) only with a dot (`1.0e-5`). Users mean a number.
_YAML12_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """SafeLoader (no Python objects) that also reads YAML 1.2 exponent floats as numbers."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))


def _node_to_python(node: yaml.Node, path: str, lines: dict[str, int], prefix: str = "") -> Any:
    # Walked by hand, not yaml.load: each key's line is recorded, and a duplicate key is an error
    # (PyYAML would silently keep the last one).
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
        items = []
        for i, value_node in enumerate(node.value):
            lines[f"{prefix}[{i}]"] = value_node.start_mark.line + 1
            items.append(_node_to_python(value_node, path, lines, f"{prefix}[{i}]"))
        return items
    return _scalar(node, path, prefix)


def _scalar(node: yaml.Node, path: str, key: str) -> Any:
    loader = _Loader("")
    try:
        return loader.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, TypeError) as exc:  # e.g. `!!int lots`, `!!python/name:...`
        problem = getattr(exc, "problem", None) or str(exc)
        raise InputError.at(
            path, f"invalid value {node.value!r} ({problem})", line=node.start_mark.line + 1, field=key or None
        ) from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Parse a YAML mapping; return it and the line of every key and list item (`a.b`, `a[0]`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError.at(path, "file not found" if not path.exists() else "not a regular file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError.at(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        node = yaml.compose(text, Loader=_Loader)
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


def line_of(lines: Mapping[str, int], key: str) -> int | None:
    """The line of `key`, else of its nearest parent (a missing key: the mapping that lacks it)."""
    while key:
        if key in lines:
            return lines[key]
        key = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", key) if re.search(r"[.\[]", key) else ""
    return None


# --- pydantic errors -> fedprompt's problems ---------------------------------------------------------

# Tags of discriminated unions appear in pydantic's error locations; they are not keys of the file.
# (A tag has a '|', which no field name can.) A union keyed by a field tags its members `<key>|<value>`.
_STR_TAG, _MAPPING_TAG = "str|", "mapping|"


def str_or(model: type[BaseModel]) -> Any:
    """`str | model`: a mapping is the model, anything else the string (so a list says "expected a string")."""
    return Annotated[
        Annotated[NonEmptyStr, Tag(_STR_TAG)] | Annotated[model, Tag(_MAPPING_TAG)],
        Discriminator(lambda v: _MAPPING_TAG if isinstance(v, (dict, model)) else _STR_TAG),
    ]


def dotted(loc: Iterable[Any]) -> str:
    """pydantic's ('labels', 0, 'name') -> 'labels[0].name', as the file's keys are named."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "|" not in part:
            out += f".{part}" if out else str(part)
    return out


def _loc(err: Mapping[str, Any]) -> tuple:
    """An error's location; a union's unknown tag `<key>|<value>` is a bad value of that key."""
    if err["type"] == "union_tag_invalid":
        return (*err["loc"], err["ctx"]["tag"].partition("|")[0])
    return tuple(err["loc"])


def issues(cls: type[BaseModel], exc: ValidationError) -> list[tuple[str, str]]:
    """(dotted field, message) for each of `exc`'s errors, in fedprompt's wording."""
    return [(dotted(_loc(err)), _message(err, cls, _loc(err))) for err in exc.errors()]


def _fields_of(model: Any) -> dict[str, Any]:
    """A model's or pydantic dataclass's fields, by the names its files use (aliases)."""
    return {f.alias or name: f for name, f in getattr(model, "__pydantic_fields__", {}).items()}


def _models_in(annotation: Any) -> list[type]:
    if isinstance(annotation, type) and hasattr(annotation, "__pydantic_fields__"):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _literals_in(annotation: Any) -> tuple:
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    return tuple(v for arg in get_args(annotation) for v in _literals_in(arg))


def _members(annotation: Any) -> dict[str, type]:
    """A discriminated union's member models by tag."""
    tagged = [get_args(arg) for arg in get_args(annotation) if get_origin(arg) is Annotated]
    return {m.tag: member for member, *meta in tagged for m in meta if isinstance(m, Tag)}


def _walk(cls: type[BaseModel], loc: Iterable[Any]) -> tuple[type | None, Any]:
    """The model `loc` points into (for a nested mapping) and the FieldInfo of its last key (None where unknown).

    A mapping's keys (`hospitals.<id>`) are stepped over: they are not fields.
    """
    model: type | None = cls
    info = None
    for part in loc:
        if isinstance(part, int):
            continue
        if "|" in part:  # a union's tag: the member it names, where that is a model
            member = _members(info.annotation).get(part) if info is not None else None
            model = member if _fields_of(member) else model
            continue
        fields = _fields_of(model)
        if part not in fields:
            if info is not None and get_origin(info.annotation) is dict:
                continue
            return None, None
        info = fields[part]
        models = _models_in(info.annotation)
        model = models[0] if models else None
    return model, info


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _range(info: Any, name: str, fallback: str) -> str:
    """'expected 0 < delta < 1' from the field's bounds (both sides where it has both)."""
    low = high = ""
    for m in getattr(info, "metadata", []):
        if isinstance(m, annotated_types.Gt):
            low = f"{_number(m.gt)} < "
        elif isinstance(m, annotated_types.Ge):
            low = f"{_number(m.ge)} <= "
        elif isinstance(m, annotated_types.Lt):
            high = f" < {_number(m.lt)}"
        elif isinstance(m, annotated_types.Le):
            high = f" <= {_number(m.le)}"
    return f"expected {low}{name}{high}" if low and high else fallback


_TYPE_NAMES = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "none_required": "null",
}
_BOUND_OPS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _message(err: Mapping[str, Any], cls: type[BaseModel], loc: tuple) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    got = f", got {value!r}"
    if kind == "missing":
        return "missing required key"
    if kind == "extra_forbidden":
        holder, _ = _walk(cls, loc[:-1])
        allowed = sorted(_fields_of(holder))
        return "unknown key" + (f" (expected one of: {', '.join(allowed)})" if allowed else "")
    if kind in _TYPE_NAMES:
        return f"expected {_TYPE_NAMES[kind]}{got}"
    if kind == "literal_error":
        _, info = _walk(cls, loc)
        options = _literals_in(info.annotation) if info is not None else ()
        return (
            f"expected one of {', '.join(repr(o) for o in options)}" if options else f"expected {ctx.get('expected')}"
        ) + got
    if kind in _BOUND_OPS:
        _, info = _walk(cls, loc)
        name = dotted(loc).rsplit(".", 1)[-1]
        bound = next(iter(ctx.values()))
        return _range(info, name, f"expected {_BOUND_OPS[kind]} {_number(bound)}") + got
    if kind == "union_tag_invalid":
        tags = [tag.strip("'").partition("|")[2] for tag in ctx["expected_tags"].split(", ")]
        return f"expected one of {', '.join(map(repr, tags))}, got {ctx['tag'].partition('|')[2]!r}"
    if kind == "too_short":
        return f"expected at least {ctx['min_length']} item(s), got {ctx['actual_length']}"
    if kind == "string_too_short":
        return f"expected a non-empty string{got}"
    if kind == "too_long":
        return f"expected at most {ctx['max_length']} item(s), got {ctx['actual_length']}"
    if kind == "string_pattern_mismatch":
        return f"expected {_PATTERN_MEANING.get(ctx['pattern'], 'a string matching ' + ctx['pattern'])}{got}"
    if kind == "value_error":
        return str(ctx["error"])  # our validators' own words
    return f"{err['msg']}{got}"  # a kind our models do not produce today: pydantic's words
