"""A tiny random CLIP checkpoint built with transformers (the oracle): model, tokenizer, image processor."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from helpers import BPE_CORPUS, STD

# The pre-tokenizer pattern of CLIP's tokenizer (words, single digits, runs of punctuation).
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
IMAGE_SIZE = 32
LOGIT_SCALE = math.log(10.0)  # exp() = 10: logits spread enough to separate labels, not enough to saturate


def clip_merges() -> list[tuple[str, str]]:
    """BPE merges with CLIP's "</w>" end-of-word suffix, learned from a small corpus."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=300, min_frequency=2, end_of_word_suffix="</w>", show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([BPE_CORPUS], trainer)
    return [tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]


def clip_tokenizer_folder(folder: Path) -> Path:
    """vocab.json + merges.txt laid out as CLIP's (bytes, bytes + "</w>", merges, then the two special
    tokens with the largest ids), loaded and saved by transformers' CLIPTokenizer (tokenizer.json)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = clip_merges()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)
    tok.save_pretrained(str(folder))
    return folder


def randomize_clip(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights at std STD, layer-norm scales around 1, a moderate logit scale."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(LOGIT_SCALE)
            elif p.ndim == 1 and ("norm" in name or "layrnorm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(STD * torch.randn(p.shape, generator=gen))
    return model.eval()


def tiny_clip_checkpoint(folder: Path, seed: int = 0, text_overrides: dict | None = None,
                         vision_overrides: dict | None = None) -> Path:
    """A tiny random CLIPModel (32x32 images, 8x8 patches) with its tokenizer and image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    clip_tokenizer_folder(folder)
    vocab = json.loads((folder / "vocab.json").read_text())
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
                pad_token_id=vocab[EOS])
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=8)
    config = CLIPConfig(text_config={**text, **(text_overrides or {})},
                        vision_config={**vision, **(vision_overrides or {})}, projection_dim=16)
    torch.manual_seed(seed)
    model = randomize_clip(CLIPModel(config), seed)
    model.save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(str(folder))
    return folder


def sample_images(count: int = 4, seed: int = 0):
    """Random RGB PIL images of assorted sizes and modes (one greyscale, one RGBA, one not square)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    shapes = [(40, 40, "RGB"), (57, 33, "RGB"), (24, 64, "L"), (48, 36, "RGBA"), (32, 32, "RGB"), (90, 70, "RGB")]
    images = []
    for i in range(count):
        h, w, mode = shapes[i % len(shapes)]
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        array = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
        images.append(Image.fromarray(array[..., 0] if channels == 1 else array, mode))
    return images
