"""LeGrad (Bousselham et al. 2024; METHODS.md 3a) for ViT classifiers.

For each block l: s_l = the target class's logit of the head applied to the mean of the block's output tokens
Z_l (`ViTAdapter.head(..., pool="mean")`: final norm, then classifier, as the authors score every layer);
G_l = d s_l / d A_l, A_l the block's post-softmax attention, taken layer by layer (one short backward per
block and round of targets, not one summed backward, so each block is scored by its own prediction);
E_l = ReLU(G_l) averaged over heads and query rows, prefix-token columns dropped; the map is sum_l E_l over
every block. Attention values are not multiplied in.

The authors' wrapper (legrad-torch's LeWrapper) sums only the last blocks by default (`layer_index=-2`);
here every block is summed, as METHODS.md 3a says, which equals LeWrapper(model, layer_index=0) up to its
final bilinear upsampling and per-map min-max (tests/test_vit_explainers.py compares the two).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from eive_audit.explainers._common import GradientExplainer, Reduce
from eive_audit.explainers.base import register
from eive_audit.pipeline.models.targets import Targets
from eive_audit.pipeline.models.vit import ViTAdapter, ViTRecord


@register("legrad")
class LeGrad(GradientExplainer):
    def _passes(self, model: ViTAdapter, record: ViTRecord,  # type: ignore[override]
                targets: Targets) -> Iterable[tuple[torch.Tensor, Sequence[torch.Tensor], Reduce]]:
        prefix = record.output.n_prefix

        def reduce(members: torch.Tensor, grads: Sequence[torch.Tensor]) -> torch.Tensor:
            return grads[0][targets.batch_index[members]].float().clamp(min=0).mean((1, 2))[:, prefix:]

        for tokens, attention in zip(record.tokens, record.output.attentions, strict=True):
            scores = model.head(tokens, pool="mean")[targets.batch_index, targets.label]
            yield scores, (attention,), reduce
