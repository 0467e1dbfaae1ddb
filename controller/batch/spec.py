"""Batch files: one base spec plus a ``batch:`` section -> many run specs (as plain data).

``runs:`` is a list of overrides, one run each; ``sweep:`` maps dotted keys to lists of values and
yields their cartesian product. Overrides use dotted keys (``training.lr: 4e-4``) or nested mappings
(``training: {lr: 4e-4}``); mappings merge key by key, anything else replaces.

Every expanded run remembers where each overridden value came from in the document (its YAML
path), so a validation error in run 3 points at the line of the override that caused it.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import re
from dataclasses import dataclass, field
from typing import Any

from controller.spec.model import NAME_RE

YamlPath = tuple[Any, ...]  # keys (str) and indices (int) from the document root
MAX_NAME = 63
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass
class ExpandedRun:
    name: str
    data: dict[str, Any]  # the base spec with this run's overrides applied
    origins: dict[tuple[str, ...], YamlPath] = field(default_factory=dict)  # spec path -> yaml path
    label: str = ""  # how a person tells the run apart: "runs[2]" or "sweep lr=1e-4, rank=16"
    generated_name: bool = True  # False when the user wrote this run's name


def expand(base: dict[str, Any], batch: dict[str, Any]) -> list[ExpandedRun]:
    """The runs a (shape-checked) ``batch`` section makes of ``base``; names unique and valid."""
    base_name = str(base.get("name") or "run")
    if batch.get("runs") is not None:
        runs = _expand_runs(base, base_name, batch["runs"])
    else:
        runs = _expand_sweep(base, base_name, batch.get("sweep") or {})
    _make_unique(runs)
    return runs


def split_key(key: str) -> tuple[str, ...]:
    return tuple(part for part in str(key).split("."))


def apply_override(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Set ``path`` in ``data`` (in place); mappings merge into mappings, anything else replaces."""
    container = data
    for part in path[:-1]:
        child = container.get(part)
        if not isinstance(child, dict):
            child = {}
            container[part] = child
        container = child
    current = container.get(path[-1])
    if isinstance(value, dict) and isinstance(current, dict):
        for key, sub in value.items():
            apply_override(current, split_key(key), sub)
    else:
        container[path[-1]] = copy.deepcopy(value)


def value_slug(value: Any) -> str:
    """A short, name-safe spelling of a sweep value: 1e-4 -> "1e-4", 0.5 -> "0p5", True -> "on"."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 0.01 or abs(value) >= 1e5):
            mantissa, exponent = f"{value:e}".split("e")
            text = f"{float(mantissa):g}e{int(exponent)}"
        else:
            text = f"{value:g}"
        return text.replace(".", "p")
    if isinstance(value, (list, tuple)):
        return "_".join(value_slug(v) for v in value)
    if isinstance(value, dict):
        return _short_hash(repr(sorted(value.items(), key=str)))
    return _UNSAFE.sub("_", str(value)).strip("_") or "x"


def safe_name(name: str) -> str:
    """``name``, or when longer than a name may be, truncated with a short hash of the whole."""
    if len(name) <= MAX_NAME:
        return name
    digest = _short_hash(name)
    return f"{name[:MAX_NAME - len(digest) - 1].rstrip('-_')}-{digest}"


def _expand_runs(base: dict[str, Any], base_name: str, overrides: list[Any]) -> list[ExpandedRun]:
    runs = []
    for index, override in enumerate(overrides):
        data = copy.deepcopy(base)
        origins: dict[tuple[str, ...], YamlPath] = {}
        for key, value in (override or {}).items():
            path = split_key(key)
            apply_override(data, path, value)
            origins[path] = ("batch", "runs", index, key)
        own = (override or {}).get("name")
        name = str(own) if own is not None else safe_name(f"{base_name}-{index + 1}")
        data["name"] = name
        if own is None:
            origins.pop(("name",), None)
        runs.append(ExpandedRun(name, data, origins, label=f"batch.runs[{index}]",
                                generated_name=own is None))
    return runs


def _expand_sweep(base: dict[str, Any], base_name: str, sweep: dict[str, list[Any]]) -> list[ExpandedRun]:
    keys = list(sweep)
    labels = _short_labels(keys)
    runs = []
    for combo in itertools.product(*(range(len(sweep[key])) for key in keys)):
        data = copy.deepcopy(base)
        origins: dict[tuple[str, ...], YamlPath] = {}
        parts = []
        for key, index in zip(keys, combo):
            value = sweep[key][index]
            apply_override(data, split_key(key), value)
            origins[split_key(key)] = ("batch", "sweep", key, index)
            parts.append(f"{labels[key]}{value_slug(value)}")
        generated = "name" not in sweep
        if generated:
            data["name"] = safe_name("-".join([base_name, *parts]))
        label = "sweep " + ", ".join(f"{key}={sweep[key][i]!r}" for key, i in zip(keys, combo))
        runs.append(ExpandedRun(str(data["name"]), data, origins, label=label,
                                generated_name=generated))
    return runs


def _short_labels(keys: list[str]) -> dict[str, str]:
    """The last part of each dotted key ("training.lr" -> "lr"), or the whole key if ambiguous."""
    lasts = [split_key(key)[-1] for key in keys]
    labels = {}
    for key, last in zip(keys, lasts):
        label = last if lasts.count(last) == 1 else key.replace(".", "_")
        labels[key] = _UNSAFE.sub("_", label)
    return labels


def _make_unique(runs: list[ExpandedRun]) -> None:
    """Suffix repeated generated names (two runs must never share an output folder).

    Names the user wrote are left alone: a repeat among them is reported by the loader.
    """
    seen: dict[str, int] = {}
    for run in runs:
        count = seen.get(run.name, 0)
        seen[run.name] = count + 1
        if count and run.generated_name and NAME_RE.match(run.name):
            run.name = safe_name(f"{run.name}-{count + 1}")
            run.data["name"] = run.name


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:6]
