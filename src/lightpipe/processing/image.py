"""Image preprocessing: an RGB image -> resize, crop, rescale and normalise, as transformers' processors do.

Reading inputs (paths, URLs, base64, bytes, arrays; EXIF orientation) is processing/image_io.py's.
`ImageProcessor` reproduces the PIL-backend image processors of transformers (ViT, DeiT, BEiT, ConvNeXt,
CLIP, Swin ...) from a checkpoint's preprocessor_config.json:

    PIL image --convert RGB--> --resize (PIL)--> uint8 (H, W, 3) --center crop--> --rescale, normalise-->
    float32 (3, H, W)

Resizing is PIL's, as in the reference, so pixels agree exactly. Rescaling and normalising map each
of the 256 byte values through a per-channel table computed the way the reference computes it
(float64 rescale, float32 normalise), so pixel values agree to the last bit, for a whole batch in
one indexing operation.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checks import number
from ..config import read_json_object
from ..errors import CheckpointError, InvalidInput, UnsupportedModel
from .image_io import load_image, require_pil

logger = logging.getLogger(__name__)
_WARNED: set[str] = set()  # unknown processor kinds already warned about

# PIL resampling filters by the integer codes preprocessor_config.json stores.
NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING = 0, 1, 2, 3, 4, 5
RESAMPLE_NAMES = {"nearest": NEAREST, "lanczos": LANCZOS, "bilinear": BILINEAR, "bicubic": BICUBIC,
                  "box": BOX, "hamming": HAMMING}

IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------
# The image processor


@dataclasses.dataclass(frozen=True)
class ProcessorDefaults:
    """The class defaults of one transformers image processor: used for keys a config leaves out."""

    size: dict
    resample: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    crop_size: dict | None = None
    do_center_crop: bool = False
    do_convert_rgb: bool = False
    default_to_square: bool = True  # how a bare int `size` reads: a square, or the shortest edge
    crop_pct: float | None = None


_VIT = ProcessorDefaults({"height": 224, "width": 224}, BILINEAR, IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD)
PROCESSOR_DEFAULTS: dict[str, ProcessorDefaults] = {
    "ViTImageProcessor": _VIT,
    "DeiTImageProcessor": ProcessorDefaults({"height": 256, "width": 256}, BICUBIC, IMAGENET_STANDARD_MEAN,
                                            IMAGENET_STANDARD_STD, {"height": 224, "width": 224}, True),
    "BeitImageProcessor": ProcessorDefaults({"height": 224, "width": 224}, BICUBIC, IMAGENET_STANDARD_MEAN,
                                            IMAGENET_STANDARD_STD, {"height": 224, "width": 224}, False),
    "ConvNextImageProcessor": ProcessorDefaults({"shortest_edge": 384}, BICUBIC, IMAGENET_STANDARD_MEAN,
                                                IMAGENET_STANDARD_STD, default_to_square=False, crop_pct=224 / 256),
    "CLIPImageProcessor": ProcessorDefaults({"shortest_edge": 224}, BICUBIC, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
                                            {"height": 224, "width": 224}, True, True, default_to_square=False),
    "BitImageProcessor": ProcessorDefaults({"shortest_edge": 224}, BICUBIC, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
                                           {"height": 224, "width": 224}, True, True, default_to_square=False),
}
# The processor each model type uses when its preprocessor_config.json names none (transformers' auto map).
PROCESSOR_OF_MODEL_TYPE = {
    "vit": "ViTImageProcessor", "swin": "ViTImageProcessor", "swinv2": "ViTImageProcessor",
    "deit": "DeiTImageProcessor", "beit": "BeitImageProcessor", "data2vec-vision": "BeitImageProcessor",
    "convnext": "ConvNextImageProcessor", "convnextv2": "ConvNextImageProcessor",
    "clip": "CLIPImageProcessor", "clip_vision_model": "CLIPImageProcessor", "dinov2": "BitImageProcessor",
}
CONFIG_FILES = ("preprocessor_config.json", "processor_config.json")
SIZE_FORMS = ({"height", "width"}, {"shortest_edge"}, {"shortest_edge", "longest_edge"},
              {"max_height", "max_width"})


def _processor_kind(raw: dict, model_type: str | None) -> str | None:
    name = raw.get("image_processor_type") or raw.get("feature_extractor_type")
    if isinstance(name, str):
        name = name.replace("FeatureExtractor", "ImageProcessor")
        for suffix in ("Fast", "Pil"):
            name = name[: -len(suffix)] if name.endswith(suffix) else name
        return name
    return PROCESSOR_OF_MODEL_TYPE.get(model_type or "")


def _size_dict(value: Any, default_to_square: bool, what: str) -> dict[str, int]:
    """A config's size in any of its historic forms -> one of SIZE_FORMS."""
    if isinstance(value, bool):
        raise CheckpointError(f"{what}={value!r} is not a size.")
    if isinstance(value, int):
        return {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    if isinstance(value, dict) and set(value) in SIZE_FORMS and all(isinstance(v, int) and v > 0 for v in value.values()):
        return dict(value)
    raise UnsupportedModel(
        f"{what}={value!r} is not supported; lightpipe resizes to {{'height', 'width'}}, {{'shortest_edge'}}, "
        "{'shortest_edge', 'longest_edge'} or {'max_height', 'max_width'}."
    )


def _triple(value: Any, what: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * 3
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return tuple(float(v) for v in value)  # type: ignore[return-value]
    raise UnsupportedModel(f"{what}={value!r} is not supported; give one value or three (one per RGB channel).")


def _positive(value: Any, what: str) -> float | None:
    """A positive finite number (None stays None): crop_pct divides a size, rescale_factor scales bytes; anything
    else would fail later, inside preprocessing, with a bare TypeError or ZeroDivisionError."""
    return None if value is None else float(number(what, value, positive=True, error=UnsupportedModel))


def _resample(value: Any) -> int:
    if isinstance(value, str) and value.lower() in RESAMPLE_NAMES:
        return RESAMPLE_NAMES[value.lower()]
    if isinstance(value, int) and not isinstance(value, bool) and value in RESAMPLE_NAMES.values():
        return value
    raise UnsupportedModel(f"resample={value!r} is not a PIL resampling filter (0..5 or a name).")


def shortest_edge_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    """(height, width) after scaling the shorter side to `shortest`; the longer side is truncated, as in
    transformers (and torchvision): int(shortest * long / short)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest * long / short)
    return (new_long, shortest) if width <= height else (shortest, new_long)


def bounded_size(height: int, width: int, shortest: int, longest: int) -> tuple[int, int]:
    """(height, width) with the shorter side at `shortest`, unless the longer side would pass `longest`,
    in which case the longer side is `longest` (transformers' get_size_with_aspect_ratio)."""
    raw = None
    low, high = float(min(height, width)), float(max(height, width))
    if high / low * shortest > longest:
        raw = longest * low / high
        shortest = int(round(raw))
    if (height <= width and height == shortest) or (width <= height and width == shortest):
        return height, width
    if width < height:
        return (int(raw * height / width) if raw is not None else int(shortest * height / width)), shortest
    return shortest, (int(raw * width / height) if raw is not None else int(shortest * width / height))


def fitted_size(height: int, width: int, max_height: int, max_width: int) -> tuple[int, int]:
    """(height, width) scaled, aspect kept, until one side meets its bound and neither passes it (up or
    down), truncated as transformers' get_image_size_for_max_height_width truncates."""
    scale = min(max_height / height, max_width / width)
    return int(height * scale), int(width * scale)


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) -> (height, width, C) around the centre; zero padding where the image is smaller,
    placed as transformers places it."""
    h, w = pixels.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return pixels[top:top + height, left:left + width]
    out_h, out_w = max(height, h), max(width, w)
    pad_top, pad_left = -(-(out_h - h) // 2), -(-(out_w - w) // 2)  # ceil division
    canvas = np.zeros((out_h, out_w) + pixels.shape[2:], dtype=pixels.dtype)
    canvas[pad_top:pad_top + h, pad_left:pad_left + w] = pixels
    top, left = top + pad_top, left + pad_left
    return canvas[max(0, top):min(out_h, top + height), max(0, left):min(out_w, left + width)]


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """A checkpoint's image preprocessing: PIL image -> float32 pixel values (3, H, W).

    Built by `from_folder` (or `from_dict`) with the class defaults of the transformers processor
    the config names, overridden by the config's own keys.
    """

    kind: str = "ViTImageProcessor"
    do_resize: bool = True
    size: dict = dataclasses.field(default_factory=lambda: {"height": 224, "width": 224})
    resample: int = BILINEAR
    do_center_crop: bool = False
    crop_size: dict | None = None
    crop_pct: float | None = None  # ConvNeXt: below 384 px, resize to shortest_edge / crop_pct, then crop
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_STANDARD_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STANDARD_STD
    do_convert_rgb: bool = False
    default_to_square: bool = True  # how a bare int `size` given later (with_options) reads

    OPTIONS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "crop_pct", "do_rescale",
               "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb", "default_to_square")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "ImageProcessor":
        """Read preprocessor_config.json, or the image_processor section of processor_config.json."""
        folder = Path(folder)
        raw = None
        for name in CONFIG_FILES:
            data = read_json_object(folder / name)
            if data is not None and name == "processor_config.json":
                data = data.get("image_processor")
            if isinstance(data, dict):
                raw = data
                break
        if raw is None:
            raise CheckpointError(
                f"{folder} has no image preprocessing settings: expected preprocessor_config.json, or "
                "processor_config.json with an image_processor section."
            )
        model_type = (read_json_object(folder / "config.json") or {}).get("model_type")
        return cls.from_dict(raw, model_type=model_type)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], model_type: str | None = None) -> "ImageProcessor":
        """Settings as preprocessor_config.json writes them; missing keys take the named processor's defaults."""
        kind = _processor_kind(raw, model_type) or "ViTImageProcessor"
        if kind not in PROCESSOR_DEFAULTS and kind not in _WARNED:
            _WARNED.add(kind)
            logger.warning("%s is not an image processor lightpipe knows; keys its config leaves out take "
                           "ViTImageProcessor's defaults.", kind)
        defaults = PROCESSOR_DEFAULTS.get(kind, _VIT)
        square = raw.get("default_to_square")
        square = defaults.default_to_square if square is None else bool(square)

        def get(key, default):
            value = raw.get(key)
            return default if value is None else value

        size = get("size", defaults.size)
        if isinstance(size, int) and "max_size" in raw and not square:  # old DETR-style configs
            size = {"shortest_edge": size, "longest_edge": raw["max_size"]}
        crop_size = get("crop_size", defaults.crop_size)
        processor = cls(
            kind=kind,
            do_resize=bool(get("do_resize", True)),
            size=_size_dict(size, square, "size"),
            resample=_resample(get("resample", defaults.resample)),
            do_center_crop=bool(get("do_center_crop", defaults.do_center_crop)),
            crop_size=None if crop_size is None else _size_dict(crop_size, True, "crop_size"),
            crop_pct=(_positive(get("crop_pct", defaults.crop_pct), "crop_pct")
                      if kind == "ConvNextImageProcessor" else None),
            do_rescale=bool(get("do_rescale", True)),
            rescale_factor=_positive(get("rescale_factor", 1 / 255), "rescale_factor"),
            do_normalize=bool(get("do_normalize", True)),
            image_mean=_triple(get("image_mean", defaults.image_mean), "image_mean"),
            image_std=_triple(get("image_std", defaults.image_std), "image_std"),
            do_convert_rgb=bool(get("do_convert_rgb", defaults.do_convert_rgb)),
            default_to_square=square,
        )
        processor._check()
        return processor

    def _check(self) -> None:
        if self.do_center_crop and (self.crop_size is None or set(self.crop_size) != {"height", "width"}):
            raise UnsupportedModel(f"do_center_crop needs crop_size {{'height', 'width'}}, not {self.crop_size!r}.")
        if self.kind == "ConvNextImageProcessor" and self.do_resize and "shortest_edge" not in self.size:
            raise UnsupportedModel(f"ConvNeXt preprocessing needs size {{'shortest_edge'}}, not {self.size!r}.")
        if self.do_normalize and any(s == 0 for s in self.image_std):
            raise UnsupportedModel("image_std must not contain 0.")

    def with_options(self, **options: Any) -> "ImageProcessor":
        """A copy with some settings changed (keys and value forms as in preprocessor_config.json)."""
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise InvalidInput(f"unknown image processor option(s) {unknown}; accepted: {', '.join(self.OPTIONS)}.")
        if not options:
            return self
        raw = {k: getattr(self, k) for k in self.OPTIONS}
        raw.update(options)
        raw["image_processor_type"] = self.kind
        try:
            return self.from_dict(raw)
        except (UnsupportedModel, CheckpointError) as e:
            raise InvalidInput(str(e)) from e

    # ------------------------------------------------------------------ the steps
    def to_rgb(self, image):
        """A PIL image of any mode -> RGB. With do_convert_rgb, transparency is composited onto white, as
        the reference's convert_to_rgb does; otherwise the alpha channel is dropped, as its load_image does."""
        PIL = require_pil()
        if self.do_convert_rgb and ("A" in image.getbands() or image.info.get("transparency") is not None):
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(white, rgba).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")

    @property
    def fixed_output_size(self) -> bool:
        """Whether every image comes out at one size (a crop, a fixed resize or ConvNeXt's square), so
        that images can share a batch; otherwise the size follows each image's aspect ratio."""
        if self.do_center_crop:
            return True
        if not self.do_resize:
            return False
        return self.crop_pct is not None or "height" in self.size

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) the resize step produces for an image of (height, width)."""
        size = self.size
        if self.crop_pct is not None:  # ConvNeXt reads shortest_edge alone (a longest_edge is ignored)
            shortest = size["shortest_edge"]
            if shortest >= 384:  # ConvNeXt warps to a square at 384 px and above
                return shortest, shortest
            return shortest_edge_size(height, width, int(shortest / self.crop_pct))
        if "shortest_edge" in size and "longest_edge" in size:
            return bounded_size(height, width, size["shortest_edge"], size["longest_edge"])
        if "shortest_edge" in size:
            return shortest_edge_size(height, width, size["shortest_edge"])
        if "max_height" in size:
            return fitted_size(height, width, size["max_height"], size["max_width"])
        return size["height"], size["width"]

    def prepare(self, image) -> np.ndarray:
        """One image (anything load_image takes) -> resized and cropped RGB bytes, (H, W, 3) uint8."""
        PIL = require_pil()
        if not isinstance(image, PIL.Image.Image):
            image = load_image(image)
        image = self.to_rgb(image)
        if self.do_resize:
            height, width = self.output_size(image.height, image.width)
            if height < 1 or width < 1:
                raise InvalidInput(f"a {image.width} x {image.height} image would be resized to {width} x {height} "
                                   "pixels, which is nothing; the image is too narrow for this model's size settings.")
            image = image.resize((width, height), resample=self.resample)
        pixels = np.array(image)  # a writable copy, (H, W, 3) uint8
        if self.do_resize and self.crop_pct is not None and self.size["shortest_edge"] < 384:
            pixels = center_crop(pixels, self.size["shortest_edge"], self.size["shortest_edge"])
        if self.do_center_crop:
            pixels = center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
        return np.ascontiguousarray(pixels)

    def pixel_table(self) -> torch.Tensor:
        """(3, 256) float32: the value each byte of each channel becomes after rescale and normalise,
        computed as the reference computes it (rescale in float64 then float32, normalise in float32)."""
        values = torch.arange(256, dtype=torch.float64)
        if self.do_rescale:
            values = values * self.rescale_factor
        values = values.to(torch.float32).expand(3, 256)
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None]
            std = torch.tensor(self.image_std, dtype=torch.float32)[:, None]
            values = (values - mean) / std
        return values.contiguous()

    def normalize(self, pixels: np.ndarray) -> torch.Tensor:
        """(..., H, W, 3) uint8 -> (..., 3, H, W) float32 pixel values, rescaled and normalised: each
        channel's bytes index that channel's row of the table (faster than arithmetic, and exact)."""
        table = self._table
        channels = [table[c][pixels[..., c]] for c in range(3)]  # 3 x (..., H, W)
        return torch.from_numpy(np.stack(channels, axis=-3))

    @functools.cached_property
    def _table(self) -> np.ndarray:
        return self.pixel_table().numpy()  # computed once: the settings are frozen

    def __call__(self, images) -> dict[str, torch.Tensor]:
        """One image -> {"pixel_values": (3, H, W)}; a list of images -> {"pixel_values": (B, 3, H, W)}.

        A list's images must come out the same size (a fixed size or a center crop make sure of it)."""
        if isinstance(images, (list, tuple)):
            if not images:
                raise InvalidInput("no images given.")
            prepared = [self.prepare(image) for image in images]
            if len({p.shape for p in prepared}) > 1:
                raise InvalidInput(
                    "these images come out of preprocessing at different sizes "
                    f"({sorted({p.shape[:2] for p in prepared})}); process them one at a time."
                )
            return {"pixel_values": self.normalize(np.stack(prepared))}
        pixels = self.prepare(images)
        return {"pixel_values": self.normalize(pixels)}
