"""The caption stage: every ingested image gets a caption sidecar the trainer reads.

Existing sidecars are kept byte for byte (ingest already copied them); the only changes ever made
to one are prepending the trigger word when it lacks it and ``insert_trigger`` is on, and, when it
is off, writing the trigger word in place of ``[trigger]`` (ai-toolkit is then not given the
trigger word, and would train on the caption with the placeholder removed). Missing
captions are filled by the template (``mode="template"``), by a captioning model
(``mode="model"``), or left missing (``mode="keep"``: the quality gate then reports
``missing_caption``). A caption file without an image was reported by ingest and is never used.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from remote.dataset.ingest import ImageRecord, IngestResult

TRIGGER_PLACEHOLDER = "[trigger]"
MODES = ("keep", "template", "model")

Captioner = Callable[[list[Any]], list[str]]  # PIL images in, one caption per image out


@dataclass
class CaptionReport:
    mode: str
    kept: int = 0  # sidecars kept as they were
    trigger_inserted: int = 0  # sidecars or model captions that got the trigger word prepended
    templated: int = 0
    generated: int = 0  # written by the captioning model
    missing: int = 0  # no caption (mode keep)
    orphan_captions: list[str] = field(default_factory=list)
    issues: list[str] = field(default_factory=list)
    entries: list[dict[str, Any]] = field(default_factory=list)  # per image: output, origin
    lengths_words: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "kept": self.kept,
            "trigger_inserted": self.trigger_inserted,
            "templated": self.templated,
            "generated": self.generated,
            "missing": self.missing,
            "orphan_captions": list(self.orphan_captions),
            "issues": list(self.issues),
            "length_words": length_stats(self.lengths_words),
            "entries": list(self.entries),
        }


def caption(result: IngestResult, *, mode: str, template: str, trigger: str | None,
            caption_ext: str, model: str | None = None, insert_trigger: bool = True,
            captioner: Captioner | None = None, batch_size: int = 8) -> CaptionReport:
    """Give every usable image of ``result`` a caption file (as the mode allows).

    ``captioner`` replaces :func:`load_captioner` (tests pass a plain function); it is only
    called in ``model`` mode, in batches of ``batch_size``, for images without a sidecar.
    Updates each record's ``caption_path``. Raises ``ValueError`` for an unknown mode.
    """
    if mode not in MODES:
        raise ValueError(f"caption mode must be one of {', '.join(MODES)}, not {mode!r}")
    report = CaptionReport(mode=mode, orphan_captions=list(result.orphan_captions))
    todo: list[ImageRecord] = []
    for record in result.images:
        if record.path is None:
            continue
        sidecar = record.path.with_name(f"{record.path.stem}.{caption_ext}")
        if sidecar.exists():
            record.caption_path = sidecar
            _keep_sidecar(record, sidecar, trigger, insert_trigger, report)
        elif mode == "template":
            text = render_template(template, trigger)
            _write_caption(record, sidecar, text, "template", report)
            report.templated += 1
        elif mode == "model":
            todo.append(record)
        else:
            record.caption_path = None
            report.missing += 1
            report.entries.append({"output": record.path.name, "origin": None})
    if todo:
        _caption_with_model(todo, captioner or load_captioner(model or ""), batch_size, trigger,
                            insert_trigger, caption_ext, report)
    return report


def render_template(template: str, trigger: str | None) -> str:
    """The template with ``[trigger]`` replaced (dropped, with its spacing, when no trigger)."""
    if trigger:
        return template.replace(TRIGGER_PLACEHOLDER, trigger).strip()
    text = template.replace(TRIGGER_PLACEHOLDER, "")
    return re.sub(r"\s{2,}", " ", text).strip(" ,")


def with_trigger(text: str, trigger: str | None) -> tuple[str, bool]:
    """``text`` with the trigger word prepended unless it (or ``[trigger]``) is already there."""
    if not trigger or TRIGGER_PLACEHOLDER in text or _contains_word(text, trigger):
        return text, False
    stripped = text.strip()
    return (f"{trigger}, {stripped}" if stripped else trigger), True


def _contains_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE) is not None


def _keep_sidecar(record: ImageRecord, sidecar: Path, trigger: str | None, insert_trigger: bool,
                  report: CaptionReport) -> None:
    raw = sidecar.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        report.issues.append(f"{record.source}: caption is not UTF-8; kept as it is")
        report.kept += 1
        report.entries.append({"output": record.path.name, "origin": "sidecar"})
        return
    if insert_trigger:
        new_text, changed = with_trigger(text, trigger)
    else:
        new_text = text.replace(TRIGGER_PLACEHOLDER, trigger) if trigger else text
        if new_text != text:
            sidecar.write_text(new_text, encoding="utf-8")
        changed = False
    if changed:
        sidecar.write_text(new_text, encoding="utf-8")
        report.trigger_inserted += 1
        report.entries.append({"output": record.path.name, "origin": "sidecar+trigger"})
    else:
        report.kept += 1
        report.entries.append({"output": record.path.name, "origin": "sidecar"})
    report.lengths_words.append(len(new_text.split()))


def _write_caption(record: ImageRecord, sidecar: Path, text: str, origin: str,
                   report: CaptionReport) -> None:
    sidecar.write_text(text, encoding="utf-8")
    record.caption_path = sidecar
    report.entries.append({"output": record.path.name if record.path else None, "origin": origin})
    report.lengths_words.append(len(text.split()))


def _caption_with_model(records: list[ImageRecord], captioner: Captioner, batch_size: int,
                        trigger: str | None, insert_trigger: bool, caption_ext: str,
                        report: CaptionReport) -> None:
    from PIL import Image

    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        images = []
        for record in batch:
            with Image.open(record.path) as im:
                images.append(im.convert("RGB"))
        texts = captioner(images)
        if len(texts) != len(batch):
            raise ValueError(f"the captioner returned {len(texts)} captions "
                             f"for {len(batch)} images")
        for record, text in zip(batch, texts):
            text = " ".join(str(text).split())
            if insert_trigger:
                text, changed = with_trigger(text, trigger)
                report.trigger_inserted += int(changed)
            sidecar = record.path.with_name(f"{record.path.stem}.{caption_ext}")
            _write_caption(record, sidecar, text, "model", report)
            report.generated += 1


def length_stats(lengths: Sequence[int]) -> dict[str, float | int | None]:
    if not lengths:
        return {"count": 0, "min": None, "max": None, "mean": None, "median": None}
    return {
        "count": len(lengths),
        "min": min(lengths),
        "max": max(lengths),
        "mean": round(statistics.fmean(lengths), 2),
        "median": statistics.median(lengths),
    }


# The default captioner (CaptioningSpec.model). BLIP loads with transformers' own classes in any
# version from 4.x on, so nothing from the hub is executed. Florence-2, which fluxgym and
# ai-toolkit's UI use, writes better captions, but microsoft/Florence-2-* runs through
# trust_remote_code: code downloaded at run time, pinned to old transformers releases and
# broken by newer ones. Transformers' native "florence2" support (converted checkpoints) works
# here too: set captioning.model to one; TASK_PROMPTS gives it its captioning task.
DEFAULT_CAPTION_MODEL = "Salesforce/blip-image-captioning-large"
MAX_CAPTION_TOKENS = 60
NUM_BEAMS = 3  # beam search: BLIP's greedy captions repeat themselves more
TASK_PROMPTS = {"florence2": "<MORE_DETAILED_CAPTION>"}  # models that caption only when asked
# BLIP-large opens many captions with invented words ("arafed", "araffe"): drop them
_BLIP_ARTIFACTS = re.compile(r"^(?:(?:there (?:is|are) )?(?:an? )?araf+e?d?\b\s*)+",
                             flags=re.IGNORECASE)


def clean_caption(text: str) -> str:
    """One line, single spaces, without BLIP's known nonsense openers."""
    text = " ".join(str(text).split())
    cleaned = _BLIP_ARTIFACTS.sub("", text).strip()
    return cleaned or text


def load_captioner(model_name: str, *, device: str | None = None,
                   max_new_tokens: int = MAX_CAPTION_TOKENS,
                   num_beams: int = NUM_BEAMS) -> Captioner:
    """An image-to-text captioner from a Hugging Face model id or a local folder.

    Uses ``AutoProcessor`` and ``AutoModelForImageTextToText`` (``AutoModelForVision2Seq`` on
    transformers releases before it), not ``pipeline("image-to-text")``, which transformers 5
    removed. ``device`` defaults to the first GPU when torch sees one (weights in fp16 there,
    fp32 on the CPU). The returned function captions one batch of PIL images per call; batching
    is :func:`caption`'s job. Raises ``ValueError`` without a model name, ``ImportError`` when
    transformers is missing, ``OSError`` when the model cannot be loaded (not on the hub, no
    network).
    """
    if not model_name:
        raise ValueError("caption mode 'model' needs captioning.model (a Hugging Face model id, "
                         f"e.g. {DEFAULT_CAPTION_MODEL})")
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise ImportError(f"caption mode 'model' needs transformers in this Python ({exc}); "
                          "install it with `pip install transformers`") from exc

    if device is None:
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    model_class = (getattr(transformers, "AutoModelForImageTextToText", None)
                   or getattr(transformers, "AutoModelForVision2Seq"))
    processor = transformers.AutoProcessor.from_pretrained(model_name)
    if isinstance(processor, transformers.ProcessorMixin):
        prepare, decode = processor, processor.batch_decode
    else:  # VisionEncoderDecoder repos: an image processor and a tokenizer, no processor class
        prepare = transformers.AutoImageProcessor.from_pretrained(model_name)
        decode = transformers.AutoTokenizer.from_pretrained(model_name).batch_decode
    model = model_class.from_pretrained(model_name).to(device=device, dtype=dtype).eval()
    prompt = TASK_PROMPTS.get(getattr(model.config, "model_type", ""))

    def run(images: list[Any]) -> list[str]:
        kwargs: dict[str, Any] = {"images": images, "return_tensors": "pt"}
        if prompt is not None and prepare is processor:
            kwargs["text"] = [prompt] * len(images)
        inputs = {key: (value.to(device=device, dtype=dtype) if value.is_floating_point()
                        else value.to(device))
                  for key, value in prepare(**kwargs).items()}
        with torch.inference_mode():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                 do_sample=False)
        return [clean_caption(text) for text in decode(ids, skip_special_tokens=True)]

    return run
