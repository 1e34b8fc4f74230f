"""What the explainers share: attention rows of chosen queries (dense or splatted), maps laid on the attention
grid, and per-target gradients from one recorded forward.

Gradient methods take one forward per batch (`DetrAdapter.record`) and one backward per *round* of
targets, a round holding at most one target per image. In an eval-mode DETR the images of a batch never
interact (frozen or eval-mode BatchNorm, per-image padding masks), so the gradient of the sum of a round's
scores, read at each member's own image, is exactly that member's gradient: a batch of B images with K
targets costs max-targets-per-image backwards instead of K.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Iterable, Iterator, Sequence

import torch

from eive_audit.explainers.base import check_supported
from eive_audit.explainers.splat import merge_levels, splat
from eive_audit.pipeline.models.detr import DetectorOutput, DetrAdapter, ForwardRecord
from eive_audit.pipeline.models.preprocess import PixelBatch
from eive_audit.pipeline.models.targets import Targets

# (round members [R], gradients of their scores w.r.t. each input, batch-first) -> maps of the members [R, h * w]
Reduce = Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]


def on_grid(maps: torch.Tensor, outputs: DetectorOutput, targets: Targets) -> torch.Tensor:
    """Token maps [K, h * w] -> the explainer contract: float32 [K, h, w], non-negative, padding cells zero."""
    valid = outputs.token_mask[targets.batch_index].flatten(1)
    return (maps.float().clamp(min=0) * valid).view(len(targets), *outputs.grid)


def attention_rows(outputs: DetectorOutput, layers: torch.Tensor, batch_index: torch.Tensor,
                   query: torch.Tensor) -> torch.Tensor:
    """Head-averaged cross-attention rows [L', K, h * w] on the attention grid: of query[l, k] of image
    batch_index[k] at decoder layer layers[l]. Dense attention is gathered; a deformable model's sampling is
    splatted and its levels merged onto the finest grid (METHODS.md 1b). Only the asked rows are computed."""
    layer, image = layers[:, None], batch_index[None, :]
    if outputs.sampling is None:
        return outputs.cross_attentions[layer, image, :, query, :].float().mean(2)  # type: ignore[index]
    sampling = outputs.sampling
    tokens = splat(sampling.weights[layer, image, query], sampling.locations[layer, image, query],
                   sampling.level_shapes)  # [L', K, M, S]
    return merge_levels(tokens.mean(2), sampling.level_shapes)


def rounds(batch_index: torch.Tensor) -> list[torch.Tensor]:
    """Target indices grouped so that no group holds two targets of the same image; the r-th target of
    each image goes to group r (so there are as many groups as the busiest image has targets)."""
    earlier = torch.arange(len(batch_index), device=batch_index.device)
    same_image_before = (batch_index[:, None] == batch_index[None, :]) & (earlier[None, :] < earlier[:, None])
    rank = same_image_before.sum(1)
    return [(rank == r).nonzero().flatten() for r in range(int(rank.max()) + 1)] if len(rank) else []


def per_target_gradients(scores: torch.Tensor, inputs: Sequence[torch.Tensor],
                         batch_index: torch.Tensor) -> Iterator[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
    """For each round of targets yield its members and d(sum of their scores) / d(each input).

    scores [K] are scalars of one recorded graph, each depending on its own image only; inputs are graph
    tensors with the batch as their first dimension; gradient slice `[batch_index[k]]` is target k's own.
    The graph is kept between rounds and freed with the record.
    """
    for members in rounds(batch_index):
        grads = torch.autograd.grad(scores[members].sum(), list(inputs), retain_graph=True, allow_unused=True,
                                    materialize_grads=True)
        yield members, grads


class GradientExplainer(ABC):
    """Template of the gradient methods: one recorded forward, then for each pass (a score per target and
    the tensors to differentiate it by) one backward per round, reduced to token maps that add up over
    passes. A method only says what its passes are."""

    name: ClassVar[str]

    @abstractmethod
    def _passes(self, model: DetrAdapter, record: ForwardRecord,
                targets: Targets) -> Iterable[tuple[torch.Tensor, Sequence[torch.Tensor], Reduce]]:
        """(scores [K], tensors to differentiate them by, reduction of a round's gradients) per pass."""

    def explain(self, model: DetrAdapter, batch: PixelBatch, outputs: DetectorOutput, targets: Targets) -> torch.Tensor:
        check_supported([self.name], model.family)
        if model.model.training:
            raise ValueError("gradient explainers need an eval-mode model: "
                             "train-mode BatchNorm mixes the images of a batch")
        h, w = outputs.grid
        with torch.inference_mode(False), torch.enable_grad():  # the audit calls explainers after an inference forward
            maps = torch.zeros(len(targets), h * w, device=outputs.logits.device)
            if len(targets):
                # Index tensors made under inference mode cannot be saved for backward: use normal copies.
                targets = Targets(targets.batch_index.clone(), targets.query.clone(), targets.label.clone(),
                                  targets.box.clone())
                record = model.record(batch)
                for scores, inputs, reduce in self._passes(model, record, targets):
                    for members, grads in per_target_gradients(scores, inputs, targets.batch_index):
                        with torch.no_grad():
                            maps[members] += reduce(members, grads).float()
            return on_grid(maps, outputs, targets)


def class_logits(record: ForwardRecord, targets: Targets, layer: int = -1) -> torch.Tensor:
    """Each target's class logit at its query, from the final head or a decoder layer's auxiliary head: [K]."""
    return record.output.layer_logits[layer, targets.batch_index, targets.query, targets.label]
