"""Seconds per training step for a Flux-dev LoRA, per GPU model, before we have measured one.

Basis: batch 1, rank 16, ~1024 px resolution mix, quantized base, adamw8bit (ai-toolkit's
example config). Published figures vary with all of these, so each prior is near the slow end
of its published range: an estimate that is too high refuses a run that would have fit, one
that is too low overspends. Measured figures from the user's own finished runs replace them
(``measured`` argument of :func:`seconds_per_step`).

Sources (as collected in shared/reference/ai-toolkit/README.md, "Throughput priors"):
    H100        1.3 - 1.8 s   SimpleTuner docs (Chroma, close to Flux size); HF flux-qlora blog
    A100 80GB   1.5 - 2.5 s   no primary figure; interpolated between H100 and L40S/4090
    L40S        1.4 - 2.1 s   SimpleTuner docs (Chroma)
    RTX 5090    ~2.5 s        no primary figure; interpolated from the 4090
    RTX 4090    1.5 - 3.5 s   SimpleTuner docs (NF4), HF blog, ComfyUI-FluxTrainer issue 81
    A6000 / A40 6.5 - 8 s     ai-toolkit issue 145 (A40, default config); kohya_ss issue 2701
    RTX 3090    4.5 - 10 s    fluxgym issue 57; ai-toolkit issue 225
Rows marked "interpolated" below have no published figure at all and are placed between the
neighbours above by memory bandwidth and tensor throughput; they are flagged in ``basis``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Prior:
    s_per_step: float
    basis: str


# Keys are Vast's gpu_name values (upper-cased for lookup).
PRIORS: dict[str, Prior] = {
    "H100 SXM": Prior(1.6, "published 1.3-1.8 (SimpleTuner, HF blog)"),
    "H100 NVL": Prior(1.7, "published H100 range 1.3-1.8"),
    "H100 PCIE": Prior(1.8, "published H100 range 1.3-1.8, PCIe at the slow end"),
    "H200": Prior(1.6, "interpolated: H100 compute, more bandwidth"),
    "A100 SXM4": Prior(2.2, "interpolated 1.5-2.5"),
    "A100 PCIE": Prior(2.4, "interpolated 1.5-2.5, PCIe at the slow end"),
    "A100X": Prior(2.4, "interpolated 1.5-2.5"),
    "L40S": Prior(2.0, "published 1.4-2.1 (SimpleTuner)"),
    "L40": Prior(2.6, "interpolated from L40S (fewer tensor FLOPs)"),
    "RTX 6000ADA": Prior(2.3, "interpolated from L40S (same die, lower clocks)"),
    "RTX PRO 6000 WS": Prior(2.2, "interpolated from RTX 5090 (larger Blackwell die)"),
    "RTX PRO 6000 S": Prior(2.2, "interpolated from RTX 5090 (larger Blackwell die)"),
    "RTX 5090": Prior(2.5, "interpolated from RTX 4090"),
    "RTX 4090": Prior(3.0, "published 1.5-3.5 (SimpleTuner NF4, HF blog, FluxTrainer #81)"),
    "RTX 4090D": Prior(3.3, "interpolated from RTX 4090 (cut-down die)"),
    "RTX A6000": Prior(7.5, "published 6.5-8 (kohya_ss #2701)"),
    "A40": Prior(7.5, "published 6.5-8 (ai-toolkit #145)"),
    "RTX 3090": Prior(8.0, "published 4.5-10 (fluxgym #57, ai-toolkit #225)"),
    "RTX 3090 TI": Prior(7.5, "interpolated from RTX 3090"),
}

# For GPUs without a prior: s/step ~= K / dlperf, with K calibrated on the RTX 5090 offers in
# the reference search (dlperf ~197 at 2.5 s/step) and a 1.5x penalty because an unlisted GPU
# is usually an older or unusual one. dlperf is Vast's own deep-learning benchmark score.
DLPERF_K = 2.5 * 197.0
UNKNOWN_PENALTY = 1.5
# Fallback of the fallback: total_flops (FP32 TFLOPS) calibrated on the 5090 (107.6 at 2.5 s).
FLOPS_K = 2.5 * 107.6
# Never estimate faster than the fastest GPU we have a published figure for.
FLOOR_S = 1.3
# Nothing known at all about the GPU: as slow as the slowest prior, doubled.
NO_INFO_S = 16.0


def prior_for(gpu_name: str) -> Prior | None:
    """The published/interpolated prior for a Vast gpu_name, or None."""
    return PRIORS.get(gpu_name.strip().upper()) or PRIORS.get(gpu_name.strip())


def seconds_per_step(
    offer: dict, measured: dict[str, float] | None = None
) -> tuple[float, str]:
    """(seconds per step, where the figure comes from) for one offer's GPU model.

    Order: the user's measured figure for this gpu_name, the prior table, then an estimate from
    the offer's ``dlperf`` (or ``total_flops``). Extra GPUs in one offer do not speed up a
    single LoRA run (ai-toolkit trains on one device), so num_gpus is ignored here.
    """
    name = str(offer.get("gpu_name") or "")
    if measured:
        for key, value in measured.items():
            if key.strip().upper() == name.strip().upper() and value > 0:
                return float(value), "measured on your runs"
    prior = prior_for(name)
    if prior is not None:
        return prior.s_per_step, f"prior: {prior.basis}"
    dlperf = _positive(offer.get("dlperf"))
    num = max(1, int(offer.get("num_gpus") or 1))
    if dlperf:
        per_gpu = dlperf / num  # Vast's dlperf covers all GPUs of the offer
        return max(FLOOR_S, DLPERF_K / per_gpu * UNKNOWN_PENALTY), "estimated from dlperf"
    flops = _positive(offer.get("total_flops"))
    if flops:
        per_gpu = flops / num
        return max(FLOOR_S, FLOPS_K / per_gpu * UNKNOWN_PENALTY), "estimated from total_flops"
    return NO_INFO_S, "unknown GPU: conservative guess"


def _positive(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None
