"""What ai-toolkit accepts and rewrites at the pinned commit: the rules ``validate`` enforces.

Every rule names the ai-toolkit file and line it copies, at commit
``27a03a91f23eb1b757d5ec2e80ee3e129cfcc350`` (the pin in ``controller.spec.model``). The same
facts, regenerated from an ai-toolkit checkout by ``scripts/aitk_facts.py``, are kept as data in
``tests/data/aitk/``; ``tests/test_aitk_conformance.py`` holds this module to them, so a new pin
that changes a rule fails a test instead of a paid run.

This module runs on the instance too: stdlib only.
"""

from __future__ import annotations

import re
from typing import Iterator

AITK_COMMIT = "27a03a91f23eb1b757d5ec2e80ee3e129cfcc350"

# toolkit/config.py:35 replace_env_vars_in_string: applied to the whole file text before parsing;
# every match is replaced from the environment (or the run fails when the variable is unset).
ENV_VAR_RE = re.compile(r"\$\{([^}]+)\}")
# toolkit/config.py:49 preprocess_config: json.dumps(config).replace("[name]", name).
NAME_TAG = "[name]"
# toolkit/config_modules.py:1400 GenerateImageConfig._process_prompt_string: prompt.split('--');
# the prompt ends at the first "--", the rest is read as flags (--w 512, --seed 3, ...).
PROMPT_FLAG = "--"
# toolkit/prompt_utils.py:720 inject_trigger_into_prompt: the placeholders replaced by the trigger.
TRIGGER_TAG = "[trigger]"

# toolkit/config.py:55-65: ai-toolkit's YAML loader adds this float resolver to yaml.SafeLoader,
# so `1e5`, `2e3` or `1.0e5` written unquoted are read as numbers (PyYAML's own resolver needs a
# dot and a signed exponent). ``remote.aitk_config.dump_yaml`` quotes every string it matches.
AITK_FLOAT_RE = re.compile(r"""^(?:
     [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)
AITK_FLOAT_FIRST = "-+0123456789."

# toolkit/train_tools.py:37-48 get_torch_dtype: any other string is returned unchanged and fails
# later, inside torch, after the model download.
DTYPES = frozenset({"float", "fp32", "single", "float32", "fp16", "half", "float16", "bf16",
                    "bfloat16", "8bit", "e4m3fn", "float8"})

# toolkit/sampler.py:134-177 get_sampler: train.noise_scheduler and sample.sampler; anything else
# raises "Sampler ... not supported" once the model is loaded.
SAMPLERS = frozenset({"ddim", "ddpm", "pndm", "lms", "k_lms", "euler", "k_euler", "euler_a",
                      "dpmsolver", "dpmsolver++", "k_dpmsolver", "k_dpmsolver++", "dpmsingle",
                      "heun", "dpm_2", "dpm_2_a", "lcm", "custom_lcm", "mean_flow", "flowmatch"})
# Flux is a flow-matching model: BaseSDTrainProcess.py:1195 and :1308 only build flow-matching
# timesteps and targets for "flowmatch"; the example configs use it for both keys.
FLUX_SAMPLER = "flowmatch"

# toolkit/optimizer.py:55-106: names matched exactly (after .lower()) that need nothing outside
# ai-toolkit's requirements (bitsandbytes for the *8bit ones, :63-75).
_EXACT_OPTIMIZERS = frozenset({"adam8", "adamw8", "adam8bit", "ademamix8bit", "adamw8bit",
                               "lion8bit", "adam", "adamw", "adagrad", "adafactor", "automagic",
                               "automagic2", "automagic3", "automagicexperiment"})
OPTIMIZERS = ("adamw8bit", "adamw", "adam", "adam8bit", "adamw8", "adam8", "ademamix8bit",
              "lion8bit", "adagrad", "adafactor", "prodigy", "prodigy8bit", "automagic",
              "automagic2", "automagic3", "automagicexperiment")


def optimizer_problem(name: str) -> str | None:
    """Why ai-toolkit's ``get_optimizer`` (toolkit/optimizer.py) would fail on ``name``, or None.

    The chain is copied branch by branch, in its order (the first branch that matches decides):
    """
    lower = name.lower()  # optimizer.py:12
    if lower.startswith("dadaptation"):  # optimizer.py:13-29
        return ("needs the `dadaptation` package, which ai-toolkit's requirements do not install "
                "(requirements_base.txt); the run would fail after the model download")
    if lower.startswith("prodigy"):  # optimizer.py:30 (prodigy8bit*), :42 (prodigy*, prodigyopt)
        return None
    if lower == "lion":  # optimizer.py:80-85
        return ("needs the `lion-pytorch` package, which ai-toolkit's requirements do not install "
                "(requirements_base.txt); use lion8bit")
    if lower.endswith("8bit") and lower not in _EXACT_OPTIMIZERS:  # optimizer.py:63-75
        return "is not an optimizer ai-toolkit knows (toolkit/optimizer.py get_optimizer)"
    if lower in _EXACT_OPTIMIZERS:
        return None
    return "is not an optimizer ai-toolkit knows (toolkit/optimizer.py get_optimizer)"


def rewrite_problem(text: str, *, prompt: bool = False) -> str | None:
    """Why ai-toolkit's loader would change ``text`` before it uses it, or None.

    ``prompt``: the text is (or goes into) a sample prompt, which is also cut at ``--``.
    Float-like strings are not a problem here: ``dump_yaml`` quotes them.
    """
    match = ENV_VAR_RE.search(text)
    if match:
        return (f"{match.group(0)!r} would be replaced by ai-toolkit with the environment variable "
                f"{match.group(1)} (toolkit/config.py replace_env_vars_in_string runs on the whole "
                "config; a secret would end up in samples and logs): remove the ${...}")
    if NAME_TAG in text:
        return ("'[name]' would be replaced by ai-toolkit with the run name (toolkit/config.py "
                "preprocess_config): write the name itself")
    if prompt and PROMPT_FLAG in text:
        return ("ai-toolkit cuts sample prompts at '--' and reads the rest as flags "
                "(toolkit/config_modules.py GenerateImageConfig._process_prompt_string): use "
                "training.sample.width/height/seed/steps/guidance instead")
    return None


def fill_trigger(prompt: str, trigger: str | None) -> str:
    """``prompt`` as it is sampled: ``[trigger]`` replaced by the trigger word, or dropped
    (with its spacing) when there is none; ends stripped as ai-toolkit strips them
    (config_modules.py:1399)."""
    if trigger:
        return prompt.replace(TRIGGER_TAG, trigger).strip()
    return re.sub(r"\s*" + re.escape(TRIGGER_TAG), "", prompt).strip().strip(",").strip()


LEGACY_ACCUMULATION = (
    "ai-toolkit's legacy train.gradient_accumulation_steps is undone by SDTrainer, which zeroes "
    "the gradients at every step (SDTrainer.py:2249), and it may not be combined with "
    "train.gradient_accumulation (config_modules.py:461-463): set "
    "training.gradient_accumulation_steps, which is rendered as train.gradient_accumulation")

# Override paths (relative to config.process[0]) whose value is a name ai-toolkit looks up.
_NAME_CHECKS = {
    ("train", "optimizer"): "optimizer",
    ("train", "noise_scheduler"): "sampler",
    ("sample", "sampler"): "sampler",
    ("train", "dtype"): "dtype",
    ("save", "dtype"): "dtype",
    ("model", "dtype"): "dtype",
}


def override_problems(overrides: dict) -> list[tuple[str, str]]:
    """(override key as written, why) for each override ai-toolkit would not take as written."""
    problems: list[tuple[str, str]] = []
    for key, value in overrides.items():
        path = tuple(str(key).split("."))
        for leaf_path, leaf in _leaves(path, value):
            for part in leaf_path:
                problem = rewrite_problem(part)
                if problem:
                    problems.append((str(key), f"key {part!r}: {problem}"))
            if leaf_path == ("train", "gradient_accumulation_steps") and leaf != 1:
                problems.append((str(key), LEGACY_ACCUMULATION))
            if isinstance(leaf, str):
                prompt = "prompts" in leaf_path or leaf_path[-1:] == ("prompt",)
                problem = rewrite_problem(leaf, prompt=prompt) or _name_problem(leaf_path, leaf)
                if problem:
                    problems.append((str(key), problem))
    return list(dict.fromkeys(problems))


def _leaves(path: tuple[str, ...], value: object) -> Iterator[tuple[tuple[str, ...], object]]:
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _leaves(path + tuple(str(key).split(".")), child)
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _leaves(path + (str(index),), child)
    else:
        yield path, value


def _name_problem(path: tuple[str, ...], value: str) -> str | None:
    kind = _NAME_CHECKS.get(path)
    if kind == "optimizer":
        problem = optimizer_problem(value)
        return f"optimizer {value!r} {problem}" if problem else None
    if kind == "sampler" and value not in SAMPLERS:
        return (f"{value!r} is not a scheduler ai-toolkit knows (toolkit/sampler.py get_sampler: "
                f"{', '.join(sorted(SAMPLERS))})")
    if kind == "sampler" and value != FLUX_SAMPLER:
        return (f"{value!r}: Flux trains and samples with 'flowmatch' only "
                "(BaseSDTrainProcess.py:1195 builds flow-matching timesteps for it alone)")
    if kind == "dtype" and value not in DTYPES:
        return (f"{value!r} is not a dtype ai-toolkit knows (toolkit/train_tools.py "
                f"get_torch_dtype: {', '.join(sorted(DTYPES))})")
    return None
