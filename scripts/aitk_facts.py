#!/usr/bin/env python3
"""Regenerate ``tests/data/aitk/`` from an ai-toolkit git repository at a given commit.

    python scripts/aitk_facts.py PATH/TO/ai-toolkit [--commit SHA] [--out tests/data/aitk]

PATH may be a clone or a bare mirror; files are read with ``git show COMMIT:path``, so the work
tree (if any) is not touched. The facts are what ``tests/test_aitk_conformance.py`` checks every
rendered config against, each with the ai-toolkit file and line it was read from:

- ``config_keys.json``: the keys each config section is read with (``kwargs.get('x')`` in the
  classes of ``toolkit/config_modules.py``, ``get_conf('x')`` in the process classes, the job keys
  of ``jobs/BaseJob.py``), and which class reads which section.
- ``names.json``: the optimizer chain of ``toolkit/optimizer.py`` (branch by branch, with the
  packages each branch imports and whether ai-toolkit's requirements install them), the schedulers
  of ``toolkit/sampler.py``, the dtypes of ``toolkit/train_tools.py``.
- ``loader.json``: what the loader rewrites (``toolkit/config.py``: ``${VAR}``, ``[name]``, the
  float resolver), where sample prompts are cut, the trigger placeholders.

Only the standard library is used (``ast``, ``json``, ``subprocess``); ai-toolkit is never
imported, so no GPU or torch is needed.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

DEFAULT_COMMIT = "27a03a91f23eb1b757d5ec2e80ee3e129cfcc350"
CONFIG_MODULES = "toolkit/config_modules.py"
PROCESS_FILES = ["jobs/process/BaseProcess.py", "jobs/process/BaseTrainProcess.py",
                 "jobs/process/BaseSDTrainProcess.py", "extensions_built_in/sd_trainer/SDTrainer.py"]
# process section -> the class that reads it, constructed in the named file as `Class(**...)`
SECTIONS = {
    "network": ("NetworkConfig", "jobs/process/BaseSDTrainProcess.py"),
    "train": ("TrainConfig", "jobs/process/BaseSDTrainProcess.py"),
    "model": ("ModelConfig", "jobs/process/BaseSDTrainProcess.py"),
    "save": ("SaveConfig", "jobs/process/BaseSDTrainProcess.py"),
    "sample": ("SampleConfig", "jobs/process/BaseSDTrainProcess.py"),
    "logging": ("LoggingConfig", "jobs/process/BaseSDTrainProcess.py"),
    "datasets[]": ("DatasetConfig", "jobs/process/BaseSDTrainProcess.py"),
    "train.ema_config": ("EMAConfig", CONFIG_MODULES),
    "sample.samples[]": ("SampleItem", CONFIG_MODULES),
}


class Source:
    """Files of one commit of a git repository (a clone or a bare mirror)."""

    def __init__(self, repo: Path, commit: str) -> None:
        self.repo, self.commit = repo, commit
        self._cache: dict[str, str] = {}

    def text(self, path: str) -> str:
        if path not in self._cache:
            done = subprocess.run(["git", "-C", str(self.repo), "show", f"{self.commit}:{path}"],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"cannot read {path} at {self.commit}: {done.stderr.strip()}")
            self._cache[path] = done.stdout
        return self._cache[path]

    def tree(self, path: str) -> ast.Module:
        return ast.parse(self.text(path), filename=path)

    def at(self, path: str, pattern: str) -> str:
        """``path:line`` of the first line that matches ``pattern``."""
        for number, line in enumerate(self.text(path).splitlines(), 1):
            if re.search(pattern, line):
                return f"{path}:{number}"
        raise SystemExit(f"{path}: no line matches {pattern!r}")


def _const(node: ast.AST) -> Any:
    return node.value if isinstance(node, ast.Constant) else None


def _calls(tree: ast.AST, test: Callable[[ast.Call], bool]) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and test(node)]


def _method_call(name: str, owner: str) -> Callable[[ast.Call], bool]:
    def test(call: ast.Call) -> bool:
        func = call.func
        return (isinstance(func, ast.Attribute) and func.attr == name and bool(call.args)
                and isinstance(call.args[0], ast.Constant)
                and (ast.unparse(func.value) == owner))
    return test


def class_keys(src: Source) -> dict[str, dict[str, str]]:
    """Per class of config_modules.py: key -> "file:line" where it is read from kwargs."""
    out: dict[str, dict[str, str]] = {}
    for node in src.tree(CONFIG_MODULES).body:
        if not isinstance(node, ast.ClassDef):
            continue
        keys: dict[str, str] = {}
        for call in _calls(node, _method_call("get", "kwargs")):
            keys.setdefault(str(_const(call.args[0])), f"{CONFIG_MODULES}:{call.lineno}")
        for sub in ast.walk(node):
            if (isinstance(sub, ast.Subscript) and ast.unparse(sub.value) == "kwargs"
                    and isinstance(_const(sub.slice), str)):
                keys.setdefault(_const(sub.slice), f"{CONFIG_MODULES}:{sub.lineno}")
        if keys:
            out[node.name] = dict(sorted(keys.items()))
    return out


def process_keys(src: Source) -> dict[str, str]:
    """Keys of ``config.process[i]`` read with ``self.get_conf('x')`` (first part of a dotted key)."""
    keys: dict[str, str] = {
        # jobs/BaseJob.py load_processes: the process type picks the process class
        "type": src.at("jobs/BaseJob.py", r"process_dict\[process..type..\]"),
    }
    for path in PROCESS_FILES:
        for call in _calls(src.tree(path), _method_call("get_conf", "self")):
            key = str(_const(call.args[0])).split(".")[0]
            keys.setdefault(key, f"{path}:{call.lineno}")
    return dict(sorted(keys.items()))


def job_keys(src: Source) -> dict[str, dict[str, str]]:
    path = "jobs/BaseJob.py"
    return {
        "(root)": {
            "job": src.at(path, r"config\[.job.\]"),
            "config": src.at(path, r"config\[.config.\]"),
            "meta": src.at(path, r".meta. in config"),
        },
        "config": {
            "name": src.at(path, r"get_conf\(.name."),
            "process": src.at(path, r"self\.config\[.process.\]"),
        },
    }


def section_map(src: Source) -> dict[str, dict[str, str]]:
    return {section: {"class": cls, "source": src.at(path, re.escape(cls) + r"\((self, )?\*\*")}
            for section, (cls, path) in SECTIONS.items()}


def _lower_test(node: ast.AST) -> list[list[str]]:
    """``lower_type == 'x'`` / ``.startswith('x')`` / ``.endswith('x')`` (or an ``or`` of them)
    as alternatives, each a list of [kind, text]."""
    if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
        return [alt for value in node.values for alt in _lower_test(value)]
    if isinstance(node, ast.Compare) and isinstance(node.ops[0], ast.Eq):
        return [["equals", str(_const(node.comparators[0]))]]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        if node.func.attr in ("startswith", "endswith"):
            return [[node.func.attr, str(_const(node.args[0]))]]
    raise SystemExit(f"toolkit/optimizer.py:{node.lineno}: unexpected test {ast.unparse(node)}")


def _chain(node: ast.If) -> list[tuple[ast.If | None, list[ast.stmt], int]]:
    """An if/elif/else chain as (if-node or None for else, body, line)."""
    out: list[tuple[ast.If | None, list[ast.stmt], int]] = []
    current: ast.If | None = node
    while current is not None:
        out.append((current, current.body, current.lineno))
        orelse = current.orelse
        if len(orelse) == 1 and isinstance(orelse[0], ast.If):
            current = orelse[0]
        else:
            if orelse:
                out.append((None, orelse, orelse[0].lineno))
            current = None
    return out


def _raises(body: list[ast.stmt]) -> bool:
    return any(isinstance(stmt, ast.Raise) for stmt in body)


def _imports(body: list[ast.stmt]) -> list[str]:
    names = []
    for stmt in body:
        for sub in ast.walk(stmt):
            if isinstance(sub, ast.Import):
                names += [alias.name.split(".")[0] for alias in sub.names]
            elif isinstance(sub, ast.ImportFrom) and sub.module:
                names.append(sub.module.split(".")[0])
    return sorted(set(names))


def optimizer_chain(src: Source) -> list[dict[str, Any]]:
    """get_optimizer's branches in order: the first whose ``when`` matches decides; the name is
    accepted when ``accept`` is null (any) or one of its alternatives matches too."""
    path = "toolkit/optimizer.py"
    func = next(n for n in src.tree(path).body
                if isinstance(n, ast.FunctionDef) and n.name == "get_optimizer")
    top = next(n for n in func.body if isinstance(n, ast.If) and "lower_type" in ast.unparse(n.test))
    branches = []
    for node, body, line in _chain(top):
        if node is None:
            branches.append({"source": f"{path}:{line}", "when": None, "accept": [],
                             "imports": []})
            continue
        nested = next((s for s in body if isinstance(s, ast.If)
                       and "lower_type" in ast.unparse(s.test)), None)
        accept: list[list[str]] | None = None
        if _raises(body) and nested is None:
            accept = []
        elif nested is not None:
            accept = []
            for inner, inner_body, _ in _chain(nested):
                if inner is not None and not _raises(inner_body):
                    accept += _lower_test(inner.test)
            # statements after the nested chain may accept the rest (no trailing raise)
            for stmt in body[body.index(nested) + 1:]:
                if isinstance(stmt, ast.If) and "lower_type" in ast.unparse(stmt.test):
                    for inner, inner_body, _ in _chain(stmt):
                        if inner is not None and not _raises(inner_body):
                            accept += _lower_test(inner.test)
        branches.append({"source": f"{path}:{line}", "when": _lower_test(node.test),
                         "accept": accept, "imports": _imports(body)})
    return branches


def _equals_constants(src: Source, path: str, func_name: str, var: str) -> dict[str, str]:
    func = next(n for n in ast.walk(src.tree(path))
                if isinstance(n, ast.FunctionDef) and n.name == func_name)
    out: dict[str, str] = {}
    for node in ast.walk(func):
        if (isinstance(node, ast.Compare) and isinstance(node.ops[0], ast.Eq)
                and ast.unparse(node.left) == var and isinstance(_const(node.comparators[0]), str)):
            out.setdefault(_const(node.comparators[0]), f"{path}:{node.lineno}")
    return dict(sorted(out.items()))


def requirements(src: Source) -> dict[str, str]:
    """Distribution names (lower case, '-' for '_') installed by requirements.txt and its -r files."""
    out: dict[str, str] = {}
    todo = ["requirements.txt"]
    while todo:
        path = todo.pop()
        for number, raw in enumerate(src.text(path).splitlines(), 1):
            line = raw.split("#")[0].strip()
            if line.startswith("-r"):
                todo.append(line[2:].strip())
            elif line.startswith("git+"):
                name = line.rstrip("/").split("/")[-1].split("@")[0].removesuffix(".git")
                out.setdefault(name.lower(), f"{path}:{number}")
            elif line:
                name = re.split(r"[<>=!~\[; ]", line)[0]
                out.setdefault(name.lower().replace("_", "-"), f"{path}:{number}")
    return dict(sorted(out.items()))


def loader_facts(src: Source) -> dict[str, Any]:
    path = "toolkit/config.py"
    tree = src.tree(path)
    env = _calls(tree, lambda c: ast.unparse(c.func) == "re.sub")[0]
    name_tag = _calls(tree, lambda c: isinstance(c.func, ast.Attribute) and c.func.attr == "replace"
                      and ast.unparse(c.func.value) == "config_string")[0]
    resolver = _calls(tree, lambda c: isinstance(c.func, ast.Attribute)
                      and c.func.attr == "add_implicit_resolver")[0]
    pattern_call = resolver.args[1]
    assert isinstance(pattern_call, ast.Call)
    first = resolver.args[2]
    assert isinstance(first, ast.Call)
    split = _calls(src.tree(CONFIG_MODULES), lambda c: isinstance(c.func, ast.Attribute)
                   and c.func.attr == "split" and ast.unparse(c.func.value) == "prompt")[0]
    replacements = next(n for n in ast.walk(src.tree("toolkit/prompt_utils.py"))
                        if isinstance(n, ast.Assign)
                        and ast.unparse(n.targets[0]) == "default_replacements")
    return {
        "env_var": {"pattern": _const(env.args[0]), "source": f"{path}:{env.lineno}",
                    "what": "replaced in the whole file text from the environment before parsing"},
        "name_tag": {"text": _const(name_tag.args[0]), "source": f"{path}:{name_tag.lineno}",
                     "what": "replaced by config.name in every string after parsing"},
        "float_resolver": {
            "tag": _const(resolver.args[0]), "pattern": _const(pattern_call.args[0]),
            "flags": ast.unparse(pattern_call.args[1]), "first": _const(first.args[0]),
            "source": f"{path}:{resolver.lineno}",
            "what": "added to yaml.SafeLoader: plain scalars matching it are read as floats"},
        "prompt_split": {"text": _const(split.args[0]), "source": f"{CONFIG_MODULES}:{split.lineno}",
                         "what": "a sample prompt ends at the first one; the rest is read as flags"},
        "trigger_placeholders": {
            "texts": [_const(e) for e in replacements.value.elts],  # type: ignore[attr-defined]
            "source": f"toolkit/prompt_utils.py:{replacements.lineno}",
            "what": "replaced by the trigger word (by '' when there is none) in captions"},
    }


def collect(src: Source) -> dict[str, dict[str, Any]]:
    meta = {"repository": "ostris/ai-toolkit", "commit": src.commit,
            "generated_by": "scripts/aitk_facts.py"}
    return {
        "config_keys.json": {
            **meta, "job": job_keys(src), "process": process_keys(src),
            "sections": section_map(src), "classes": class_keys(src),
        },
        "names.json": {
            **meta,
            "optimizers": optimizer_chain(src),
            "optimizer_case": src.at("toolkit/optimizer.py", r"lower_type = optimizer_type.lower"),
            "samplers": _equals_constants(src, "toolkit/sampler.py", "get_sampler", "sampler"),
            "dtypes": _equals_constants(src, "toolkit/train_tools.py", "get_torch_dtype",
                                        "dtype_str"),
            "requirements": requirements(src),
        },
        "loader.json": {**meta, **loader_facts(src)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repo", type=Path, help="an ai-toolkit clone or bare mirror")
    parser.add_argument("--commit", default=DEFAULT_COMMIT)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent.parent / "tests" / "data" / "aitk")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in collect(Source(args.repo, args.commit)).items():
        (args.out / name).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n",
                                     encoding="utf-8")
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
