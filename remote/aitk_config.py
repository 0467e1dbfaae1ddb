"""Run spec (as plain data) -> the ai-toolkit job config that trains it.

The output follows ai-toolkit's own example ``config/examples/train_lora_flux_24gb.yaml`` key for
key (same nesting, same names) and its schnell example for FLUX.1-schnell (training adapter,
guidance 1, 4 sample steps). The tiny trainer reads the same file, so both trainers see one config.

This runs on the instance too, so it takes the spec as the dict that
``RunSpec.model_dump(mode="json")`` produces and depends on nothing but the stdlib and pyyaml.

Rules that are ours, not ai-toolkit's:
- ``save.push_to_hub`` is always false: publishing is flux-remote's job, and ai-toolkit's push
  opens an interactive login prompt that hangs a headless run.
- ``save_every`` / ``sample_every`` default to about an eighth of the run (2000 steps -> 250, as
  in the example), at least 1 and never more than the number of steps.
- ``training.ai_toolkit.overrides`` are merged last, relative to ``config.process[0]`` (where every
  training setting lives): dotted keys (``train.noise_offset: 0.1``, ``datasets.0.num_repeats: 2``)
  or nested mappings. Mappings merge key by key; anything else replaces. ``training_folder`` and
  ``save.push_to_hub`` are re-applied afterwards because the run directory contract needs them.
"""

from __future__ import annotations

import copy
from typing import Any

from remote.aitk_rules import AITK_FLOAT_FIRST, AITK_FLOAT_RE, fill_trigger

BASE_MODELS = {
    "flux-dev": "black-forest-labs/FLUX.1-dev",
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",
}
SCHNELL_ADAPTER = "ostris/FLUX.1-schnell-training-adapter"

# The fraction of the run between two saves / two sample events when the spec does not say.
EVENTS_PER_RUN = 8
# ai-toolkit's own default for logging.log_every; smaller runs log more often.
LOG_EVERY = 100


class OverrideError(ValueError):
    """An override key that cannot be applied; ``key`` is the key as the spec wrote it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"override {key!r}: {message}")
        self.key = key


def build_aitk_config(
    spec: dict[str, Any], *, dataset_dir: str, training_folder: str, device: str = "cuda:0"
) -> dict[str, Any]:
    """The ai-toolkit job dict for ``spec`` (a dumped RunSpec); ``dataset_dir`` is what it reads."""
    training = spec.get("training") or {}
    steps = int(training.get("steps", 2000))
    schnell = is_schnell(spec)
    process: dict[str, Any] = {
        "type": "sd_trainer",
        "training_folder": training_folder,
        "device": device,
    }
    trigger = spec.get("trigger_word")
    if trigger and (spec.get("captioning") or {}).get("insert_trigger", True):
        # ai-toolkit prepends this to every caption that lacks it (dataloader_mixins.py:392
        # get_caption); without it in the config, insert_trigger: false is true to its word.
        process["trigger_word"] = trigger
    rank = int(training.get("rank", 16))
    process["network"] = {
        "type": "lora",
        "linear": rank,
        # ai-toolkit saves Flux LoRAs in PEFT format and sets alpha = rank whatever is written
        # here (toolkit/lora_special.py:422-431, "no alpha for peft"); validate refuses another.
        "linear_alpha": rank,
    }
    process["save"] = {
        "dtype": "float16",
        "save_every": _every(training.get("save_every"), steps),
        "max_step_saves_to_keep": int(training.get("max_step_saves_to_keep", 4)),
        "push_to_hub": False,
    }
    process["datasets"] = [_dataset(spec.get("dataset") or {}, dataset_dir, training)]
    process["train"] = _train(training, steps)
    process["model"] = _model(spec, schnell)
    process["sample"] = _sample(training.get("sample") or {}, steps, schnell, trigger)
    wandb = spec.get("wandb") or {}
    if wandb.get("enabled"):
        process["logging"] = {
            "log_every": max(1, min(LOG_EVERY, steps // 20 or 1)),
            "use_wandb": True,
            "project_name": wandb.get("project") or "flux-remote",
            "run_name": wandb.get("run_name") or spec["name"],
        }

    overrides = (training.get("ai_toolkit") or {}).get("overrides") or {}
    apply_overrides(process, overrides)
    process["training_folder"] = training_folder
    process.setdefault("save", {})["push_to_hub"] = False

    return {
        "job": "extension",
        "config": {"name": spec["name"], "process": [process]},
        "meta": {"name": "[name]", "version": "1.0"},
    }


def dump_yaml(cfg: dict[str, Any]) -> str:
    """The YAML text ai-toolkit reads (keys in the example's order, block style).

    Strings that ai-toolkit's YAML loader would read as floats (``1e5``; toolkit/config.py:55-65)
    are quoted, so every string reaches it unchanged.
    """
    import yaml

    return yaml.dump(cfg, Dumper=_aitk_dumper(), sort_keys=False, default_flow_style=False,
                     allow_unicode=True, width=100)


def _aitk_dumper() -> type:
    """A SafeDumper that resolves plain scalars as ai-toolkit's loader does (so it quotes them)."""
    global _DUMPER
    if _DUMPER is None:
        import yaml

        class AitkDumper(yaml.SafeDumper):
            pass

        AitkDumper.add_implicit_resolver("tag:yaml.org,2002:float", AITK_FLOAT_RE,
                                         list(AITK_FLOAT_FIRST))
        _DUMPER = AitkDumper
    return _DUMPER


_DUMPER: type | None = None


def is_schnell(spec: dict[str, Any]) -> bool:
    base = spec.get("base_model", "flux-dev")
    if isinstance(base, dict):
        return base.get("variant") == "schnell"
    return base == "flux-schnell"


def base_model_path(spec: dict[str, Any]) -> str:
    base = spec.get("base_model", "flux-dev")
    if isinstance(base, dict):
        return str(base["name_or_path"])
    return BASE_MODELS[base]


def scaled_every(steps: int) -> int:
    """About ``steps / EVENTS_PER_RUN``, at least 1 and at most ``steps``."""
    return max(1, min(steps, round(steps / EVENTS_PER_RUN)))


def apply_overrides(target: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Merge ``overrides`` into ``target`` in place: dotted keys, nested mappings, list indices."""
    for key, value in overrides.items():
        parts = str(key).split(".")
        container: Any = target
        for part in parts[:-1]:
            container = _step_into(container, part, key)
        _merge_leaf(container, parts[-1], value, key)


def _step_into(container: Any, part: str, key: str) -> Any:
    if isinstance(container, list):
        index = _list_index(container, part, key)
        return container[index]
    if not isinstance(container, dict):
        raise OverrideError(key, f"{part!r} is inside a value that is not a mapping")
    child = container.get(part)
    if child is None:
        child = container[part] = {}
    elif not isinstance(child, (dict, list)):
        raise OverrideError(key, f"{part!r} holds {child!r}, not a mapping or list")
    return child


def _merge_leaf(container: Any, part: str, value: Any, key: str) -> None:
    if isinstance(container, list):
        container[_list_index(container, part, key)] = copy.deepcopy(value)
        return
    if not isinstance(container, dict):
        raise OverrideError(key, f"{part!r} is inside a value that is not a mapping")
    current = container.get(part)
    if isinstance(value, dict) and isinstance(current, dict):
        apply_overrides(current, value)
    else:
        container[part] = copy.deepcopy(value)


def _list_index(container: list[Any], part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(container):
        raise OverrideError(key, f"{part!r} is not an index of a {len(container)}-item list")
    return int(part)


def _every(value: Any, steps: int) -> int:
    if value is None:
        return scaled_every(steps)
    return max(1, min(steps, int(value)))


def _number(value: Any) -> int | float:
    number = float(value)
    return int(number) if number.is_integer() else number


def _dataset(dataset: dict[str, Any], dataset_dir: str, training: dict[str, Any]) -> dict[str, Any]:
    return {
        "folder_path": dataset_dir,
        "caption_ext": dataset.get("caption_ext", "txt"),
        "caption_dropout_rate": float(dataset.get("caption_dropout_rate", 0.05)),
        "shuffle_tokens": bool(dataset.get("shuffle_tokens", False)),
        "cache_latents_to_disk": bool(dataset.get("cache_latents_to_disk", True)),
        "resolution": [int(r) for r in training.get("resolutions", [512, 768, 1024])],
    }


def _train(training: dict[str, Any], steps: int) -> dict[str, Any]:
    train: dict[str, Any] = {
        "batch_size": int(training.get("batch_size", 1)),
        "steps": steps,
        # The key SDTrainer honours (config_modules.py:460); the legacy gradient_accumulation_steps
        # is undone by SDTrainer.hook_train_loop, which zeroes the gradients at every step
        # (SDTrainer.py:2249), so N-1 of N batches would be thrown away.
        "gradient_accumulation": int(training.get("gradient_accumulation_steps", 1)),
        "train_unet": True,
        "train_text_encoder": False,  # does not work with Flux
        "gradient_checkpointing": True,
        "noise_scheduler": "flowmatch",
        "optimizer": training.get("optimizer", "adamw8bit"),
        "lr": float(training.get("lr", 1e-4)),
        "ema_config": {"use_ema": True, "ema_decay": 0.99},
        "dtype": training.get("dtype", "bf16"),
    }
    if not (training.get("sample") or {}).get("enabled", True):
        train["skip_first_sample"] = True
        train["disable_sampling"] = True
    return train


def _model(spec: dict[str, Any], schnell: bool) -> dict[str, Any]:
    model: dict[str, Any] = {"name_or_path": base_model_path(spec)}
    if schnell:
        base = spec.get("base_model")
        adapter = base.get("assistant_lora_path") if isinstance(base, dict) else None
        model["assistant_lora_path"] = adapter or SCHNELL_ADAPTER
    model["is_flux"] = True
    model["quantize"] = bool((spec.get("training") or {}).get("quantize", True))
    return model


def _sample(sample: dict[str, Any], steps: int, schnell: bool,
            trigger: str | None) -> dict[str, Any]:
    enabled = sample.get("enabled", True)
    guidance = sample.get("guidance")
    sample_steps = sample.get("steps")
    return {
        "sampler": "flowmatch",  # must match train.noise_scheduler
        "sample_every": _every(sample.get("every"), steps) if enabled else steps,
        "sample_start_step": 0,
        "width": int(sample.get("width", 1024)),
        "height": int(sample.get("height", 1024)),
        # The prompts exactly as sampled: ai-toolkit only fills "[trigger]" when the config has a
        # trigger_word (BaseSDTrainProcess.py:326) and samples a literal "[trigger]" otherwise.
        "prompts": [fill_trigger(str(p), trigger) for p in sample.get("prompts") or []],
        "neg": "",  # not used by Flux
        "seed": int(sample.get("seed", 42)),
        "walk_seed": True,
        "guidance_scale": _number(guidance if guidance is not None else (1 if schnell else 4)),
        "sample_steps": int(sample_steps if sample_steps is not None else (4 if schnell else 20)),
    }
