"""The run spec: what a user writes in ``run.yaml``, as pydantic v2 models.

Every model forbids unknown keys (typos are errors, not silently ignored settings). Defaults are
the realistic ones for a Flux LoRA on a 24 GB+ GPU; the comment on each field says what it does.
Loading from YAML with located error messages lives in ``controller.spec_loader``; this module only
declares the shape and the rules that involve one field or one section.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Defined once, in the config generator that also runs on the instance; re-exported here.
from remote.aitk_config import BASE_MODELS, SCHNELL_ADAPTER

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")

# ai-toolkit at a commit we have read; users with a fork set training.ai_toolkit.repo / commit.
AI_TOOLKIT_REPO = "https://github.com/ostris/ai-toolkit.git"
# ostris/ai-toolkit main as of 2026-08-21 ("Rework progress bar and ui speed string ...").
AI_TOOLKIT_COMMIT = "27a03a91f23eb1b757d5ec2e80ee3e129cfcc350"

DEFAULT_PROMPTS = [
    "[trigger] portrait, natural light, 85mm photo",
    "[trigger] in a cafe, sitting by the window, film grain",
    "[trigger] as a watercolor illustration",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CustomBaseModel(_Model):
    """An explicit base model: a hub id or a local path, and which Flux variant it is."""

    name_or_path: str = Field(min_length=1)
    variant: Literal["dev", "schnell"] = "dev"
    assistant_lora_path: str | None = None  # schnell needs ostris' training adapter


class DatasetSpec(_Model):
    path: Path  # a local folder of images with optional caption sidecars; never modified
    caption_ext: str = Field("txt", pattern=r"^[A-Za-z0-9]{1,8}$")
    caption_dropout_rate: float = Field(0.05, ge=0.0, le=1.0)
    shuffle_tokens: bool = False
    cache_latents_to_disk: bool = True
    max_side: int = Field(2048, ge=256, le=8192)  # ingest downscales larger images (never up)


class CaptioningSpec(_Model):
    mode: Literal["keep", "template", "model"] = "template"
    template: str = "a photo of [trigger]"  # used for images without a sidecar caption
    model: str = "Salesforce/blip-image-captioning-large"  # image-to-text model for mode: model
    batch_size: int = Field(8, ge=1, le=256)
    insert_trigger: bool = True  # prepend the trigger word to captions that lack it


GateCategory = Literal[
    "corrupt", "too_small", "duplicate", "blurry", "extreme_aspect", "missing_caption", "nsfw"
]


class QualityGateSpec(_Model):
    enabled: bool = True
    strict: bool = False  # any image in an `exclude` category fails the whole gate
    min_images: int = Field(5, ge=1)  # usable images needed after exclusions
    min_short_side: int = Field(256, ge=1)  # pixels
    blur_threshold: float = Field(40.0, ge=0.0)  # variance of Laplacian at 256 px; below = blurry
    duplicate_max_distance: int = Field(4, ge=0, le=64)  # perceptual-hash Hamming distance
    max_aspect_ratio: float = Field(3.0, ge=1.0)  # long side / short side
    allow_nsfw: bool = True  # ALLOW_NSFW; only enforced when nsfw_model is set
    nsfw_model: str | None = None
    exclude: list[GateCategory] = Field(
        default_factory=lambda: ["corrupt", "too_small", "duplicate", "extreme_aspect", "nsfw"]
    )  # images in these categories are dropped; the other categories only warn


class SampleSpec(_Model):
    enabled: bool = True
    every: int | None = Field(None, ge=1)  # steps; None = scaled to the run length
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS))
    steps: int | None = Field(None, ge=1, le=200)  # None = 20 for dev, 4 for schnell
    guidance: float | None = Field(None, ge=0.0, le=30.0)  # None = 4 for dev, 1 for schnell
    seed: int = 42
    width: int = Field(1024, ge=64, le=4096)
    height: int = Field(1024, ge=64, le=4096)


class AiToolkitSpec(_Model):
    repo: str = AI_TOOLKIT_REPO  # git URL (file:// works: tests and private forks)
    commit: str = AI_TOOLKIT_COMMIT  # pinned commit (or branch) to check out
    path: str | None = None  # an existing checkout on the instance (the aitoolkit image has one)
    overrides: dict[str, Any] = Field(default_factory=dict)  # merged last into the generated YAML


ResumeSetting = Union[Literal["auto", "none"], str]


class TrainingSpec(_Model):
    trainer: Literal["ai-toolkit", "tiny"] = "ai-toolkit"
    steps: int = Field(2000, ge=1, le=200_000)
    lr: float = Field(1e-4, gt=0.0, le=1.0)
    rank: int = Field(16, ge=1, le=1024)
    alpha: float | None = Field(None, gt=0.0)  # None = same as rank
    batch_size: int = Field(1, ge=1, le=64)
    gradient_accumulation_steps: int = Field(1, ge=1, le=256)
    resolutions: list[int] = Field(default_factory=lambda: [512, 768, 1024])
    optimizer: str = "adamw8bit"
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    quantize: bool = True
    save_every: int | None = Field(None, ge=1)  # None = scaled to the run length
    max_step_saves_to_keep: int = Field(4, ge=1, le=100)
    sample: SampleSpec = Field(default_factory=SampleSpec)
    resume_from_checkpoint: ResumeSetting = "auto"  # RESUME_FROM_CHECKPOINT: auto | none | path
    max_retries: int = Field(1, ge=0, le=5)  # trainer crashes retried from the newest checkpoint
    ai_toolkit: AiToolkitSpec = Field(default_factory=AiToolkitSpec)
    command: list[str] | None = None  # explicit trainer argv; "{config}" is the YAML path

    @field_validator("resolutions")
    @classmethod
    def _resolutions(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("give at least one resolution, e.g. [512, 768, 1024]")
        for res in value:
            if res < 16 or res > 4096 or res % 16:
                raise ValueError(f"{res} is not a multiple of 16 between 16 and 4096")
        return value

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("an empty command runs nothing: remove the key or give argv")
        return value

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class GpuSpec(_Model):
    names: list[str] = Field(default_factory=list)  # allowed GPU models, e.g. ["RTX 4090"]; [] = any
    min_vram_gb: float = Field(24.0, gt=0)  # Flux LoRA needs 24 GB with quantize: true
    min_ram_gb: float = Field(48.0, gt=0)  # quantizing at start needs ~50 GB of system RAM
    disk_gb: float = Field(120.0, gt=0)  # disk to rent: weights ~33 GB + venv + outputs
    min_reliability: float = Field(0.98, ge=0.0, le=1.0)
    min_inet_down_mbps: float = Field(200.0, ge=0.0)
    num_gpus: int = Field(1, ge=1, le=16)
    interruptible: bool = False  # bid instances: cheaper, can be outbid mid-run
    datacenter_only: bool = False
    verified_only: bool = True
    image: str = "pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel"
    min_cuda: float | None = Field(12.4, ge=0)  # max CUDA version the host driver supports
    max_cuda: float | None = Field(None, ge=0)
    min_driver: str | None = None  # e.g. "580.0" for torch cu130 builds


class BudgetSpec(_Model):
    max_usd: float = Field(gt=0)  # COST_GUARD: hard cap for this run, all costs included
    max_usd_per_hour: float | None = Field(None, gt=0)
    max_hours: float | None = Field(None, gt=0)
    on_cap: Literal["graceful_stop", "hard_stop"] = "graceful_stop"  # graceful: checkpoint, publish
    safety_margin: float = Field(0.15, ge=0.0, le=2.0)  # estimates are multiplied by 1 + this


class ProviderSpec(_Model):
    type: Literal["vast", "ssh", "local"] = "vast"
    host: str | None = None  # ssh only
    port: int = Field(22, ge=1, le=65535)
    user: str = "root"
    key_path: Path | None = None  # ssh only; default ~/.ssh/id_ed25519 via ssh's own rules
    price_per_hour: float = Field(0.0, ge=0.0)  # ssh/local: what your own hardware costs you
    remote_root: str = "/workspace/flux-remote"  # where run dirs live on the instance
    remote_python: str = "python3"
    auto_mount_paths: bool = True  # VAST_AUTO_MOUNT_PATHS: caches/outputs on the largest volume
    heartbeat_grace_s: int = Field(900, ge=10)  # the agent's watchdog acts after this much silence

    @model_validator(mode="after")
    def _ssh_needs_host(self) -> "ProviderSpec":
        if self.type == "ssh" and not self.host:
            raise ValueError("provider type ssh needs `host` (and usually `user`, `port`, `key_path`)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"type": value}
        return value


class WandbSpec(_Model):
    enabled: bool = False  # the key comes only from WANDB_API_KEY
    project: str = "flux-remote"
    entity: str | None = None
    run_name: str | None = None


class PublishSpec(_Model):
    out_dir: Path | None = None  # default ./runs/<name>/
    hf_repo: str | None = Field(None, pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
    hf_private: bool = True


class RunSpec(_Model):
    name: str
    trigger_word: str | None = None
    base_model: Union[Literal["flux-dev", "flux-schnell"], CustomBaseModel] = "flux-dev"
    dataset: DatasetSpec
    captioning: CaptioningSpec = Field(default_factory=CaptioningSpec)
    quality_gate: QualityGateSpec = Field(default_factory=QualityGateSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    gpu: GpuSpec = Field(default_factory=GpuSpec)
    budget: BudgetSpec
    provider: ProviderSpec = Field(default_factory=ProviderSpec)
    wandb: WandbSpec = Field(default_factory=WandbSpec)
    publish: PublishSpec = Field(default_factory=PublishSpec)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError(
                "must be 1-63 characters of letters, digits, '-' or '_', starting with a letter "
                "or digit (it becomes a folder name and an instance label)"
            )
        return value

    @field_validator("trigger_word")
    @classmethod
    def _trigger(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or "\n" in value):
            raise ValueError("must be a non-empty single line, e.g. 'p3r5on'")
        return value

    @property
    def base_model_path(self) -> str:
        if isinstance(self.base_model, CustomBaseModel):
            return self.base_model.name_or_path
        return BASE_MODELS[self.base_model]

    @property
    def is_schnell(self) -> bool:
        if isinstance(self.base_model, CustomBaseModel):
            return self.base_model.variant == "schnell"
        return self.base_model == "flux-schnell"

    @property
    def out_dir(self) -> Path:
        return self.publish.out_dir or Path("runs") / self.name


class BatchSpec(_Model):
    """The ``batch:`` section: the rest of the file is the base spec every run starts from."""

    max_usd: float = Field(gt=0)  # total for all runs together; never exceeded
    max_parallel: int = Field(1, ge=1, le=64)  # instances alive at once
    retries: int = Field(1, ge=0, le=5)  # infrastructure failures only, never a failed gate
    runs: list[dict[str, Any]] | None = None  # overrides (dotted keys or nested), one per run
    sweep: dict[str, list[Any]] | None = None  # dotted key -> values; cartesian product

    @model_validator(mode="after")
    def _one_of(self) -> "BatchSpec":
        if (self.runs is None) == (self.sweep is None):
            raise ValueError("give exactly one of `runs:` (a list of overrides) or `sweep:`")
        if self.runs is not None and not self.runs:
            raise ValueError("`runs:` is empty")
        if self.sweep is not None:
            for key, values in self.sweep.items():
                if not isinstance(values, list) or not values:
                    raise ValueError(f"sweep key {key!r} needs a non-empty list of values")
        return self


def json_schema() -> dict[str, Any]:
    """JSON Schema of a spec file, the optional ``batch:`` section included (for editors)."""
    schema = RunSpec.model_json_schema()
    batch = BatchSpec.model_json_schema()
    defs = schema.setdefault("$defs", {})
    defs.update(batch.pop("$defs", {}))
    defs["BatchSpec"] = batch
    schema["properties"]["batch"] = {
        "$ref": "#/$defs/BatchSpec",
        "description": "Makes this a batch file: the rest of the file is the base spec of every run.",
    }
    provider = schema["properties"]["provider"]
    schema["properties"]["provider"] = {  # the shorthand `provider: vast` is valid too
        "anyOf": [{"$ref": "#/$defs/ProviderSpec"}, {"enum": ["vast", "ssh", "local"]}],
        **{key: value for key, value in provider.items() if key != "$ref"},
    }
    schema["title"] = "flux-remote run spec"
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
