"""Configuration of every training job: built-in defaults <- a YAML file <- ``key=value`` overrides.

Strict everywhere: a key the defaults do not have is an error that names the key, where it came from (the YAML file
or the command-line override) and the closest known key; so is a value that is a mapping where the defaults hold a
plain value, or the reverse. Only the mappings named in ``free`` (dotted paths such as ``model.overrides``: fields of
a model config, checked by the model itself) take any keys.

Override values are parsed as YAML: ``train.max_steps=4``, ``data.mean=[0.5,0.5,0.5]``, ``model.init_from=null``.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable
from pathlib import Path

import yaml

__all__ = ["ConfigError", "dump_config", "load_config", "merge_config", "parse_override"]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is one line naming the key, the source and the fix."""


def _known(base: dict, where: str) -> str:
    return ", ".join(f"{where}{k}" for k in base) or "none"


def merge_config(base: dict, update: dict, *, free: Iterable[str] = (), source: str = "config",
                 _where: str = "") -> dict:
    """Merge ``update`` into ``base`` in place (nested mappings key by key) and return ``base``.

    ``source`` names where ``update`` came from, for the error message."""
    free = tuple(free)
    if not isinstance(update, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys{f' under {_where[:-1]!r}' if _where else ''}, "
                          f"got {update!r}")
    for key, value in update.items():
        dotted = f"{_where}{key}"
        if dotted in free:  # a free-form mapping: any keys, merged key by key
            if value is None:
                base[key] = None
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: config key {dotted!r} must be a mapping, got {value!r}")
            base[key] = {**(base.get(key) or {}), **copy.deepcopy(value)}
            continue
        if key not in base:
            candidates = [f"{_where}{k}" for k in base]
            close = difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {_known(base, _where)}"
            raise ConfigError(f"{source}: unknown config key {dotted!r}; {hint}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: config key {dotted!r} is a section ({_known(base[key], dotted + '.')}); "
                                  f"got the value {value!r}")
            merge_config(base[key], value, free=free, source=source, _where=dotted + ".")
        elif isinstance(value, dict) and base[key] is not None:
            raise ConfigError(f"{source}: config key {dotted!r} takes a value like {base[key]!r}, not a mapping")
        else:
            base[key] = value
    return base


def parse_override(item: str) -> dict:
    """``"a.b.c=VALUE"`` -> ``{"a": {"b": {"c": yaml(VALUE)}}}``."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"command-line override {item!r} is not key=value (e.g. train.max_steps=4)")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"command-line override {item!r}: the value is not valid YAML ({err.problem})") from None
    nested: dict = {}
    node = nested
    *parents, leaf = key.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return nested


def load_config(path: str | Path | None, overrides: Iterable[str] = (), *, defaults: dict,
                free: Iterable[str] = ()) -> dict:
    """A deep copy of ``defaults`` <- the YAML file at ``path`` <- each ``key=value`` override, all strict."""
    cfg = copy.deepcopy(defaults)
    free = tuple(free)
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
        merge_config(cfg, loaded or {}, free=free, source=str(path))
    for item in overrides:
        merge_config(cfg, parse_override(item), free=free, source=f"command-line override {item!r}")
    return cfg


def dump_config(cfg: dict, path: str | Path) -> Path:
    """Write ``cfg`` as YAML, atomically (the resolved configuration of a run)."""
    from .checkpoint import atomic_write_text

    return atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False))
