"""What the ViT explainers share: attention maps read off the forward (raw attention, rollout) and the CDAM
core (token contributions at the last block, for the vanilla, smooth and integrated variants).

Maps are on the patch grid (`outputs.grid`): prefix tokens (CLS, distillation, registers; `outputs.n_prefix`)
are dropped. The rows a map is read from are the head's readout (`ViTAdapter.readout`): the CLS row, CLS
and distillation rows averaged for a distilled DeiT, and the mean of the patch rows for a mean-pooled model,
whose prediction reads those rows and no CLS.
"""

from __future__ import annotations

from typing import Callable

import torch

from eive_audit.explainers._common import on_grid
from eive_audit.pipeline.models.preprocess import PixelBatch
from eive_audit.pipeline.models.targets import Targets
from eive_audit.pipeline.models.vit import ClassifierOutput, ViTAdapter

# (tokens T of the round's rows [R, N, D], copy index of each row [R]) -> the altered tokens [R, N, D]
Alter = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _per_image(maps: torch.Tensor, images: torch.Tensor, outputs: ClassifierOutput, targets: Targets) -> torch.Tensor:
    """Token maps [I, N] of the distinct target images `images` (sorted) -> each target's map on the grid."""
    slot = torch.searchsorted(images, targets.batch_index)
    return on_grid(maps[slot, outputs.n_prefix:], outputs, targets)  # type: ignore[arg-type]


def raw_attention(model: ViTAdapter, outputs: ClassifierOutput, targets: Targets) -> torch.Tensor:
    """The last block's attention of the readout rows over the patches, heads averaged: [K, h, w]."""
    images = targets.batch_index.unique()
    last = outputs.attentions[-1][images].float().mean(1)  # [I, N, N]
    return _per_image(model.readout(last.shape[-1]) @ last, images, outputs, targets)


def rollout(model: ViTAdapter, outputs: ClassifierOutput, targets: Targets) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): per block the head-mean attention plus the identity (the
    residual), rows renormalised to 1; their product from the first block to the last; the readout rows
    of the product over the patches: [K, h, w]."""
    images = targets.batch_index.unique()
    n = outputs.attentions[0].shape[-1]
    eye = torch.eye(n, device=outputs.logits.device)
    relevance = eye.expand(len(images), n, n)
    for attention in outputs.attentions:
        mixed = attention[images].float().mean(1) + eye
        relevance = (mixed / mixed.sum(-1, keepdim=True)) @ relevance
    return _per_image(model.readout(n) @ relevance, images, outputs, targets)


def cdam(model: ViTAdapter, batch: PixelBatch, targets: Targets, copies: int, alter: Alter,
         integrated: bool = False, batch_size: int = 64) -> torch.Tensor:
    """CDAM contributions of the patch tokens [K, h * w], signed, averaged over `copies` altered copies of the
    tokens T entering the last attention (the output of the last block's first LayerNorm).

    Copy j of target k: T' = alter(T_k, j). Its contribution of token i is sum_d M_id * df/dT'_id, f the
    target's class logit with T' in place of T (the residual stream keeps the block's own input), M = T' (a
    CDAM of the altered tokens: vanilla, smooth) or M = T (`integrated`: the original tokens times the
    average gradient along the path, as integrated gradients). One forward up to the last block for the
    batch; then rows (target, copy), gathered from their images, go through the last block and the head,
    `batch_size` rows per forward with one backward: rows never interact, so one backward of their summed
    logits gives each row its own gradient.
    """
    if len(targets) == 0:
        return torch.zeros(0, model.grid[0] * model.grid[1], device=batch.pixel_values.device)
    last = model.num_blocks - 1
    with torch.inference_mode(False):
        pixels = batch.pixel_values.clone()  # a batch made under inference mode cannot enter a graph
        labels, images = targets.label.clone(), targets.batch_index.clone()
        with torch.no_grad(), model.autocast():
            inputs = model.tokens_entering(pixels, last)
            tokens = model.attention_norm(last)(inputs)
        rows = torch.arange(len(targets) * copies, device=pixels.device)
        maps = torch.zeros(len(targets), inputs.shape[1], device=pixels.device)
        for chunk in rows.split(batch_size):
            target, copy = chunk // copies, chunk % copies
            image = images[target]
            with torch.enable_grad(), model.autocast():
                altered = alter(tokens[image].float(), copy).to(tokens.dtype).requires_grad_(True)
                out, _ = model.run_block(last, inputs[image], normed=altered)
                score = model.head(out).gather(1, labels[target, None]).sum()
                (grad,) = torch.autograd.grad(score, altered)
            times = tokens[image] if integrated else altered.detach()
            maps.index_add_(0, target, (times.float() * grad.float()).sum(-1))
    return maps[:, model.n_prefix:] / copies
