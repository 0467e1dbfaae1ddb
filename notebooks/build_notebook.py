"""Write ``flux-lora-vastai.ipynb`` from the cells below: ``python notebooks/build_notebook.py``.

The notebook is generated so that it stays reviewable (this file diffs like code) and is always
committed without outputs. Cell ids are fixed, so rebuilding an unchanged notebook rewrites the
same bytes; ``tests/test_notebook.py`` checks that the committed file matches this script.

The notebook has no logic of its own: it turns the parameter cell into a run spec and calls the
same controller functions as ``flux-remote launch``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

NOTEBOOK = Path(__file__).resolve().with_name("flux-lora-vastai.ipynb")

CELLS: list[tuple[str, str, str]] = []  # (id, kind, source)


def md(cell_id: str, text: str) -> None:
    CELLS.append((cell_id, "markdown", text.strip("\n")))


def code(cell_id: str, text: str) -> None:
    CELLS.append((cell_id, "code", text.strip("\n")))


md("objective", """
# Train a Flux LoRA on a rented Vast.ai GPU

This notebook trains a [Flux](https://github.com/black-forest-labs/flux) LoRA with
[ai-toolkit](https://github.com/ostris/ai-toolkit) on the cheapest Vast.ai GPU that fits your
budget, from your laptop: it plans, rents, ships your images, runs the whole pipeline on the
instance (checks, install, captions, quality gate, training, validation, bundle), shows progress
and spend, brings the verified bundle home and destroys the instance. Nothing is left billing.

It is a front end to `flux-remote`: every cell calls the same Python functions as the
`flux-remote` command line, so a run started here can be followed, stopped or resumed from a
terminal (`flux-remote ls`, `status`, `stop`, `resume`) and the other way round.

With `PROVIDER = "local"` (the default) it runs top to bottom on this machine in a minute or two,
with the `tiny` trainer (a real, small LoRA fit on the CPU) and the bundled demo images. Set
`PROVIDER = "vast"` for the real thing; nothing else has to change.
""")

md("prerequisites", """
## Prerequisites

* `pip install -e .` in the flux-remote checkout (this kernel must import `controller`).
* For `PROVIDER = "local"`: nothing else.
* For `PROVIDER = "vast"`:
  * a Vast.ai account with credit, and its API key in `VAST_API_KEY` or in
    `~/.config/vastai/vast_api_key` (what `vastai set api-key` writes);
  * `ssh` and `rsync` on this machine;
  * for `flux-dev`: accept the license of `black-forest-labs/FLUX.1-dev` on Hugging Face and set
    `HF_TOKEN` (read access) before starting Jupyter;
  * your images in a folder, with optional `.txt` captions beside them.
* Optional: `WANDB_API_KEY` to log to Weights & Biases, `HF_TOKEN` with write access to publish.

Secrets are read from the environment only: never type them into this notebook.
""")

md("parameters-intro", """
## Parameters

Every control is in the next cell. The values that differ between the demo and a real run are
written as `... if PROVIDER == "local" else ...`.
""")

code("parameters", '''
import os
from pathlib import Path

PROVIDER = "local"  # "local": tiny CPU trainer on this machine (demo) | "vast": rent a GPU on Vast.ai
LOCAL = PROVIDER == "local"

# what to train
RUN_NAME = "demo-local" if LOCAL else "my-flux-lora"  # letters, digits, - and _
DATASET = Path("../configs/demo-data")  # your images (+ optional .txt captions); never modified
TRIGGER_WORD = "d3m0"  # the word that calls up your subject in prompts
BASE_MODEL = "flux-dev"  # "flux-dev" (gated: license + HF_TOKEN) or "flux-schnell"
CAPTIONING = "template"  # "keep" | "template" | "model" (an image-to-text model on the GPU)
CAPTION_TEMPLATE = "a picture of [trigger], simple shapes"  # for images without a caption
CAPTION_MODEL = "Salesforce/blip-image-captioning-large"  # used by CAPTIONING = "model"

# the quality gate: checked on this machine before renting, and again on the instance
QUALITY_GATE = True  # refuse to train on a dataset that fails the gate
MIN_IMAGES = 5
MIN_SHORT_SIDE = 64 if LOCAL else 256  # pixels
ALLOW_NSFW = True  # only enforced with a quality_gate.nsfw_model in a spec file

# training
STEPS = 80 if LOCAL else 2000
LEARNING_RATE = 1e-3 if LOCAL else 1e-4
RANK = 4 if LOCAL else 16
RESOLUTIONS = [64] if LOCAL else [512, 768, 1024]
OPTIMIZER = "adamw" if LOCAL else "adamw8bit"
DTYPE = "fp32" if LOCAL else "bf16"
QUANTIZE = not LOCAL  # 8-bit base weights: Flux fits in 24 GB
SAVE_EVERY = 20 if LOCAL else 250  # steps between checkpoints
SAMPLE_EVERY = 40 if LOCAL else 250  # steps between sample images
SAMPLE_PROMPTS = (["[trigger] red circle", "[trigger] yellow square"] if LOCAL else
                  ["[trigger] portrait, natural light, 85mm photo",
                   "[trigger] as a watercolor illustration"])
SAMPLE_SIZE = 64 if LOCAL else 1024  # pixels, square
SAMPLE_STEPS = 2 if LOCAL else None  # denoising steps per sample; None: 20 (dev) or 4 (schnell)
RESUME_FROM_CHECKPOINT = "auto"  # "auto": continue from the newest checkpoint | "none" | a path
TRAINER_COMMAND = None  # your ai-toolkit fork starts differently? e.g. ["python", "train.py", "{config}"]
AI_TOOLKIT_REPO = None  # a fork's git URL; None: ostris/ai-toolkit at the commit flux-remote pins
AI_TOOLKIT_COMMIT = None  # with AI_TOOLKIT_REPO: the commit or branch to check out

# machine and money
COST_GUARD = 1.0 if LOCAL else 10.0  # dollars: hard cap on everything; the run stops gracefully
MAX_HOURS = None  # optional wall-clock cap
GPU_NAMES = []  # [] = any GPU that fits, e.g. ["RTX 4090", "RTX A6000"]
MIN_VRAM_GB = 24
INTERRUPTIBLE = False  # bid instances: cheaper, but can be outbid mid-run
VAST_AUTO_MOUNT_PATHS = True  # put caches and outputs on the instance's largest volume

# tracking and publishing
WANDB = False  # log loss, lr, s/step and samples to Weights & Biases (key: WANDB_API_KEY)
WANDB_PROJECT = "flux-remote"
PUBLISH_HF_REPO = None  # e.g. "you/my-flux-lora": upload the bundle to the Hub (HF_TOKEN, write)
PUBLISH_HF_PRIVATE = True
OUT_DIR = Path(os.environ.get("FLUX_REMOTE_NOTEBOOK_OUT") or f"runs/{RUN_NAME}")  # the bundle
POLL_SECONDS = 1.0 if LOCAL else 5.0  # how often the progress is read
''')

md("spec-intro", """
## The run spec

The parameters become a `run.yaml`, checked by the same loader as `flux-remote launch` (unknown
keys, bad values, a missing dataset and secrets pasted into the file are all errors). The file is
kept: `flux-remote launch` runs the same thing from a terminal.
""")

code("spec", '''
import yaml

from controller.cli.plan_cmds import load_run_spec

toolkit = {key: value for key, value in (("repo", AI_TOOLKIT_REPO),
                                         ("commit", AI_TOOLKIT_COMMIT)) if value}
spec_data = {
    "name": RUN_NAME,
    "trigger_word": TRIGGER_WORD,
    "base_model": BASE_MODEL,
    "dataset": {"path": str(DATASET.resolve())},
    "captioning": {"mode": CAPTIONING, "template": CAPTION_TEMPLATE, "model": CAPTION_MODEL},
    "quality_gate": {"enabled": QUALITY_GATE, "min_images": MIN_IMAGES,
                     "min_short_side": MIN_SHORT_SIDE, "allow_nsfw": ALLOW_NSFW},
    "training": {
        "trainer": "tiny" if LOCAL else "ai-toolkit",
        "steps": STEPS, "lr": LEARNING_RATE, "rank": RANK, "resolutions": RESOLUTIONS,
        "optimizer": OPTIMIZER, "dtype": DTYPE, "quantize": QUANTIZE,
        "save_every": SAVE_EVERY, "resume_from_checkpoint": RESUME_FROM_CHECKPOINT,
        "command": TRAINER_COMMAND, "ai_toolkit": toolkit,
        "sample": {"every": SAMPLE_EVERY, "prompts": SAMPLE_PROMPTS,
                   "width": SAMPLE_SIZE, "height": SAMPLE_SIZE, "steps": SAMPLE_STEPS},
    },
    "gpu": {"names": GPU_NAMES, "min_vram_gb": MIN_VRAM_GB, "interruptible": INTERRUPTIBLE},
    "budget": {"max_usd": COST_GUARD, "max_hours": MAX_HOURS},
    "provider": {"type": PROVIDER, "auto_mount_paths": VAST_AUTO_MOUNT_PATHS},
    "wandb": {"enabled": WANDB, "project": WANDB_PROJECT},
    "publish": {"out_dir": str(OUT_DIR.resolve()), "hf_repo": PUBLISH_HF_REPO,
                "hf_private": PUBLISH_HF_PRIVATE},
}
SPEC_FILE = OUT_DIR.parent / f"{RUN_NAME}.yaml"
SPEC_FILE.parent.mkdir(parents=True, exist_ok=True)
SPEC_FILE.write_text(yaml.safe_dump(spec_data, sort_keys=False), encoding="utf-8")
spec = load_run_spec(SPEC_FILE)
print(f"spec: {SPEC_FILE.resolve()}\\n  the same run from a terminal: flux-remote launch {SPEC_FILE}")
''')

md("checks-intro", """
## Runtime checks

What this machine needs for the chosen provider, then the dataset: the same ingest, captions and
quality gate the instance runs, here and before anything is rented (the instance runs its own
GPU, driver, disk and bandwidth checks as its first stage).
""")

code("checks", '''
from rich.console import Console
from rich.table import Table
from rich.text import Text

from controller.cli.dataset_cmds import render_report
from controller.dataset_check import run_checks
from controller.errors import SpecError
from controller.run.launch import machine_checks

console = Console()
checks = Table(title="this machine", title_justify="left")
checks.add_column("check")
checks.add_column("result")
for check in machine_checks(spec):
    checks.add_row(check.name, Text(check.result, style="" if check.ok else "red"))
console.print(checks)

[(label, dataset_report)] = run_checks(spec)
render_report(dataset_report, console, label=label)
if QUALITY_GATE and not dataset_report["passed"]:
    raise SpecError("the dataset fails the quality gate: fix it (see above) before renting")
''')

md("plan-intro", """
## Offers and cost estimate

For `vast`: the offers that fit the `gpu` section, ranked by the estimated dollars of the whole
run (boot, install, weight download, training, sampling, transfers), not by $/h. For `local` the
plan is trivial: this machine, at no cost. A run whose estimate exceeds `COST_GUARD` is refused
here, before anything is rented.
""")

code("plan", '''
from controller.journal import open_journal
from controller.run.launch import check_budget, plan_run
from controller.ui import LiveView, plan_table

journal = open_journal()
view = LiveView(console, show_logs=False)
orchestrator, estimate = plan_run(spec, journal, reporter=view, enforce_budget=False)
console.print(plan_table(estimate, budget_usd=spec.budget.max_usd))
for note in estimate.notes:
    console.print(f"- {note}")
check_budget(spec, estimate)  # over COST_GUARD: refused here, before anything is rented
''')

md("launch-intro", """
## Launch and live progress

Running the next cell rents the machine (for `vast`), ships the dataset and the agent, and follows
the run to its end: stage, step, loss and spend are printed as they change. Interrupting the
kernel detaches: the run carries on, its own cost guard and watchdog still bound its spend, and
`flux-remote resume RUN_ID` picks it up again. Interrupted before the agent runs, there is
nothing to detach from: the machine is released at once. This is the same function that
`flux-remote launch --yes` calls (`controller.run.launch.drive_interactive`).
""")

code("launch", '''
from controller.run.launch import drive_interactive
from controller.run.orchestrator import Options

run_id = orchestrator.create_run(spec, estimate, out_dir=OUT_DIR, spec_path=SPEC_FILE.resolve())
console.print(f"run [bold]{run_id}[/]")
try:  # Ctrl-C (interrupt the kernel) detaches, or releases a machine nothing runs on yet
    outcome = drive_interactive(orchestrator, run_id, Options(poll_interval=POLL_SECONDS),
                                estimate=estimate)
finally:
    view.close()
console.print(f"run {outcome.run_id}: {outcome.state}"
              + (f" (detached: `flux-remote resume {run_id}` follows it)" if outcome.detached else ""))
''')

md("logs-intro", """
## Log tail

The end of the agent's log (checks, install, captions, gate, the trainer's output), fetched with
the bundle. `flux-remote logs RUN_ID` prints all of it.
""")

code("logs", '''
LOG_LINES = 25
log_file = Path(outcome.out_dir) / "logs" / "agent.log"
if log_file.exists():
    lines = log_file.read_text(encoding="utf-8", errors="replace").splitlines()
    print("\\n".join(lines[-LOG_LINES:]))
else:
    print(f"no log fetched yet: flux-remote logs {outcome.run_id}")
''')

md("validation-intro", """
## Validation and samples

The agent checked the LoRA before packing it (it loads, the keys and shapes are LoRA keys of the
configured rank, no NaN) and that the samples exist. The samples of the last step are shown here;
`report.html` in the bundle has the loss curve, every sample and the gate summary on one page.
""")

code("validation", '''
import json

from IPython.display import Image, display

from remote.publish.bundle import sample_grid

if not outcome.bundle:
    raise RuntimeError(f"run {outcome.run_id} ended {outcome.state} without a bundle: "
                       f"{outcome.error or 'see the log tail above'}")
BUNDLE = Path(outcome.bundle)
receipt = json.loads((BUNDLE / "receipt.json").read_text(encoding="utf-8"))
validation = receipt.get("validation") or {}
lora = validation.get("lora") or {}
console.print(f"LoRA {'[green]valid[/]' if validation.get('ok') else '[red]INVALID[/]'}: "
              f"{lora.get('problems') or 'no problems found'}")
grid = sample_grid(BUNDLE / "samples")  # step -> prompt index -> image
if grid:
    last = max(grid)
    print(f"samples at step {last}:")
    for index, sample in sorted(grid[last].items()):
        prompt = spec.training.sample.prompts[index]
        print(f"  {prompt.replace('[trigger]', spec.trigger_word or '')}")
        display(Image(filename=str(sample), width=256))
print(f"full report: {BUNDLE / 'report.html'}")
''')

md("receipt-intro", """
## Cost receipt

What the run used and cost: the agent's `receipt.json` (GPU, hours, steps, s/step) and the
controller's own meter (`controller_receipt.json`: billed hours, idle time before the destroy,
bandwidth), against the estimate and the budget.
""")

code("receipt", '''
from controller.run.fetch import CONTROLLER_RECEIPT
from controller.ui import money, render_summary

render_summary(console, outcome)
metered = json.loads((BUNDLE / CONTROLLER_RECEIPT).read_text(encoding="utf-8"))
table = Table(title="receipt", title_justify="left")
table.add_column("item")
table.add_column("value", justify="right")
table.add_row("GPU", str(receipt["hardware"]["gpu"]))
table.add_row("steps", f"{receipt['steps']['done']} of {receipt['steps']['planned']}")
table.add_row("s/step", f"{receipt['s_per_step']:.3f}" if receipt.get("s_per_step") else "-")
table.add_row("billed hours", f"{metered['billed_hours']:.3f}" if metered.get("billed_hours") else "-")
table.add_row("estimated", money(metered.get("estimated_usd")))
table.add_row("metered", money(metered.get("metered_usd")))
table.add_row("budget", money(metered.get("budget_usd")))
console.print(table)
''')

md("publish-intro", """
## The publish pack

The bundle is the LoRA (`<name>.safetensors`), its samples, the ai-toolkit `config.yaml`, the
resolved `run.yaml`, the quality report, the captions, a Hugging Face model card (`README.md`),
the receipts, `report.html` and `SHA256SUMS`. It was verified against `SHA256SUMS` before the
instance was destroyed; it is verified again here. With `PUBLISH_HF_REPO` set the launch
uploaded it to the Hub from this machine, right after the destroy (private unless
`PUBLISH_HF_PRIVATE = False`, model card first); if that upload failed, this cell tries again
(re-running is safe: unchanged files are not committed twice).
""")

code("publish", '''
from controller.run.fetch import verify_sums
from controller.hf_publish import publish_bundle

files_verified = verify_sums(BUNDLE)
console.print(f"{BUNDLE}: {files_verified} files verified against SHA256SUMS")
for path in sorted(p for p in BUNDLE.iterdir() if p.is_file()):
    print(f"  {path.name:32} {path.stat().st_size:>12,} bytes")
if PUBLISH_HF_REPO:
    published = journal.events(run_id, kind="published")
    if published:
        url = published[-1]["detail"]["url"]
    else:
        url = publish_bundle(BUNDLE, PUBLISH_HF_REPO, private=PUBLISH_HF_PRIVATE)
    console.print(f"published: {url}")
''')

md("next-steps", """
## Next steps

* Use the LoRA: `<name>.safetensors` loads in ComfyUI, Forge or diffusers
  (`pipe.load_lora_weights(...)`); put the trigger word in your prompts.
* Train longer: raise `STEPS` and run again with the same `RUN_NAME`; with
  `RESUME_FROM_CHECKPOINT = "auto"` training continues from the newest checkpoint.
* From a terminal: `flux-remote ls`, `flux-remote status`, `flux-remote logs RUN_ID`,
  `flux-remote cost`; `flux-remote gc` finds any instance no run owns.
* Publish later: `flux-remote publish RUN_ID --repo you/my-lora` (or the bundle folder).
* Several runs under one budget: a batch file (`configs/batch-sweep.yaml`).
* Outgrowing one Vast account: `flux-remote export skypilot run.yaml` runs the same pipeline on any
  cloud SkyPilot supports.
""")


def build() -> Any:
    """The notebook as an ``nbformat`` node (no outputs, fixed cell ids)."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    cells = []
    for cell_id, kind, source in CELLS:
        cell = new_code_cell(source) if kind == "code" else new_markdown_cell(source)
        cell["id"] = cell_id
        if cell_id == "parameters":
            cell["metadata"]["tags"] = ["parameters"]  # papermill injects overrides after it
        cells.append(cell)
    notebook = new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    })
    nbformat.validate(notebook)
    return notebook


def render() -> str:
    """The notebook file's exact text."""
    import nbformat

    return nbformat.writes(build()) + "\n"


def main() -> int:
    NOTEBOOK.write_text(render(), encoding="utf-8")
    print(f"wrote {NOTEBOOK}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
