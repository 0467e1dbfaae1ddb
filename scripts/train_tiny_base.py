"""Train the tiny trainer's base model: ``remote/trainers/tiny_base.safetensors``.

A small text-to-image generator (:class:`remote.trainers.model.TinyDenoiser`) learns, by flow
matching, to draw procedurally generated 64 px pictures of one shape in one colour on a plain
background, captioned "a red circle on a blue background" (sometimes without the background, and
one in ten without any caption, so that it also draws something for a prompt it does not know).
The LoRA of the local demo then starts from a model that draws what a prompt asks for, and its
samples show what the LoRA adds.

Deterministic (fixed seeds, one thread): the same file every time on the same torch version. A few
minutes on a laptop CPU; the weights are kept as an exponential moving average and saved in fp16.

    nice -n 10 python scripts/train_tiny_base.py [--steps N] [--out PATH]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from remote.trainers.model import BASE_WEIGHTS, TinyDenoiser, embed_text  # noqa: E402
from scripts.shapes import COLOURS, SHAPES, draw_shape  # noqa: E402

RESOLUTION = 64
SEED = 1234


def example(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One random picture in [-1, 1] (H, W, 3) and its caption."""
    names = list(COLOURS)
    fg, bg = rng.choice(len(names), size=2, replace=False)
    shape = SHAPES[rng.integers(len(SHAPES))]
    image = Image.new("RGB", (RESOLUTION, RESOLUTION), COLOURS[names[bg]])
    size = RESOLUTION * rng.uniform(0.4, 0.7)
    cx, cy = RESOLUTION * (0.5 + rng.uniform(-0.12, 0.12, size=2))
    box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
    draw_shape(ImageDraw.Draw(image), shape, box, COLOURS[names[fg]])
    roll = rng.random()
    if roll < 0.1:
        caption = ""
    elif roll < 0.3:
        caption = f"a {names[fg]} {shape}"
    else:
        caption = f"a {names[fg]} {shape} on a {names[bg]} background"
    return np.asarray(image, dtype=np.float32) / 127.5 - 1.0, caption


def batch(rng: np.random.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [example(rng) for _ in range(size)]
    images = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).contiguous()
    return images, torch.stack([embed_text(p[1]) for p in pairs])


def train(steps: int, batch_size: int, out: Path, log_every: int = 100) -> None:
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    model = TinyDenoiser()
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    started = time.monotonic()
    running = None
    for step in range(1, steps + 1):
        lr = 2e-3 * min(1.0, step / 200) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x, text = batch(rng, batch_size)
        t = torch.rand(batch_size)
        noise = torch.randn_like(x)
        t4 = t[:, None, None, None]
        loss = torch.nn.functional.mse_loss(model((1 - t4) * x + t4 * noise, t, text), noise - x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(0.998, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % log_every == 0 or step == steps:
            print(f"step {step}/{steps}  loss {running:.4f}  lr {lr:.2e}  "
                  f"{time.monotonic() - started:.0f}s", flush=True)
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.to(torch.float16).contiguous() for k, v in ema.items()}, str(tmp),
              metadata={"what": "flux-remote tiny trainer base model",
                        "trained_by": "scripts/train_tiny_base.py", "steps": str(steps),
                        "batch_size": str(batch_size), "resolution": str(RESOLUTION)})
    tmp.replace(out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--out", type=Path, default=BASE_WEIGHTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one fixed thread: reproducible sums, polite on a shared CPU
    train(args.steps, args.batch_size, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
