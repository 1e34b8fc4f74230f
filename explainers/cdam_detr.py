"""CDAM adapted to DETR (METHODS.md 2 and 3b): the class logit of the instance's query, attributed to the
encoder memory T [B, N, D] (the tokens every decoder cross-attention reads) by S_i = sum_d T_id dS/dT_id.

S is signed: positive tokens push the logit up, negative ones pull it down. The map keeps the positive
part (evidence for the class), like ODAM's ReLU, rather than min-max: min-max would turn the most
negative token into the zero and give every neutral token mass, which the mass-based localisation scores
would read as attention on the background.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from eive_audit.explainers._common import GradientExplainer, Reduce, class_logits
from eive_audit.explainers.base import register
from eive_audit.pipeline.models.detr import DetrAdapter, ForwardRecord
from eive_audit.pipeline.models.targets import Targets


@register("cdam-detr")
class CDAMDetr(GradientExplainer):
    def _passes(self, model: DetrAdapter, record: ForwardRecord,
                targets: Targets) -> Iterable[tuple[torch.Tensor, Sequence[torch.Tensor], Reduce]]:
        def reduce(members: torch.Tensor, grads: Sequence[torch.Tensor]) -> torch.Tensor:
            image = targets.batch_index[members]
            return (grads[0][image] * record.memory[image]).float().sum(-1)  # positive part kept by on_grid

        yield class_logits(record, targets), (record.memory,), reduce
