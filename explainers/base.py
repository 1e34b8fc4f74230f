"""The explainer interface and registry: every method answers the same batched call.

`explain(model, batch, outputs, targets) -> maps [K, h, w]`, non-negative, on the attention grid of the
forward (`outputs.grid`), one map per target. Padding cells are zero. Maps are raw: normalise at use.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Protocol

import torch

from eive_audit.pipeline.models.detr import DetectorOutput, DetrAdapter
from eive_audit.pipeline.models.preprocess import PixelBatch
from eive_audit.pipeline.models.targets import Targets


class Explainer(Protocol):
    name: ClassVar[str]
    needs_gradients: ClassVar[bool]

    def explain(self, model: DetrAdapter, batch: PixelBatch, outputs: DetectorOutput, targets: Targets) -> torch.Tensor:
        ...


_REGISTRY: dict[str, Callable[..., Explainer]] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator adding an explainer under `name`; a duplicate name is an error, not an override."""

    def decorate(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"explainer {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available() -> list[str]:
    return sorted(_REGISTRY)


def get_explainer(name: str, **params: object) -> Explainer:
    """An explainer instance by registry name, with its parameters."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown explainer {name!r}; available: {available()}")
    return _REGISTRY[name](**params)
