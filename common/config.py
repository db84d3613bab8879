"""Loading the config tree (``common.options``): defaults < TOML file < ``--set`` overrides, every problem listed.

``load_config`` builds the tree and ``common.config_checks`` lists every problem at once; a bad config never
starts a process. The tree's classes are importable from here too, where every caller takes them from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from common.config_checks import validate
from common.options import (
    Config,
    LoraConfig,
    ModelConfig,
    PPOUpdateConfig,
    RunConfig,
    SamplingConfig,
    TransportConfig,
    max_response_tokens,
)

__all__ = [
    "Config",
    "ConfigError",
    "LoraConfig",
    "ModelConfig",
    "PPOUpdateConfig",
    "RunConfig",
    "SamplingConfig",
    "TransportConfig",
    "build_config",
    "config_hash",
    "config_to_dict",
    "config_to_toml",
    "load_config",
    "max_response_tokens",
    "parse_overrides",
]


class ConfigError(ValueError):
    """A configuration that cannot run; the message lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


REMOVED = {
    "sampling.top_k": ": removed, sampling draws from the whole tempered distribution (delete the line)",
    "sampling.top_p": ": removed, sampling draws from the whole tempered distribution (delete the line)",
    "sampling.seed": ": removed, it was read by nothing; run.seed seeds every sequence (delete the line)",
}
"""Settings that existed once: a config naming one is refused with what became of it."""


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _field_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _coerce(value: Any, kind: Any, where: str, problems: list[str]) -> Any:
    """Check one value against its declared type; ints are accepted where floats are declared. A ``Literal``'s
    values are checked with the ranges (``config_checks``), so that a wrong mode is listed among them."""
    if typing.get_origin(kind) is typing.Literal:
        kind = type(typing.get_args(kind)[0])
    origin = typing.get_origin(kind)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            problems.append(f"{where}: expected a list of strings, got {value!r}")
            return None
        return tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, float) and not math.isfinite(value):
        problems.append(f"{where}: {value!r} is not a finite number")
        return None
    if kind is bool and not isinstance(value, bool):
        problems.append(f"{where}: expected true or false, got {value!r}")
        return None
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        problems.append(f"{where}: expected an integer, got {value!r}")
        return None
    if kind in (float, str) and not isinstance(value, kind):
        problems.append(f"{where}: expected {kind.__name__}, got {value!r}")
        return None
    return value


def _parse_override_value(text: str) -> Any:
    """Read a ``--set`` value the way TOML would; bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Turn ``["section.key=value", ...]`` into a nested dict; malformed items raise ConfigError."""
    nested: dict[str, dict[str, Any]] = {}
    problems = []
    for item in items:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            problems.append(f"override {item!r}: expected section.key=value")
            continue
        nested.setdefault(section, {})[name] = _parse_override_value(text.strip())
    if problems:
        raise ConfigError(problems)
    return nested


def _merge(base: dict[str, dict[str, Any]], extra: Mapping[str, Mapping[str, Any]]) -> None:
    for section, values in extra.items():
        if not isinstance(values, Mapping):
            base.setdefault("__bad__", {})[section] = values
            continue
        base.setdefault(section, {}).update(values)


def build_config(layers: Iterable[Mapping[str, Mapping[str, Any]]]) -> Config:
    """Apply layers of ``{section: {key: value}}`` over the defaults, then validate; raises ConfigError."""
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:
        _merge(merged, layer)
    problems = [f"[{name}]: expected a table of settings" for name in merged.pop("__bad__", {})]
    sections = _section_types()
    built = {}
    for section, values in merged.items():
        if section not in sections:
            problems.append(f"unknown section [{section}] (known: {', '.join(sections)})")
            continue
        types_ = _field_types(sections[section])
        kwargs = {}
        for key, value in values.items():
            if key not in types_:
                removed = REMOVED.get(f"{section}.{key}", "")
                problems.append(f"unknown setting {section}.{key}{removed} (known: {', '.join(types_)})")
                continue
            coerced = _coerce(value, types_[key], f"{section}.{key}", problems)
            if coerced is not None:
                kwargs[key] = coerced
        built[section] = sections[section](**kwargs)
    if problems:
        raise ConfigError(problems)
    cfg = Config(**built)
    problems = validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults < TOML file at ``path`` < ``section.key=value`` overrides; raises ConfigError listing all."""
    layers: list[Mapping[str, Mapping[str, Any]]] = []
    if path is not None:
        try:
            layers.append(tomllib.loads(Path(path).read_text()))
        except FileNotFoundError as e:
            raise ConfigError([f"config file {path} does not exist"]) from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError([f"config file {path} is not valid TOML: {e}"]) from e
    layers.append(parse_overrides(overrides))
    return build_config(layers)


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dict of the config (tuples become lists), suitable for JSON, TOML and msgpack."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_hash(cfg: Config) -> str:
    """Stable hash of the settings both sides must agree on (run_dir excluded: it is per machine)."""
    d = config_to_dict(cfg)
    d["run"].pop("run_dir", None)
    d["model"].pop("cache_dir", None)
    d["model"].pop("adapters", None)  # the learner's starting point; actors get its snapshots
    d["transport"].pop("keys_dir", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def config_to_toml(cfg: Config) -> str:
    """The resolved config as TOML that ``load_config`` reads back to an equal Config."""
    lines = []
    for section, values in config_to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)
