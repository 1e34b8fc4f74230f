"""What an explainer is asked to explain: K instances of a batch, as tensors on the model's device."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Targets:
    """K instances to explain, as tensors on the model's device.

    batch_index [K] (image in the batch), query [K] (the query that predicted it, or the best-overlapping
    query of a missed GT box), label [K] (model label index), box [K, 4] (normalised cxcywh, the
    instance's box in the model's frame: the prediction's, or the missed GT box).
    """

    batch_index: torch.Tensor
    query: torch.Tensor
    label: torch.Tensor
    box: torch.Tensor

    def __len__(self) -> int:
        return int(self.query.shape[0])
