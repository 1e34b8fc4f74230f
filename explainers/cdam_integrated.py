"""Integrated CDAM (METHODS.md 3b): integrated gradients on the tokens T entering the last attention, from a
zero baseline: S_i = sum_d T_id * (1 / (m - 1)) sum_{k=1}^{m-1} d logit_c / d T_id at T' = (k / m) T (the
residual stream keeps the block's own input). The map is the positive part (see explainers/cdam.py).

The path scales T, not the block's input: the block's first LayerNorm would undo a scaling of its input
(LN(a x) = LN(x) up to its epsilon), leaving the path nearly constant. With m = 2 (one step) it is the
gradient at T / 2 times T, i.e. twice the vanilla CDAM of the halved tokens. Scaled copies go through the
last block `batch_size` rows per forward.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from eive_audit.explainers._common import on_grid
from eive_audit.explainers._vit import cdam
from eive_audit.explainers.base import check_supported, register
from eive_audit.pipeline.config import CdamIntegratedSettings
from eive_audit.pipeline.models.preprocess import PixelBatch
from eive_audit.pipeline.models.targets import Targets
from eive_audit.pipeline.models.vit import ClassifierOutput, ViTAdapter


@register("cdam-integrated")
class IntegratedCDAM:
    name: ClassVar[str]

    def __init__(self, settings: CdamIntegratedSettings) -> None:
        self.settings = settings

    def explain(self, model: ViTAdapter, batch: PixelBatch, outputs: ClassifierOutput, targets: Targets) -> torch.Tensor:
        check_supported([self.name], model.family)
        m = self.settings.steps
        alphas = torch.arange(1, m, device=outputs.logits.device, dtype=torch.float32) / m

        def scaled(tokens: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
            return tokens * alphas[copy][:, None, None]

        maps = cdam(model, batch, targets, m - 1, scaled, integrated=True, batch_size=self.settings.batch_size)
        return on_grid(maps, outputs, targets)  # type: ignore[arg-type]
