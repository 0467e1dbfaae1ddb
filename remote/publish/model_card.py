"""The Hugging Face model card (``README.md``) for a Flux LoRA.

Front matter follows the conventions of published Flux LoRAs (see the ai-toolkit reference):
tags, ``base_model``, ``instance_prompt`` (the trigger word), ``widget`` entries from the newest
samples, and the license of the base model: FLUX.1-dev's non-commercial license, or Apache 2.0
for FLUX.1-schnell.
"""

from __future__ import annotations

from typing import Any

from remote.aitk_config import base_model_path, is_schnell
from remote.aitk_rules import fill_trigger as aitk_fill_trigger

TAGS = ["text-to-image", "flux", "lora", "diffusers", "template:sd-lora"]
DEV_LICENSE = {
    "license": "other",
    "license_name": "flux-1-dev-non-commercial-license",
    "license_link": "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md",
}
SCHNELL_LICENSE = {"license": "apache-2.0"}


def fill_trigger(prompt: str, trigger: str | None) -> str:
    """The prompt as sampled: the config generator fills ``[trigger]`` the same way, so the card
    shows exactly the prompts of the samples beside them."""
    return aitk_fill_trigger(prompt, trigger)


def front_matter(spec: dict[str, Any], widget: list[tuple[str, str]]) -> dict[str, Any]:
    """``widget``: (prompt, path inside the bundle) pairs."""
    meta: dict[str, Any] = {"tags": list(TAGS), "base_model": base_model_path(spec)}
    if spec.get("trigger_word"):
        meta["instance_prompt"] = spec["trigger_word"]
    if widget:
        meta["widget"] = [{"text": text, "output": {"url": url}} for text, url in widget]
    meta.update(SCHNELL_LICENSE if is_schnell(spec) else DEV_LICENSE)
    return meta


def render_model_card(spec: dict[str, Any], *, lora_file: str,
                      widget: list[tuple[str, str]], receipt: dict[str, Any]) -> str:
    import yaml

    name = spec["name"]
    trigger = spec.get("trigger_word")
    base = base_model_path(spec)
    training = spec.get("training") or {}
    head = yaml.safe_dump(front_matter(spec, widget), sort_keys=False, allow_unicode=True,
                          width=1000)
    trigger_text = (f"Use the trigger word `{trigger}` in your prompt to invoke the subject."
                    if trigger else "This LoRA has no trigger word.")
    example = widget[0][0] if widget else fill_trigger("[trigger]", trigger) or name
    gallery = "\n".join(f"- ![{text}]({url})" for text, url in widget)
    lines = [
        "---", head.rstrip(), "---", "", f"# {name}", "",
        f"A LoRA for [{base}](https://huggingface.co/{base}), trained with flux-remote "
        f"({training.get('trainer')} trainer, {receipt.get('steps', {}).get('done')} steps, "
        f"rank {training.get('rank')}).", "",
        "## Trigger word", "", trigger_text, "",
    ]
    if gallery:
        lines += ["## Samples", "", gallery, ""]
    lines += [
        "## Use it with diffusers", "", "```python", "import torch",
        "from diffusers import FluxPipeline", "",
        f'pipe = FluxPipeline.from_pretrained("{base}", torch_dtype=torch.bfloat16).to("cuda")',
        f'pipe.load_lora_weights(".", weight_name="{lora_file}")',
        f'image = pipe("{example}").images[0]',
        'image.save("example.png")', "```", "",
        "## Training", "",
        f"- steps: {receipt.get('steps', {}).get('done')} of {training.get('steps')}",
        f"- learning rate: {training.get('lr')}, batch size {training.get('batch_size')}",
        f"- hardware: {receipt.get('hardware', {}).get('gpu')}",
        f"- cost: ${receipt.get('spend_usd', 0):.2f}", "",
    ]
    return "\n".join(lines)
