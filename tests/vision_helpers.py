"""Tiny random vision checkpoints built with transformers (the oracle), and sample image files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from helpers import STD  # 0.2: larger than transformers' 0.02, so outputs depend clearly on every pixel

# arch -> (config class, config sizes, image processor class, processor settings)
VISION_ARCH = {
    "vit": ("ViTConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                              image_size=32, patch_size=8),
            "ViTImageProcessor", dict(size={"height": 32, "width": 32})),
    "deit": ("DeiTConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                image_size=32, patch_size=8),
             "DeiTImageProcessor", dict(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32})),
    "convnext": ("ConvNextConfig", dict(hidden_sizes=[8, 16], depths=[1, 2], num_stages=2, patch_size=4,
                                        image_size=32),
                 "ConvNextImageProcessor", dict(size={"shortest_edge": 32}, crop_pct=0.875)),
    "beit": ("BeitConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                image_size=32, patch_size=8, use_relative_position_bias=True),
             "BeitImageProcessor", dict(size={"height": 32, "width": 32})),
    "swin": ("SwinConfig", dict(image_size=32, patch_size=4, embed_dim=8, depths=[2, 1], num_heads=[2, 4],
                                window_size=4),
             "ViTImageProcessor", dict(size={"height": 32, "width": 32})),
}
PREFIX = {"vit": "ViT", "deit": "DeiT", "convnext": "ConvNext", "beit": "Beit", "swin": "Swin"}
HEAD_CLASS = {"base": "Model", "image-classification": "ForImageClassification",
              "image-classification-with-teacher": "ForImageClassificationWithTeacher"}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every weight with std STD (normalisation weights around 1) so small bugs show at 1e-4."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(STD * torch.randn(p.shape, generator=gen))
    return model.eval()


def tiny_vision_checkpoint(folder: Path, arch: str, head: str, *, num_labels: int = 3, seed: int = 0,
                           labels: list[str] | None = None, processor: dict | None = None,
                           **config_overrides) -> Path:
    """Save a tiny random `arch` model with `head` plus its image processor into `folder`."""
    import transformers

    config_name, sizes, processor_name, processor_settings = VISION_ARCH[arch]
    labels = labels or [f"LABEL_{i}" for i in range(num_labels)]
    config = getattr(transformers, config_name)(
        id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
        **{**sizes, **config_overrides},
    )
    torch.manual_seed(seed)
    model = getattr(transformers, PREFIX[arch] + HEAD_CLASS[head])(config)
    randomize(model, seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    image_processor = getattr(transformers, processor_name)(**{**processor_settings, **(processor or {})})
    image_processor.save_pretrained(str(folder))
    return folder


def smooth_image(height: int, width: int, seed: int = 0, mode: str = "RGB"):
    """A PIL image with gradients, blobs and noise: resizing and JPEG both have real work to do."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = []
    for c in range(4):
        fy, fx = rng.uniform(0.5, 4, 2)
        wave = np.sin(2 * np.pi * (fy * y / max(height, 1) + fx * x / max(width, 1)) + rng.uniform(0, 6))
        channels.append(127.5 + 90 * wave + rng.normal(0, 25, (height, width)))
    pixels = np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)
    if mode == "RGBA":
        return Image.fromarray(pixels, "RGBA")
    image = Image.fromarray(pixels[..., :3], "RGB")
    return image if mode == "RGB" else image.convert(mode)


def image_bytes(image, fmt: str = "JPEG", **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def exif_rotated_jpeg(path: Path, orientation: int = 6, size=(48, 30)) -> Path:
    """A JPEG whose EXIF orientation tag asks viewers to rotate it."""
    image = smooth_image(size[1], size[0], seed=orientation)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, format="JPEG", exif=exif.tobytes(), quality=95)
    return path


def sample_files(folder: Path) -> list[Path]:
    """JPEG, PNG (RGBA, palette, grayscale) and WebP-free files of several sizes and aspect ratios."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (h, w, mode, fmt) in enumerate([(48, 64, "RGB", "JPEG"), (100, 37, "RGB", "JPEG"), (32, 32, "RGB", "PNG"),
                                           (29, 71, "RGBA", "PNG"), (40, 40, "L", "PNG"), (57, 45, "P", "PNG"),
                                           (300, 200, "RGB", "JPEG"), (7, 9, "RGB", "BMP")]):
        path = folder / f"sample{i}.{fmt.lower()}"
        smooth_image(h, w, seed=i, mode=mode).save(path, format=fmt)
        files.append(path)
    files.append(exif_rotated_jpeg(folder / "rotated.jpg"))
    return files


def reference_model(folder: Path, arch: str, head: str):
    """The transformers model for `head` from `folder`: the class config.json names for a classifier."""
    import json

    import transformers

    if head == "base":
        name = PREFIX[arch] + "Model"
    else:
        name = json.loads((Path(folder) / "config.json").read_text())["architectures"][0]
    return getattr(transformers, name).from_pretrained(str(folder)).eval()


def assert_model_parity(folder: Path, arch: str, head: str, pixel_values: torch.Tensor, tol: float = 1e-4,
                        **forward_kwargs) -> dict:
    """Our model's outputs equal transformers' (logits, last_hidden_state, pooler_output) within tol, and a
    batch gives what its rows give one at a time. Returns our outputs."""
    from lightpipe.loading import load_model

    ours = load_model(folder, "base" if head == "base" else "image-classification")
    ref = reference_model(folder, arch, head)
    with torch.inference_mode():
        got = ours(pixel_values, **forward_kwargs)
        expected = ref(pixel_values=pixel_values, **forward_kwargs)
        names = ("logits",) if head != "base" else ("last_hidden_state", "pooler_output")
        compared = 0
        for name in names:
            if expected.get(name) is None:
                assert name not in got
                continue
            assert got[name].shape == expected[name].shape, name
            assert (got[name] - expected[name]).abs().max().item() <= tol, name
            compared += 1
        assert compared
        for i in range(pixel_values.shape[0]):
            single = ours(pixel_values[i:i + 1], **forward_kwargs)
            for name in names:
                if name in got:
                    assert (single[name][0] - got[name][i]).abs().max().item() <= 1e-5, name
    return got


def assert_same_labels(ours, ref, tol=1e-4):
    """Classification results (a list of {"label", "score"}, or a list of such lists) equal: labels in the same
    order, scores within tol."""
    if ref and isinstance(ref[0], list):
        assert len(ours) == len(ref)
        for o, r in zip(ours, ref):
            assert_same_labels(o, r, tol)
        return
    assert [d["label"] for d in ours] == [d["label"] for d in ref]
    assert max(abs(o["score"] - r["score"]) for o, r in zip(ours, ref)) <= tol


def assert_close(ours, ref, tol=1e-4):
    """Nested lists or arrays of the same shape, equal within tol."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= tol
