"""Malformed specs: each one fails with FILE:LINE:COL: field.path: what is wrong.

In each case the line the error must point at carries the marker ``#<``; the test finds it, so the
expected line number is written next to the YAML it belongs to.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from controller.errors import SpecError
from controller.spec.loader import load_file, load_spec

HF_SECRET = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123"
HEX40 = "0123456789abcdef" * 2 + "01234567"

CASES = {
    "wrong type": ("""\
name: ok
dataset: {path: data}
training:
  steps: many   #<
budget: {max_usd: 5}
""", "training.steps", "valid integer"),
    "unknown top-level key, did you mean": ("""\
name: ok
trigger_wrd: p3r5on   #<
dataset: {path: data}
budget: {max_usd: 5}
""", "trigger_wrd", "did you mean 'trigger_word'?"),
    "unknown nested key, did you mean": ("""\
name: ok
dataset: {path: data}
training:
  steps: 100
  lrr: 0.001   #<
budget: {max_usd: 5}
""", "training.lrr", "did you mean 'lr'?"),
    "missing required section": ("""\
name: ok   #<
dataset: {path: data}
""", "budget", "required field is missing"),
    "missing required field points at its parent": ("""\
name: ok
dataset: {path: data}
budget:
  max_hours: 3   #<
""", "budget.max_usd", "required field is missing"),
    "bad enum value": ("""\
name: ok
dataset: {path: data}
budget: {max_usd: 5}
provider:
  type: aws   #<
""", "provider.type", "'vast', 'ssh' or 'local'"),
    "a bandwidth URL that is not http(s)": ("""\
name: ok
dataset: {path: data}
budget: {max_usd: 5}
gpu:
  bandwidth_check_url: ftp://mirror/blob   #<
""", "gpu.bandwidth_check_url", "must be an http(s) URL"),
    "bad trainer": ("""\
name: ok
dataset: {path: data}
training:
  trainer: kohya   #<
budget: {max_usd: 5}
""", "training.trainer", "'ai-toolkit' or 'tiny'"),
    "negative budget": ("""\
name: ok
dataset: {path: data}
budget:
  max_usd: -5   #<
""", "budget.max_usd", "greater than 0"),
    "path traversal in the name": ("""\
name: ../x   #<
dataset: {path: data}
budget: {max_usd: 5}
""", "name", "letters, digits"),
    "space in the name": ("""\
name: a b   #<
dataset: {path: data}
budget: {max_usd: 5}
""", "name", "letters, digits"),
    "a secret key": ("""\
name: ok
dataset: {path: data}
budget: {max_usd: 5}
publish:
  hf_token: abc   #<
""", "publish.hf_token", "HF_TOKEN"),
    "a token as a value": (f"""\
name: ok
trigger_word: {HF_SECRET}   #<
dataset: {{path: data}}
budget: {{max_usd: 5}}
""", "trigger_word", "HF_TOKEN"),
    "a wandb key as a value": (f"""\
name: ok
dataset: {{path: data}}
budget: {{max_usd: 5}}
wandb:
  entity: {HEX40}   #<
""", "wandb.entity", "WANDB_API_KEY"),
    "bad YAML": ("""\
name: ok
dataset: {path: data
budget: {max_usd: 5}   #<
""", "(yaml)", "invalid YAML"),
    "missing dataset folder": ("""\
name: ok
dataset:
  path: nowhere   #<
budget: {max_usd: 5}
""", "dataset.path", "no such folder"),
    "empty dataset folder": ("""\
name: ok
dataset:
  path: empty   #<
budget: {max_usd: 5}
""", "dataset.path", "holds no images"),
    "sweep over an unknown key": ("""\
batch:
  max_usd: 10
  sweep:
    training.rnk: [8, 16]   #<
name: ok
dataset: {path: data}
budget: {max_usd: 5}
""", "batch.sweep.training.rnk", "did you mean 'rank'?"),
    "resolution not a multiple of 16": ("""\
name: ok
dataset: {path: data}
training:
  resolutions: [512, 700]   #<
budget: {max_usd: 5}
""", "training.resolutions", "multiple of 16"),
    "custom base model without name_or_path": ("""\
name: ok
base_model:
  variant: schnell   #<
dataset: {path: data}
budget: {max_usd: 5}
""", "base_model.name_or_path", "required field is missing"),
    "unknown base model": ("""\
name: ok
base_model: flux-pro   #<
dataset: {path: data}
budget: {max_usd: 5}
""", "base_model", "'flux-dev' or 'flux-schnell'"),
    "ssh provider without host": ("""\
name: ok
dataset: {path: data}
budget: {max_usd: 5}
provider:
  type: ssh   #<
""", "provider", "needs `host`"),
    "batch run override of the wrong type": ("""\
batch:
  max_usd: 10
  runs:
    - training.steps: 100
    - training.steps: lots   #<
name: ok
dataset: {path: data}
budget: {max_usd: 5}
""", "training.steps", "valid integer"),
    "batch with both runs and sweep": ("""\
batch:
  max_usd: 10   #<
  runs: [{training.steps: 100}]
  sweep: {training.rank: [4, 8]}
name: ok
dataset: {path: data}
budget: {max_usd: 5}
""", "batch", "exactly one of"),
    "key given twice": ("""\
name: ok
dataset: {path: data}
budget: {max_usd: 5}
name: again   #<
""", "name", "given twice"),
    "override into a list index that does not exist": ("""\
name: ok
dataset: {path: data}
training:
  ai_toolkit:
    overrides:
      datasets.3.num_repeats: 2   #<
budget: {max_usd: 5}
""", "training.ai_toolkit.overrides", "is not an index"),
    "the file is a list, not a mapping": ("""\
- name: ok   #<
""", "(root)", "mapping of keys"),
    # ai-toolkit at the pinned commit (issue 15): settings it would ignore or reject after setup
    "alpha other than the rank (ai-toolkit sets alpha = rank for Flux)": ("""\
name: ok
dataset: {path: data}
training:
  rank: 16
  alpha: 8   #<
budget: {max_usd: 5}
""", "training.alpha", "sets alpha = rank"),
    "a sweep over alpha would run identical trainings": ("""\
batch:
  max_usd: 10
  sweep:
    training.alpha: [8, 16]   #<
name: ok
dataset: {path: data}
budget: {max_usd: 5}
""", "batch.sweep.training.alpha", "identical trainings"),
    "a batch run whose alpha differs from its rank": ("""\
batch:
  max_usd: 10
  runs:
    - {training.rank: 16}
    - {training.rank: 32, training.alpha: 16}   #<
name: ok
dataset: {path: data}
budget: {max_usd: 5}
""", "training.alpha", "sets alpha = rank"),
    "an optimizer ai-toolkit does not know": ("""\
name: ok
dataset: {path: data}
training:
  optimizer: adamw9bit   #<
budget: {max_usd: 5}
""", "training.optimizer", "not an optimizer ai-toolkit knows"),
    "an optimizer whose package ai-toolkit does not install": ("""\
name: ok
dataset: {path: data}
training:
  optimizer: DAdaptationAdam   #<
budget: {max_usd: 5}
""", "training.optimizer", "requirements do not install"),
    "${VAR} in a sample prompt (ai-toolkit substitutes the environment)": ("""\
name: ok
dataset: {path: data}
training:
  sample:
    prompts:
      - a portrait
      - "${HF_TOKEN} portrait"   #<
budget: {max_usd: 5}
""", "training.sample.prompts[1]", "environment variable HF_TOKEN"),
    "[name] in a sample prompt (ai-toolkit replaces it with the run name)": ("""\
name: ok
dataset: {path: data}
training:
  sample:
    prompts: ["[name] at sea"]   #<
budget: {max_usd: 5}
""", "training.sample.prompts[0]", "replaced by ai-toolkit with the run name"),
    "-- in a sample prompt (ai-toolkit cuts the prompt there)": ("""\
name: ok
dataset: {path: data}
training:
  sample:
    prompts:
      - "[trigger] portrait --w 512"   #<
budget: {max_usd: 5}
""", "training.sample.prompts[0]", "cuts sample prompts at '--'"),
    "[name] in the caption template (ai-toolkit replaces it in captions)": ("""\
name: ok
dataset: {path: data}
captioning:
  template: "a photo of [name]"   #<
budget: {max_usd: 5}
""", "captioning.template", "replaces '[name]' in every caption"),
    "${VAR} in the trigger word": ("""\
name: ok
trigger_word: "${USER}"   #<
dataset: {path: data}
budget: {max_usd: 5}
""", "trigger_word", "environment variable USER"),
    "${VAR} in the W&B project": ("""\
name: ok
dataset: {path: data}
budget: {max_usd: 5}
wandb:
  enabled: true
  project: "loras-${USER}"   #<
""", "wandb.project", "environment variable USER"),
    "${VAR} in an override value": ("""\
name: ok
dataset: {path: data}
training:
  ai_toolkit:
    overrides:
      model.name_or_path: "${MODEL}"   #<
budget: {max_usd: 5}
""", "training.ai_toolkit.overrides", "environment variable MODEL"),
    "an override naming a scheduler ai-toolkit does not know": ("""\
name: ok
dataset: {path: data}
training:
  ai_toolkit:
    overrides:
      train.noise_scheduler: flowmatching   #<
budget: {max_usd: 5}
""", "training.ai_toolkit.overrides", "not a scheduler ai-toolkit knows"),
    "an override sampling Flux with a non-flow-matching scheduler": ("""\
name: ok
dataset: {path: data}
training:
  ai_toolkit:
    overrides:
      sample: {sampler: ddpm}   #<
budget: {max_usd: 5}
""", "training.ai_toolkit.overrides", "'flowmatch' only"),
    "an override naming a dtype ai-toolkit does not know": ("""\
name: ok
dataset: {path: data}
training:
  ai_toolkit:
    overrides:
      train.dtype: bfloat   #<
budget: {max_usd: 5}
""", "training.ai_toolkit.overrides", "not a dtype ai-toolkit knows"),
    "an override setting ai-toolkit's legacy accumulation key": ("""\
name: ok
dataset: {path: data}
training:
  ai_toolkit:
    overrides:
      train.gradient_accumulation_steps: 4   #<
budget: {max_usd: 5}
""", "training.ai_toolkit.overrides", "rendered as train.gradient_accumulation"),
    "an override naming an unknown optimizer": ("""\
name: ok
dataset: {path: data}
training:
  ai_toolkit:
    overrides:
      train: {optimizer: sgd}   #<
budget: {max_usd: 5}
""", "training.ai_toolkit.overrides", "not an optimizer ai-toolkit knows"),
}


@pytest.fixture
def spec_dir(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "data" / "a.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    return tmp_path


def _expected_line(text: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if "#<" in line)


@pytest.mark.parametrize("text, field, what", CASES.values(), ids=list(CASES))
def test_malformed_spec_is_located(spec_dir: Path, text: str, field: str, what: str) -> None:
    path = spec_dir / "run.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_file(path)
    line = _expected_line(text)
    wanted = re.compile(rf"^{re.escape(str(path))}:{line}:\d+: {re.escape(field)}: .*{re.escape(what)}")
    assert any(wanted.search(problem) for problem in info.value.problems), info.value.problems
    assert info.value.exit_code == 2


def test_every_problem_is_reported_at_once(spec_dir: Path) -> None:
    path = spec_dir / "run.yaml"
    path.write_text("name: a b\ndataset: {path: data}\ntraining: {steps: 0, rank: x}\n"
                    "budget: {max_usd: -1}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    fields = [problem.split(": ")[1] for problem in info.value.problems]
    assert fields == ["name", "training.steps", "training.rank", "budget.max_usd"]


def test_secret_values_are_never_echoed(spec_dir: Path) -> None:
    path = spec_dir / "run.yaml"
    path.write_text(f"name: ok\ntrigger_word: {HF_SECRET}\ndataset: {{path: data}}\n"
                    f"budget: {{max_usd: 5}}\nwandb: {{project: {HEX40}}}\n")
    with pytest.raises(SpecError) as info:
        load_file(path)
    text = str(info.value)
    assert HF_SECRET not in text and HEX40 not in text
    assert "hf_A…" in text


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"nope\.yaml: \(file\): no such file"):
        load_file(tmp_path / "nope.yaml")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("# nothing yet\n")
    with pytest.raises(SpecError, match=r"run\.yaml:1:1: \(root\): .*an empty file"):
        load_file(path)
