"""The run spec: what a user writes in ``run.yaml``, as pydantic v2 models.

Every model forbids unknown keys (typos are errors, not silently ignored settings). Defaults are
the realistic ones for a Flux LoRA on a 24 GB+ GPU; the description on each field says what it
does (editors show it on hover, from the JSON Schema that ``flux-remote schema`` prints).
Loading from YAML with located error messages lives in ``controller.spec.loader``; this module only
declares the shape and the rules that involve one field or one section.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator,
                      model_validator)

# Defined once, in the config generator that also runs on the instance; re-exported here.
from remote.aitk_config import BASE_MODELS, SCHNELL_ADAPTER  # noqa: F401 (re-exported)
from remote.aitk_rules import NAME_TAG, OPTIMIZERS, optimizer_problem, rewrite_problem

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


def _reaches_aitk(value: str) -> str:
    """A string that goes into the ai-toolkit config: refused if ai-toolkit's loader rewrites it."""
    problem = rewrite_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _sample_prompt(value: str) -> str:
    problem = rewrite_problem(value, prompt=True)
    if problem:
        raise ValueError(problem)
    return value


AitkText = Annotated[str, AfterValidator(_reaches_aitk)]


class CustomBaseModel(_Model):
    """An explicit base model: a hub id or a local path, and which Flux variant it is."""

    name_or_path: AitkText = Field(min_length=1,
                                   description="a Hugging Face hub id or a local path")
    variant: Literal["dev", "schnell"] = Field("dev", description="which Flux variant it is")
    assistant_lora_path: AitkText | None = Field(
        None, description="schnell needs ostris' training adapter")


class DatasetSpec(_Model):
    path: Path = Field(description="a local folder of images with optional caption sidecars; "
                                   "never modified")
    caption_ext: str = Field("txt", pattern=r"^[A-Za-z0-9]{1,8}$",
                             description="extension of the caption sidecar beside each image")
    caption_dropout_rate: float = Field(0.05, ge=0.0, le=1.0,
                                        description="fraction of steps trained without a caption")
    shuffle_tokens: bool = Field(False, description="shuffle the comma-separated caption tokens")
    cache_latents_to_disk: bool = Field(True, description="encode images once and cache the latents")
    max_side: int = Field(2048, ge=256, le=8192,
                          description="ingest downscales larger images (never up)")
    max_files: int = Field(10000, ge=1, description="a dataset folder holding more files than "
                                                    "this is refused (a wrong path, e.g. home)")


class CaptioningSpec(_Model):
    mode: Literal["keep", "template", "model"] = Field(
        "template", description="images without a sidecar caption: keep (no caption), template, "
                                "or model (an image-to-text model on the GPU)")
    template: str = Field("a photo of [trigger]",
                          description="used for images without a sidecar caption")

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        if NAME_TAG in value:
            raise ValueError("ai-toolkit replaces '[name]' in every caption with the trigger word "
                             "(toolkit/prompt_utils.py:720 inject_trigger_into_prompt): write "
                             "[trigger] for the trigger word, or the words themselves")
        return value
    model: str = Field("Salesforce/blip-image-captioning-large",
                       description="image-to-text model for mode: model")
    batch_size: int = Field(8, ge=1, le=256, description="images per captioning batch")
    insert_trigger: bool = Field(
        True, description="prepend the trigger word to captions that lack it (false: captions "
                          "are trained as written; ai-toolkit is not given the trigger word)")


GateCategory = Literal[
    "corrupt", "too_small", "duplicate", "blurry", "extreme_aspect", "missing_caption", "nsfw"
]


class QualityGateSpec(_Model):
    enabled: bool = Field(True, description="refuse to train on a dataset that fails the gate")
    strict: bool = Field(False,
                         description="any image in an `exclude` category fails the whole gate")
    min_images: int = Field(5, ge=1, description="usable images needed after exclusions")
    min_short_side: int = Field(256, ge=1, description="pixels")
    blur_threshold: float = Field(
        40.0, ge=0.0, description="variance of Laplacian at 256 px; below = blurry")
    duplicate_max_distance: int = Field(4, ge=0, le=64,
                                        description="perceptual-hash Hamming distance")
    max_aspect_ratio: float = Field(3.0, ge=1.0, description="long side / short side")
    allow_nsfw: bool = Field(True,
                             description="ALLOW_NSFW; only enforced when nsfw_model is set")
    nsfw_model: str | None = Field(
        None, description="an image classifier (hub id) that flags nsfw images; None = no check")
    exclude: list[GateCategory] = Field(
        default_factory=lambda: ["corrupt", "too_small", "duplicate", "extreme_aspect", "nsfw"],
        description="images in these categories are dropped; the other categories only warn",
    )


class SampleSpec(_Model):
    enabled: bool = Field(True, description="sample images while training")
    every: int | None = Field(None, ge=1, description="steps; None = scaled to the run length")
    prompts: list[Annotated[str, AfterValidator(_sample_prompt)]] = Field(
        default_factory=lambda: list(DEFAULT_PROMPTS),
        description="[trigger] is replaced by the trigger word (dropped when there is none)")
    steps: int | None = Field(None, ge=1, le=200,
                              description="denoising steps; None = 20 for dev, 4 for schnell")
    guidance: float | None = Field(None, ge=0.0, le=30.0,
                                   description="None = 4 for dev, 1 for schnell")
    seed: int = Field(42, description="the same seed for every sample, so steps compare")
    width: int = Field(1024, ge=64, le=4096, description="pixels")
    height: int = Field(1024, ge=64, le=4096, description="pixels")


class AiToolkitSpec(_Model):
    repo: str = Field(AI_TOOLKIT_REPO,
                      description="git URL (file:// works: tests and private forks)")
    commit: str = Field(AI_TOOLKIT_COMMIT, description="pinned commit (or branch) to check out")
    path: str | None = Field(None, description="an existing checkout on the instance "
                                               "(the aitoolkit image has one)")
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description="merged last into the generated YAML")


ResumeSetting = Union[Literal["auto", "none"], str]


class TrainingSpec(_Model):
    trainer: Literal["ai-toolkit", "tiny"] = Field(
        "ai-toolkit", description="ai-toolkit (the real one) or tiny (a small CPU LoRA fit: demo, tests)")
    steps: int = Field(2000, ge=1, le=200_000, description="training steps")
    lr: float = Field(1e-4, gt=0.0, le=1.0, description="learning rate")
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank")
    alpha: float | None = Field(
        None, gt=0.0, description="LoRA alpha: ai-toolkit trains Flux LoRAs with alpha = rank, "
                                  "so only the rank's value (or no value) is accepted")
    batch_size: int = Field(1, ge=1, le=64, description="images per step")
    gradient_accumulation_steps: int = Field(1, ge=1, le=256,
                                             description="batches accumulated per optimizer step")
    resolutions: list[int] = Field(default_factory=lambda: [512, 768, 1024],
                                   description="training buckets, multiples of 16")
    optimizer: str = Field("adamw8bit", description="ai-toolkit optimizer name: "
                                                    "adamw8bit, adamw, prodigy, adafactor, ...")
    dtype: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="training precision")
    quantize: bool = Field(True, description="8-bit base weights: Flux fits in 24 GB")
    save_every: int | None = Field(None, ge=1, description="checkpoint every this many steps; "
                                                           "None = scaled to the run length")
    max_step_saves_to_keep: int = Field(4, ge=1, le=100, description="checkpoints kept")
    sample: SampleSpec = Field(default_factory=SampleSpec,
                               description="sample images while training")
    resume_from_checkpoint: ResumeSetting = Field(
        "auto", description="RESUME_FROM_CHECKPOINT: auto | none | path")
    max_retries: int = Field(
        1, ge=0, le=5, description="trainer crashes retried from the newest checkpoint")
    ai_toolkit: AiToolkitSpec = Field(default_factory=AiToolkitSpec,
                                      description="which ai-toolkit to install on the instance")
    command: list[str] | None = Field(
        None, description='explicit trainer argv; "{config}" is the YAML path')

    @field_validator("resolutions")
    @classmethod
    def _resolutions(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("give at least one resolution, e.g. [512, 768, 1024]")
        for res in value:
            if res < 16 or res > 4096 or res % 16:
                raise ValueError(f"{res} is not a multiple of 16 between 16 and 4096")
        return value

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, value: float | None, info: ValidationInfo) -> float | None:
        rank = info.data.get("rank")
        if value is not None and rank is not None and value != rank:
            raise ValueError(
                f"alpha {value:g} with rank {rank} would be ignored: ai-toolkit saves Flux LoRAs "
                "in PEFT format and sets alpha = rank (toolkit/lora_special.py, 'no alpha for "
                "peft'); remove training.alpha or set it to the rank")
        return value

    @field_validator("optimizer")
    @classmethod
    def _optimizer(cls, value: str) -> str:
        problem = optimizer_problem(value)
        if problem:
            raise ValueError(f"{value!r} {problem}; known: {', '.join(OPTIMIZERS)}")
        return value

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("an empty command runs nothing: remove the key or give argv")
        return value

    @field_validator("resume_from_checkpoint")
    @classmethod
    def _resume(cls, value: str) -> str:
        value = value.strip()
        if value in ("auto", "none"):
            return value
        if not value.endswith(".safetensors"):
            raise ValueError("give auto, none, or the path of a .safetensors LoRA (a relative "
                             "path is read from the dataset folder)")
        if ".." in Path(value).parts:
            raise ValueError("a relative path must stay inside the dataset folder (no '..')")
        return value

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class GpuSpec(_Model):
    names: list[str] = Field(default_factory=list,
                             description='allowed GPU models, e.g. ["RTX 4090"]; [] = any')
    min_vram_gb: float = Field(24.0, gt=0, description="Flux LoRA needs 24 GB with quantize: true")
    min_ram_gb: float = Field(48.0, gt=0,
                              description="quantizing at start needs ~50 GB of system RAM")
    disk_gb: float = Field(120.0, gt=0,
                           description="disk to rent: weights ~33 GB + venv + outputs")
    min_reliability: float = Field(0.98, ge=0.0, le=1.0,
                                   description="the host's reliability score, 0 to 1")
    min_inet_down_mbps: float = Field(200.0, ge=0.0,
                                      description="download bandwidth: the weights come first")
    bandwidth_check_url: str | None = Field(
        None,
        description="an http(s) URL of a large file: the checks stage downloads up to 50 MB of it "
                    "to measure the instance's real download speed (a warning below half of "
                    "min_inet_down_mbps); unset: not measured")
    num_gpus: int = Field(1, ge=1, le=16, description="GPUs per instance")
    interruptible: bool = Field(False, description="bid instances: cheaper, can be outbid mid-run")
    on_lost: Literal["continue", "stop"] = Field(
        "continue", description="when the machine is lost (outbid, host offline): continue on "
                               "the next offer from the checkpoint at home, or stop the run")
    datacenter_only: bool = Field(False, description="only hosts in a datacenter")
    verified_only: bool = Field(True, description="only hosts Vast.ai has verified")
    image: str = Field("pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel",
                       description="the Docker image the instance runs")
    min_cuda: float | None = Field(12.4, ge=0,
                                   description="max CUDA version the host driver supports")
    max_cuda: float | None = Field(None, ge=0,
                                   description="upper bound on the host's CUDA version")
    min_driver: str | None = Field(None, description='e.g. "580.0" for torch cu130 builds')

    @field_validator("bandwidth_check_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://\S+", value):
            raise ValueError("must be an http(s) URL of a large file, e.g. "
                             "https://huggingface.co/<repo>/resolve/main/<file>")
        return value


class BudgetSpec(_Model):
    max_usd: float = Field(gt=0,
                           description="COST_GUARD: hard cap for this run, all costs included")
    max_usd_per_hour: float | None = Field(None, gt=0, description="offers dearer than this are skipped")
    max_hours: float | None = Field(None, gt=0, description="optional wall-clock cap")
    on_cap: Literal["graceful_stop", "hard_stop"] = Field(
        "graceful_stop", description="graceful: checkpoint, publish")
    safety_margin: float = Field(0.15, ge=0.0, le=2.0,
                                 description="estimates are multiplied by 1 + this")
    stop_grace_s: float = Field(
        300.0, ge=0.0, description="after the cap's STOP, the agent has this long (never more "
                                   "than the money left buys) before the instance is stopped "
                                   "through the provider's API")


class ProviderSpec(_Model):
    type: Literal["vast", "ssh", "local"] = Field(
        "vast", description="vast: rent on Vast.ai; ssh: a machine you have; local: this machine")
    host: str | None = Field(None, description="ssh only")
    port: int = Field(22, ge=1, le=65535, description="ssh only")
    user: str = Field("root", description="ssh only")
    key_path: Path | None = Field(
        None, description="ssh only; default ~/.ssh/id_ed25519 via ssh's own rules")
    price_per_hour: float = Field(0.0, ge=0.0,
                                  description="ssh/local: what your own hardware costs you")
    remote_root: AitkText = Field("/workspace/flux-remote",
                                  description="where run dirs live on the instance")
    remote_python: str = Field("python3", description="the Python the agent runs with")
    auto_mount_paths: bool = Field(
        True, description="VAST_AUTO_MOUNT_PATHS: caches/outputs on the largest volume")
    heartbeat_grace_s: int = Field(
        900, ge=10, description="the agent's watchdog acts after this much silence")

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
    enabled: bool = Field(False, description="the key comes only from WANDB_API_KEY")
    project: AitkText = Field("flux-remote", description="the W&B project")
    entity: str | None = Field(None, description="the W&B team or user; None = your default")
    run_name: AitkText | None = Field(None, description="None = the run id")


class PublishSpec(_Model):
    out_dir: Path | None = Field(None, description="where the bundle goes; default ./runs/<name>/")
    hf_repo: str | None = Field(None, pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$",
                                description="upload the bundle to this Hub repo (HF_TOKEN, write)")
    hf_private: bool = Field(True, description="create the Hub repo private")
    fetch_checkpoints: bool = Field(
        False, description="copy each new checkpoint to <out>/checkpoints/ while training (only "
                           "the newest is kept): costs download bandwidth, keeps the progress "
                           "home if the host dies")
    max_bundle_mb: int = Field(4096, ge=1, description="a bundle larger than this is not "
                                                       "brought home (the instance is untrusted)")
    max_checkpoint_mb: int = Field(4096, ge=1,
                                   description="checkpoint files larger than this stay on the "
                                               "instance")


class RunSpec(_Model):
    name: str = Field(description="letters, digits, - and _: a folder name and an instance label")
    trigger_word: str | None = Field(None,
                                     description="the word that calls up your subject in prompts")
    base_model: Union[Literal["flux-dev", "flux-schnell"], CustomBaseModel] = Field(
        "flux-dev", description="flux-dev (gated: license + HF_TOKEN), flux-schnell, or "
                                "{name_or_path, variant}")
    dataset: DatasetSpec = Field(description="the images to train on")
    captioning: CaptioningSpec = Field(default_factory=CaptioningSpec,
                                       description="captions for images without one")
    quality_gate: QualityGateSpec = Field(default_factory=QualityGateSpec,
                                          description="checks before paying for training")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="the LoRA training")
    gpu: GpuSpec = Field(default_factory=GpuSpec, description="which offers may be rented")
    budget: BudgetSpec = Field(description="what the run may cost")
    provider: ProviderSpec = Field(default_factory=ProviderSpec,
                                   description="where the run happens")
    wandb: WandbSpec = Field(default_factory=WandbSpec,
                             description="optional Weights & Biases logging")
    publish: PublishSpec = Field(default_factory=PublishSpec,
                                 description="where the bundle goes")

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
        # the trigger word is in the config and in every sample prompt
        problem = rewrite_problem(value, prompt=True) if value is not None else None
        if problem:
            raise ValueError(problem)
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

    max_usd: float = Field(gt=0, description="total for all runs together; never exceeded")
    max_parallel: int = Field(1, ge=1, le=64, description="instances alive at once")
    retries: int = Field(1, ge=0, le=5,
                         description="infrastructure failures only, never a failed gate")
    reuse_machines: bool = Field(
        True, description="runs whose base model, trainer, gpu and provider sections match run "
                          "one after another on a machine already set up (setup paid once per "
                          "machine); false: a fresh instance per run")
    gpus_per_machine: int = Field(
        4, ge=1, le=8,
        description="with reuse_machines: up to this many runs at once on one multi-GPU "
                    "on-demand instance, one trainer per GPU, when the planner finds that cheaper "
                    "per run than an instance each (controller.planning.packing); 1: never")
    runs: list[dict[str, Any]] | None = Field(
        None, description="overrides (dotted keys or nested), one per run")
    sweep: dict[str, list[Any]] | None = Field(
        None, description="dotted key -> values; cartesian product")

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
