"""Grad-CAM for ViT classifiers, from the grad-cam package (pytorch-grad-cam): a library baseline, not our
own CAM code. This module also holds what score-cam shares with it: the adapter as the module the package
expects, the reshape of tokens to the patch grid, and the package's map brought back to that grid.

The package's recipe for ViTs (its vision-transformer tutorial): the target layer is the last block's first
LayerNorm (`ViTAdapter.attention_norm(num_blocks - 1)`), whose output tokens, prefix tokens dropped and
laid out on the patch grid, are the "activations" the CAM weights. Grad-CAM weighs each channel by the mean
gradient of the target class's logit over the grid, sums the weighted channels, takes the positive part,
min-maxes each map and upsamples it to the input (cv2, bilinear). Its map is area-pooled back onto the patch
grid here (the input is the grid times the patch), so a cell is the mean of the package's pixels over it.

One package call per batch: a row per target (an image with several targets is repeated, once per target),
`ClassifierOutputTarget(label)` per row. The package calls `loss.backward()` and `model.zero_grad()`; for
that call the weights are frozen (requires_grad off) so the gradient lands on a throwaway copy of the pixels
only, and each weight's `requires_grad` and `.grad` are put back in `finally`. The package's hooks are
released in `finally` too: its context manager would swallow an IndexError (it prints and returns True).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from eive_audit.explainers._common import on_grid
from eive_audit.explainers.base import check_supported, register
from eive_audit.pipeline.models.preprocess import PixelBatch
from eive_audit.pipeline.models.targets import Targets
from eive_audit.pipeline.models.vit import ClassifierOutput, ViTAdapter


class LogitsModule(nn.Module):
    """A ViT adapter as a module pixels [B, 3, H, W] -> logits [B, C] (float32), run through the adapter's
    own primitives (embed, every block, head) so the target layer's hooks see the tokens our other
    explainers see. The model is a submodule, so the package finds its device from its parameters."""

    def __init__(self, adapter: ViTAdapter) -> None:
        super().__init__()
        self.model = adapter.model
        self.adapter = adapter

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.adapter.embed(pixels)
        for i in range(self.adapter.num_blocks):
            tokens = self.adapter.run_block(i, tokens)[0]
        return self.adapter.head(tokens).float()


def patch_grid(adapter: ViTAdapter) -> Callable[[torch.Tensor], torch.Tensor]:
    """The package's reshape transform for this model: tokens [B, N, D] -> [B, D, h, w] float32, the
    prefix tokens (CLS, distillation, registers; `adapter.n_prefix`) dropped (the package hands arrays to
    numpy, which has no bfloat16)."""
    (h, w), prefix = adapter.grid, adapter.n_prefix

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, prefix:].float().transpose(1, 2).reshape(tokens.shape[0], -1, h, w)

    return reshape


@contextlib.contextmanager
def weights_untouched(model: nn.Module) -> Iterator[None]:
    """Within the block the weights do not require grad (a backward leaves no `.grad` on them); on exit,
    error or not, every weight's `requires_grad` and `.grad` are as they were (the package's
    `model.zero_grad()` would have cleared a caller's gradients)."""
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        for p, _, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad


def package_cams(cam_class: type, adapter: ViTAdapter, pixels: torch.Tensor, labels: torch.Tensor,
                 configure: Callable[[object], None] | None = None) -> torch.Tensor:
    """One call of the package's `cam_class` (GradCAM, ScoreCAM) on rows pixels [R, 3, H, W], row r
    explained for class labels[r]: its maps [R, H, W] (non-negative, min-maxed, at the input size) as a
    tensor on the adapter's device. `configure(cam)` sets options on the CAM object (Score-CAM's batch
    size). The package's hooks are released on exit, error or not."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if adapter.model.training:
        raise ValueError("the grad-cam package switches its model to eval mode: pass an eval-mode model")
    cam = cam_class(LogitsModule(adapter), [adapter.attention_norm(adapter.num_blocks - 1)],
                    reshape_transform=patch_grid(adapter))
    try:
        if configure is not None:
            configure(cam)
        maps = cam(pixels, [ClassifierOutputTarget(int(label)) for label in labels.tolist()])
    finally:
        cam.activations_and_grads.release()
    return torch.from_numpy(maps).to(adapter.device)


def to_grid(maps: torch.Tensor, outputs: ClassifierOutput, targets: Targets) -> torch.Tensor:
    """The package's maps [K, H, W] at the input size -> the explainer contract on the patch grid, each cell
    the mean of the pixels it covers."""
    pooled = F.interpolate(maps[:, None].float(), size=outputs.grid, mode="area")[:, 0]
    return on_grid(pooled.flatten(1), outputs, targets)  # type: ignore[arg-type]


@register("grad-cam")
class GradCam:
    name: ClassVar[str]

    def explain(self, model: ViTAdapter, batch: PixelBatch, outputs: ClassifierOutput, targets: Targets) -> torch.Tensor:
        from pytorch_grad_cam import GradCAM

        check_supported([self.name], model.family)
        if len(targets) == 0:
            return torch.zeros(0, *outputs.grid, device=outputs.logits.device)
        # The audit calls explainers in inference mode: the rows are normal tensors a graph may save.
        with torch.inference_mode(False), torch.enable_grad(), weights_untouched(model.model):
            rows = batch.pixel_values[targets.batch_index.clone()].clone().requires_grad_(True)
            maps = package_cams(GradCAM, model, rows, targets.label)
        return to_grid(maps, outputs, targets)
