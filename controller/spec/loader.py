"""``run.yaml`` -> validated ``RunSpec``s, with every problem located at its line and column.

Problems read ``FILE:LINE:COL: field.path: what is wrong`` and are all reported at once in one
``SpecError``. The YAML is parsed twice: ``yaml.safe_load`` for the data pydantic validates and
``yaml.compose`` for the node tree whose marks give pydantic's error locations a line and column
(a missing field points at the mapping that should hold it).

Checks, in order: the file reads and parses; no secrets (``controller.spec.secrets_scan``); the
``batch:`` section, if any, and its expansion; each run against ``RunSpec``; each run's dataset
folder exists and holds images (relative paths resolve against the YAML file's folder); each run's
ai-toolkit overrides apply.
"""

from __future__ import annotations

import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controller.errors import SpecError

if typing.TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError

    from controller.batch.spec import ExpandedRun
    from controller.spec.model import BatchSpec, RunSpec

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
# A union member's name in a pydantic error location ("CustomBaseModel", "literal['a','b']", "str").
_UNION_TAG = re.compile(r"^([A-Z]\w*|literal\[.*|str|int|float|bool|none|function-.*|\w+\[.*)$")
_POSITION = re.compile(r"^.*?:(\d+):(\d+): ")


@dataclass
class LoadedFile:
    """A spec file: one run, or a batch of expanded runs sharing one budget."""

    path: Path
    runs: list["RunSpec"]
    batch: "BatchSpec | None" = None
    labels: list[str] = field(default_factory=list)  # per run: "" or where a batch run came from


def load_spec(path: Path) -> "RunSpec":
    """The one run a (non-batch) spec file describes; raises ``SpecError`` with every problem."""
    loaded = load_file(path)
    if loaded.batch is not None:
        doc = _Document.read(Path(path))
        line, col = doc.mark(("batch",))
        raise SpecError([f"{path}:{line}:{col}: batch: this is a batch file of {len(loaded.runs)} "
                         "runs, not a single run; `flux-remote launch` runs it as a batch"])
    return loaded.runs[0]


def load_file(path: Path) -> LoadedFile:
    """A spec file that may hold a ``batch:`` section; raises ``SpecError`` with every problem."""
    from controller.spec.secrets_scan import scan

    path = Path(path)
    doc = _Document.read(path)
    problems = [doc.problem_at((f.line, f.column), f.path, f.message) for f in scan(doc.root)]
    if "batch" in doc.data:
        loaded = _load_batch(doc, problems)
    else:
        spec = _validate_run(doc, doc.data, {}, "", problems)
        loaded = LoadedFile(path, [spec] if spec is not None else [], None, [""])
    if problems:
        raise SpecError(_unique(problems))
    return loaded


class _Document:
    """One parsed spec file: its data, its node tree, and how to point into it."""

    def __init__(self, path: Path, data: dict[str, Any], root: yaml.Node) -> None:
        self.path = path
        self.data = data
        self.root = root

    @classmethod
    def read(cls, path: Path) -> "_Document":
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SpecError([f"{path}: (file): no such file"]) from None
        except IsADirectoryError:
            raise SpecError([f"{path}: (file): is a folder, not a YAML file"]) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecError([f"{path}: (file): cannot read: {exc}"]) from exc
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f"{mark.line + 1}:{mark.column + 1}" if mark else "1:1"
            what = " ".join(p for p in (exc.context, exc.problem) if p)
            raise SpecError([f"{path}:{where}: (yaml): invalid YAML: {what}"]) from exc
        except yaml.YAMLError as exc:
            raise SpecError([f"{path}:1:1: (yaml): invalid YAML: {exc}"]) from exc
        if not isinstance(data, dict) or not isinstance(root, yaml.MappingNode):
            raise SpecError([f"{path}:1:1: (root): a spec is a mapping of keys (name:, dataset:, "
                             "budget:, ...), not " + ("an empty file" if data is None
                                                      else type(data).__name__)])
        duplicates = list(_duplicate_keys(root, ()))
        if duplicates:
            raise SpecError([f"{path}:{node.start_mark.line + 1}:{node.start_mark.column + 1}: "
                             f"{_dotted(p)}: key given twice" for p, node in duplicates])
        return cls(path, data, root)

    def find(self, yaml_path: tuple[Any, ...]) -> tuple[yaml.Node, yaml.Node | None, int]:
        """The deepest node along ``yaml_path``: (node, its key node, how many parts matched)."""
        node, key_node, depth = self.root, None, 0
        for part in yaml_path:
            child = _child(node, part)
            if child is None:
                break
            key_node, node = child
            depth += 1
        return node, key_node, depth

    def mark(self, yaml_path: tuple[Any, ...], *, key: bool = False) -> tuple[int, int]:
        node, key_node, _ = self.find(yaml_path)
        target = key_node if key and key_node is not None else node
        return target.start_mark.line + 1, target.start_mark.column + 1

    def problem_at(self, where: tuple[int, int], field_path: str, message: str) -> str:
        return f"{self.path}:{where[0]}:{where[1]}: {field_path}: {message}"


def _load_batch(doc: _Document, problems: list[str]) -> LoadedFile:
    from controller.batch.spec import expand
    from controller.spec.model import BatchSpec

    raw_batch = doc.data.get("batch")
    base = {key: value for key, value in doc.data.items() if key != "batch"}
    if not isinstance(raw_batch, dict):
        problems.append(doc.problem_at(doc.mark(("batch",)), "batch",
                                       "must be a mapping with max_usd and runs: or sweep:"))
        return LoadedFile(doc.path, [], None)
    batch = _validate(doc, BatchSpec, raw_batch, ("batch",), {}, "", problems)
    if batch is None:
        return LoadedFile(doc.path, [], None)
    unknown = [(key, reason) for key in batch.sweep or {}
               if (reason := _unknown_spec_key(key) or _pointless_sweep(key))]
    for key, reason in unknown:
        problems.append(doc.problem_at(doc.mark(("batch", "sweep", key), key=True),
                                       f"batch.sweep.{key}", reason))
    if unknown:
        return LoadedFile(doc.path, [], batch)
    named = batch.runs is not None and all("name" in run for run in batch.runs)
    if "name" not in base and not named:
        problems.append(doc.problem_at(doc.mark(()), "name", "required field is missing (the "
                                       "names of the batch's runs start with it)"))
        return LoadedFile(doc.path, [], batch)
    runs, labels = [], []
    expanded = expand(base, batch.model_dump(mode="python"))
    _check_unique_names(doc, expanded, problems)
    for run in expanded:
        spec = _validate_run(doc, run.data, run.origins, run.label, problems)
        if spec is not None:
            runs.append(spec)
            labels.append(run.label)
    return LoadedFile(doc.path, runs, batch, labels)


def _check_unique_names(doc: _Document, runs: list["ExpandedRun"], problems: list[str]) -> None:
    seen: set[str] = set()
    for run in runs:
        if run.name in seen:
            yaml_path = run.origins.get(("name",), ("name",))
            problems.append(doc.problem_at(doc.mark(yaml_path), "name",
                                           f"two runs are named {run.name!r}; names must differ "
                                           "(each run gets its own folder)"))
        seen.add(run.name)


def _validate_run(doc: _Document, data: dict[str, Any], origins: dict, label: str,
                  problems: list[str]) -> "RunSpec | None":
    from controller.spec.model import RunSpec

    before = len(problems)
    spec = _validate(doc, RunSpec, data, (), origins, label, problems)
    dataset = data.get("dataset")
    raw_path = dataset.get("path") if isinstance(dataset, dict) else None
    folder = None
    if isinstance(raw_path, str) and raw_path:  # checked even when other fields are wrong
        max_files = dataset.get("max_files") if isinstance(dataset, dict) else None
        folder = _check_dataset(doc, raw_path, origins, label, problems,
                                max_files=max_files if isinstance(max_files, int) else 10000)
    if spec is None or folder is None:
        return None
    spec.dataset.path = folder
    _check_overrides(doc, spec, origins, label, problems)
    return spec if len(problems) == before else None


def _validate(doc: _Document, model: type["BaseModel"], data: Any, prefix: tuple[Any, ...],
              origins: dict, label: str, problems: list[str]) -> Any:
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems.extend(_explain(doc, model, exc, prefix, origins, label))
        return None


def _explain(doc: _Document, model: type["BaseModel"], exc: "ValidationError",
             prefix: tuple[Any, ...], origins: dict, label: str) -> list[str]:
    """Each pydantic error as a located problem; union members' errors narrowed to the one meant."""
    grouped: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for error in exc.errors(include_url=False):
        loc, tag = _strip_union_tags(tuple(error["loc"]), error["type"])
        if tag is not None and not _branch_matches(doc, prefix + loc, origins, tag):
            continue
        grouped.setdefault(loc, []).append(error)
    if not grouped:  # no branch matched the node kind: report every member's complaint
        for error in exc.errors(include_url=False):
            loc, _ = _strip_union_tags(tuple(error["loc"]), error["type"])
            grouped.setdefault(loc, []).append(error)
    out = []
    for loc, errors in grouped.items():
        kinds = {error["type"] for error in errors}
        messages = list(dict.fromkeys(_message(model, error, loc) for error in errors))
        # union members each say "Input should be ...": one sentence, the value shown once
        message = " or ".join([messages[0]] + [m.removeprefix("Input should be ")
                                                for m in messages[1:]])
        message += _got(errors[0].get("input"), errors[0]["type"])
        where, from_override = _locate(doc, prefix + loc, origins,
                                       at_key="extra_forbidden" in kinds)
        suffix = f" (in {label})" if label and from_override else ""
        out.append(doc.problem_at(where, _dotted(prefix + loc), message + suffix))
    return out


def _strip_union_tags(loc: tuple[Any, ...], kind: str) -> tuple[tuple[Any, ...], str | None]:
    kept, tag = [], None
    for index, part in enumerate(loc):
        last = index == len(loc) - 1
        if isinstance(part, str) and _UNION_TAG.match(part) and not (last and kind == "extra_forbidden"):
            tag = part
            continue
        kept.append(part)
    return tuple(kept), tag


def _branch_matches(doc: _Document, loc: tuple[Any, ...], origins: dict, tag: str) -> bool:
    """A mapping in the YAML means the model member was meant; a scalar, the others."""
    node, _, _, _ = _resolve(doc, loc, origins)
    wants_model = tag[:1].isupper()
    return isinstance(node, yaml.MappingNode) == wants_model


def _resolve(doc: _Document, loc: tuple[Any, ...],
             origins: dict) -> tuple[yaml.Node, yaml.Node | None, bool, bool]:
    """The node that holds spec path ``loc``: (node, key node, found all the way, from an override).

    In a batch run a value may come from the base spec or from an override (``origins`` maps spec
    paths to the override's YAML path); the candidate that reaches deepest wins, the override on a
    tie. A path that is not there all the way (a missing field) ends at the deepest mapping found.
    """
    candidates: list[tuple[tuple[Any, ...], int]] = [(loc, 0)]
    for length in range(len(loc), 0, -1):
        origin = origins.get(tuple(loc[:length]))
        if origin is not None:
            # an override's YAML path is longer than the spec path it replaces: do not favour it
            candidates.insert(0, (tuple(origin) + tuple(loc[length:]), len(origin) - length))
            break
    scored = []
    for path, handicap in candidates:
        node, key_node, depth = doc.find(path)
        scored.append(((depth == len(path), depth - handicap), node, key_node, path is not loc))
    (complete, _), node, key_node, from_override = max(scored, key=lambda item: item[0])
    return node, key_node, complete, from_override


def _locate(doc: _Document, loc: tuple[Any, ...], origins: dict, *,
            at_key: bool = False) -> tuple[tuple[int, int], bool]:
    """Line and column for ``loc`` (its key with ``at_key``), and whether it is a batch override."""
    node, key_node, complete, from_override = _resolve(doc, loc, origins)
    if complete and at_key and key_node is not None:
        node = key_node
    return (node.start_mark.line + 1, node.start_mark.column + 1), from_override


def _message(model: type["BaseModel"], error: dict[str, Any], loc: tuple[Any, ...]) -> str:
    kind, msg = error["type"], error["msg"]
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else "?"
        return _unknown_key_message(key, _fields_at(model, loc[:-1]))
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    return msg


def _got(value: Any, kind: str) -> str:
    from controller.spec.secrets_scan import looks_secret

    if kind in {"value_error", "missing", "extra_forbidden"} or isinstance(value, (dict, list)):
        return ""
    text = repr(value)
    if isinstance(value, str) and looks_secret(value):
        return ""
    return f" (got {text})" if len(text) <= 40 else ""


def _unknown_key_message(key: str, allowed: list[str] | None) -> str:
    if not allowed:
        return f"unknown key {key!r}"
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    if close:
        return f"unknown key {key!r}; did you mean {close[0]!r}?"
    return f"unknown key {key!r} (allowed here: {', '.join(allowed)})"


def _fields_at(model: type["BaseModel"], loc: tuple[Any, ...]) -> list[str] | None:
    """Field names of the model reached by following ``loc`` from ``model`` (None if not a model)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        current = _model_in(current)
        if current is None or part not in current.model_fields:
            return None
        current = current.model_fields[part].annotation
    current = _model_in(current)
    return list(current.model_fields) if current is not None else None


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside an annotation (``X``, ``X | None``, ``list[X]``, a union)."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _unknown_spec_key(dotted: str) -> str | None:
    """Why a dotted key (a sweep key) does not name a RunSpec field, or None if it does."""
    from controller.batch.spec import split_key
    from controller.spec.model import RunSpec

    current: Any = RunSpec
    for index, part in enumerate(split_key(dotted)):
        model = _model_in(current)
        if model is None:
            if typing.get_origin(current) is dict or current is dict:
                return None  # free-form mapping (ai-toolkit overrides): anything goes below
            return f"{'.'.join(split_key(dotted)[:index])} has no keys inside it"
        if part not in model.model_fields:
            return _unknown_key_message(part, list(model.model_fields)).replace(
                "unknown key", "the sweep names an unknown key", 1)
        current = model.model_fields[part].annotation
    return None


def _pointless_sweep(dotted: str) -> str | None:
    """Why sweeping this key would run identical trainings, or None."""
    from controller.batch.spec import split_key

    if split_key(dotted) == ("training", "alpha"):
        return ("a sweep over training.alpha would run identical trainings: ai-toolkit sets "
                "alpha = rank for Flux LoRAs (toolkit/lora_special.py, 'no alpha for peft'); "
                "sweep training.rank instead")
    return None


def _check_dataset(doc: _Document, raw_path: str, origins: dict, label: str,
                   problems: list[str], *, max_files: int = 10000) -> Path | None:
    """The absolute dataset folder if it exists, may be uploaded (``dataset_guard``) and holds
    images, else None and a problem."""
    from controller.spec.dataset_guard import refusal

    folder = Path(raw_path).expanduser()
    if not folder.is_absolute():
        folder = (doc.path.parent / folder).resolve()
    where, from_override = _locate(doc, ("dataset", "path"), origins)
    suffix = f" (in {label})" if label and from_override else ""
    if not folder.exists():
        problem = f"no such folder: {folder}"
    elif not folder.is_dir():
        problem = f"not a folder: {folder}"
    elif (refused := refusal(folder, max_files=max_files)) is not None:
        problem = refused
    elif not any(p.suffix.lower() in IMAGE_EXTS for p in folder.iterdir() if p.is_file()):
        problem = f"{folder} holds no images ({', '.join(sorted(IMAGE_EXTS))})"
    else:
        return folder
    problems.append(doc.problem_at(where, "dataset.path", problem + suffix))
    return None


def _check_overrides(doc: _Document, spec: "RunSpec", origins: dict, label: str,
                     problems: list[str]) -> None:
    """Overrides apply, and ai-toolkit takes what they set as written (names, strings)."""
    from remote.aitk_config import OverrideError, build_aitk_config
    from remote.aitk_rules import override_problems

    overrides = spec.training.ai_toolkit.overrides
    if not overrides:
        return
    try:
        build_aitk_config(spec.model_dump(mode="json"), dataset_dir="/dataset",
                          training_folder="/output")
        found = [(key, f"override {key!r}: {why}") for key, why in override_problems(overrides)]
    except OverrideError as exc:
        found = [(exc.key, str(exc))]
    for key, message in found:
        loc = ("training", "ai_toolkit", "overrides", key)
        where, from_override = _locate(doc, loc, origins, at_key=True)
        suffix = f" (in {label})" if label and from_override else ""
        problems.append(doc.problem_at(where, _dotted(loc[:-1]), f"{message}{suffix}"))


def _child(node: yaml.Node, part: Any) -> tuple[yaml.Node | None, yaml.Node] | None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(part):
                return key_node, value_node
    elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        return None, node.value[part]
    return None


def _duplicate_keys(node: yaml.Node, path: tuple[Any, ...]):
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                yield path + (key,), key_node
            seen.add(key)
            yield from _duplicate_keys(value_node, path + (key,))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _duplicate_keys(item, path + (index,))


def _dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(root)"


def _unique(problems: list[str]) -> list[str]:
    """Each problem once, in the order of the file (line, then column)."""
    def position(problem: str) -> tuple[int, int]:
        match = _POSITION.match(problem)
        return (int(match.group(1)), int(match.group(2))) if match else (0, 0)

    return sorted(dict.fromkeys(problems), key=position)
