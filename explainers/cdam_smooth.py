"""Smooth CDAM (METHODS.md 3b): CDAM averaged over n noisy copies of the tokens T entering the last
attention, T + eps, eps ~ N(0, sigma^2), sigma = noise * (max - min of the image's T); each copy's CDAM is
that of its own noisy tokens. The map is the positive part of the average (see explainers/cdam.py).

The noise is altered at T, where CDAM attributes, rather than at the block's input before its LayerNorm, for
one treatment with cdam-integrated (whose scaling a LayerNorm would undo). The n standard-normal draws are
the same for every image and target (seeded once: common random numbers), so an image's map does not depend
on the batch it comes in. Copies go through the last block `batch_size` rows per forward.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from eive_audit.explainers._common import on_grid
from eive_audit.explainers._vit import cdam
from eive_audit.explainers.base import check_supported, register
from eive_audit.pipeline.config import CdamSmoothSettings
from eive_audit.pipeline.models.preprocess import PixelBatch
from eive_audit.pipeline.models.targets import Targets
from eive_audit.pipeline.models.vit import ClassifierOutput, ViTAdapter


@register("cdam-smooth")
class SmoothCDAM:
    name: ClassVar[str]

    def __init__(self, settings: CdamSmoothSettings) -> None:
        self.settings = settings

    def explain(self, model: ViTAdapter, batch: PixelBatch, outputs: ClassifierOutput, targets: Targets) -> torch.Tensor:
        check_supported([self.name], model.family)
        s = self.settings
        draws: list[torch.Tensor] = []  # [n, N, D], drawn at the first call, when the token shape is known

        def noisy(tokens: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
            if not draws:
                generator = torch.Generator().manual_seed(s.seed)  # on the CPU: the same draws on every device
                draws.append(torch.randn(s.n_samples, *tokens.shape[1:], generator=generator).to(tokens.device))
            spread = tokens.amax((1, 2)) - tokens.amin((1, 2))
            return tokens + (s.noise * spread)[:, None, None] * draws[0][copy]

        maps = cdam(model, batch, targets, s.n_samples, noisy, batch_size=s.batch_size)
        return on_grid(maps, outputs, targets)  # type: ignore[arg-type]
