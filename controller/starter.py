"""``flux-remote init PHOTOS_DIR``: a commented ``run.yaml`` for a folder of photos.

So that a new user never starts from a blank file: the name comes from the folder, the trigger
word is a rare token made from it, the captions mode from the sidecars that exist, the quality
gate's verdict on the photos (``controller.dataset_check``, the agent's own gate) is written into
the file as a comment, and, when a Vast.ai key is present, so is the cheapest current estimate
(``controller.planning.planner``, the same ranking ``flux-remote plan`` prints). Nothing is
rented. rich-free: the CLI draws :class:`Starter`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from controller.errors import FluxRemoteError, SpecError
from controller.run.checklist import plain
from remote.dataset.ingest import IMAGE_EXTS

if TYPE_CHECKING:
    from controller.spec.model import RunSpec

CAPTION_EXTS = ("txt", "caption")  # sidecar extensions looked for, the first found wins
DEFAULT_BUDGET_USD = 8.0  # without an estimate: a Flux dev LoRA on a 24 GB GPU costs a few $
LEET = str.maketrans({"a": "4", "e": "3", "i": "1", "o": "0", "s": "5"})


def suggest_name(folder: Path) -> str:
    """The folder's name as a run name (letters, digits, - and _; 63 at most)."""
    slug = re.sub(r"[^a-z0-9_-]+", "-", folder.resolve().name.lower()).strip("-_")
    return slug[:63].rstrip("-_") or "my-lora"


def suggest_trigger(name: str) -> str:
    """A rare token from the name, as ``d3m0`` is for demo: the first letters with vowels
    turned into digits, so that it collides with no word the base model already knows."""
    letters = re.sub(r"[^a-z]", "", name.lower())[:5] or "subj"
    token = letters.translate(LEET)
    return token if token != letters else token + "7"


@dataclass
class Sidecars:
    """What captions the folder already has."""

    images: int
    captioned: int
    ext: str

    @property
    def mode(self) -> str:
        """``keep`` when every image has its caption, else ``template`` (fill the missing)."""
        return "keep" if self.images and self.captioned == self.images else "template"


def find_sidecars(folder: Path) -> Sidecars:
    images = [p for p in sorted(folder.iterdir())
              if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    best = Sidecars(len(images), 0, CAPTION_EXTS[0])
    for ext in CAPTION_EXTS:
        count = sum(1 for p in images if p.with_suffix(f".{ext}").is_file())
        if count > best.captioned:
            best = Sidecars(len(images), count, ext)
    return best


@dataclass
class CheapestOffer:
    """The cheapest offer now, or why there is none."""

    offer_id: int | None = None
    gpu_name: str = ""
    dph_total: float = 0.0
    est_hours: float = 0.0
    est_usd: float = 0.0
    problem: str | None = None  # set when there is no estimate

    @property
    def budget_usd(self) -> float:
        """A budget with room: twice the estimate, in whole dollars, at least $2."""
        return float(max(2, math.ceil(self.est_usd * 2)))


@dataclass
class Starter:
    """Everything ``init`` found out, and the file it writes."""

    folder: Path
    name: str
    trigger: str
    sidecars: Sidecars
    gate: dict[str, Any]  # the quality gate's report (remote.dataset.quality, to_dict)
    estimate: CheapestOffer | None  # None: no Vast.ai key
    budget_usd: float = DEFAULT_BUDGET_USD

    def gate_line(self) -> str:
        verdict = "PASSED" if self.gate.get("passed") else "FAILED"
        line = (f"{verdict}: {self.gate.get('usable_count', 0)} usable of "
                f"{self.gate.get('image_count', 0)} images")
        flagged = {k: v for k, v in (self.gate.get("totals") or {}).items() if v}
        if flagged:
            line += "; flagged: " + ", ".join(f"{k.replace('_', ' ')} {v}"
                                              for k, v in flagged.items())
        return line


def check_photos(spec: "RunSpec") -> dict[str, Any]:
    """The quality gate's report on the photos, with the settings of the spec init writes."""
    from controller.dataset_check import check_arguments, run_check

    return run_check(check_arguments(spec))["gate"]


Search = Callable[["RunSpec"], list[dict[str, Any]]]  # offers for a spec (the live search)


def estimate_now(spec: "RunSpec", *, num_images: int, dataset_gb: float,
                 search: Search | None = None) -> CheapestOffer:
    """The cheapest offer for ``spec`` now (a live search, as ``flux-remote plan`` does)."""
    from controller.cli.plan_cmds import measured_speeds, search_live
    from controller.planning.planner import plan_offers

    try:
        offers = (search or search_live)(spec)
    except FluxRemoteError as exc:
        return CheapestOffer(problem=f"the offer search failed: {exc}")
    result = plan_offers(spec, offers, measured_s_per_step=measured_speeds(),
                         dataset_gb=dataset_gb, num_images=max(1, num_images))
    best = result.chosen or (result.offers[0] if result.offers else None)
    if best is None:
        return CheapestOffer(problem=result.refusal())
    return CheapestOffer(best.offer_id, best.gpu_name, best.dph_total, best.est_hours, best.est_usd)


def have_vast_key() -> bool:
    from controller.errors import CredentialsError
    from controller.vast.client import find_api_key

    try:
        find_api_key()
    except CredentialsError:
        return False
    return True


def _quoted(text: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(text, ensure_ascii=False)


def _kv(key: str, value: Any, comment: str = "", indent: int = 0) -> str:
    """``key: value`` with its comment from column 32, as in the example configs."""
    line = " " * indent + f"{key}: {value}"
    return f"{line:<30} # {comment}" if comment else line


def render(starter: Starter, *, dataset_path: str, file_name: str = "run.yaml") -> str:
    """The commented ``run.yaml``."""
    s, gate, sidecars = starter, starter.gate, starter.sidecars
    caption_note = (f"all {sidecars.images} images have a .{sidecars.ext} caption: kept"
                    if sidecars.mode == "keep" else
                    f"{sidecars.captioned} of {sidecars.images} images have a .{sidecars.ext} "
                    "caption; the others get the template")
    lines = [
        f"# Written by `flux-remote init` for {plain(s.folder, limit=500)}.",
        "# Settings not shown have their defaults (configs/flux-dev-vast.yaml shows them all,",
        "# docs/spec.md explains them). Next:",
        f"#   flux-remote validate {file_name}",
        f"#   flux-remote plan {file_name}       # which GPU, how many dollars (rents nothing)",
        f"#   flux-remote launch {file_name}",
        "",
        _kv("name", s.name, "from the folder's name"),
        _kv("trigger_word", s.trigger, 'a rare token; "[trigger]" in captions becomes it'),
        "",
        _kv("base_model", "flux-dev", "gated: accept its license on Hugging Face, set HF_TOKEN"),
        "",
        "dataset:",
        _kv("path", _quoted(dataset_path), "relative to this file; never modified", 2),
        _kv("caption_ext", sidecars.ext, "image1.jpg + image1.txt", 2),
        "",
        "captioning:",
        f"  # {caption_note}",
        _kv("mode", sidecars.mode, "keep | template | model (a captioner on the GPU)", 2),
        _kv("template", _quoted("a photo of [trigger]"), "for images without a caption", 2),
        "",
        f"# The quality gate on these photos now (`flux-remote check-dataset {file_name}` shows",
        "# each image):",
        f"#   {s.gate_line()}",
    ]
    lines += [f"#   {plain(reason)}" for reason in gate.get("reasons") or []]
    lines += [f"#   warning: {plain(warning)}" for warning in gate.get("warnings") or []]
    lines += [
        "quality_gate:",
        _kv("min_images", 5, "usable images needed", 2),
        _kv("min_short_side", 256, "pixels; smaller images are left out", 2),
        "",
        "training:",
        _kv("steps", 2000, "1000-3000 for a person or an object", 2),
        _kv("rank", 16, "LoRA rank", 2),
        _kv("save_every", 250, "a checkpoint every this many steps", 2),
        "",
    ]
    est = s.estimate
    if est is None:
        lines += ["# No Vast.ai key here, so no estimate: set VAST_API_KEY (or run",
                  f"# `vastai set api-key`), then `flux-remote plan {file_name}`."]
    elif est.problem:
        lines.append(f"# No estimate now: {plain(est.problem, limit=300)}")
    else:
        lines += [f"# Cheapest now: offer {est.offer_id} ({plain(est.gpu_name, limit=40)}, "
                  f"${est.dph_total:.3f}/h), about {est.est_hours:.2f} h, est "
                  f"${est.est_usd:.2f}.",
                  f"# The budget is about twice that; `flux-remote plan {file_name}` shows the "
                  "offers of the moment."]
    lines += [
        "budget:",
        _kv("max_usd", f"{s.budget_usd:g}", "the hard cap for this run, everything included",
            2),
        "",
        "provider:",
        _kv("type", "vast", "vast | ssh (your own host) | local", 2),
        "",
    ]
    return "\n".join(lines)


def dataset_gb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e9


def spec_of(text: str, base: Path) -> "RunSpec":
    """The RunSpec a rendered file describes (dataset path relative to ``base``)."""
    import yaml

    from controller.spec.model import RunSpec

    data = yaml.safe_load(text)
    data["dataset"]["path"] = str((base / data["dataset"]["path"]).resolve())
    return RunSpec.model_validate(data)


def init(folder: Path, out: Path, *, search: Search | None = None,
         key_present: Callable[[], bool] = have_vast_key) -> Starter:
    """Look at ``folder``, write the commented spec to ``out`` (never over an existing file),
    check that it loads, and return what was found. ``search`` replaces the live offer search."""
    from controller.spec.loader import load_spec

    folder = Path(folder)
    if not folder.is_dir():
        raise SpecError(f"{folder}: no such folder",
                        hint="give the folder that holds your photos")
    if out.exists() or out.is_symlink():
        raise SpecError(f"{out} exists; init never overwrites a file",
                        hint="remove it, or write elsewhere with --out other.yaml")
    name = suggest_name(folder)
    trigger = suggest_trigger(name)
    sidecars = find_sidecars(folder)
    if not sidecars.images:
        raise SpecError(f"{folder}: no images (jpg, png, webp, ...) in this folder")
    starter = Starter(folder.resolve(), name, trigger, sidecars, {}, None)
    relative = os.path.relpath(folder.resolve(), out.resolve().parent)
    spec = spec_of(render(starter, dataset_path=relative, file_name=plain(out.name, limit=100)),
                   out.resolve().parent)
    starter.gate = check_photos(spec)
    if key_present():
        starter.estimate = estimate_now(spec, num_images=sidecars.images,
                                        dataset_gb=dataset_gb(folder), search=search)
        if not starter.estimate.problem:
            starter.budget_usd = starter.estimate.budget_usd
    text = render(starter, dataset_path=relative, file_name=plain(out.name, limit=100))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "x", encoding="utf-8") as fh:  # "x": a file made meanwhile is not replaced
        fh.write(text)
    load_spec(out)  # what init writes always validates; a failure here is our bug, shown
    return starter
