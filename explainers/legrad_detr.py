"""LeGrad adapted to DETR (METHODS.md 2 and 3a): for each decoder layer l, the class logit of the
instance's query through that layer's auxiliary head, differentiated with respect to that layer's own
cross-attention row of the query; ReLU, mean over heads, summed over layers. Layer by layer (L short
backwards per round of targets), not one summed backward, so each layer is scored by its own prediction.
Attention values are not multiplied in, as in LeGrad.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from eive_audit.explainers._common import GradientExplainer, Reduce, class_logits
from eive_audit.explainers.base import register
from eive_audit.pipeline.models.detr import DetrAdapter, ForwardRecord
from eive_audit.pipeline.models.targets import Targets


@register("legrad-detr")
class LeGradDetr(GradientExplainer):
    def _passes(self, model: DetrAdapter, record: ForwardRecord,
                targets: Targets) -> Iterable[tuple[torch.Tensor, Sequence[torch.Tensor], Reduce]]:
        def reduce(members: torch.Tensor, grads: Sequence[torch.Tensor]) -> torch.Tensor:
            rows = grads[0][targets.batch_index[members], :, targets.query[members]]  # [R, M, N]
            return rows.float().clamp(min=0).mean(1)

        for layer, attention in enumerate(record.cross_attentions):
            yield class_logits(record, targets, layer), (attention,), reduce
