"""Raw attention (METHODS.md 2): the last decoder layer's cross-attention row of the instance's query,
averaged over heads (for a deformable model, its splatted sampling). The plainest reading of the forward;
EIVE's layer fusion and query tracking are what it lacks.

For a ViT classifier (`model.task == "classify"`): the last block's attention of the CLS row (the rows the
head pools: explainers._vit.raw_attention) over the patches, averaged over heads."""

from __future__ import annotations

from typing import ClassVar

import torch

from eive_audit.explainers import _vit
from eive_audit.explainers._common import attention_rows, on_grid
from eive_audit.explainers.base import register
from eive_audit.pipeline.models.detr import DetectorOutput, DetrAdapter
from eive_audit.pipeline.models.preprocess import PixelBatch
from eive_audit.pipeline.models.targets import Targets


@register("raw-attention")
class RawAttention:
    name: ClassVar[str]

    def explain(self, model: DetrAdapter, batch: PixelBatch, outputs: DetectorOutput, targets: Targets) -> torch.Tensor:
        if getattr(model, "task", "detect") == "classify":
            return _vit.raw_attention(model, outputs, targets)  # type: ignore[arg-type]
        last = torch.tensor([outputs.layer_logits.shape[0] - 1], device=targets.query.device)
        return on_grid(attention_rows(outputs, last, targets.batch_index, targets.query[None])[0], outputs, targets)
