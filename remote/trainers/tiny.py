"""``python -m remote.trainers.tiny CONFIG.yaml``: a real LoRA fit small enough for a laptop CPU.

It reads an ai-toolkit job YAML and behaves like ai-toolkit where the agent can see it: the same
progress bar and ``Saving at step`` / ``Saved checkpoint to`` lines, the same output folder
(checkpoints, ``optimizer.pt``, ``samples/``, ``config.yaml``), automatic resume from the newest
checkpoint, and ``train.steps`` raised to extend a finished run. Unlike ai-toolkit it also saves a
checkpoint on SIGTERM (after finishing any save in progress) and exits 143.

The model is the frozen base generator of :mod:`remote.trainers.model` with LoRA adapters
of the config's rank and alpha on every conv and linear layer. The config's lr is meant for a 12B
parameter transformer; the tiny network needs a larger one to move in a hundred steps, so it uses
``min(lr * LR_SCALE, MAX_LR)`` (the bar still shows the config's lr). Gradients are clipped to
norm 1, as ai-toolkit does by default.

With ``logging.use_wandb`` in the config (``wandb.enabled`` in the spec) it logs loss, lr, s/step
and the samples to Weights & Biases, and the quality report next to the config as the run's
summary (:mod:`remote.wandb_log`; a no-op without wandb installed).

Test knobs (environment):
    FLUX_REMOTE_TINY_STEP_DELAY      seconds to sleep per step (make a run last long enough to stop)
    FLUX_REMOTE_TINY_CRASH_AT_STEP   raise a "CUDA out of memory" RuntimeError at that step, once
                                     (a marker file in the output folder remembers it happened)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import TextIO

import torch

from remote import __version__
from remote.trainers import checkpoints as ck
from remote.trainers.adamw import AdamW
from remote.trainers.bar import format_bar, loss_postfix
from remote.trainers.config import ConfigError, TinyConfig, load_config
from remote.trainers.lora import inject_lora, load_lora_state_dict, lora_parameters, lora_state_dict
from remote.trainers.model import build_base_model, embed_text, load_dataset, sample_image
from remote.wandb_log import WandbLogger, logging_section, summarize_files

LR_SCALE, MAX_LR = 30.0, 1e-2
MAX_SAMPLE_STEPS = 8  # Euler steps when decoding a sample; the config's 20-28 buys nothing here
EMA = 0.3  # tqdm's smoothing of the displayed rate
EXIT_TERMINATED = 143  # 128 + SIGTERM: stopped on request, checkpoint saved
SAVE_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bf16": torch.bfloat16,
               "bfloat16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


class Console:
    """Redraws the bar in place with ``\\r`` and ends it before an ordinary line, like tqdm."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.bar_active = False

    def bar(self, text: str) -> None:
        self.stream.write("\r" + text)
        self.stream.flush()
        self.bar_active = True

    def line(self, text: str) -> None:
        if self.bar_active:
            self.stream.write("\n")
            self.bar_active = False
        self.stream.write(text + "\n")
        self.stream.flush()


class TinyTrainer:
    def __init__(self, cfg: TinyConfig, config_text: str, console: Console, *,
                 config_path: Path | None = None) -> None:
        self.cfg = cfg
        self.config_text = config_text
        self.config_path = config_path
        self.out = console
        self.out_dir = cfg.output_dir
        self.stop_requested = False
        self.step_delay = float(os.environ.get("FLUX_REMOTE_TINY_STEP_DELAY") or 0)
        crash = os.environ.get("FLUX_REMOTE_TINY_CRASH_AT_STEP")
        self.crash_at = int(crash) if crash else None
        want_cuda = cfg.device.startswith("cuda") and torch.cuda.is_available()
        self.device = torch.device(cfg.device if want_cuda else "cpu")
        self.model: torch.nn.Module | None = None
        self.optimizer: AdamW | None = None
        self.step = 0
        self.last_saved = 0  # nothing new to save before the first step
        self.n_images = 0
        self.wandb = WandbLogger(None)

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler: only sets a flag, so a save in progress always completes."""
        self.stop_requested = True

    def run(self) -> int:
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ck.write_bytes_atomic(self.out_dir / "config.yaml", self.config_text.encode("utf-8"))
        resume = ck.newest_checkpoint(self.out_dir, cfg.name)
        if resume and resume[1] >= cfg.steps and ck.final_path(self.out_dir, cfg.name).is_file():
            self.out.line(f"{cfg.name} is already trained to step {resume[1]} (steps: {cfg.steps}); "
                          "nothing to do")
            return 0
        self._start_wandb()
        code = 1
        try:
            code = self._run(resume)
        finally:
            self.wandb.finish(exit_code=code)
        return code

    def _start_wandb(self) -> None:
        import yaml

        job = yaml.safe_load(self.config_text)
        process = job["config"]["process"][0]
        self.wandb = WandbLogger.start(logging_section(job), output_dir=self.out_dir,
                                       name=self.cfg.name, config=process, warn=self.out.line)
        if self.wandb.active and self.config_path is not None:  # the gate's report is its sibling
            self.wandb.summary(summarize_files([self.config_path.parent / "quality_report.json"]))

    def _run(self, resume: tuple[Path, int] | None) -> int:
        cfg = self.cfg
        if self.device.type != self.cfg.device.split(":")[0]:
            self.out.line(f"device {cfg.device} is not available: training on {self.device}")
        self._build()
        images, captions = load_dataset(cfg.folder_path, cfg.resolution, cfg.caption_ext,
                                        cfg.trigger_word)
        self.n_images = len(images)
        self.out.line(f"  -  Found {len(images)} images")
        if resume:
            self._resume(*resume)
        elif cfg.sampling and not cfg.skip_first_sample:
            self.out.line("Generating baseline samples before training")
            self._sample(0)
        self._train(images.to(self.device), captions)
        if self.stop_requested and self.step < cfg.steps:
            if self.step > self.last_saved:
                self._save(self.step)
            return EXIT_TERMINATED
        if cfg.sampling:
            self._sample(self.step)
        self._save(self.step, final=True)
        return 0

    def _build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model = build_base_model()
        inject_lora(model, cfg.rank, cfg.alpha)
        self.model = model.to(self.device)
        self.optimizer = AdamW(lora_parameters(model), lr=min(cfg.lr * LR_SCALE, MAX_LR))
        self.out.line(f"create LoRA network. base dim (rank): {cfg.rank}, alpha: {cfg.alpha:g}")

    def _resume(self, path: Path, step: int) -> None:
        from safetensors.torch import load_file

        load_lora_state_dict(self.model, load_file(str(path)))
        state_path = self.out_dir / "optimizer.pt"
        if state_path.is_file():
            state = torch.load(state_path, map_location="cpu", weights_only=False)
            if state.get("step") == step:
                # the fp32 masters and the RNG make a resumed run match an uninterrupted one
                load_lora_state_dict(self.model, state["lora"])
                self.optimizer.load_state_dict(state["optimizer"])
                torch.set_rng_state(state["rng"])
        self.step = self.last_saved = step
        self.out.line(f"Loading from {path}")
        self.out.line(f"Found step {step} in metadata, starting from there")

    def _train(self, images: torch.Tensor, captions: list[str]) -> None:
        cfg, model, opt = self.cfg, self.model, self.optimizer
        texts = torch.stack([embed_text(c) for c in captions]).to(self.device)
        params = lora_parameters(model)
        started = last = time.monotonic()
        s_per_step: float | None = None
        self.out.bar(format_bar(cfg.name, self.step, cfg.steps, 0.0, None))
        while self.step < cfg.steps and not self.stop_requested:
            self._maybe_crash(self.step + 1)
            idx = torch.randint(len(images), (cfg.batch_size,))
            x = images[idx]
            keep = (torch.rand(cfg.batch_size) >= cfg.caption_dropout_rate).float()
            text = texts[idx] * keep.to(self.device)[:, None]
            t = torch.rand(cfg.batch_size)
            noise = torch.randn(x.shape).to(self.device)
            t4 = t.to(self.device)[:, None, None, None]
            loss = torch.nn.functional.mse_loss(model((1 - t4) * x + t4 * noise, t.to(self.device),
                                                      text), noise - x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if self.step_delay:
                time.sleep(self.step_delay)
            self.step += 1
            now = time.monotonic()
            s_per_step = (now - last) if s_per_step is None else EMA * (now - last) + (1 - EMA) * s_per_step
            last = now
            self.out.bar(format_bar(cfg.name, self.step, cfg.steps, now - started, s_per_step,
                                    loss_postfix(cfg.lr, loss.item())))
            self.wandb.log_step(self.step, loss=loss.item(), lr=cfg.lr, s_per_step=s_per_step,
                                force=self.step == cfg.steps)
            if self.step < cfg.steps:
                if cfg.sampling and self.step % cfg.sample_every == 0:
                    self._sample(self.step)
                if self.step % cfg.save_every == 0:
                    self._save(self.step)

    def _maybe_crash(self, step: int) -> None:
        if self.crash_at != step:
            return
        marker = self.out_dir / f".tiny_crashed_at_{step}"
        if marker.exists():
            return
        marker.write_text("crashed once\n", encoding="utf-8")
        raise RuntimeError(f"CUDA out of memory. Tried to allocate 20.00 MiB at step {step} "
                           "(simulated by FLUX_REMOTE_TINY_CRASH_AT_STEP)")

    def _sample(self, step: int) -> None:
        cfg = self.cfg
        samples = self.out_dir / "samples"
        samples.mkdir(exist_ok=True)
        self.model.eval()
        written: list[tuple[Path, str]] = []
        for i, prompt in enumerate(cfg.prompts):
            seed = cfg.seed + i if cfg.walk_seed else cfg.seed
            image = sample_image(self.model, prompt, cfg.resolution,
                                 max(1, min(cfg.sample_steps, MAX_SAMPLE_STEPS)), seed, self.device)
            path = samples / f"{int(time.time() * 1000)}__{step:09d}_{i}.jpg"
            tmp = path.with_name(f".{path.name}.tmp")
            image.save(tmp, format="JPEG", quality=95)
            os.replace(tmp, path)
            written.append((path, prompt))
        self.model.train()
        self.wandb.log_samples(step, written)

    def _metadata(self, step: int) -> dict[str, str]:
        cfg = self.cfg
        epoch = step * cfg.batch_size // max(self.n_images, 1)
        return {
            "name": cfg.meta_name,
            "version": cfg.meta_version,
            "training_info": json.dumps({"step": step, "epoch": epoch}),
            "ss_base_model_version": "flux.1",
            "software": json.dumps({"name": "flux-remote-tiny", "version": __version__}),
            "format": "pt",
            "lora_rank": str(cfg.rank),
            "lora_alpha": f"{cfg.alpha:g}",
        }

    def _save(self, step: int, *, final: bool = False) -> None:
        cfg = self.cfg
        self.out.line(f"Saving at step {step}")
        path = (ck.final_path(self.out_dir, cfg.name) if final
                else ck.step_path(self.out_dir, cfg.name, step))
        dtype = SAVE_DTYPES.get(cfg.save_dtype.lower(), torch.float16)
        ck.save_lora_atomic(path, lora_state_dict(self.model, dtype), self._metadata(step))
        # ai-toolkit's order (BaseSDTrainProcess.save): the LoRA is announced, then the
        # optimizer state is written and announced, then old saves are pruned
        self.out.line(f"Saved checkpoint to {path}")
        optimizer = self.out_dir / "optimizer.pt"
        ck.torch_save_atomic(optimizer, {
            "step": step,
            "optimizer": self.optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "lora": lora_state_dict(self.model),
        })
        self.out.line(f"Saved optimizer to {optimizer}")
        for old in ck.prune(self.out_dir, cfg.name, cfg.max_step_saves_to_keep):
            self.out.line(f"Removing old save: {old}")
        self.last_saved = step


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m remote.trainers.tiny CONFIG.yaml", file=sys.stderr)
        return 2
    # one thread: a 32-64 px step is too small to split, and on a shared CPU extra threads spin
    torch.set_num_threads(1)
    console = Console(sys.stdout)
    try:
        cfg = load_config(args[0])
        trainer = TinyTrainer(cfg, Path(args[0]).read_text(encoding="utf-8"), console,
                              config_path=Path(args[0]))
    except ConfigError as exc:
        console.line(f"Error running job: {exc}")
        return 2
    previous = {sig: signal.signal(sig, trainer.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return trainer.run()
    except Exception as exc:  # the trainer's boundary: report like ai-toolkit, exit non-zero
        console.line(f"Error running job: {exc}")
        console.stream.write(traceback.format_exc())
        console.stream.flush()
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
