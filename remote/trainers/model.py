"""The tiny trainer's frozen base model, its conditioning, its data and its sampler.

The base is a small text-conditioned image generator, trained once by
``scripts/train_tiny_base.py`` on procedurally drawn shapes and colours ("a red circle on a blue
background") and shipped next to this module as ``tiny_base.safetensors`` (fp16, half a
megabyte). It is loaded frozen, so at step 0 a sample shows what the base draws for the prompt,
and what changes afterwards is the LoRA's doing. Without the file (a checkout that has not run
the script) the same architecture is built from a fixed seed: training still works, the samples
are then noise.

The network works on 4x4 pixel patches (``PixelUnshuffle``) with one level of downsampling, which
gives it a receptive field over the whole 64 px image at a cost a CPU can train. Training is flow
matching: for an image ``x``, noise ``n`` and ``t ~ U(0, 1)`` the input is ``x_t = (1 - t) x + t n``
and the target the velocity ``n - x``; sampling integrates that velocity from pure noise (t = 1)
to t = 0 with Euler steps.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

BASE_SEED = 20240801  # the fallback weights come from this seed, never from the config
BASE_WEIGHTS = Path(__file__).with_name("tiny_base.safetensors")
TEXT_DIM = 128  # hashed bag of words and word pairs
TIME_DIM = 16  # sinusoidal embedding of t
SIGMA_DATA = 0.6  # std of the pixels (in [-1, 1]) of saturated shapes on plain backgrounds
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def _tokens(text: str) -> list[str]:
    words = text.lower().replace(",", " ").split()
    # word pairs keep "red circle on a blue background" apart from "blue circle on a red ..."
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])]


def embed_text(text: str) -> torch.Tensor:
    """A fixed, training-free caption embedding: each word and word pair hashed to a signed bucket."""
    vec = torch.zeros(TEXT_DIM)
    for token in _tokens(text):
        h = zlib.crc32(token.encode("utf-8"))
        vec[h % TEXT_DIM] += 1.0 if (h >> 16) & 1 else -1.0
    norm = vec.norm()
    return vec / norm if norm > 0 else vec


def embed_time(t: torch.Tensor) -> torch.Tensor:
    half = TIME_DIM // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = t[:, None] * 1000.0 * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class Block(nn.Module):
    """A residual pair of 3x3 convolutions, scaled and shifted by the caption and time."""

    def __init__(self, channels: int, emb_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(8, channels)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm(self.conv1(self.act(x))) * (1 + scale) + shift
        return x + self.conv2(self.act(h))


class TinyDenoiser(nn.Module):
    """Predicts the flow-matching velocity ``noise - image`` from ``x_t``, ``t`` and a caption.

    ``blocks[0..half)`` run at 1/4 resolution, ``mid`` at 1/8, ``blocks[half..)`` at 1/4 again
    with a skip connection; the image side must be a multiple of 8.
    """

    def __init__(self, channels: int = 32, depth: int = 4, mid_depth: int = 2, patch: int = 4) -> None:
        super().__init__()
        emb_dim = TEXT_DIM + TIME_DIM
        self.unshuffle, self.shuffle = nn.PixelUnshuffle(patch), nn.PixelShuffle(patch)
        self.conv_in = nn.Conv2d(3 * patch * patch, channels, 3, padding=1)
        self.cond = nn.Linear(emb_dim, emb_dim)
        self.blocks = nn.ModuleList(Block(channels, emb_dim) for _ in range(depth))
        self.down = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.mid = nn.ModuleList(Block(channels, emb_dim) for _ in range(mid_depth))
        self.up = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv_out = nn.Conv2d(channels, 3 * patch * patch, 3, padding=1)
        # at full resolution: the per-pixel noise a 4x4 patch cannot carry through the channels
        self.refine_in = nn.Conv2d(6, 16, 3, padding=1)
        self.refine_out = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        # EDM-style preconditioning (Karras et al. 2022, sec. 5) worked out for flow matching: with
        # data of std SIGMA_DATA, the best velocity linear in x_t is c_skip * x_t, the rest has
        # variance c_out**2; the network only predicts that rest, from an input of unit variance.
        # It keeps every layer's numbers near unit scale at every t, which a small model trained
        # briefly needs.
        t4 = t[:, None, None, None]
        var = (1 - t4) ** 2 * SIGMA_DATA ** 2 + t4 ** 2
        c_skip = (t4 - (1 - t4) * SIGMA_DATA ** 2) / var
        c_out = SIGMA_DATA / var.sqrt()
        emb = torch.nn.functional.silu(self.cond(torch.cat([text, embed_time(t)], dim=1)))
        x_in = x_t / var.sqrt()
        h = self.conv_in(self.unshuffle(x_in))
        half = len(self.blocks) // 2
        for block in self.blocks[:half]:
            h = block(h, emb)
        m = self.down(h)
        for block in self.mid:
            m = block(m, emb)
        h = h + self.up(torch.nn.functional.interpolate(m, scale_factor=2.0, mode="nearest"))
        for block in self.blocks[half:]:
            h = block(h, emb)
        coarse = self.shuffle(self.conv_out(torch.nn.functional.silu(h)))
        fine = self.refine_out(torch.nn.functional.silu(self.refine_in(torch.cat([x_in, coarse], 1))))
        return c_skip * x_t + c_out * (coarse + fine)


def build_base_model(weights: Path | None = BASE_WEIGHTS) -> TinyDenoiser:
    """The frozen base: the shipped weights when present, else a fixed seed's, same in every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BASE_SEED)
        model = TinyDenoiser()
    if weights is not None and weights.is_file():
        from safetensors.torch import load_file

        state = {k: v.float() for k, v in load_file(str(weights)).items()}
        model.load_state_dict(state)
    return model


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
