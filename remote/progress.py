"""Read a trainer's log: progress redraws, checkpoint saves and the cause of a crash.

ai-toolkit (and the tiny trainer, which copies it) prints a tqdm bar that is redrawn in place, so
a raw log holds many redraws separated by ``\\r``, with ordinary ``\\n`` lines in between::

    my_lora:  10%|#         | 200/2000 [06:40<1:00:00,  2.00s/it, lr: 1.0e-04 loss: 4.211e-01]
    Saving at step 250
    Saved checkpoint to output/my_lora/my_lora_000000250.safetensors
    Saved optimizer to output/my_lora/optimizer.pt

Only the training bar is training progress (``BaseSDTrainProcess.run``: ``ToolkitProgressBar(
desc=self.job.name)`` with the postfix ``lr: ... loss: ...``); model loading, quantizing,
"Caching latents", "Generating Images" and its inner denoise bar are other tqdm bars.

A save (``BaseSDTrainProcess.save``) prints "Saved checkpoint to" once the LoRA is written, then
writes ``optimizer.pt`` and prints "Saved optimizer to" (or "Could not save optimizer"), then
prunes old saves: the save is complete only after the optimizer line. The final save has no
"Saving at step" line.

A ``print`` while the bar is on screen glues its text straight after the bar's ``]``, so every
pattern here is searched for inside a segment rather than anchored to its start.

:class:`LogWatcher` consumes bytes as they arrive (a segment split across chunks is handled) and
returns events; :func:`parse_progress` and :func:`recognise_error` work on text already read;
:func:`progress_main` is ``python -m remote progress LOGFILE``. Standard library only.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf"
_PROGRESS_RE = re.compile(
    r"(?:(?P<desc>[^\]\r\n]*?):)?\s*(?P<pct>\d{1,3})%\|(?P<bar>[^|\r\n]*)\|\s*(?P<n>\d+)/(?P<total>\d+)\s*"
    r"\[(?P<elapsed>\d+(?::\d{2}){1,2})<(?P<remaining>\d+(?::\d{2}){1,2}|\?),\s*"
    r"(?P<rate>\d+\.?\d*|\?)\s*(?P<prefix>[kMG]?)(?P<unit>it/s|s/it)"
    r"(?:,\s*(?P<postfix>[^\]\r\n]*))?\]"
)
_LR_RE = re.compile(rf"\blr:\s*(?P<v>{_NUMBER})", re.IGNORECASE)
_LOSS_RE = re.compile(rf"\bloss:\s*(?P<v>{_NUMBER})", re.IGNORECASE)
_SAVING_RE = re.compile(r"Saving at step (?P<step>\d+)")
_SAVED_RE = re.compile(r"Saved checkpoint to (?P<path>.+?)\s*$")
# BaseSDTrainProcess.save: after the LoRA, the optimizer state (or the reason it was not saved)
_OPTIMIZER_RE = re.compile(r"Saved optimizer to \S|Could not save optimizer")
# BaseSDTrainProcess.run: "Generating baseline samples before training" precedes the bar
_BASELINE_RE = re.compile(r"Generating baseline samples before training")
# toolkit/network_mixins.py load_weights prints the file's keys the network lacks, always
_MISSING_KEYS_RE = re.compile(r"Missing keys: \[(?P<keys>.*)\]")
_STEP_IN_NAME_RE = re.compile(r"_(?P<step>\d{9})\.safetensors$")
_SI = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9}

# Causes the supervisor acts on; the first pattern found in a log wins (later errors are
# usually consequences of the first one, e.g. "Error running job: ..." repeats it).
ERROR_PATTERNS: dict[str, re.Pattern[str]] = {
    # torch's allocator ("CUDA out of memory"), an asynchronous kernel failure ("CUDA error: out
    # of memory"), and ai-toolkit's own abort after three skipped batches
    # (BaseSDTrainProcess.run: "OOM during training step 3 times in a row, aborting training";
    # its "# OOM during training step, skipping batch N/3 #" banner is a warning, not the end)
    "cuda_oom": re.compile(r"CUDA out of memory|CUDA error: out of memory"
                           r"|torch\.OutOfMemoryError|torch\.cuda\.OutOfMemoryError"
                           r"|OOM during training step \d+ times in a row"),
    "disk_full": re.compile(r"No space left on device"),
    "hf_auth": re.compile(
        r"\b40[13] Client Error|\bHTTP Error 40[13]\b|status(?: code)?[ :=]+40[13]\b"
        r"|GatedRepoError|gated repo|does not appear to have a file named config\.json"
        r"|Access to model \S+ is restricted|Invalid user token|\b40[13] (?:Unauthorized|Forbidden)\b",
        re.IGNORECASE,
    ),
    # run.py prints "Error running job: {e}" (no type) before the traceback names the type
    "import_error": re.compile(r"\b(?:ImportError|ModuleNotFoundError)\b"
                              r"|cannot import name '[^']+' from|No module named '"),
    # safetensors on a save cut short: the retry needs that file set aside (remote.resume)
    "corrupt_checkpoint": re.compile(r"Error while deserializing header"),
}
# a LoRA whose keys the network lacks loaded (partly) nothing: ai-toolkit goes on training
MISSING_KEYS = "missing_keys"
NON_RETRYABLE_CAUSES = frozenset({"hf_auth", "import_error", "disk_full", MISSING_KEYS})


@dataclass
class Progress:
    """One progress redraw. Times are seconds; ``s_per_step`` is converted from it/s if needed.

    As parsed, ``s_per_step`` and ``eta_s`` are the bar's own (paused-clock) figures; the train
    supervisor replaces them with wall-clock ones (:mod:`remote.pace`) before anyone sees them."""

    step: int
    total: int
    loss: float | None = None
    lr: float | None = None
    s_per_step: float | None = None
    eta_s: float | None = None
    elapsed_s: float | None = None
    # set by the supervisor (remote.pace): wall seconds until each of the next saves is complete
    next_saves_s: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


@dataclass
class LogEvent:
    """What :meth:`LogWatcher.feed` reports.

    kind:
        ``progress`` (``progress`` set), ``saving`` (``step`` set: a save has begun),
        ``checkpoint`` (``path`` set, ``step`` from the file name or the last progress: the LoRA
        is written), ``saved`` (the save is complete: optimizer state written or given up),
        ``bar`` (a tqdm bar that is not training: ``progress`` set),
        ``error`` (``cause`` set: a recognised failure line).
    """

    kind: str
    line: str
    progress: Progress | None = None
    step: int | None = None
    path: str | None = None
    cause: str | None = None


def parse_interval(text: str) -> float | None:
    """``MM:SS`` or ``H:MM:SS`` -> seconds; ``?`` -> None."""
    if text == "?":
        return None
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + int(part)
    return seconds


def _number(match: re.Match[str] | None) -> float | None:
    return float(match.group("v")) if match else None


def _from_match(m: re.Match[str]) -> Progress:
    step, total = int(m.group("n")), int(m.group("total"))
    s_per_step = None
    if m.group("rate") != "?":
        rate = float(m.group("rate")) * _SI[m.group("prefix")]
        if m.group("unit") == "s/it":
            s_per_step = rate
        elif rate > 0:
            s_per_step = 1.0 / rate
    eta = parse_interval(m.group("remaining"))
    if eta is None and s_per_step is not None:
        eta = max(total - step, 0) * s_per_step
    postfix = m.group("postfix") or ""
    return Progress(step=step, total=total, loss=_number(_LOSS_RE.search(postfix)),
                    lr=_number(_LR_RE.search(postfix)), s_per_step=s_per_step, eta_s=eta,
                    elapsed_s=parse_interval(m.group("elapsed")))


def parse_bar(text: str) -> tuple[str, str, Progress] | None:
    """The last tqdm redraw in ``text`` as (description, postfix, progress), any bar."""
    found = None
    for found in _PROGRESS_RE.finditer(text):
        pass
    if found is None:
        return None
    return (found.group("desc") or "").strip(), found.group("postfix") or "", _from_match(found)


def is_training_postfix(postfix: str) -> bool:
    """ai-toolkit's training bar carries ``lr: ... loss: ...`` (BaseSDTrainProcess.run)."""
    return bool(_LR_RE.search(postfix) and _LOSS_RE.search(postfix))


def parse_progress(text: str) -> Progress | None:
    """The latest training progress in ``text`` (any mix of ``\\r`` and ``\\n``), or None.

    Training bars are told from the other bars in a log (caching latents, loading shards,
    sampling) as :class:`LogWatcher` does; a text with no training bar has no progress."""
    watcher = LogWatcher()
    watcher.feed(text.encode("utf-8"))
    watcher.close()
    return watcher.progress


def recognise_error(text: str) -> str | None:
    """The cause of the earliest recognised failure in ``text``:
    ``cuda_oom`` | ``hf_auth`` | ``import_error`` | ``disk_full``, or None."""
    found = [(m.start(), cause) for cause, pattern in ERROR_PATTERNS.items()
             if (m := pattern.search(text))]
    return min(found)[1] if found else None


def checkpoint_step(path: str) -> int | None:
    """The step in a ``<name>_<9 digits>.safetensors`` file name (None for the final file)."""
    m = _STEP_IN_NAME_RE.search(path.replace("\\", "/"))
    return int(m.group("step")) if m else None


class LogWatcher:
    """Incremental log reader: ``feed(bytes)`` returns the events completed so far.

    Only the training bar makes ``progress`` events: the bar whose description is ``name`` (the
    job name, which both trainers use) and whose postfix carries ``lr:`` and ``loss:``; without a
    name, the first bar with such a postfix names it. Other tqdm bars (loading shards, caching
    latents, "Generating Images" and its denoise bar) are ignored; they only tell the phase.

    ``phase`` is what the trainer is doing, for a stall report: ``loading`` (until the first
    bar of training or sampling), ``baseline sampling``, ``training``, ``sampling``, ``saving``,
    ``final save`` and ``final sampling`` (after the last step).

    A segment ends at ``\\r`` or ``\\n``. A tqdm redraw is complete once its closing ``]`` has
    arrived even though its terminating ``\\r`` comes with the next redraw, so an unterminated
    tail that already holds a whole bar is reported at once (and not again when it completes).
    """

    def __init__(self, name: str | None = None) -> None:
        self._pending = b""
        self._reported_tail: str | None = None
        self._train_desc = name  # the training bar's description: the job name
        self.progress: Progress | None = None
        self.other_progress: Progress | None = None  # the last bar that is not training
        self.last_checkpoint: str | None = None
        self.saving = False  # a save has begun and its optimizer state is not yet written
        self.saves = 0  # complete saves
        self.final_saved = False  # the final <name>.safetensors and its optimizer state
        self._saving_final = False  # the save under way is the final one
        self._save_step = -1  # the training step shown when the save under way began
        self.phase = "loading"
        self.total: int | None = None  # the training bar's total, once seen
        self.cause: str | None = None  # first recognised error
        self.error_line: str | None = None

    def feed(self, chunk: bytes) -> list[LogEvent]:
        data = self._pending + chunk
        segments = re.split(rb"[\r\n]", data)
        self._pending = segments.pop()
        events: list[LogEvent] = []
        for raw in segments:
            text = raw.decode("utf-8", errors="replace")
            if text == self._reported_tail:
                self._reported_tail = None
                continue
            self._reported_tail = None
            events.extend(self._segment(text))
        tail = self._pending.decode("utf-8", errors="replace")
        if tail and tail != self._reported_tail and tail.rstrip().endswith("]"):
            tail_events = self._segment(tail, progress_only=True)
            if tail_events:
                self._reported_tail = tail
                events.extend(tail_events)
        return events

    def close(self) -> list[LogEvent]:
        """Flush a final unterminated segment (end of file or process exit)."""
        return self.feed(b"\n") if self._pending else []

    def _segment(self, text: str, *, progress_only: bool = False) -> list[LogEvent]:
        events: list[LogEvent] = []
        bar = parse_bar(text)
        if bar:
            desc, postfix, progress = bar
            if self._train_desc is None and is_training_postfix(postfix):
                self._train_desc = desc
            if desc == self._train_desc and is_training_postfix(postfix):
                # a later step: that save is over (a trainer that prints no optimizer line; a
                # redraw at the same count may be tqdm's monitor refreshing mid-save)
                if self.saving and progress.step > self._save_step:
                    events.append(self._save_done(text))
                self.progress, self.total = progress, progress.total
                if not self.saving:
                    self.phase = "training"
                events.append(LogEvent("progress", text, progress=progress))
            else:
                self.other_progress = progress
                if not self.saving and self.phase != "baseline sampling":
                    self.phase = self._sampling_phase()
                events.append(LogEvent("bar", text, progress=progress))
        if progress_only:
            return events
        if _BASELINE_RE.search(text):
            self.phase = "baseline sampling"
        if m := _SAVING_RE.search(text):
            self._begin_save("saving")
            events.append(LogEvent("saving", text, step=int(m.group("step"))))
        if m := _SAVED_RE.search(text):
            path = m.group("path")
            step = checkpoint_step(path)
            final = step is None
            if step is None and self.progress is not None:
                step = self.progress.step
            if not self.saving:
                self._begin_save("final save" if final else "saving")
            self.phase = "final save" if final else "saving"
            self._saving_final = final
            self.last_checkpoint = path
            events.append(LogEvent("checkpoint", text, step=step, path=path))
        if _OPTIMIZER_RE.search(text) and self.saving:
            events.append(self._save_done(text))
        if (m := _MISSING_KEYS_RE.search(text)) and m.group("keys").strip():
            events.append(self._error(MISSING_KEYS, text))
        cause = recognise_error(text)
        if cause:
            events.append(self._error(cause, text))
        return events

    def _begin_save(self, phase: str) -> None:
        self.saving, self.phase = True, phase
        self._save_step = self.progress.step if self.progress is not None else -1

    def _sampling_phase(self) -> str:
        if self.progress is None:
            return "loading"
        done = self.total is not None and self.progress.step >= self.total
        return "final sampling" if done or self.final_saved else "sampling"

    def _save_done(self, text: str) -> LogEvent:
        self.saving = False
        self.saves += 1
        self.final_saved = self.final_saved or self._saving_final
        self.phase = "final sampling" if self._saving_final else "training"
        return LogEvent("saved", text, path=self.last_checkpoint)

    def _error(self, cause: str, text: str) -> LogEvent:
        if self.cause is None:
            self.cause, self.error_line = cause, text.strip()
        return LogEvent("error", text, cause=cause)

    def summary(self) -> dict[str, object]:
        """The JSON that ``python -m remote progress`` prints."""
        p = self.progress
        return {
            "step": p.step if p else None,
            "total": p.total if p else None,
            "loss": p.loss if p else None,
            "lr": p.lr if p else None,
            "s_per_step": p.s_per_step if p else None,
            "eta_s": p.eta_s if p else None,
            "elapsed_s": p.elapsed_s if p else None,
            "last_checkpoint": self.last_checkpoint,
            "error": self.cause,
            "error_line": self.error_line,
        }


def progress_main(logfile: str) -> int:
    """Print the latest progress in ``logfile`` as JSON; 1 if the file cannot be read."""
    try:
        data = Path(logfile).read_bytes()
    except OSError as exc:
        print(f"cannot read {logfile}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    watcher = LogWatcher()
    watcher.feed(data)
    watcher.close()
    print(json.dumps(watcher.summary(), indent=2))
    return 0
