"""ODAM (ICLR 2023, "Gradient-based instance-specific visual explanations for object detection"),
on DETR (METHODS.md 2).

y = the instance's class score (probability) at its query; A = the feature map it came from, here the
backbone's last map after the 1x1 input projection (the grid the encoder reads, [B, D, h, w]; for a
multi-scale deformable model, its finest projected level, the grid of its maps);
H = ReLU(sum_k dy/dA_k * A_k), element-wise: no spatial pooling of the gradient, which is what makes
the map instance-specific. One backward per round of targets (see `explainers._common`).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from eive_audit.explainers._common import GradientExplainer, Reduce
from eive_audit.explainers.base import register
from eive_audit.pipeline.models.detr import DetrAdapter, ForwardRecord
from eive_audit.pipeline.models.targets import Targets


@register("odam")
class ODAM(GradientExplainer):
    def _passes(self, model: DetrAdapter, record: ForwardRecord,
                targets: Targets) -> Iterable[tuple[torch.Tensor, Sequence[torch.Tensor], Reduce]]:
        probs = model.class_probs(record.output.logits[targets.batch_index, targets.query])  # [K, C]
        score = probs.gather(-1, targets.label[:, None])[:, 0]

        def reduce(members: torch.Tensor, grads: Sequence[torch.Tensor]) -> torch.Tensor:
            image = targets.batch_index[members]
            return (grads[0][image] * record.features[image]).float().sum(1).flatten(1)  # ReLU in on_grid

        yield score, (record.features,), reduce
