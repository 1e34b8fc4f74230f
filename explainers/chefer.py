"""Chefer et al. (ICCV 2021, "Generic Attention-model Explainability"), encoder-decoder form (METHODS.md 2).

One backward from the target query's class logit gives the gradient of every attention map; per layer
Abar = mean over heads of (grad(A) * A)^+, propagated by the rules of `explainers.rollout.relevance`. The map
is row q of R_qi.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from eive_audit.explainers._common import GradientExplainer, Reduce, class_logits
from eive_audit.explainers.base import register
from eive_audit.explainers.rollout import relevance
from eive_audit.pipeline.models.detr import DetrAdapter, ForwardRecord
from eive_audit.pipeline.models.targets import Targets


@register("chefer")
class Chefer(GradientExplainer):
    """Gradient-weighted relevance propagation through encoder self-, decoder self- and cross-attention."""

    def _passes(self, model: DetrAdapter, record: ForwardRecord,
                targets: Targets) -> Iterable[tuple[torch.Tensor, Sequence[torch.Tensor], Reduce]]:
        n_enc, n_dec = len(record.encoder_attentions), len(record.decoder_attentions)
        attentions = (*record.encoder_attentions, *record.decoder_attentions, *record.cross_attentions)

        def reduce(members: torch.Tensor, grads: Sequence[torch.Tensor]) -> torch.Tensor:
            image = targets.batch_index[members]
            abar = [(g[image] * a[image]).float().clamp(min=0).mean(1) for g, a in zip(grads, attentions)]
            r_qi = relevance(abar[:n_enc], abar[n_enc:n_enc + n_dec], abar[n_enc + n_dec:])
            return r_qi[torch.arange(len(members), device=r_qi.device), targets.query[members]]

        yield class_logits(record, targets), attentions, reduce
