"""Typed configs: YAML (with ``_base_`` inheritance) + dotted overrides -> nested dataclasses.

Only this module and the factories read configs; modules take plain ints and tensors.

* ``_base_: other.yaml`` (or a list) at the top of a YAML file is loaded first (relative to the
  file) and the file's own keys are deep-merged over it.
* Overrides are ``a.b.c=value`` strings; the value is parsed as YAML (``model.img_size=[224,224]``).
* An unknown key, a wrong type or a value outside a ``Literal`` is a :class:`ConfigError` that names
  the dotted key and, for unknown keys, suggests the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Type, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


# --------------------------------------------------------------------------------------------- YAML
def shipped_configs_dir() -> Path:
    """The configs that come with the package (``hybrid_reid/configs``; in a source checkout a link to
    the repository's ``configs/``)."""
    here = Path(__file__).resolve().parents[1] / "configs"
    return here if here.is_dir() else Path(__file__).resolve().parents[2] / "configs"


def shipped_configs() -> List[str]:
    """Names of the shipped configs (``quickstart``, ``methods/mambapro`` ...)."""
    root = shipped_configs_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def resolve_config_path(path: Union[str, os.PathLike]) -> Path:
    """A config file: ``path`` itself when it exists, else a shipped config by name from any directory
    (``quickstart``, ``methods/mambapro``, or ``configs/quickstart.yaml`` as the README writes it).

    Raises:
        ConfigError: neither exists; the message lists the shipped names.
    """
    p = Path(path)
    if p.is_file():
        return p
    name = p.as_posix()
    if name.startswith("configs/"):
        name = name[len("configs/"):]
    shipped = shipped_configs_dir() / (name if name.endswith((".yaml", ".yml")) else name + ".yaml")
    if not p.is_absolute() and shipped.is_file():
        return shipped
    raise ConfigError(f"config file not found: {p} (nor a shipped config of that name; shipped: "
                      f"{', '.join(shipped_configs())})")


def load_yaml(path: Union[str, os.PathLike], _seen: Optional[List[Path]] = None,
              merge: Optional[Callable[[Dict[str, Any], Dict[str, Any], str], Dict[str, Any]]] = None
              ) -> Dict[str, Any]:
    """Read a YAML mapping, resolving ``_base_`` files (depth first, later bases win).

    ``merge(merged, layer, where)`` puts a file over what it inherits (default: :func:`deep_merge`;
    the schema passes its own, which knows that ``model.towers`` replaces a shorthand)."""
    merge = merge or (lambda a, b, where: deep_merge(a, b))
    path = Path(path).resolve()
    seen = list(_seen or [])
    if path in seen:
        chain = " -> ".join(str(p) for p in seen + [path])
        raise ConfigError(f"{path}: _base_ cycle ({chain})")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else list(bases)
    merged: Dict[str, Any] = {}
    for base in bases:
        merged = merge(merged, load_yaml(path.parent / base, seen + [path], merge), str(path.parent / base))
    return merge(merged, data, str(path))


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> Dict[str, Any]:
    """Recursively merge ``over`` into a copy of ``base`` (mappings merge, everything else replaces)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: Iterable[str]) -> Dict[str, Any]:
    """Turn ``["model.backbone=hybrid", "model.feat_dim=256"]`` into a nested dict."""
    out: Dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse {raw!r}: {e}") from None
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is set both as a value and as a section")
        node[parts[-1]] = value
    return out


# ------------------------------------------------------------------------------------ typed build
def from_dict(cls: Type[T], data: Optional[Mapping[str, Any]], path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, checking keys and types recursively."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or '<root>'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {_join(path, close[0])!r}?" if close else ""
            raise ConfigError(f"unknown config key {_join(path, key)!r}{hint} "
                              f"(valid here: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            value = data[name]
            if isinstance(value, Mapping) and f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()  # a partial section keeps the field's own defaults
                if dataclasses.is_dataclass(default):  # (model.vit: {stride: 16} stays a timm ViT);
                    base = default._partial_base() if hasattr(default, "_partial_base") else to_dict(default)
                    value = {**base, **value}  # a key given replaces (group_lr: {} stays {})
            kwargs[name] = _convert(hints[name], value, _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key {_join(path, name)!r}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # __post_init__ checks
        raise ConfigError(f"{path or '<root>'}: {e}") from None


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain YAML-safe dict (tuples become lists); fields a dataclass lists in
    ``_DUMP_EXCLUDE`` (input-only shorthands) are left out."""
    if dataclasses.is_dataclass(obj):
        skip = getattr(obj, "_DUMP_EXCLUDE", ())
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name not in skip}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of {_type_name(tp)}")
    if origin is typing.Literal:
        if isinstance(value, bool) and str(value).lower() not in args:
            # YAML 1.1 reads a bare no / off / yes / on as a bool: take it back as the word
            for word in (("no", "off", "false") if not value else ("yes", "on", "true")):
                if word in args:
                    value = word
                    break
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(args[0] if args else Any, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (dict, Dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        vt = args[1] if args else Any
        return {str(k): _convert(vt, v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported config type {_type_name(tp)}")  # a schema bug
