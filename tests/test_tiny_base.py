"""The tiny trainer's base model is a real (small) generator, and the demo's LoRA visibly teaches
it the demo dataset's concept: the final samples are closer to the training images than the
samples at step 0, by a plain pixel distance. These fail if the demo regresses to noise."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from remote.trainers.model import BASE_WEIGHTS, build_base_model, load_dataset, sample_image
from tests.test_tiny_trainer import run_inprocess, write_job

ROOT = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((ROOT / "configs" / "demo-local.yaml").read_text(encoding="utf-8"))
DEMO_DATA = ROOT / "configs" / "demo-data"


def test_the_base_weights_are_shipped_small_and_loaded_frozen() -> None:
    from remote.trainers.lora import inject_lora, lora_parameters

    assert BASE_WEIGHTS.is_file() and BASE_WEIGHTS.stat().st_size < 3_000_000
    model = build_base_model()
    seeded = build_base_model(weights=None)
    weight = "blocks.0.conv1.weight"
    assert not torch.equal(model.state_dict()[weight], seeded.state_dict()[weight])
    inject_lora(model, 4, 4)
    trainable = {id(p) for p in lora_parameters(model)}
    assert all(id(p) in trainable for p in model.parameters() if p.requires_grad)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".base." in n)


def _rgb(image: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    return np.asarray(image.crop(box), dtype=np.float32).reshape(-1, 3).mean(axis=0)


def test_the_base_draws_what_the_prompt_asks_for() -> None:
    """Not noise: the background takes the prompt's colour, and a red circle on blue is red in
    the middle and blue in the corners (the small base draws colours surely, shapes roughly)."""
    model = build_base_model().eval()
    cpu = torch.device("cpu")
    corner_boxes = ((0, 0, 6, 6), (58, 0, 64, 6), (0, 58, 6, 64), (58, 58, 64, 64))
    looks = {}
    for prompt in ("a red circle on a blue background", "a blue square on a red background"):
        image = sample_image(model, prompt, 64, 8, seed=1, device=cpu)
        corners = np.mean([_rgb(image, box) for box in corner_boxes], axis=0)
        looks[prompt] = _rgb(image, (24, 24, 40, 40)), corners
    middle, corners = looks["a red circle on a blue background"]
    assert middle[0] > middle[2] + 60 and corners[2] > corners[0] + 60, looks
    _, corners = looks["a blue square on a red background"]
    assert corners[0] > corners[2] + 60, looks


def _nearest_distance(sample: Path, training: np.ndarray) -> float:
    """Mean absolute pixel difference (0-255) to the closest training image."""
    with Image.open(sample) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    return float(np.abs(training - pixels[None]).mean(axis=(1, 2, 3)).min())


def test_the_demo_lora_moves_the_samples_to_the_trained_concept(tmp_path: Path, capsys) -> None:
    """configs/demo-local.yaml's training on configs/demo-data/, its prompts and trigger."""
    training = DEMO["training"]
    config = write_job(tmp_path, steps=training["steps"], save_every=training["save_every"],
                       sample_every=training["sample"]["every"], rank=training["rank"],
                       alpha=training["rank"], resolution=training["resolutions"][0],
                       dataset=DEMO_DATA, lr=training["lr"],
                       train_extra={"batch_size": training["batch_size"]})
    job = yaml.safe_load(config.read_text())
    process = job["config"]["process"][0]
    process["trigger_word"] = DEMO["trigger_word"]
    process["sample"].update(prompts=training["sample"]["prompts"],
                             sample_steps=training["sample"]["steps"])
    config.write_text(yaml.safe_dump(job, sort_keys=False))
    rc, log = run_inprocess(config, capsys)
    assert rc == 0, log

    images, _ = load_dataset(DEMO_DATA, 64, "txt", None)
    training_pixels = ((images.permute(0, 2, 3, 1).numpy() + 1) * 127.5)
    samples = {re.search(r"__(\d{9})_(\d)\.jpg$", p.name).groups(): p
               for p in (tmp_path / "output" / "demo" / "samples").iterdir()}
    final = f"{training['steps']:09d}"
    before = [_nearest_distance(samples[("000000000", str(i))], training_pixels) for i in (0, 1)]
    after = [_nearest_distance(samples[(final, str(i))], training_pixels) for i in (0, 1)]
    assert np.mean(after) < 0.75 * np.mean(before), (before, after)
