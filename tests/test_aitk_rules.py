"""The config trains what the spec says, as ai-toolkit reads it at the pinned commit (issue 15).

Each test names the ai-toolkit behaviour it holds us to; the facts behind them are in
``tests/data/aitk/`` (see ``test_aitk_conformance.py``).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from controller.spec.model import RunSpec
from remote.aitk_config import build_aitk_config, dump_yaml
from remote.aitk_rules import AITK_FLOAT_FIRST, AITK_FLOAT_RE, optimizer_problem, override_problems


def _spec(**fields: Any) -> dict[str, Any]:
    data = {"name": "my_lora", "dataset": {"path": "/data"}, "budget": {"max_usd": 5}, **fields}
    return RunSpec.model_validate(data).model_dump(mode="json")


def _process(spec: dict[str, Any]) -> dict[str, Any]:
    return build_aitk_config(spec, dataset_dir="/ds", training_folder="/out")["config"]["process"][0]


def aitk_load(text: str) -> Any:
    """Parse ``text`` as ai-toolkit's loader does: SafeLoader plus its float resolver
    (toolkit/config.py:55-65)."""
    class FixedLoader(yaml.SafeLoader):
        pass

    FixedLoader.add_implicit_resolver("tag:yaml.org,2002:float", AITK_FLOAT_RE,
                                      list(AITK_FLOAT_FIRST))
    return yaml.load(text, Loader=FixedLoader)


def test_gradient_accumulation_renders_the_key_sdtrainer_honours() -> None:
    """SDTrainer.hook_train_loop zeroes the gradients at every step (SDTrainer.py:2249): the
    legacy ``gradient_accumulation_steps`` throws N-1 of N batches away. ``gradient_accumulation``
    (config_modules.py:460) gathers N batches per step (BaseSDTrainProcess.py:2565)."""
    train = _process(_spec(training={"gradient_accumulation_steps": 4}))["train"]
    assert train["gradient_accumulation"] == 4
    assert "gradient_accumulation_steps" not in train


def test_alpha_is_the_rank_in_the_config() -> None:
    """ai-toolkit sets alpha = rank for Flux (lora_special.py:428-431); the config says so."""
    network = _process(_spec(training={"rank": 32, "alpha": 32}))["network"]
    assert network["linear_alpha"] == network["linear"] == 32
    assert _process(_spec(training={"rank": 8}))["network"]["linear_alpha"] == 8


def test_alpha_other_than_rank_is_refused() -> None:
    with pytest.raises(ValueError, match="alpha = rank"):
        _spec(training={"rank": 16, "alpha": 8})


def test_insert_trigger_false_keeps_the_trigger_word_away_from_ai_toolkit() -> None:
    """With ``trigger_word`` in the config, ai-toolkit prepends it to every caption that lacks it
    (dataloader_mixins.py:392-394 get_caption); ``insert_trigger: false`` must leave it out."""
    on = _process(_spec(trigger_word="p3r5on"))
    off = _process(_spec(trigger_word="p3r5on", captioning={"insert_trigger": False}))
    assert on["trigger_word"] == "p3r5on"
    assert "trigger_word" not in off
    # the sample prompts still show the subject: the trigger word is written into them
    assert off["sample"]["prompts"] == on["sample"]["prompts"]
    assert all(p.startswith("p3r5on ") for p in off["sample"]["prompts"])


def test_without_a_trigger_word_no_prompt_samples_a_literal_placeholder() -> None:
    """ai-toolkit only fills ``[trigger]`` when the config has a trigger word
    (BaseSDTrainProcess.py:326); otherwise it samples the placeholder as text."""
    prompts = _process(_spec(training={"sample": {"prompts": [
        "[trigger] portrait, natural light", "a [trigger], in a cafe", "no placeholder"]}}))[
        "sample"]["prompts"]
    assert prompts == ["portrait, natural light", "a, in a cafe", "no placeholder"]
    assert not any("[trigger]" in p for p in prompts)


def test_the_model_card_shows_the_prompts_really_sampled() -> None:
    from remote.publish.model_card import fill_trigger, render_model_card

    for trigger in (None, "p3r5on"):
        spec = _spec(trigger_word=trigger) if trigger else _spec()
        sampled = _process(spec)["sample"]["prompts"]
        shown = [fill_trigger(p, trigger) for p in sampled]  # what the bundle puts in the card
        assert shown == sampled
        card = render_model_card(spec, lora_file="x.safetensors", receipt={},
                                 widget=[(shown[0], "samples/a.jpg")])
        assert f"text: {sampled[0]}" in card and "[trigger]" not in card


@pytest.mark.parametrize("field, value", [
    ("name", "2e3"), ("trigger_word", "1e5"), ("trigger_word", "1.0e5"), ("prompt", "3e4"),
    ("trigger_word", "1_000"), ("prompt", "1:30.5"), ("prompt", ".5e+3"),
])
def test_float_like_strings_reach_ai_toolkit_as_strings(field: str, value: str) -> None:
    """ai-toolkit's YAML loader reads unquoted ``1e5`` as a float (toolkit/config.py:55-65): a
    run named ``2e3`` crashed after the paid setup. The dump quotes what that loader would
    resolve."""
    if field == "prompt":
        spec = _spec(training={"sample": {"prompts": [value]}})
    else:
        spec = _spec(**{field: value})
    cfg = build_aitk_config(spec, dataset_dir="/ds", training_folder="/out")
    loaded = aitk_load(dump_yaml(cfg))
    assert loaded == cfg
    process = loaded["config"]["process"][0]
    got = {"name": loaded["config"]["name"], "trigger_word": process.get("trigger_word"),
           "prompt": process["sample"]["prompts"][0]}[field]
    assert got == value and isinstance(got, str)


@pytest.mark.parametrize("name, accepted", [
    ("adamw8bit", True), ("AdamW8bit", True), ("adamw", True), ("adafactor", True),
    ("prodigy", True), ("prodigy8bit", True), ("lion8bit", True), ("automagic", True),
    ("adamw9bit", False), ("sgd", False), ("lion", False), ("dadaptation", False),
    ("dadaptationadam", False), ("", False),
])
def test_optimizer_names_follow_get_optimizer(name: str, accepted: bool) -> None:
    assert (optimizer_problem(name) is None) is accepted


def test_override_problems_name_the_key_as_written() -> None:
    problems = override_problems({
        "train.noise_scheduler": "flowmatch",
        "train": {"optimizer": "sgd"},
        "sample.prompts": ["fine", "cut --h 512"],
        "model.dtype": "bf16",
        "logging": {"run_name": "${WANDB_API_KEY}"},
    })
    keys = [key for key, _ in problems]
    assert keys == ["train", "sample.prompts", "logging"]
    assert re.search(r"'sgd' is not an optimizer", problems[0][1])
