"""``training.resume_from_checkpoint``: where training starts (RESUME_FROM_CHECKPOINT).

Both trainers resume by themselves: ai-toolkit loads the newest ``<name>*`` save in its output
folder (by creation time) and reads the step from its ``training_info`` metadata, the tiny
trainer does the same by step; both reload ``optimizer.pt``. So the policy only arranges the
output folder ``<training_folder>/<name>/`` before the trainer starts:

``auto`` (the default)
    Nothing to arrange: continue from the newest checkpoint, if there is one.
``none``
    Start at step 0. What an earlier attempt left (``<name>*`` saves, ``optimizer.pt``,
    ``samples/``) is moved into ``previous-<UTC time>/`` in the same folder (a name neither
    trainer takes for a save); nothing is deleted.
a path to a ``.safetensors`` LoRA
    Relative to the dataset folder (the file ships with the dataset; ingest skips files that
    are not images) or absolute on the machine that runs the agent. It must load with
    safetensors and hold PEFT ``lora_A``/``lora_B`` pairs of the run's rank, else the run fails
    before training. Earlier files are set aside as for ``none``, then the LoRA is copied in as
    ``<name>_<9-digit step>.safetensors``, the step taken from its ``training_info`` metadata
    (0 without) and written into the copy's metadata so that both trainers start there. With
    no ``optimizer.pt`` beside it the optimizer starts fresh.

``none`` and a path are applied once per run: ``resume.json`` in the run dir records it, so an
agent restarted on the same plan (after a crash or a kill) continues from the run's own
checkpoints as with ``auto``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from remote.plan import write_json_atomic

MARKER = "resume.json"  # in the run dir: the policy was applied for this run
SET_ASIDE_PREFIX = "previous-"
_COPY_CHUNK = 16 * 1024 * 1024


class ResumeError(ValueError):
    """The checkpoint named by ``resume_from_checkpoint`` cannot be used; the message says why."""


@dataclass(frozen=True)
class ResumeSource:
    """A validated LoRA to start from."""

    path: Path
    step: int  # from its training_info metadata; 0 when it has none
    pairs: int  # lora_A/lora_B pairs


def setting_of(spec: dict[str, Any]) -> str:
    """The spec's ``training.resume_from_checkpoint`` ("auto" when absent)."""
    value = (spec.get("training") or {}).get("resume_from_checkpoint")
    return str(value).strip() if value not in (None, "") else "auto"


def resolve_source(setting: str, dataset_dir: Path) -> Path:
    """The file a path setting names: absolute as given, relative to the dataset folder."""
    path = Path(setting).expanduser()
    return path if path.is_absolute() else dataset_dir / path


def inspect_source(path: Path, *, rank: int, flux_keys: bool = False) -> ResumeSource:
    """Validate a LoRA to resume from; raises :class:`ResumeError` naming every problem.

    ``flux_keys`` (the ai-toolkit trainer): its keys and shapes must also be ones ai-toolkit
    looks for in a Flux LoRA of ``rank`` (:mod:`remote.flux_keys`): it loads non-strictly and
    would otherwise start from zero with only a "Missing keys" line."""
    from remote.flux_keys import flux_key_problems, read_shapes
    from remote.validate import validate_lora

    if not path.is_file():
        raise ResumeError(f"resume_from_checkpoint: {path} does not exist (a relative path is "
                          "read from the dataset folder)")
    if path.suffix != ".safetensors":
        raise ResumeError(f"resume_from_checkpoint: {path.name} is not a .safetensors LoRA")
    report = validate_lora(path, rank=rank)
    # a LoRA from elsewhere may lack training_info: it then starts at step 0
    problems = [p for p in report["problems"]
                if report["step"] is not None or "training_info" not in p]
    if flux_keys and not problems:
        try:
            problems = flux_key_problems(read_shapes(path), rank=rank)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems = [f"its header cannot be read: {exc}"]
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ResumeError(f"resume_from_checkpoint: {path.name} cannot be resumed from: "
                          + "; ".join(problems[:5]) + more)
    return ResumeSource(path=path, step=int(report["step"] or 0), pairs=int(report["pairs"]))


def read_marker(run_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((run_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class ResumePolicy:
    """The resume setting of one run; :meth:`apply` arranges the output folder before training.

    ``rank`` is the LoRA rank the run trains (the generated config's ``network.linear``);
    ``clock`` (epoch seconds) names the set-aside folder and stamps the record; ``flux_keys``
    (ai-toolkit trains) checks a source's keys and shapes against a Flux LoRA's.
    """

    def __init__(self, setting: str, *, run_dir: Path, run_id: str, dataset_dir: Path,
                 output_dir: Path, name: str, rank: int,
                 clock: Callable[[], float] = time.time, flux_keys: bool = False) -> None:
        self.setting = setting
        self.run_dir = run_dir
        self.run_id = run_id
        self.dataset_dir = dataset_dir
        self.output_dir = output_dir
        self.name = name
        self.rank = rank
        self.clock = clock
        self.flux_keys = flux_keys  # ai-toolkit: the source must fit a Flux LoRA (inspect_source)

    @property
    def mode(self) -> str:
        """One of auto, none or path."""
        return self.setting if self.setting in ("auto", "none") else "path"

    def pending(self) -> bool:
        """True while ``none`` or a path still has to be applied to this run."""
        if self.mode == "auto":
            return False
        marker = read_marker(self.run_dir)
        return not (marker and marker.get("run_id") == self.run_id
                    and marker.get("setting") == self.setting)

    def check(self) -> ResumeSource | None:
        """Validate the source of a pending path setting (cheap enough to run before paying for
        the bootstrap); None when there is nothing to check."""
        if self.mode != "path" or not self.pending():
            return None
        return inspect_source(resolve_source(self.setting, self.dataset_dir), rank=self.rank,
                              flux_keys=self.flux_keys)

    def apply(self) -> dict[str, Any] | None:
        """Arrange the output folder once; returns what was done (also kept in ``resume.json``),
        or None when nothing was to do. Raises :class:`ResumeError` for an unusable source."""
        if not self.pending():
            return None
        source = self.check()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        aside, moved = self._set_aside()
        record: dict[str, Any] = {
            "run_id": self.run_id, "setting": self.setting, "mode": self.mode,
            "applied_at": self.clock(), "set_aside": str(aside) if aside else None,
            "moved": moved, "checkpoint": None, "step": 0}
        if source is not None:
            target = self.output_dir / f"{self.name}_{source.step:09d}.safetensors"
            copy_with_step(source.path, target, source.step)
            record.update(source=str(source.path), checkpoint=str(target), step=source.step)
        write_json_atomic(self.run_dir / MARKER, record)
        return record

    def _set_aside(self) -> tuple[Path | None, list[str]]:
        """Move an earlier attempt's saves, optimizer state and samples out of the trainers' way."""
        entries = sorted(p for p in self.output_dir.iterdir() if self._earlier(p))
        if not entries:
            return None, []
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(self.clock()))
        aside = self.output_dir / f"{SET_ASIDE_PREFIX}{stamp}"
        n = 1
        while aside.exists():
            n += 1
            aside = self.output_dir / f"{SET_ASIDE_PREFIX}{stamp}-{n}"
        aside.mkdir()
        for entry in entries:
            os.replace(entry, aside / entry.name)
        return aside, [entry.name for entry in entries]

    def _earlier(self, path: Path) -> bool:
        """What a trainer would resume from (ai-toolkit globs ``<name>*``), and what belongs to
        that attempt: ``optimizer.pt`` and ``samples/``."""
        if path.name in ("optimizer.pt", "samples"):
            return True
        if not path.name.startswith(self.name) or path.name.startswith(SET_ASIDE_PREFIX):
            return False
        return path.is_dir() or path.suffix in (".safetensors", ".pt")


def copy_with_step(src: Path, dst: Path, step: int) -> None:
    """Copy a safetensors file, setting ``training_info`` to ``step`` in its metadata.

    Only the JSON header changes (tensor offsets are relative to the data that follows it), so
    this needs neither torch nor numpy and keeps every dtype. Written atomically, mode 0644.
    """
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    with open(src, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
        metadata = dict(header.get("__metadata__") or {})
        epoch = 0
        try:
            epoch = int(json.loads(metadata["training_info"]).get("epoch", 0))
        except (KeyError, ValueError, TypeError, AttributeError):
            pass
        metadata["training_info"] = json.dumps({"step": step, "epoch": epoch})
        header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
        with open(tmp, "wb") as out:
            out.write(len(raw).to_bytes(8, "little"))
            out.write(raw)
            shutil.copyfileobj(fh, out, _COPY_CHUNK)
            out.flush()
            os.fsync(out.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, dst)


def lora_is_whole(path: Path) -> bool:
    """A safetensors file that loads: its header parses and every tensor's bytes are there.

    A save cut short (SIGKILL after the grace period, a host OOM) leaves a truncated file that
    safetensors refuses ("Error while deserializing header: MetadataIncompleteBuffer"); standard
    library only, so the agent can check before a retry without torch."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if not 0 < header_len <= size - 8:
                return False
            header = json.loads(fh.read(header_len))
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return size >= 8 + header_len + max(ends, default=0)


BROKEN_PREFIX = "unloadable-"


def set_aside_unloadable(output_dir: Path, name: str, *,
                         clock: Callable[[], float] = time.time) -> Path | None:
    """Move the saves a resume would choke on out of the trainer's way; returns the folder.

    ai-toolkit resumes from the newest ``<name>*`` save by creation time
    (``BaseSDTrainProcess.get_latest_save_path``: ``max(paths, key=os.path.getctime)``) and
    crashes on one that a kill cut short, on every retry. From the newest down, each LoRA that
    does not load is moved to ``unloadable-<UTC time>/`` until one loads; an ``optimizer.pt``
    that does not open goes there too. Nothing is deleted."""
    if not output_dir.is_dir():
        return None
    saves = sorted((p for p in output_dir.glob(f"{name}*.safetensors") if p.is_file()),
                   key=lambda p: p.stat().st_ctime, reverse=True)
    broken = []
    for path in saves:
        if lora_is_whole(path):
            break
        broken.append(path)
    optimizer = output_dir / "optimizer.pt"
    if optimizer.is_file() and not optimizer_is_whole(optimizer):
        broken.append(optimizer)
    if not broken:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(clock()))
    aside = output_dir / f"{BROKEN_PREFIX}{stamp}"
    n = 1
    while aside.exists():
        n += 1
        aside = output_dir / f"{BROKEN_PREFIX}{stamp}-{n}"
    aside.mkdir()
    for path in broken:
        os.replace(path, aside / path.name)
    return aside


def optimizer_is_whole(path: Path) -> bool:
    """``optimizer.pt`` as ``torch.save`` writes it (a zip archive) opens and its CRCs match."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def run_rank(spec: dict[str, Any]) -> int:
    """The rank the run trains: ``network.linear`` of the generated config (overrides included)."""
    from remote.aitk_config import OverrideError, build_aitk_config

    try:
        config = build_aitk_config(spec, dataset_dir="", training_folder="")
    except OverrideError:  # the config stage reports it; the spec's own rank is the best guess
        return int((spec.get("training") or {}).get("rank", 16))
    return int(config["config"]["process"][0]["network"]["linear"])
