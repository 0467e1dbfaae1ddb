"""AdamW for the tiny trainer's few LoRA tensors, written out.

The same update as ``torch.optim.AdamW`` (Loshchilov & Hutter: weight decay decoupled from the
gradient, bias-corrected moments, ``eps`` added after the square root; no amsgrad), and the same
``state_dict`` layout, so an ``optimizer.pt`` written by either loads into the other. Written out
because ``torch.optim``'s first parameter group imports ``torch._dynamo`` (about 2 s of CPU at
every trainer start, torch 2.13), more than a whole tiny run trains for.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class AdamW:
    def __init__(self, params: list[torch.nn.Parameter], *, lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:
        self.params = list(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.step_count = [0] * len(self.params)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        for i, param in enumerate(self.params):
            if param.grad is None:
                continue
            grad, m, v = param.grad, self.exp_avg[i], self.exp_avg_sq[i]
            self.step_count[i] += 1
            t = self.step_count[i]
            param.mul_(1 - self.lr * self.weight_decay)
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(self.eps)
            param.addcdiv_(m, denom, value=-self.lr / (1 - beta1 ** t))

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict``'s layout: params by index, ``step`` a tensor."""
        state = {i: {"step": torch.tensor(float(self.step_count[i])),
                     "exp_avg": self.exp_avg[i].clone(), "exp_avg_sq": self.exp_avg_sq[i].clone()}
                 for i in range(len(self.params)) if self.step_count[i]}
        group = {"lr": self.lr, "betas": self.betas, "eps": self.eps,
                 "weight_decay": self.weight_decay, "amsgrad": False,
                 "params": list(range(len(self.params)))}
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, data: dict[str, Any]) -> None:
        groups = data.get("param_groups") or []
        count = sum(len(group.get("params") or []) for group in groups)
        if count != len(self.params):
            raise ValueError(f"optimizer state has {count} parameters, the LoRA {len(self.params)}")
        if groups:
            self.lr = float(groups[0].get("lr", self.lr))
        for key, entry in (data.get("state") or {}).items():
            i = int(key)
            self.step_count[i] = int(float(entry["step"]))
            self.exp_avg[i] = entry["exp_avg"].to(self.params[i].device).clone()
            self.exp_avg_sq[i] = entry["exp_avg_sq"].to(self.params[i].device).clone()
