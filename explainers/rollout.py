"""Attention rollout through encoder-decoder: Chefer's propagation rules (METHODS.md 2) fed plain head-mean
attention instead of gradient-weighted attention. No gradients; one extra forward to record the encoder and
decoder self-attention, which the audit's forward does not keep.

`relevance` is the propagation itself, shared with `chefer`:
encoder R_ii = I, R_ii += Abar R_ii per layer; decoder R_qq = I, R_qi = 0, then per layer
self-attention R_qq += Abar R_qq, R_qi += Abar R_qi, and cross-attention R_qi += norm(R_qq)^T Abar norm(R_ii),
norm(R) = rownorm(R - I) + I. The map of query q is row q of R_qi.

For a ViT classifier (`model.task == "classify"`) it is Abnar & Zuidema's rollout over the blocks
(explainers._vit.rollout): head-mean attention plus identity, rows renormalised, multiplied from the first
block to the last, read at the rows the head pools (CLS; the mean patch row of a mean-pooled model), from
the attention the forward already holds.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch

from eive_audit.explainers import _vit
from eive_audit.explainers._common import on_grid
from eive_audit.explainers.base import check_supported, register
from eive_audit.pipeline.models.detr import DetectorOutput, DetrAdapter
from eive_audit.pipeline.models.preprocess import PixelBatch
from eive_audit.pipeline.models.targets import Targets


def _normalise(relevance: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """rownorm(R - I) + I over the last two dimensions: each row's accumulated attention (without the
    residual identity) rescaled to sum 1, so the cross-attention rule does not grow with depth."""
    eye = torch.eye(relevance.shape[-1], device=relevance.device, dtype=relevance.dtype)
    extra = relevance - eye
    return extra / extra.sum(-1, keepdim=True).clamp(min=eps) + eye


def relevance(encoder: Sequence[torch.Tensor], decoder_self: Sequence[torch.Tensor],
              cross: Sequence[torch.Tensor]) -> torch.Tensor:
    """R_qi [R, Q, N] from head-reduced attention of R independent items (images or targets): encoder
    [R, N, N] per encoder layer, decoder self [R, Q, Q] and cross [R, Q, N] per decoder layer."""
    r, q, n = cross[0].shape
    device, dtype = cross[0].device, cross[0].dtype
    r_ii = torch.eye(n, device=device, dtype=dtype).expand(r, n, n)
    for abar in encoder:
        r_ii = r_ii + abar @ r_ii
    norm_ii = _normalise(r_ii)
    r_qq = torch.eye(q, device=device, dtype=dtype).expand(r, q, q)
    r_qi = torch.zeros(r, q, n, device=device, dtype=dtype)
    for self_abar, cross_abar in zip(decoder_self, cross, strict=True):
        r_qq = r_qq + self_abar @ r_qq
        r_qi = r_qi + self_abar @ r_qi
        r_qi = r_qi + _normalise(r_qq).transpose(-1, -2) @ cross_abar @ norm_ii
    return r_qi


@register("rollout")
class Rollout:
    """Relevance propagated through all attention of the transformer, each layer's heads averaged."""

    name: ClassVar[str]

    def explain(self, model: DetrAdapter, batch: PixelBatch, outputs: DetectorOutput, targets: Targets) -> torch.Tensor:
        check_supported([self.name], model.family)
        h, w = outputs.grid
        if len(targets) == 0:
            return torch.zeros(0, h, w, device=outputs.logits.device)
        if getattr(model, "task", "detect") == "classify":
            return _vit.rollout(model, outputs, targets)  # type: ignore[arg-type]
        record = model.record(batch, gradients=False)
        images = targets.batch_index.unique()  # only images with targets are propagated

        def head_mean(attentions: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            return [a[images].float().mean(1) for a in attentions]

        r_qi = relevance(head_mean(record.encoder_attentions), head_mean(record.decoder_attentions),
                         head_mean(record.cross_attentions))
        slot = torch.searchsorted(images, targets.batch_index)
        return on_grid(r_qi[slot, targets.query], outputs, targets)
