"""The part of an ai-toolkit job YAML that the tiny trainer reads, with ai-toolkit's defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MIN_RES, MAX_RES = 32, 64  # the tiny network trains at the config's smallest resolution, clipped


class ConfigError(Exception):
    """The YAML is not an ai-toolkit job the tiny trainer can run."""


@dataclass
class TinyConfig:
    name: str
    training_folder: Path
    device: str
    rank: int
    alpha: float
    save_every: int
    max_step_saves_to_keep: int
    save_dtype: str
    folder_path: Path
    caption_ext: str
    caption_dropout_rate: float
    resolution: int
    steps: int
    lr: float
    batch_size: int
    trigger_word: str | None
    sampling: bool
    skip_first_sample: bool
    sample_every: int
    prompts: list[str] = field(default_factory=list)
    seed: int = 42
    walk_seed: bool = True
    sample_steps: int = 8
    meta_name: str = ""
    meta_version: str = "1.0"

    @property
    def output_dir(self) -> Path:
        return self.training_folder / self.name


def _section(proc: dict[str, Any], key: str) -> dict[str, Any]:
    value = proc.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"config.process[0].{key} must be a mapping")
    return value


def load_config(path: str | Path) -> TinyConfig:
    """Parse ``path``; raises :class:`ConfigError` when it is not an ai-toolkit job."""
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        cfg = doc["config"]
        name = str(cfg["name"])
        proc = cfg["process"][0]
        dataset = proc["datasets"][0]
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    except (KeyError, IndexError, TypeError) as exc:
        raise ConfigError(f"{path}: not an ai-toolkit job (missing {exc})") from exc
    network, save = _section(proc, "network"), _section(proc, "save")
    train, sample = _section(proc, "train"), _section(proc, "sample")
    resolutions = dataset.get("resolution") or [512]
    if not isinstance(resolutions, list):
        resolutions = [resolutions]
    rank = int(network.get("linear", 16))
    prompts = [str(p) for p in sample.get("prompts") or []]
    trigger = proc.get("trigger_word")
    if trigger:
        prompts = [p.replace("[trigger]", str(trigger)) for p in prompts]
    steps = int(train.get("steps", 1000))
    meta = doc.get("meta") or {}
    return TinyConfig(
        name=name,
        training_folder=Path(proc.get("training_folder", "output")),
        device=str(proc.get("device", "cpu")),
        rank=rank,
        alpha=float(network.get("linear_alpha", rank)),
        save_every=max(int(save.get("save_every", 250)), 1),
        max_step_saves_to_keep=max(int(save.get("max_step_saves_to_keep", 4)), 1),
        save_dtype=str(save.get("dtype", "float16")),
        folder_path=Path(dataset["folder_path"]),
        caption_ext=str(dataset.get("caption_ext", "txt")).lstrip("."),
        caption_dropout_rate=float(dataset.get("caption_dropout_rate", 0.0)),
        resolution=min(max(min(int(r) for r in resolutions), MIN_RES), MAX_RES),
        steps=steps,
        lr=float(train.get("lr", 1e-4)),
        batch_size=max(int(train.get("batch_size", 1)), 1),
        trigger_word=str(trigger) if trigger else None,
        sampling=bool(sample) and bool(prompts) and not train.get("disable_sampling", False),
        skip_first_sample=bool(train.get("skip_first_sample", False)),
        sample_every=max(int(sample.get("sample_every", steps)), 1),
        prompts=prompts,
        seed=int(sample.get("seed", 42)),
        walk_seed=bool(sample.get("walk_seed", True)),
        sample_steps=int(sample.get("sample_steps", 8)),
        meta_name=str(meta.get("name", "[name]")).replace("[name]", name),
        meta_version=str(meta.get("version", "1.0")),
    )
