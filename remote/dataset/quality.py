"""The quality gate: sort every image into categories, drop the excluded ones, give a verdict.

Categories (an image can be in several):

    corrupt          not decodable: truncated, zero bytes, not an image, decoder crash
    too_small        short side below ``min_short_side``
    duplicate        pHash within ``duplicate_max_distance`` of a kept image (the pair is named;
                     of a group the largest, then sharpest, then first by name is kept)
    blurry           variance of Laplacian at 256 px below ``blur_threshold``
    extreme_aspect   long side / short side above ``max_aspect_ratio``
    missing_caption  no caption sidecar after the caption stage
    nsfw             a classifier said so (only when one is given and ``allow_nsfw`` is false)

Images in the gate's ``exclude`` categories are removed from the ingested dataset folder; the
others only warn. The verdict fails when fewer than ``min_images`` usable images remain, or in
``strict`` mode when anything in an exclude category was found. A disabled gate (``enabled:
false``) still reports everything but drops only what cannot be read, and fails only when
nothing usable is left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from remote.dataset.imageops import hamming
from remote.dataset.ingest import ImageRecord, IngestResult
from remote.plan import write_json_atomic

CATEGORIES = ("corrupt", "too_small", "duplicate", "blurry", "extreme_aspect",
              "missing_caption", "nsfw")

# The same defaults as controller.spec.model.QualityGateSpec (remote cannot import controller).
DEFAULT_GATE: dict[str, Any] = {
    "enabled": True,
    "strict": False,
    "min_images": 5,
    "min_short_side": 256,
    "blur_threshold": 40.0,
    "duplicate_max_distance": 4,
    "max_aspect_ratio": 3.0,
    "allow_nsfw": True,
    "nsfw_model": None,
    "exclude": ["corrupt", "too_small", "duplicate", "extreme_aspect", "nsfw"],
}
NSFW_THRESHOLD = 0.5

# Paths of usable images in, one probability of "not safe for work" per image out.
NsfwClassifier = Callable[[list[Path]], list[float]]


@dataclass
class GateReport:
    passed: bool
    reasons: list[str]  # why it failed (empty when it passed)
    usable: list[ImageRecord]
    entries: list[dict[str, Any]]  # one per image file
    totals: dict[str, int]  # category -> images in it
    warnings: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)  # sources dropped from the dataset
    skipped: list[dict[str, str]] = field(default_factory=list)  # from ingest: not image files
    orphan_captions: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reasons": list(self.reasons),
            "warnings": list(self.warnings),
            "usable_count": len(self.usable),
            "image_count": len(self.entries),
            "excluded_count": len(self.excluded),
            "totals": dict(self.totals),
            "images": list(self.entries),
            "skipped": list(self.skipped),
            "orphan_captions": list(self.orphan_captions),
            "settings": dict(self.settings),
        }

    def summary(self) -> str:
        """A few lines for the agent log and the terminal."""
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [f"quality gate {verdict}: {len(self.usable)} usable of {len(self.entries)} images"
                 f" ({len(self.excluded)} excluded)"]
        found = ", ".join(f"{cat} {n}" for cat, n in self.totals.items() if n)
        lines.append(f"  found: {found or 'nothing to report'}")
        lines += [f"  fail: {reason}" for reason in self.reasons]
        lines += [f"  warning: {warning}" for warning in self.warnings]
        return "\n".join(lines)


def gate_settings(gate: dict[str, Any] | None) -> dict[str, Any]:
    """The gate section with defaults filled in; unknown keys raise ``ValueError``."""
    gate = dict(gate or {})
    unknown = sorted(set(gate) - set(DEFAULT_GATE))
    if unknown:
        raise ValueError(f"unknown quality_gate keys: {', '.join(unknown)}")
    settings = {**DEFAULT_GATE, **gate}
    for key, value in settings.items():
        if not _type_fits(DEFAULT_GATE[key], value):
            raise ValueError(f"quality_gate.{key}: {value!r} is not a valid value")
    bad = sorted(set(settings["exclude"]) - set(CATEGORIES))
    if bad:
        raise ValueError(f"unknown quality_gate.exclude categories: {', '.join(bad)}")
    return settings


def _type_fits(default: Any, value: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
    if isinstance(default, list):
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    return value is None or isinstance(value, str)


def run_gate(result: IngestResult, gate: dict[str, Any], *, caption_ext: str,
             nsfw_classifier: NsfwClassifier | None = None, load_models: bool = True,
             prune: bool = True) -> GateReport:
    """Judge every image of ``result``; with ``prune`` remove excluded images (and their
    captions) from ``result.dataset_dir`` so that it holds only usable images. Writes no report
    (see :func:`write_report`).

    NSFW: ``nsfw_classifier`` when given, else the gate's ``nsfw_model`` loaded with
    :func:`load_nsfw_classifier` when ``load_models`` (a model that cannot be loaded raises
    ``ValueError``); only when ``allow_nsfw`` is false. Bad settings raise ``ValueError``.
    """
    settings = gate_settings(gate)
    nsfw_wanted = not settings["allow_nsfw"] and (nsfw_classifier is not None
                                                  or bool(settings["nsfw_model"]))
    if nsfw_wanted and nsfw_classifier is None and load_models:
        nsfw_classifier = _load_nsfw(settings["nsfw_model"])
    found: dict[str, dict[str, str]] = {record.source: {} for record in result.images}
    for record in result.images:
        _judge(record, settings, caption_ext, found[record.source])
    _find_duplicates(result.images, settings["duplicate_max_distance"], found)
    if nsfw_classifier is not None and not settings["allow_nsfw"]:
        _classify_nsfw(result.images, nsfw_classifier, found)

    exclude = set(settings["exclude"]) if settings["enabled"] else {"corrupt"}
    usable, excluded, entries = [], [], []
    for record in result.images:
        cats = found[record.source]
        dropped = record.path is None or bool(exclude & set(cats))
        entries.append({**record.to_dict(), "categories": sorted(cats, key=CATEGORIES.index),
                        "details": cats, "excluded": dropped})
        if dropped:
            excluded.append(record.source)
            if prune:
                _remove(record)
        else:
            usable.append(record)
    totals = {cat: sum(1 for cats in found.values() if cat in cats) for cat in CATEGORIES}
    reasons = _reasons(settings, usable, totals, exclude)
    warnings = _warnings(result, totals, exclude)
    if nsfw_wanted and nsfw_classifier is None:
        warnings.append("nsfw: not checked here (the NSFW model runs on the instance)")
    return GateReport(
        passed=not reasons, reasons=reasons, usable=usable, entries=entries, totals=totals,
        warnings=warnings, excluded=excluded,
        skipped=list(result.skipped), orphan_captions=list(result.orphan_captions),
        settings=settings,
    )


def _judge(record: ImageRecord, settings: dict[str, Any], caption_ext: str,
           cats: dict[str, str]) -> None:
    if record.path is None:
        cats["corrupt"] = "; ".join(record.issues) or "not a usable image"
        return
    short, long_ = sorted((record.width or 0, record.height or 0))
    if short < settings["min_short_side"]:
        cats["too_small"] = f"short side {short}px < {settings['min_short_side']}px"
    if short and long_ / short > settings["max_aspect_ratio"]:
        cats["extreme_aspect"] = f"aspect {long_ / short:.2f} > {settings['max_aspect_ratio']}"
    if record.blur is not None and record.blur < settings["blur_threshold"]:
        cats["blurry"] = f"sharpness {record.blur:.1f} < {settings['blur_threshold']}"
    if not record.path.with_name(f"{record.path.stem}.{caption_ext}").exists():
        cats["missing_caption"] = "no caption sidecar"


def _find_duplicates(records: list[ImageRecord], max_distance: int,
                     found: dict[str, dict[str, str]]) -> None:
    """Greedy: the best image of a group is kept, later ones within the distance of a kept one
    are its duplicates. Best = not otherwise flagged, larger, sharper, first by name."""
    candidates = [r for r in records if r.phash is not None]
    candidates.sort(key=lambda r: (bool(set(found[r.source]) - {"missing_caption"}),
                                   -((r.width or 0) * (r.height or 0)),
                                   -(r.blur or 0.0), r.source))
    kept: list[ImageRecord] = []
    for record in candidates:
        match = min(((hamming(record.phash, k.phash), k) for k in kept),
                    key=lambda pair: pair[0], default=None)
        if match is not None and match[0] <= max_distance:
            distance, original = match
            found[record.source]["duplicate"] = (f"duplicate of {original.source} "
                                                 f"(distance {distance})")
        else:
            kept.append(record)


def _classify_nsfw(records: list[ImageRecord], classifier: NsfwClassifier,
                   found: dict[str, dict[str, str]]) -> None:
    todo = [r for r in records if r.path is not None]
    if not todo:
        return
    scores = classifier([r.path for r in todo])
    if len(scores) != len(todo):
        raise ValueError(f"the NSFW classifier returned {len(scores)} scores "
                         f"for {len(todo)} images")
    for record, score in zip(todo, scores):
        if score >= NSFW_THRESHOLD:
            found[record.source]["nsfw"] = f"nsfw score {score:.2f}"


def _reasons(settings: dict[str, Any], usable: list[ImageRecord], totals: dict[str, int],
             exclude: set[str]) -> list[str]:
    if not settings["enabled"]:
        return [] if usable else ["no usable images"]
    reasons = []
    if len(usable) < settings["min_images"]:
        reasons.append(f"only {len(usable)} usable images; at least {settings['min_images']} "
                       "needed (quality_gate.min_images)")
    hits = {cat: n for cat, n in totals.items() if n and cat in exclude}
    if settings["strict"] and hits:
        listed = ", ".join(f"{cat} {n}" for cat, n in hits.items())
        reasons.append(f"strict mode: images in excluded categories ({listed})")
    return reasons


def _warnings(result: IngestResult, totals: dict[str, int], exclude: set[str]) -> list[str]:
    warnings = [f"{cat}: {n} image(s) kept (warning only)" for cat, n in totals.items()
                if n and cat not in exclude]
    warnings += [f"caption without an image, not used: {rel}" for rel in result.orphan_captions]
    warnings += [f"skipped {item['source']}: {item['reason']}" for item in result.skipped]
    return warnings


def _remove(record: ImageRecord) -> None:
    for path in (record.path, record.caption_path):
        if path is not None:
            path.unlink(missing_ok=True)


def write_report(report: GateReport, path: Path) -> None:
    """Write ``quality_report.json`` atomically."""
    write_json_atomic(path, report.to_dict())


def _load_nsfw(model_name: str) -> NsfwClassifier:
    try:
        return load_nsfw_classifier(model_name)
    except (ImportError, OSError, ValueError) as exc:
        raise ValueError(f"quality_gate.nsfw_model {model_name!r} cannot be loaded: {exc}") from exc


def load_nsfw_classifier(model_name: str, *, device: str | None = None) -> NsfwClassifier:
    """An NSFW classifier from a Hugging Face image-classification model (e.g. one whose labels
    are ``nsfw`` / ``normal``); transformers is imported here only."""
    import torch
    from PIL import Image
    from transformers import pipeline

    if device is None:
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    pipe = pipeline("image-classification", model=model_name, device=device)
    unsafe = {"nsfw", "porn", "hentai", "sexy", "explicit", "unsafe"}

    def classify(paths: list[Path]) -> list[float]:
        scores = []
        for path in paths:
            with Image.open(path) as im:
                labels = pipe(im.convert("RGB"))
            scores.append(sum(item["score"] for item in labels
                              if str(item["label"]).lower() in unsafe))
        return scores

    return classify
