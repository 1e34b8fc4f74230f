"""Raw attention (METHODS.md 2): the last decoder layer's cross-attention row of the instance's query,
averaged over heads. The plainest reading of the forward; EIVE's layer fusion and query tracking are what
it lacks."""

from __future__ import annotations

from typing import ClassVar

import torch

from explainers._common import head_mean_rows, on_grid
from explainers.base import Targets, register
from pipeline.models.detr import DetectorOutput, DetrAdapter
from pipeline.models.preprocess import PixelBatch


@register("raw-attention")
class RawAttention:
    needs_gradients: ClassVar[bool] = False
    name: ClassVar[str]

    @torch.no_grad()
    def explain(self, model: DetrAdapter, batch: PixelBatch, outputs: DetectorOutput, targets: Targets) -> torch.Tensor:
        return on_grid(head_mean_rows(outputs.cross_attentions[-1], targets), outputs, targets)
