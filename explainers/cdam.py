"""CDAM (Brocki & Chung; METHODS.md 3b) for ViT classifiers: T = the tokens entering the last attention (the
output of the last block's first LayerNorm), S_i = sum_d T_id * d logit_c / d T_id for each patch token i.

S is signed in the paper (evidence for and against the class). Our maps must be non-negative, so the map is
its positive part, the evidence for the class (as cdam-detr keeps it), not a min-max of the signed scores,
which would give every neutral token mass. Batched: one forward to the last block for the batch, then the
last block and head for all targets at once, with one backward (explainers._vit.cdam).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from eive_audit.explainers._common import on_grid
from eive_audit.explainers._vit import cdam
from eive_audit.explainers.base import check_supported, register
from eive_audit.pipeline.models.preprocess import PixelBatch
from eive_audit.pipeline.models.targets import Targets
from eive_audit.pipeline.models.vit import ClassifierOutput, ViTAdapter


@register("cdam")
class CDAM:
    name: ClassVar[str]

    def explain(self, model: ViTAdapter, batch: PixelBatch, outputs: ClassifierOutput, targets: Targets) -> torch.Tensor:
        check_supported([self.name], model.family)
        return on_grid(cdam(model, batch, targets, 1, lambda tokens, _copy: tokens), outputs, targets)  # type: ignore[arg-type]
