"""LoRA adapters for ``nn.Conv2d`` and ``nn.Linear``, saved with PEFT/diffusers key names.

A wrapped layer computes ``base(x) + B(A(x)) * alpha / rank`` with ``base`` frozen and ``B``
starting at zero (so training starts from the base network exactly). ``A`` keeps the base
layer's kernel, stride and padding; ``B`` is a 1x1 convolution (or a linear layer), which makes
the saved shapes ``lora_A: [rank, in, k, k]``, ``lora_B: [out, rank, 1, 1]`` like PEFT's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

KEY_PREFIX = "transformer."  # what Flux LoRAs use; the tiny network stands in for the transformer


class LoRALayer(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        self.scale = alpha / rank
        if isinstance(base, nn.Conv2d):
            self.lora_A = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride,
                                    base.padding, bias=False)
            self.lora_B = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        elif isinstance(base, nn.Linear):
            self.lora_A = nn.Linear(base.in_features, rank, bias=False)
            self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        else:
            raise TypeError(f"no LoRA for {type(base).__name__}")
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale


def inject_lora(model: nn.Module, rank: int, alpha: float) -> list[str]:
    """Wrap every Conv2d/Linear in ``model`` (in place), freeze the rest; returns wrapped names."""
    model.requires_grad_(False)
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, (nn.Conv2d, nn.Linear)) and name]
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LoRALayer(module, rank, alpha))
    return [name for name, _ in targets]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def lora_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """PEFT-named LoRA weights, e.g. ``transformer.blocks.0.conv1.lora_A.weight``."""
    out = {}
    for name, tensor in model.state_dict().items():
        if ".lora_A." in name or ".lora_B." in name:
            value = tensor.detach().to("cpu")
            out[KEY_PREFIX + name] = (value.to(dtype) if dtype else value).contiguous()
    return out


def load_lora_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`lora_state_dict`; raises ValueError when the keys do not match."""
    own = {KEY_PREFIX + n: p for n, p in model.named_parameters() if ".lora_" in n}
    if set(own) != set(tensors):
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        raise ValueError(f"LoRA keys differ: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for key, param in own.items():
            if tensors[key].shape != param.shape:
                raise ValueError(f"{key}: shape {tuple(tensors[key].shape)} != {tuple(param.shape)}"
                                 " (was the rank changed?)")
            param.copy_(tensors[key].to(param.dtype))
