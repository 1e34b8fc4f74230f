"""What a deleted pixel of a model input becomes: the reference images of every perturbation (deletion and
insertion scores, AHA's training and refinement)."""

from __future__ import annotations

import torch
from torchvision.transforms.functional import gaussian_blur


def baseline_images(pixels: torch.Tensor, mask: torch.Tensor, kind: str, blur_sigma: float = 10.0,
                    seed: int = 0) -> torch.Tensor:
    """What deleted pixels become, per image [B, 3, H, W]: a strong blur, the mean colour, or uniform noise
    over the image's own value range."""
    valid = mask[:, None].float()
    if kind == "blur":
        kernel = int(2 * round(3 * blur_sigma) + 1)
        return gaussian_blur(pixels, [kernel, kernel], [blur_sigma, blur_sigma])
    if kind == "mean":
        mean = (pixels * valid).sum((2, 3), keepdim=True) / valid.sum((2, 3), keepdim=True).clamp(min=1)
        return mean.expand_as(pixels).clone()
    generator = torch.Generator(device=pixels.device).manual_seed(seed)
    lo, hi = pixels.amin((1, 2, 3), keepdim=True), pixels.amax((1, 2, 3), keepdim=True)
    return lo + (hi - lo) * torch.rand(pixels.shape, generator=generator, device=pixels.device)
