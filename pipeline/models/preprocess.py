"""Batched DETR preprocessing on the model's device: resize, normalise, pad, pixel mask.

Images arrive decoded by `pipeline.sources.decode.decode_rgb`, at most `longest_edge` on a side (no input
side is ever longer), so a large image may come as a smaller copy of itself: the input size is computed from
its original (display) size, which is what boxes are given and returned in.

The parameters (input size, mean, std) come from the checkpoint's `preprocessor_config.json`, the file
every transformers detection checkpoint ships, so a model is always fed the way it was trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from eive_audit.pipeline.models.families import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class PreprocessConfig:
    shortest_edge: int = 800
    longest_edge: int = 1333
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def from_dir(cls, model_dir: Path) -> "PreprocessConfig":
        """Read `preprocessor_config.json`; DETR defaults where the checkpoint has none."""
        path = Path(model_dir) / "preprocessor_config.json"
        if not path.exists():
            return cls()
        raw = json.loads(path.read_text())
        size = raw.get("size") or {}
        shortest = size.get("shortest_edge") or size.get("height") or cls.shortest_edge
        longest = size.get("longest_edge") or max(size.get("height", 0), size.get("width", 0)) or cls.longest_edge
        return cls(
            shortest_edge=int(shortest),
            longest_edge=int(longest),
            mean=tuple(raw.get("image_mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
            std=tuple(raw.get("image_std", IMAGENET_STD)),  # type: ignore[arg-type]
        )

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """DETR's rule: scale the short side to `shortest_edge` unless the long side would pass `longest_edge`."""
        scale = self.shortest_edge / min(height, width)
        if max(height, width) * scale > self.longest_edge:
            scale = self.longest_edge / max(height, width)
        return max(1, round(height * scale)), max(1, round(width * scale))


@dataclass
class PixelBatch:
    """Model input for B images: pixels [B, 3, H, W], mask [B, H, W] (1 = real pixel), sizes [B, 2] (h, w)."""

    pixel_values: torch.Tensor
    pixel_mask: torch.Tensor
    input_sizes: torch.Tensor
    original_sizes: torch.Tensor


def preprocess(images: list[torch.Tensor], config: PreprocessConfig, device: torch.device | str = "cpu",
               sizes: list[tuple[int, int]] | None = None) -> PixelBatch:
    """Resize each uint8 [3, h, w] image, normalise, and pad the batch to its largest size.

    sizes: each image's original (height, width) when it was decoded smaller (the record's display size);
    by default its own shape. Input sizes follow the original, and `original_sizes` are these."""
    if not images:
        raise ValueError("preprocess needs at least one image")
    originals = sizes if sizes is not None else [tuple(image.shape[-2:]) for image in images]
    if len(originals) != len(images):
        raise ValueError(f"{len(originals)} sizes for {len(images)} images")
    mean = torch.tensor(config.mean, device=device).view(3, 1, 1)
    std = torch.tensor(config.std, device=device).view(3, 1, 1)
    resized = []
    for image, (height, width) in zip(images, originals):
        h, w = config.resized_shape(height, width)
        x = image.to(device=device, non_blocking=True).to(torch.float32).div_(255.0)  # async from pinned memory
        if (h, w) != tuple(x.shape[-2:]):
            x = F.interpolate(x[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
        resized.append((x - mean) / std)
    height = max(x.shape[-2] for x in resized)
    width = max(x.shape[-1] for x in resized)
    pixels = torch.zeros(len(images), 3, height, width, device=device)
    mask = torch.zeros(len(images), height, width, dtype=torch.long, device=device)
    for i, x in enumerate(resized):
        pixels[i, :, : x.shape[-2], : x.shape[-1]] = x
        mask[i, : x.shape[-2], : x.shape[-1]] = 1
    return PixelBatch(
        pixel_values=pixels,
        pixel_mask=mask,
        input_sizes=torch.tensor([x.shape[-2:] for x in resized], device=device),
        original_sizes=torch.tensor([tuple(size) for size in originals], device=device),
    )
