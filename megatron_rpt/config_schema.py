"""The machinery under the config tree: typed fields, YAML files, ``--set`` and field descriptions.

Owns, for any tree of dataclasses (:mod:`megatron_rpt.config` defines the one the trainer uses):

* checking a value against its annotation (:func:`coerce`): ``Literal`` choices, ``Annotated``
  ranges (:class:`Range`), finite numbers, lists, optional values. Numbers are read the way
  Python reads them: PyYAML follows YAML 1.1, where ``1e-3`` is a *string*, so a numeric field
  parses strings with ``int()`` / ``float()`` (``1e-3``, ``1_000``, ``.5``);
* reading YAML files (:func:`load_yaml_tree`): ``base: other.yaml`` inheritance (cycles and
  missing files name the file whose ``base:`` is wrong), UTF-8 only, ``${VAR}`` and
  ``${VAR:-default}`` (the default also when VAR is empty, as in the shell);
* ``--set a.b=c`` (:func:`parse_override`, :func:`apply_override`): a mapping value is merged
  into the section instead of replacing it;
* the one-line description of every field, read from the attribute docstring under it
  (:func:`field_docs`), which ``python -m megatron_rpt.config explain`` prints.

Every problem is a :class:`ConfigError` naming the key, the value and the fix.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import os
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from megatron_rpt.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value (or a flag standing for one) is missing, unknown, mistyped or inconsistent."""


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric field, used as ``Annotated[int, Range(ge=1)]``."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def check(self, value: float, key: str) -> None:
        if ((self.gt is not None and not value > self.gt) or (self.ge is not None and not value >= self.ge)
                or (self.lt is not None and not value < self.lt) or (self.le is not None and not value <= self.le)):
            raise ConfigError(f"{key}={value} must be {self.describe()}")

    def describe(self) -> str:
        parts = [f"{op} {b:g}" for b, op in ((self.gt, ">"), (self.ge, ">="), (self.lt, "<"), (self.le, "<="))
                 if b is not None]
        return " and ".join(parts)


class Section:
    """Base of a config section: ``check()`` holds the rules of the section alone."""

    def check(self) -> None:
        """Rules joining this section's fields (types, choices and ranges are the loader's)."""


# ----------------------------------------------------------------------------- values


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def type_text(tp: Any) -> str:
    """``'a' | 'b'``, ``int >= 1``, ``list[str]``, ``float | null``: how ``explain`` shows a type."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(tp)
        ranges = [m.describe() for m in meta if isinstance(m, Range)]
        return " ".join([type_text(base), *ranges])
    if _is_union(tp):
        return " | ".join("null" if a is type(None) else type_text(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{type_text(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _number(value: Any, key: str, integer: bool) -> int | float:
    kind = "an integer" if integer else "a number"
    if isinstance(value, str):  # YAML 1.1 leaves 1e-3 a string; read it as Python does
        text = value.strip()
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise ConfigError(f"{key}: expected {kind}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{key}={value} must be a finite number")
    if integer:
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    return float(value)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp`` (lossless conversions applied)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(tp)
        value = coerce(value, base, key)
        for m in meta:
            if isinstance(m, Range):
                m.check(value, key)
        return value
    if _is_union(tp):
        options = [o for o in typing.get_args(tp) if o is not type(None)]
        if value is None:
            if len(options) < len(typing.get_args(tp)):
                return None
            raise ConfigError(f"{key}: null is not allowed; give a {type_text(tp)}")
        errors = []
        for option in options:
            try:
                return coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        suffix = " (or null)" if len(options) < len(typing.get_args(tp)) else ""
        raise ConfigError((errors[0] if len(errors) == 1 else f"{key}={value!r} is not a {type_text(tp)}") + suffix)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if any(value == c and type(value) is type(c) for c in choices):
            return value
        raise ConfigError(f"{key}={value!r} is not one of {list(choices)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            if isinstance(value, str) and item_tp is str:
                return [value]
            raise ConfigError(f"{key}: expected a list of {type_text(item_tp)}, got {value!r}")
        return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):  # an item of a list of sections (data.mixture)
        item = value if isinstance(value, tp) else build(tp, value, key)
        check_fields(item, key)
        item.check()
        return item
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int or tp is float:
        return _number(value, key, integer=tp is int)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """An instance of the dataclass ``cls`` from a mapping, every value checked (see :func:`coerce`)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names), key=str)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{prefix}.{u}'.lstrip('.') for u in unknown)} in {prefix or 'top level'}; "
            f"valid keys there: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name in names:
        if name in data:
            key = f"{prefix}.{name}".lstrip(".")
            tp = hints[name]
            kwargs[name] = build(tp, data[name], key) if dataclasses.is_dataclass(tp) else coerce(data[name], tp, key)
    return cls(**kwargs)


def check_fields(obj: Any, prefix: str) -> None:
    """Check every field of the dataclass instance ``obj`` (defaults and values set in code too)."""
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        if not dataclasses.is_dataclass(hints[f.name]):
            coerce(getattr(obj, f.name), hints[f.name], f"{prefix}.{f.name}")


# ----------------------------------------------------------------------------- files and overrides

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(obj: Any) -> Any:
    """``${VAR}`` -> its value ("" when unset); ``${VAR:-default}`` -> default when VAR is unset or empty."""
    if isinstance(obj, str):
        return _ENV_REF.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), obj)
    if isinstance(obj, list):
        return [expand_env(v) for v in obj]
    if isinstance(obj, dict):
        return {k: expand_env(v) for k, v in obj.items()}
    return obj


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                          f"{exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of sections (model:, rollout:, ...)")
    return data


def load_yaml_tree(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping in ``path`` merged over the files its ``base:`` chain names."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass --config configs/<name>.yaml")
    data = _read_yaml(p)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {p}: base: {base!r} must be the path of another YAML file")
    base_path = Path(base) if Path(base).is_absolute() else p.parent / base
    chain = (*_chain, p.resolve())
    if base_path.resolve() in chain:
        names = " -> ".join(str(c) for c in (*chain, base_path.resolve()))
        raise ConfigError(f"config file {p}: base: {base!r} makes a cycle ({names}); remove one of the base: lines")
    if not base_path.is_file():
        raise ConfigError(f"config file {p}: base: {base!r} ({base_path}) does not exist; fix the path "
                          "(relative paths are relative to the file that names them)")
    merged = load_yaml_tree(base_path, chain)
    deep_merge(merged, data)
    return merged


def deep_merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    """Merge ``src`` into ``dst`` in place: mappings merge key by key, anything else replaces."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            deep_merge(dst[k], v)
        else:
            dst[k] = v


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"rollout.temperature=0.8"`` -> (["rollout", "temperature"], 0.8) (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set rollout.temperature=0.8")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key must look like section.name")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({' '.join(str(exc).split())})") from None
    return key.split("."), value


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``path`` in ``tree``; a mapping value is merged into an existing section, not swapped for it."""
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
        node = child
    if isinstance(value, dict) and isinstance(node.get(path[-1]), dict):
        deep_merge(node[path[-1]], value)
    else:
        node[path[-1]] = value


# ----------------------------------------------------------------------------- descriptions


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: one-line description}`` from the attribute docstring under each field of ``cls``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


@dataclass(frozen=True)
class FieldInfo:
    key: str
    type: str
    default: Any
    doc: str


def iter_fields(cls: type, prefix: str = "") -> Iterator[FieldInfo]:
    """Every leaf field of the dataclass tree ``cls``, depth first, in declaration order."""
    hints = typing.get_type_hints(cls, include_extras=True)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}".lstrip(".")
        if dataclasses.is_dataclass(hints[f.name]):
            yield from iter_fields(hints[f.name], key)
            continue
        item = typing.get_args(hints[f.name])[0] if typing.get_origin(hints[f.name]) is list else None
        if dataclasses.is_dataclass(item):  # list of sections: the list, then the fields of one item
            yield FieldInfo(key, type_text(hints[f.name]), [], docs.get(f.name, ""))
            yield from iter_fields(item, f"{key}[]")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        yield FieldInfo(key, type_text(hints[f.name]), default, docs.get(f.name, ""))


def explain(cls: type, key: str | None = None) -> str:
    """Text describing every field under ``key`` (a section, a field, or everything)."""
    fields = [f for f in iter_fields(cls) if key is None or f.key == key or f.key.startswith((key + ".", key + "[]"))]
    if not fields:
        sections = sorted({f.key.split(".")[0] for f in iter_fields(cls)})
        raise ConfigError(f"no config key {key!r}; sections are {', '.join(sections)} "
                          "(e.g. python -m megatron_rpt.config explain optim)")
    lines = []
    for f in fields:
        default = "null" if f.default is None else repr(f.default)
        lines.append(f"{f.key} = {default}  ({f.type})\n    {f.doc}")
    return "\n".join(lines)
