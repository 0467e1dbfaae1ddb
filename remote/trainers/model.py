"""The tiny trainer's frozen "base model", its conditioning, its data and its sampler.

The base network is a small convolutional denoiser built from a fixed seed, so every process (and
every resume) gets the same frozen weights without shipping them. It works on 2x2 pixel patches
(``PixelUnshuffle``) to keep a 64 px step cheap on a CPU. Training is flow matching: for an image
``x``, noise ``n`` and ``t ~ U(0, 1)`` the input is ``x_t = (1 - t) x + t n`` and the target the
velocity ``n - x``; sampling integrates that velocity from pure noise (t = 1) to t = 0 with Euler.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

BASE_SEED = 20240801  # the frozen base weights come from this seed, never from the config
TEXT_DIM = 32  # hashed bag-of-words caption embedding
TIME_DIM = 16  # sinusoidal embedding of t
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def embed_text(text: str) -> torch.Tensor:
    """A fixed, training-free caption embedding: each word hashed to a signed bucket."""
    vec = torch.zeros(TEXT_DIM)
    for word in text.lower().replace(",", " ").split():
        h = zlib.crc32(word.encode("utf-8"))
        vec[h % TEXT_DIM] += 1.0 if (h >> 16) & 1 else -1.0
    norm = vec.norm()
    return vec / norm if norm > 0 else vec


def embed_time(t: torch.Tensor) -> torch.Tensor:
    half = TIME_DIM // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = t[:, None] * 1000.0 * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class Block(nn.Module):
    def __init__(self, channels: int, emb_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv1(self.act(x)) + self.emb_proj(emb)[:, :, None, None])
        return x + self.conv2(h)


class TinyDenoiser(nn.Module):
    """Predicts the flow-matching velocity ``noise - image`` from ``x_t``, ``t`` and a caption."""

    def __init__(self, channels: int = 32, depth: int = 3, patch: int = 2) -> None:
        super().__init__()
        emb_dim = TEXT_DIM + TIME_DIM
        self.unshuffle, self.shuffle = nn.PixelUnshuffle(patch), nn.PixelShuffle(patch)
        self.conv_in = nn.Conv2d(3 * patch * patch, channels, 3, padding=1)
        self.cond = nn.Linear(emb_dim, emb_dim)
        self.blocks = nn.ModuleList(Block(channels, emb_dim) for _ in range(depth))
        self.conv_out = nn.Conv2d(channels, 3 * patch * patch, 3, padding=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        emb = torch.nn.functional.silu(self.cond(torch.cat([text, embed_time(t)], dim=1)))
        h = self.conv_in(self.unshuffle(x_t))
        for block in self.blocks:
            h = block(h, emb)
        return self.shuffle(self.conv_out(h))


def build_base_model() -> TinyDenoiser:
    """The frozen base: the same weights in every process, whatever the global RNG holds."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BASE_SEED)
        return TinyDenoiser()


def _caption(image: Path, caption_ext: str, trigger: str | None) -> str:
    sidecar = image.with_suffix(f".{caption_ext}")
    text = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else ""
    if trigger:
        text = text.replace("[trigger]", trigger)
        if trigger not in text:  # ai-toolkit adds the trigger word to captions that lack it
            text = f"{trigger}, {text}" if text else trigger
    return text


def load_dataset(folder: Path, resolution: int, caption_ext: str,
                 trigger: str | None) -> tuple[torch.Tensor, list[str]]:
    """Images as ``[N, 3, R, R]`` in [-1, 1] (center crop, resize) and their captions."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    images, captions = [], []
    for path in files:
        with Image.open(path) as im:
            square = ImageOps.fit(ImageOps.exif_transpose(im).convert("RGB"),
                                  (resolution, resolution), Image.Resampling.BICUBIC)
        array = np.asarray(square, dtype=np.float32) / 127.5 - 1.0
        images.append(torch.from_numpy(array).permute(2, 0, 1))
        captions.append(_caption(path, caption_ext, trigger))
    if not images:
        raise FileNotFoundError(f"no .jpg/.jpeg/.png images in {folder}")
    return torch.stack(images), captions


@torch.no_grad()
def sample_image(model: nn.Module, prompt: str, resolution: int, steps: int, seed: int,
                 device: torch.device) -> Image.Image:
    """Decode one image from noise with ``steps`` Euler steps of the learned velocity."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, resolution, resolution, generator=gen).to(device)
    text = embed_text(prompt)[None].to(device)
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for t_now, t_next in zip(ts[:-1], ts[1:]):
        velocity = model(x, t_now.repeat(1).to(device), text)
        x = x - (t_now - t_next) * velocity
    pixels = ((x[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
    return Image.fromarray(pixels.cpu().numpy())
