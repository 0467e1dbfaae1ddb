"""Optional Weights & Biases logging for the tiny trainer (ai-toolkit logs through its own keys).

The switch is the ai-toolkit config's ``logging`` section, which :mod:`remote.aitk_config` writes
when the spec has ``wandb.enabled: true``: ``use_wandb``, ``project_name``, ``run_name``,
``log_every``. Both trainers therefore read the same file; ai-toolkit acts on it itself, the tiny
trainer through :class:`WandbLogger`.

Nothing here is required: without ``use_wandb``, or when ``wandb`` is not importable, every call
is a no-op (the latter says so once), and a W&B failure never stops training: the first call that
raises is reported and logging is switched off. The API key is never passed by this code: wandb
reads ``WANDB_API_KEY`` (and ``WANDB_MODE``, ``WANDB_ENTITY``, ``WANDB_DIR``) from the
environment itself. ``WANDB_MODE=offline`` writes the run under ``<dir>/wandb/offline-run-*``.

The run id is ``WANDB_RUN_ID`` when set, else the one remembered in ``wandb_run.json`` in the
trainer's output folder, so a resumed training continues the same W&B run (``resume="allow"``).
That file also holds the run URL, for whoever wants to show it.

For the agent, whichever the trainer: :func:`trainer_env` (the variables that name the run),
:func:`summarize_run` (after packing: the receipt and the quality report into the run's summary,
via ``python -m remote.wandb_log summary``) and :func:`find_run_url` (for ``status.json``).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

RUN_FILE = "wandb_run.json"
DEFAULT_PROJECT = "flux-remote"
# what wandb prints when a run starts ("View run at ...") and what WandbLogger prints ("run X at")
_URL_LINE = re.compile(r"wandb:.*?\b(?:View run at|run \S+ at) (https?://\S+)")

Warn = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def logging_section(job: Mapping[str, Any]) -> dict[str, Any]:
    """``config.process[0].logging`` of an ai-toolkit job document ({} when absent)."""
    try:
        section = job["config"]["process"][0].get("logging") or {}
    except (KeyError, IndexError, TypeError, AttributeError):
        return {}
    return dict(section) if isinstance(section, Mapping) else {}


def _import_wandb(warn: Warn) -> Any | None:
    try:
        import wandb
    except ImportError:
        warn("wandb: logging.use_wandb is set but wandb is not installed here "
             "(pip install wandb); training continues without it")
        return None
    return wandb


def _read_run_file(output_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((output_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_run_file(output_dir: Path, data: Mapping[str, Any]) -> None:
    from remote.plan import write_json_atomic

    write_json_atomic(output_dir / RUN_FILE, dict(data))


class WandbLogger:
    """One W&B run, or nothing. Build it with :meth:`start`; ``WandbLogger(None)`` is a no-op."""

    def __init__(self, run: Any | None, *, log_every: int = 1, warn: Warn = _stderr) -> None:
        self.run = run
        self.log_every = max(int(log_every), 1)
        self.warn = warn

    @classmethod
    def start(cls, logging_cfg: Mapping[str, Any], *, output_dir: Path, name: str,
              config: Mapping[str, Any] | None = None, warn: Warn = _stderr,
              env: Mapping[str, str] | None = None) -> "WandbLogger":
        """Open (or resume) the run when ``logging_cfg["use_wandb"]`` is true.

        ``config`` is recorded as the run's config (the ai-toolkit process: no secrets in it).
        """
        if not logging_cfg.get("use_wandb"):
            return cls(None)
        wandb = _import_wandb(warn)
        if wandb is None:
            return cls(None)
        env = os.environ if env is None else env
        output_dir.mkdir(parents=True, exist_ok=True)
        known = _read_run_file(output_dir)
        run_id = env.get("WANDB_RUN_ID") or known.get("id")  # None: wandb makes one
        project = str(logging_cfg.get("project_name") or DEFAULT_PROJECT)
        try:
            run = wandb.init(
                project=project, name=str(logging_cfg.get("run_name") or name), id=run_id,
                resume="allow", config=dict(config or {}), job_type="train",
                dir=None if env.get("WANDB_DIR") else str(output_dir),
                # the agent parses this process's stdout: wandb must not wrap it
                settings=wandb.Settings(console="off"))
        except Exception as exc:  # wandb's own errors have no common base: report, go on
            warn(f"wandb: could not start a run ({exc}); training continues without it")
            return cls(None)
        _write_run_file(output_dir, {"id": run.id, "project": project,
                                     "url": getattr(run, "url", None),
                                     "offline": bool(getattr(run, "offline", False)),
                                     "dir": str(getattr(run, "dir", ""))})
        if getattr(run, "url", None):
            warn(f"wandb: run {run.id} at {run.url}")
        return cls(run, log_every=int(logging_cfg.get("log_every") or 1), warn=warn)

    @property
    def active(self) -> bool:
        return self.run is not None

    @property
    def url(self) -> str | None:
        return getattr(self.run, "url", None) if self.run is not None else None

    def _call(self, what: str, fn: Callable[[], None]) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as exc:  # a logging failure must never end a paid training run
            self.warn(f"wandb: {what} failed ({exc}); logging switched off")
            self.run = None

    def log_step(self, step: int, *, loss: float, lr: float, s_per_step: float | None,
                 force: bool = False) -> None:
        """Loss, lr and s/step at ``step`` (every ``log_every`` steps unless ``force``)."""
        if self.run is None or (not force and step % self.log_every):
            return
        metrics: dict[str, float] = {"train/loss": float(loss), "train/lr": float(lr)}
        if s_per_step is not None:
            metrics["train/s_per_step"] = float(s_per_step)
        self._call("log", lambda: self.run.log(metrics, step=step))

    def log_samples(self, step: int, samples: Sequence[tuple[Path, str]]) -> None:
        """Sample images written at ``step``, each captioned with its prompt."""
        if self.run is None or not samples:
            return

        def log() -> None:
            import wandb

            images = [wandb.Image(str(path), caption=prompt) for path, prompt in samples]
            self.run.log({"samples": images}, step=step)

        self._call("logging samples", log)

    def summary(self, data: Mapping[str, Any]) -> None:
        """Add ``data`` to the run's summary (the quality report, the receipt)."""
        self._call("summary", lambda: self.run.summary.update(dict(data)))

    def finish(self, exit_code: int = 0) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish(exit_code=exit_code)
        except Exception as exc:  # the run data is on disk already; say so and go on
            self.warn(f"wandb: finishing the run failed ({exc})")


def trainer_env(spec: Mapping[str, Any], run_id: str, output_dir: Path,
                env: Mapping[str, str]) -> dict[str, str]:
    """What the agent adds to the trainer's environment when ``wandb.enabled``.

    The W&B run id is the flux-remote run id, for ai-toolkit (which calls ``wandb.init`` itself
    and reads ``WANDB_RUN_ID``/``WANDB_RESUME``) and the tiny trainer alike, so a restarted
    trainer continues the same W&B run and :func:`add_summary` finds it; ``wandb/`` goes into the
    run's output folder instead of ai-toolkit's checkout. Values already in ``env`` win.
    """
    wandb = spec.get("wandb") or {}
    if not wandb.get("enabled"):
        return {}
    wanted = {"WANDB_RUN_ID": run_id, "WANDB_RESUME": "allow", "WANDB_DIR": str(output_dir),
              "WANDB_PROJECT": str(wandb.get("project") or DEFAULT_PROJECT)}
    if wandb.get("entity"):
        wanted["WANDB_ENTITY"] = str(wandb["entity"])
    return {key: value for key, value in wanted.items() if not env.get(key)}


def summarize_run(*, python: str, output_dir: Path, files: Sequence[Path],
                  env: Mapping[str, str], log: Warn, timeout_s: float = 180.0) -> None:
    """Run :func:`add_summary` with the trainer's ``python`` (the one that has wandb).

    Best effort, for the agent after packing: output goes to ``log``, and a failure or a hang
    is logged, never raised (the run is finished; a summary is not worth failing it).
    """
    import subprocess

    command = [python, "-m", "remote.wandb_log", "summary", str(output_dir),
               *(str(path) for path in files)]
    try:
        done = subprocess.run(command, env=dict(env), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log(f"wandb: adding the receipt to the run's summary failed: {exc}")
        return
    for line in (done.stdout + done.stderr).splitlines():
        if line.strip():
            log(line)


def find_run_url(output_dir: Path, log_path: Path | None = None) -> str | None:
    """The W&B run URL: remembered by the tiny trainer, else printed into the trainer's log."""
    url = known_run_url(output_dir)
    if url or log_path is None:
        return url
    try:
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if "wandb:" in line:
                    url = url_in_line(line) or url
    except OSError:
        return None
    return url


def url_in_line(line: str) -> str | None:
    """The W&B run URL in one line of trainer output (ai-toolkit's or the tiny trainer's)."""
    match = _URL_LINE.search(line)
    return match.group(1) if match else None


def known_run_url(output_dir: Path) -> str | None:
    """The run URL the tiny trainer remembered in ``output_dir`` (None offline or unknown)."""
    url = _read_run_file(output_dir).get("url")
    return str(url) if url else None


def quality_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The headline of ``quality_report.json`` (the per-image entries stay in the bundle)."""
    keys = ("passed", "usable_count", "image_count", "excluded_count", "totals", "reasons",
            "warnings")
    return {f"quality/{key}": report[key] for key in keys if key in report}


def receipt_summary(receipt: Mapping[str, Any]) -> dict[str, Any]:
    """The headline of ``receipt.json``: what the run used and cost."""
    hardware = receipt.get("hardware") or {}
    steps = receipt.get("steps") or {}
    values = {"state": receipt.get("state"), "provider": receipt.get("provider"),
              "gpu": hardware.get("gpu"), "steps_done": steps.get("done"),
              "s_per_step": receipt.get("s_per_step"), "hours": receipt.get("hours"),
              "spend_usd": receipt.get("spend_usd"), "budget_usd": receipt.get("budget_usd")}
    return {f"receipt/{key}": value for key, value in values.items() if value is not None}


def summarize_files(paths: Sequence[Path]) -> dict[str, Any]:
    """Summary entries from the ``quality_report.json`` / ``receipt.json`` files that exist."""
    summary: dict[str, Any] = {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        if "usable_count" in data or "passed" in data:
            summary.update(quality_summary(data))
        elif "spend_usd" in data or "hardware" in data:
            summary.update(receipt_summary(data))
    return summary


def add_summary(output_dir: Path, files: Sequence[Path], *, warn: Warn = _stderr,
                env: Mapping[str, str] | None = None) -> bool:
    """Reopen the training's W&B run and add the files' summaries to it.

    The run is ``WANDB_RUN_ID`` when set (the id ai-toolkit was started with), else the one
    remembered in ``output_dir``. For the agent after packing (the receipt exists only then),
    run with the trainer's Python, which has wandb. Returns whether anything was written.
    """
    env = os.environ if env is None else env
    known = _read_run_file(output_dir)
    run_id = env.get("WANDB_RUN_ID") or known.get("id")
    summary = summarize_files(files)
    if not run_id or not summary:
        return False
    wandb = _import_wandb(warn)
    if wandb is None:
        return False
    logger = WandbLogger(None, warn=warn)
    try:
        # a folder of its own: offline, a second run dir created in the same second as the
        # training's would have the same name and overwrite its record log
        folder = Path(env.get("WANDB_DIR") or output_dir) / "summary"
        folder.mkdir(parents=True, exist_ok=True)
        logger.run = wandb.init(project=known.get("project") or env.get("WANDB_PROJECT")
                                or DEFAULT_PROJECT, id=run_id, resume="allow", dir=str(folder),
                                settings=wandb.Settings(console="off"))
    except Exception as exc:  # as in WandbLogger.start: W&B trouble is reported, never fatal
        warn(f"wandb: could not reopen run {run_id} ({exc})")
        return False
    logger.summary(summary)
    written = logger.active
    logger.finish()
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m remote.wandb_log summary OUTPUT_DIR FILE.json...`` (always exits 0 on W&B
    trouble: a summary is never worth failing a finished run)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[0] != "summary":
        print("usage: python -m remote.wandb_log summary OUTPUT_DIR FILE.json...", file=sys.stderr)
        return 2
    add_summary(Path(args[1]), [Path(p) for p in args[2:]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
