"""The LoRA keys and shapes ai-toolkit looks for when it loads a Flux LoRA.

ai-toolkit saves Flux LoRAs in PEFT format (``toolkit/lora_special.py``: "always do peft for
flux") under the prefix ``transformer.`` and, with ``transformer_only`` (the default), only for
modules inside ``transformer_blocks`` / ``single_transformer_blocks``
(``LoRASpecialNetwork.create_modules``). It loads non-strictly
(``toolkit/network_mixins.py`` ``load_weights``): a key the network lacks is listed in
``Missing keys: [...]`` and dropped, so a LoRA from another trainer or model loads nothing and
training silently starts from zero. This module says, before anything is paid for, whether a
file's keys and shapes are ones such a network has.

The module shapes are those of diffusers' ``FluxTransformer2DModel`` (FLUX.1 dev and schnell:
inner dim 3072, MLP ratio 4, 19 double and 38 single blocks): ``lora_A`` is ``[rank, in]``,
``lora_B`` is ``[out, rank]``. Standard library only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

DIM, MLP = 3072, 4 * 3072
DOUBLE_BLOCKS, SINGLE_BLOCKS = 19, 38
# module (inside a block) -> (in_features, out_features)
DOUBLE_MODULES: dict[str, tuple[int, int]] = {
    "norm1.linear": (DIM, 6 * DIM), "norm1_context.linear": (DIM, 6 * DIM),
    "attn.to_q": (DIM, DIM), "attn.to_k": (DIM, DIM), "attn.to_v": (DIM, DIM),
    "attn.add_q_proj": (DIM, DIM), "attn.add_k_proj": (DIM, DIM),
    "attn.add_v_proj": (DIM, DIM), "attn.to_out.0": (DIM, DIM), "attn.to_add_out": (DIM, DIM),
    "ff.net.0.proj": (DIM, MLP), "ff.net.2": (MLP, DIM),
    "ff_context.net.0.proj": (DIM, MLP), "ff_context.net.2": (MLP, DIM),
}
SINGLE_MODULES: dict[str, tuple[int, int]] = {
    "norm.linear": (DIM, 3 * DIM), "proj_mlp": (DIM, MLP), "proj_out": (DIM + MLP, DIM),
    "attn.to_q": (DIM, DIM), "attn.to_k": (DIM, DIM), "attn.to_v": (DIM, DIM),
}
_KEY_RE = re.compile(r"^transformer\.(?P<blocks>transformer_blocks|single_transformer_blocks)"
                     r"\.(?P<n>\d+)\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def module_shape(key: str) -> tuple[str, int, int] | None:
    """(A or B, in, out) of the Flux module a PEFT key names, or None if Flux has no such one."""
    m = _KEY_RE.match(key)
    if not m:
        return None
    double = m.group("blocks") == "transformer_blocks"
    count, modules = (DOUBLE_BLOCKS, DOUBLE_MODULES) if double else (SINGLE_BLOCKS, SINGLE_MODULES)
    dims = modules.get(m.group("module"))
    if dims is None or int(m.group("n")) >= count:
        return None
    return m.group("ab"), dims[0], dims[1]


def read_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header (no tensor is read)."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if not 0 < size < 100_000_000:
            raise ValueError(f"{path.name} has no safetensors header")
        header = json.loads(fh.read(size))
    return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def flux_key_problems(shapes: dict[str, list[int]], *, rank: int) -> list[str]:
    """What ai-toolkit would not load from a file with these tensors, for a Flux LoRA of ``rank``.

    ``.alpha`` keys are skipped as ai-toolkit's PEFT loader skips them."""
    problems, loadable = [], 0
    unknown = []
    for key, shape in sorted(shapes.items()):
        if key.endswith(".alpha"):
            continue
        found = module_shape(key)
        if found is None:
            unknown.append(key)
            continue
        ab, d_in, d_out = found
        want = [rank, d_in] if ab == "A" else [d_out, rank]
        if shape != want:
            problems.append(f"{key} has shape {shape}; a rank-{rank} Flux LoRA has {want}")
        else:
            loadable += 1
    if unknown:
        more = f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else ""
        problems.insert(0, f"{len(unknown)} key(s) that a Flux transformer does not have, which "
                        f"ai-toolkit would drop as 'Missing keys': {', '.join(unknown[:3])}{more}")
    if not loadable:
        problems.insert(0, "no tensor ai-toolkit would load into a Flux LoRA (expected keys like "
                        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight)")
    return problems
