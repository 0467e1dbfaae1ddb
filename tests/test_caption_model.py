"""``captioning.mode: model`` with real transformers models: a tiny random BLIP, and a tiny
VisionEncoderDecoder (ViT + BERT) saved the way such repos are, both built here.

No download: the models and their processors are made from configs and a ten-word vocabulary,
saved with ``save_pretrained`` into a temp folder and loaded back by :func:`load_captioner` exactly
as a hub id would be (``HF_HUB_OFFLINE=1`` is set for every test). The language-model head is
biased towards one word so that the random network writes a known, non-empty caption.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from remote.dataset.caption import caption, clean_caption, load_captioner
from remote.dataset.ingest import ingest
from tests.fixtures_data import TRIGGER

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "photo", "of"]


def build_tiny_blip(folder: Path) -> Path:
    """A 1-layer BLIP captioner whose output is "red red red ..."."""
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration,
                              BlipImageProcessor, BlipProcessor)

    vocab_dir = folder / "vocab"
    vocab_dir.mkdir(parents=True)
    (vocab_dir / "vocab.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer.from_pretrained(str(vocab_dir))
    torch.manual_seed(0)
    small = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 32}
    config = BlipConfig(
        text_config={**small, "vocab_size": len(WORDS), "max_position_embeddings": 64,
                     "encoder_hidden_size": 16, "bos_token_id": tokenizer.cls_token_id,
                     "sep_token_id": tokenizer.sep_token_id,
                     "eos_token_id": tokenizer.sep_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={**small, "image_size": 32, "patch_size": 8, "projection_dim": 16},
        projection_dim=16)
    model = BlipForConditionalGeneration(config)
    always_say_red(model.text_decoder.cls.predictions)
    out = folder / "tiny-blip"
    model.save_pretrained(out)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(out)
    return out


def always_say_red(head: Any) -> None:
    """A BERT LM head whose hidden state is zeroed: the logits are the bias, "red" wins."""
    import torch

    with torch.no_grad():
        head.transform.LayerNorm.weight.zero_()
        head.transform.LayerNorm.bias.zero_()
        bias = torch.full((len(WORDS),), -10.0)
        bias[WORDS.index("red")] = 10.0
        head.bias.copy_(bias)


def build_tiny_vision_encoder_decoder(folder: Path) -> Path:
    """ViT encoder + BERT decoder, saved as such repos are: an image processor and a tokenizer,
    no processor class (``AutoProcessor`` returns only the tokenizer for them)."""
    import torch
    from transformers import (BertConfig, BertTokenizer, ViTConfig, ViTImageProcessor,
                              VisionEncoderDecoderConfig, VisionEncoderDecoderModel)

    vocab_dir = folder / "vocab"
    vocab_dir.mkdir(parents=True)
    (vocab_dir / "vocab.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer.from_pretrained(str(vocab_dir))
    torch.manual_seed(0)
    small = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 32}
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        ViTConfig(**small, image_size=32, patch_size=8),
        BertConfig(**small, vocab_size=len(WORDS), max_position_embeddings=64, is_decoder=True,
                   add_cross_attention=True))
    config.decoder_start_token_id = tokenizer.cls_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.sep_token_id
    model = VisionEncoderDecoderModel(config)
    always_say_red(model.decoder.cls.predictions)
    out = folder / "tiny-ved"
    model.save_pretrained(out)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("captioner"))


@needs_transformers
def test_tiny_model_writes_a_caption(tiny_blip: Path) -> None:
    from PIL import Image

    captioner = load_captioner(str(tiny_blip), device="cpu", max_new_tokens=6)
    texts = captioner([Image.new("RGB", (40, 52), "red"), Image.new("RGB", (64, 64), "blue")])
    assert len(texts) == 2
    for text in texts:
        words = text.split()
        assert words and set(words) == {"red"}, text


@needs_transformers
def test_vision_encoder_decoder_without_a_processor_class(tmp_path: Path) -> None:
    from PIL import Image

    captioner = load_captioner(str(build_tiny_vision_encoder_decoder(tmp_path)), device="cpu",
                               max_new_tokens=3)
    assert captioner([Image.new("RGB", (48, 32), "green")] * 3) == ["red red red"] * 3


@needs_transformers
def test_model_mode_fills_missing_captions_and_keeps_the_rest(small_dataset: Path,
                                                              tmp_path: Path,
                                                              tiny_blip: Path) -> None:
    originals = {p.stem: p.read_bytes() for p in small_dataset.glob("*.txt")}
    calls: list[int] = []
    inner = load_captioner(str(tiny_blip), device="cpu", max_new_tokens=4)

    def counting(images: list) -> list[str]:
        calls.append(len(images))
        return inner(images)

    result = ingest(small_dataset, tmp_path / "work", workers=1)
    report = caption(result, mode="model", template="unused", trigger=TRIGGER, caption_ext="txt",
                     model=str(tiny_blip), captioner=counting, batch_size=5)
    assert calls == [5, 3]
    assert (report.generated, report.kept, report.templated, report.missing) == (8, 4, 0, 0)
    assert report.trigger_inserted == 8
    for record in result.images:
        text = record.caption_path.read_text(encoding="utf-8")
        stem = record.path.stem
        if stem in originals:
            assert record.caption_path.read_bytes() == originals[stem]
        else:
            assert text.startswith(f"{TRIGGER}, red"), text
    assert sorted(p.name for p in small_dataset.glob("*.txt")) == sorted(
        f"{stem}.txt" for stem in originals)  # the user's folder is never written


@needs_transformers
def test_caption_loads_the_model_itself_when_none_is_injected(small_dataset: Path,
                                                              tmp_path: Path,
                                                              tiny_blip: Path) -> None:
    result = ingest(small_dataset, tmp_path / "work", workers=1)
    report = caption(result, mode="model", template="unused", trigger=None, caption_ext="txt",
                     model=str(tiny_blip), batch_size=16)
    assert report.generated == 8 and report.trigger_inserted == 0
    filled = [r for r in result.images if r.path.stem not in {"img_00", "img_01", "img_02",
                                                              "img_03"}]
    assert all(r.caption_path.read_text(encoding="utf-8").startswith("red") for r in filled)


@needs_transformers
def test_missing_model_name_and_missing_model_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="captioning.model"):
        load_captioner("")
    with pytest.raises(OSError):
        load_captioner(str(tmp_path / "no-such-model"), device="cpu")


@pytest.mark.parametrize("raw, cleaned", [
    ("arafed woman in a red hat", "woman in a red hat"),
    ("there is a araffe man  standing\n", "man standing"),
    ("a dog on the grass", "a dog on the grass"),
    ("arafed", "arafed"),
])
def test_clean_caption_drops_blip_artifacts(raw: str, cleaned: str) -> None:
    assert clean_caption(raw) == cleaned


def test_bootstrap_installs_transformers_into_the_agent_python(tmp_path: Path) -> None:
    import os

    from remote.bootstrap import install_extras
    from remote.status import StageFailed
    from tests.test_wandb import fake_python

    spec = {"captioning": {"mode": "model"}}
    python = str(fake_python(tmp_path))
    steps = install_extras(spec, "/unused/trainer/python", env=dict(os.environ),
                           log=lambda line: None, agent_python=python)
    assert steps == ["transformers"]
    assert (tmp_path / "calls").read_text().splitlines()[-1] == "-m pip install --quiet transformers"
    failing = tmp_path / "failing"
    failing.mkdir()
    with pytest.raises(StageFailed):
        install_extras(spec, "/unused", env=dict(os.environ), log=lambda line: None,
                       agent_python=str(fake_python(failing, pip_fails=True)))
