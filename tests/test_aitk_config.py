"""The generated ai-toolkit config against ai-toolkit's own Flux examples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.spec.model import RunSpec
from remote.aitk_config import OverrideError, apply_overrides, build_aitk_config, dump_yaml, scaled_every

REFERENCE = Path(__file__).parent / "data" / "reference" / "ai-toolkit"
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


LEGACY_ACCUMULATION = "config.process[0].train.gradient_accumulation_steps"


def _spec(**fields: Any) -> dict[str, Any]:
    data = {"name": "my_lora", "dataset": {"path": "/data"}, "budget": {"max_usd": 5}, **fields}
    return RunSpec.model_validate(data).model_dump(mode="json")


def _build(spec: dict[str, Any]) -> dict[str, Any]:
    return build_aitk_config(spec, dataset_dir="/ds", training_folder="/out")


def key_paths(node: Any, prefix: str = "") -> set[str]:
    """Every key path in a config; lists of mappings are indexed, lists of scalars are leaves."""
    paths = set()
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            paths.add(path)
            paths |= key_paths(value, path)
    elif isinstance(node, list) and node and all(isinstance(item, dict) for item in node):
        for index, item in enumerate(node):
            paths |= key_paths(item, f"{prefix}[{index}]")
    return paths


def _render(config_name: str) -> dict[str, Any]:
    from controller.cli.spec_cmds import render_config
    from controller.spec.loader import load_spec

    # the rendered YAML text, parsed back: what ai-toolkit itself would read
    return yaml.safe_load(dump_yaml(render_config(load_spec(CONFIGS / config_name))))


@pytest.mark.parametrize("config_name, reference", [
    ("flux-dev-vast.yaml", "train_lora_flux_24gb.yaml"),
    ("flux-schnell-vast.yaml", "train_lora_flux_schnell_24gb.yaml"),
])
def test_render_has_every_reference_key_with_the_same_nesting(config_name: str, reference: str) -> None:
    ref = yaml.safe_load((REFERENCE / reference).read_text())
    rendered = _render(config_name)
    # the example's legacy key is replaced by the one SDTrainer honours (test below)
    missing = key_paths(ref) - key_paths(rendered) - {LEGACY_ACCUMULATION}
    assert not missing, f"keys of the reference missing from the render: {sorted(missing)}"
    # and no mapping became a scalar or the other way round
    for path in key_paths(ref) - {LEGACY_ACCUMULATION}:
        assert type(_get(ref, path)) is type(_get(rendered, path)) or _numbers(ref, rendered, path), path


def test_defaults_reproduce_the_reference_values() -> None:
    """A spec left at its defaults trains what ai-toolkit's example trains."""
    ref = yaml.safe_load((REFERENCE / "train_lora_flux_24gb.yaml").read_text())
    cfg = _build(_spec())
    differs_on_purpose = {"config.name", "config.process[0].training_folder",
                          "config.process[0].datasets[0].folder_path", "config.process[0].sample.prompts"}
    for path in key_paths(ref) - differs_on_purpose - {LEGACY_ACCUMULATION}:
        want, got = _get(ref, path), _get(cfg, path)
        if isinstance(want, dict) or (isinstance(want, list) and isinstance(want[0], dict)):
            continue  # a container: its leaves are checked one by one
        if path.endswith(".lr"):  # PyYAML reads the example's `1e-4` as a string
            want = float(want)
        assert got == want, path


def test_schnell_uses_adapter_guidance_1_and_4_steps() -> None:
    ref = yaml.safe_load((REFERENCE / "train_lora_flux_schnell_24gb.yaml").read_text())
    process = _build(_spec(base_model="flux-schnell"))["config"]["process"][0]
    ref_process = ref["config"]["process"][0]
    assert process["model"] == ref_process["model"]
    assert process["sample"]["guidance_scale"] == 1
    assert process["sample"]["sample_steps"] == 4


def test_our_fields_reach_ai_toolkit() -> None:
    spec = _spec(
        trigger_word="p3r5on",
        dataset={"path": "/data", "caption_ext": "caption", "caption_dropout_rate": 0.1},
        training={"steps": 400, "lr": 4e-4, "rank": 32, "alpha": 32, "resolutions": [512, 1024],
                  "optimizer": "prodigy", "dtype": "fp16", "quantize": False, "batch_size": 2,
                  "sample": {"prompts": ["[trigger] at sea"], "seed": 7, "width": 768}},
    )
    process = build_aitk_config(spec, dataset_dir="/ds", training_folder="/out", device="cuda:1")[
        "config"]["process"][0]
    assert process["device"] == "cuda:1"
    assert process["trigger_word"] == "p3r5on"
    assert process["network"] == {"type": "lora", "linear": 32, "linear_alpha": 32}
    assert process["datasets"][0]["folder_path"] == "/ds"
    assert process["datasets"][0]["caption_ext"] == "caption"
    assert process["datasets"][0]["caption_dropout_rate"] == 0.1
    assert process["datasets"][0]["resolution"] == [512, 1024]
    train = process["train"]
    assert (train["steps"], train["lr"], train["optimizer"], train["dtype"], train["batch_size"]) == (
        400, 4e-4, "prodigy", "fp16", 2)
    assert process["model"]["quantize"] is False
    assert process["sample"]["prompts"] == ["p3r5on at sea"]  # as sampled
    assert (process["sample"]["seed"], process["sample"]["width"]) == (7, 768)
    assert "logging" not in process


@pytest.mark.parametrize("steps, every", [(2000, 250), (80, 10), (10, 1), (4, 1), (1, 1), (12, 2)])
def test_save_and_sample_every_scale_with_the_run(steps: int, every: int) -> None:
    assert scaled_every(steps) == every
    process = _build(_spec(training={"steps": steps}))["config"]["process"][0]
    assert process["save"]["save_every"] == every
    assert process["sample"]["sample_every"] == every


def test_explicit_every_is_kept_but_never_past_the_last_step() -> None:
    process = _build(_spec(training={"steps": 100, "save_every": 30, "sample": {"every": 500}}))[
        "config"]["process"][0]
    assert process["save"]["save_every"] == 30
    assert process["sample"]["sample_every"] == 100


def test_disabled_sampling() -> None:
    train = _build(_spec(training={"sample": {"enabled": False}}))["config"]["process"][0]["train"]
    assert train["disable_sampling"] is True
    assert train["skip_first_sample"] is True


def test_wandb_becomes_ai_toolkit_logging() -> None:
    process = _build(_spec(wandb={"enabled": True, "project": "loras"}))["config"]["process"][0]
    assert process["logging"] == {"log_every": 100, "use_wandb": True, "project_name": "loras",
                                  "run_name": "my_lora"}


def test_custom_schnell_model_keeps_its_adapter() -> None:
    spec = _spec(base_model={"name_or_path": "/models/schnell", "variant": "schnell",
                             "assistant_lora_path": "/models/adapter"})
    model = _build(spec)["config"]["process"][0]["model"]
    assert model["name_or_path"] == "/models/schnell"
    assert model["assistant_lora_path"] == "/models/adapter"


def test_overrides_merge_last_relative_to_the_process() -> None:
    spec = _spec(training={"ai_toolkit": {"overrides": {
        "train.noise_offset": 0.1,
        "datasets.0.num_repeats": 3,
        "sample": {"walk_seed": False, "guidance_scale": 3.5},
        "save.push_to_hub": True,
        "training_folder": "/elsewhere",
    }}})
    process = _build(spec)["config"]["process"][0]
    assert process["train"]["noise_offset"] == 0.1
    assert process["train"]["lr"] == 1e-4  # merged, not replaced
    assert process["datasets"][0]["num_repeats"] == 3
    assert process["sample"]["walk_seed"] is False and process["sample"]["guidance_scale"] == 3.5
    assert process["sample"]["sample_steps"] == 20
    assert process["save"]["push_to_hub"] is False  # publishing is ours; theirs hangs headless
    assert process["training_folder"] == "/out"  # the run directory contract


def test_bad_override_paths_raise() -> None:
    target: dict[str, Any] = {"datasets": [{"folder_path": "/x"}], "device": "cpu"}
    with pytest.raises(OverrideError, match="not an index"):
        apply_overrides(target, {"datasets.1.num_repeats": 2})
    with pytest.raises(OverrideError, match="not a mapping or list"):
        apply_overrides(target, {"device.index": 2})
    with pytest.raises(OverrideError, match="not a mapping"):
        apply_overrides(target, {"datasets.0.folder_path.x": 2})


def test_dump_yaml_round_trips_in_the_example_order() -> None:
    cfg = _build(_spec())
    text = dump_yaml(cfg)
    assert yaml.safe_load(text) == cfg
    assert text.startswith("job: extension\nconfig:\n  name: my_lora\n")


def test_the_generator_needs_neither_pydantic_nor_controller() -> None:
    code = ("import sys, remote.aitk_config as a; "
            "a.build_aitk_config({'name': 'x'}, dataset_dir='/d', training_folder='/o'); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('controller', 'pydantic')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def _get(node: Any, path: str) -> Any:
    for part in path.replace("[", ".[").split("."):
        node = node[int(part[1:-1])] if part.startswith("[") else node[part]
    return node


def _numbers(ref: Any, rendered: Any, path: str) -> bool:
    kinds = (int, float, str)  # `lr: 1e-4` is a str to PyYAML, a float in ours
    return isinstance(_get(ref, path), kinds) and isinstance(_get(rendered, path), kinds)
