"""Forward hooks that record what a module is called with or returns, for the duration of one forward.

The adapters (`detr`, `deformable`) and AAJTS training read intermediate tensors this way; the hooks are
removed on exit, even on error, so a shared model never keeps a stale hook.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def capture_outputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, object]]:
    """Record each module's forward output under its key."""
    captured: dict[str, object] = {}
    handles = []
    try:
        for key, module in modules.items():
            handles.append(module.register_forward_hook(lambda _m, _i, out, key=key: captured.__setitem__(key, out)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def capture_inputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, dict[str, object]]]:
    """Record each module's call arguments by parameter name (however the caller passed them, positionally or
    by keyword) under its key."""
    captured: dict[str, dict[str, object]] = {}
    handles = []

    def hook(key: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured[key] = inspect.signature(module.forward).bind(*args, **kwargs).arguments

    try:
        for key, module in modules.items():
            handles.append(module.register_forward_pre_hook(functools.partial(hook, key), with_kwargs=True))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
