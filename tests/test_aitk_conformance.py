"""Every config we render, read the way the pinned ai-toolkit reads it (issue 15).

ai-toolkit cannot be installed in CI (torch, CUDA, model downloads), so what its loader and config
classes do is kept as data in ``tests/data/aitk/``, each fact with the ai-toolkit file and line it
comes from; ``scripts/aitk_facts.py`` regenerates the data from an ai-toolkit checkout at the
commit we pin. Each rendered config (the shipped ones, every run of the batch example, hostile
strings) is put through the loader's rewrites and checked key by key and name by name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from controller.spec.model import AI_TOOLKIT_COMMIT, RunSpec
from remote import aitk_rules
from remote.aitk_config import build_aitk_config, dump_yaml

ROOT = Path(__file__).resolve().parent.parent
FACTS = Path(__file__).parent / "data" / "aitk"
KEYS = json.loads((FACTS / "config_keys.json").read_text(encoding="utf-8"))
NAMES = json.loads((FACTS / "names.json").read_text(encoding="utf-8"))
LOADER = json.loads((FACTS / "loader.json").read_text(encoding="utf-8"))

# Keys we write that sd_trainer does not read, each with the reason it is still written.
NOT_READ_ON_PURPOSE = {
    # BaseSDTrainProcess.py:105 takes the device from accelerate; ai-toolkit's own Flux example
    # (config/examples/train_lora_flux_24gb.yaml) writes it, and the tiny trainer reads it.
    "config.process[].device",
}
# The sections whose values are names ai-toolkit looks up, and where the accepted names are.
NAME_FIELDS = {("train", "optimizer"): "optimizer", ("train", "noise_scheduler"): "samplers",
               ("sample", "sampler"): "samplers", ("train", "dtype"): "dtypes",
               ("save", "dtype"): "dtypes", ("model", "dtype"): "dtypes"}

HOSTILE = {
    "name": "2e3",
    "trigger_word": "1e5",
    "captioning": {"insert_trigger": True},
    "wandb": {"enabled": True, "project": "1.0e5", "run_name": "on"},
    "training": {"sample": {"prompts": [
        "1e5", "3:25.5", ".5e+3", "null", "yes", "~", "0x1F", "1_000", "-.inf",
        "[trigger] 'single' \"double\" colon: # hash",
        "ünïcode ✓ 🙂 and a tab\tinside", "@at %percent !tag &anchor *alias",
        "- dash", "? question", "{braces}", "[brackets] [trigger]", "  padded  ",
        "$HOME and $ {not a var} and {HF_TOKEN}", "a single - dash and an em — dash",
        "a long prompt,  with double  spaces " * 8 + "that the dump folds over lines",
    ]}},
}


def _facts_source_ok(source: str) -> bool:
    return re.fullmatch(r"[\w./-]+\.(py|txt):\d+", source) is not None


def _sources() -> Iterator[str]:
    """Every fact's "file:line"."""
    maps = [*KEYS["job"].values(), KEYS["process"], *KEYS["classes"].values(), NAMES["samplers"],
            NAMES["dtypes"], NAMES["requirements"]]
    for facts in maps:
        yield from facts.values()
    yield from (section["source"] for section in KEYS["sections"].values())
    yield from (branch["source"] for branch in NAMES["optimizers"])
    yield NAMES["optimizer_case"]
    yield from (fact["source"] for fact in LOADER.values() if isinstance(fact, dict))


def rendered_configs() -> list[tuple[str, dict[str, Any]]]:
    """(label, job dict) for the shipped configs, every run of the batch example, hostile text."""
    from controller.cli.spec_cmds import render_config
    from controller.spec.loader import load_file

    out = []
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        loaded = load_file(path)
        for index, spec in enumerate(loaded.runs):
            out.append((f"{path.name}[{index}]", render_config(spec)))
    for trigger in (True, False):
        data = {"dataset": {"path": "/data"}, "budget": {"max_usd": 5}, **HOSTILE}
        data["captioning"] = {"insert_trigger": trigger}
        spec = RunSpec.model_validate(data).model_dump(mode="json")
        out.append((f"hostile(insert_trigger={trigger})",
                    build_aitk_config(spec, dataset_dir="/w/work/dataset", training_folder="/w/out")))
    return out


CONFIGS = rendered_configs()


def aitk_read(text: str) -> Any:
    """``text`` as ai-toolkit's get_config returns it: env substitution of the whole text, its
    YAML loader, then preprocess_config's ``[name]`` replacement (all from loader.json)."""
    env = re.compile(LOADER["env_var"]["pattern"])
    assert not env.search(text), f"ai-toolkit would substitute {env.search(text).group(0)}"

    class FixedLoader(yaml.SafeLoader):
        pass

    resolver = LOADER["float_resolver"]
    assert resolver["flags"] == "re.X"
    FixedLoader.add_implicit_resolver(resolver["tag"], re.compile(resolver["pattern"], re.X),
                                      list(resolver["first"]))
    config = yaml.load(text, Loader=FixedLoader)
    name = config["config"]["name"]
    return json.loads(json.dumps(config).replace(LOADER["name_tag"]["text"], name))


def key_paths(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path, value) of every key; list items are ``[]`` (the path names the section, not the
    index)."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            yield path, value
            yield from key_paths(value, path)
    elif isinstance(node, list):
        for item in node:
            if isinstance(item, dict):
                yield from key_paths(item, f"{prefix}[]")


def read_keys(parent: str) -> set[str] | None:
    """The keys ai-toolkit reads inside ``parent`` (a key path with ``[]``), or None if it reads
    the value whole (a list of numbers, a free-form dict)."""
    sections = KEYS["sections"]
    if parent == "":
        return set(KEYS["job"]["(root)"])
    if parent == "config":
        return set(KEYS["job"]["config"])
    if parent == "config.process[]":
        return set(KEYS["process"])
    relative = parent.removeprefix("config.process[].")
    if relative in sections:
        return set(KEYS["classes"][sections[relative]["class"]])
    return None


@pytest.mark.parametrize("label, config", CONFIGS, ids=[label for label, _ in CONFIGS])
def test_every_string_survives_the_loader_unchanged(label: str, config: dict[str, Any]) -> None:
    read = aitk_read(dump_yaml(config))
    expected = json.loads(json.dumps(config))
    expected["meta"]["name"] = config["config"]["name"]  # the one [name] meant to be replaced
    assert read == expected


@pytest.mark.parametrize("label, config", CONFIGS, ids=[label for label, _ in CONFIGS])
def test_every_key_is_one_ai_toolkit_reads(label: str, config: dict[str, Any]) -> None:
    unread = []
    for path, _ in key_paths(config):
        parent, _, key = path.rpartition(".")
        allowed = read_keys(parent)
        if allowed is None:
            continue  # inside a value read whole: meta (BaseJob.py:20), optimizer_params, ...
        if key not in allowed and path not in NOT_READ_ON_PURPOSE:
            unread.append(path)
    assert not unread, f"keys no ai-toolkit code reads at {NAMES['commit']}: {unread}"


@pytest.mark.parametrize("label, config", CONFIGS, ids=[label for label, _ in CONFIGS])
def test_every_name_is_one_ai_toolkit_accepts(label: str, config: dict[str, Any]) -> None:
    process = config["config"]["process"][0]
    for (section, key), kind in NAME_FIELDS.items():
        value = process.get(section, {}).get(key)
        if value is None:
            continue
        if kind == "optimizer":
            assert optimizer_verdict(value), f"{section}.{key}: {value!r}"
        else:
            assert value in NAMES[kind], f"{section}.{key}: {value!r}"
    for prompt in process.get("sample", {}).get("prompts", []):
        assert LOADER["prompt_split"]["text"] not in prompt
        assert not any(tag in prompt for tag in LOADER["trigger_placeholders"]["texts"])


def test_the_hostile_strings_reach_ai_toolkit_as_written() -> None:
    for label, config in CONFIGS:
        if not label.startswith("hostile"):
            continue
        read = aitk_read(dump_yaml(config))
        process = read["config"]["process"][0]
        assert read["config"]["name"] == HOSTILE["name"]
        assert process["logging"]["project_name"] == "1.0e5"
        assert process["logging"]["run_name"] == "on"
        prompts = HOSTILE["training"]["sample"]["prompts"]
        trigger = HOSTILE["trigger_word"]
        assert process["sample"]["prompts"] == [aitk_rules.fill_trigger(p, trigger) for p in prompts]
        if label == "hostile(insert_trigger=True)":
            assert process["trigger_word"] == trigger
        else:
            assert "trigger_word" not in process


@pytest.mark.parametrize("text, prompt", [
    ("${HF_TOKEN}", False), ("a ${X} b", False), ("[name] portrait", False),
    ("portrait --w 512", True),
])
def test_what_the_loader_would_rewrite_is_refused(text: str, prompt: bool) -> None:
    assert aitk_rules.rewrite_problem(text, prompt=prompt)
    env = re.compile(LOADER["env_var"]["pattern"])
    rewritten = (env.search(text) or LOADER["name_tag"]["text"] in text
                 or (prompt and LOADER["prompt_split"]["text"] in text))
    assert rewritten  # the data agrees that ai-toolkit changes it


def optimizer_verdict(name: str) -> bool:
    """Whether get_optimizer (names.json) builds ``name`` with what ai-toolkit installs."""
    lower = name.lower()

    def matches(test: list[str]) -> bool:
        kind, text = test
        return {"equals": lower == text, "startswith": lower.startswith(text),
                "endswith": lower.endswith(text)}[kind]

    for branch in NAMES["optimizers"]:
        if branch["when"] is not None and not any(matches(t) for t in branch["when"]):
            continue
        accepted = branch["accept"] is None or any(matches(t) for t in branch["accept"])
        installed = all(module == "toolkit" or module.replace("_", "-") in NAMES["requirements"]
                        for module in branch["imports"])
        return accepted and installed
    return False


def test_optimizer_rule_matches_get_optimizer() -> None:
    names = {t[1] for b in NAMES["optimizers"] for t in (b["when"] or []) + (b["accept"] or [])}
    names |= {"", "sgd", "AdamW8bit", "dadaptationfoo", "prodigyfoo", "xlion8bit", "Lion",
              "DAdaptAdam", "prodigy8bitfoo", *aitk_rules.OPTIMIZERS}
    for name in sorted(names):
        assert (aitk_rules.optimizer_problem(name) is None) is optimizer_verdict(name), name
    assert all(optimizer_verdict(name) for name in aitk_rules.OPTIMIZERS)


def test_the_code_uses_the_facts_of_the_pinned_commit() -> None:
    assert NAMES["commit"] == KEYS["commit"] == LOADER["commit"] == AI_TOOLKIT_COMMIT
    assert aitk_rules.AITK_COMMIT == AI_TOOLKIT_COMMIT
    assert aitk_rules.SAMPLERS == set(NAMES["samplers"])
    assert aitk_rules.DTYPES == set(NAMES["dtypes"])
    assert aitk_rules.ENV_VAR_RE.pattern == LOADER["env_var"]["pattern"]
    assert aitk_rules.AITK_FLOAT_RE.pattern == LOADER["float_resolver"]["pattern"]
    assert aitk_rules.AITK_FLOAT_FIRST == LOADER["float_resolver"]["first"]
    assert aitk_rules.NAME_TAG == LOADER["name_tag"]["text"]
    assert aitk_rules.PROMPT_FLAG == LOADER["prompt_split"]["text"]
    assert aitk_rules.TRIGGER_TAG in LOADER["trigger_placeholders"]["texts"]
    # ai-toolkit honours train.gradient_accumulation (the legacy key is undone by SDTrainer)
    assert "gradient_accumulation" in KEYS["classes"]["TrainConfig"]


def test_every_fact_names_its_file_and_line() -> None:
    sources = list(_sources())
    assert len(sources) > 100
    bad = [s for s in sources if not _facts_source_ok(s)]
    assert not bad, bad
