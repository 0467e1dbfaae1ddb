"""The JSON Schema that editors read (``flux-remote schema``): every field says what it does."""

from __future__ import annotations

import subprocess
import sys
from typing import Any, Iterator

from pydantic import BaseModel

from controller.spec.model import BatchSpec, CaptioningSpec, RunSpec, json_schema


def _leaf_fields(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, type[BaseModel], str]]:
    """(dotted path, owning model, field name) of every field that is not itself a section."""
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _leaf_fields(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", model, name


def _properties(schema: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    if model is RunSpec:
        return schema["properties"]
    return schema["$defs"][model.__name__]["properties"]


def test_every_leaf_field_has_a_description_in_the_schema() -> None:
    schema = json_schema()
    leaves = [*_leaf_fields(RunSpec, ""), *_leaf_fields(BatchSpec, "batch.")]
    assert len(leaves) > 80  # the walk really went into the sections
    missing = [path for path, model, name in leaves
               if not _properties(schema, model)[name].get("description", "").strip()]
    assert missing == []


def test_sections_have_descriptions_too() -> None:
    properties = json_schema()["properties"]
    assert all(prop.get("description") for prop in properties.values()), [
        key for key, prop in properties.items() if not prop.get("description")]
    assert properties["provider"]["anyOf"][1] == {"enum": ["vast", "ssh", "local"]}


def test_descriptions_keep_the_words_of_the_old_comments() -> None:
    defs = json_schema()["$defs"]
    assert defs["BudgetSpec"]["properties"]["max_usd"]["description"] == (
        "COST_GUARD: hard cap for this run, all costs included")
    assert "RESUME_FROM_CHECKPOINT" in (
        defs["TrainingSpec"]["properties"]["resume_from_checkpoint"]["description"])
    assert defs["GpuSpec"]["properties"]["min_vram_gb"]["default"] == 24.0
    assert defs["GpuSpec"]["properties"]["min_vram_gb"]["exclusiveMinimum"] == 0


def test_caption_model_default_matches_the_agent() -> None:
    """The spec cannot import the agent's caption module (it pulls numpy and PIL in at import
    time, and the spec loads on every command), so the two defaults are kept equal here."""
    from remote.dataset.caption import DEFAULT_CAPTION_MODEL

    assert CaptioningSpec().model == DEFAULT_CAPTION_MODEL


def test_the_spec_module_does_not_import_numpy_or_pil() -> None:
    code = ("import sys, controller.spec.model; "
            "print(sorted(m for m in ('numpy', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
