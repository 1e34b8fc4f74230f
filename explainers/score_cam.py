"""Score-CAM for ViT classifiers, from the grad-cam package (pytorch-grad-cam): a library baseline, with the
target layer, reshape and grid pooling of grad-cam (explainers/grad_cam.py).

Score-CAM needs no gradients: each channel of the last block's first-LayerNorm tokens, laid on the patch
grid, upsampled and min-maxed, masks the image; the softmax over channels of the target class's logit on
the masked images weighs the channels. That is D masked forwards per target (D the token width), run
`ScoreCamSettings.batch_size` images per forward (the package's own batch size).

The package builds every masked copy of a call's rows at once (rows x D x 3 x H x W floats), so the targets
go to it in calls of at most `MASKED_BYTES` of copies, a row per target. Its progress bar (a tqdm bar per
target) is switched off for the call, so the audit's stderr keeps its own progress lines.
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import ClassVar, Iterator

import torch

from eive_audit.explainers.base import check_supported, register
from eive_audit.explainers.grad_cam import package_cams, to_grid
from eive_audit.pipeline.config import ScoreCamSettings
from eive_audit.pipeline.models.preprocess import PixelBatch
from eive_audit.pipeline.models.targets import Targets
from eive_audit.pipeline.models.vit import ClassifierOutput, ViTAdapter

MASKED_BYTES = 2**29  # the package's masked copies held per call (512 MiB)


@contextlib.contextmanager
def _quiet_package() -> Iterator[None]:
    """The package's score_cam module sees a tqdm whose bars are disabled, for the block only."""
    import tqdm
    from pytorch_grad_cam import score_cam

    original = score_cam.tqdm
    score_cam.tqdm = types.SimpleNamespace(tqdm=functools.partial(tqdm.tqdm, disable=True))  # type: ignore[assignment]
    try:
        yield
    finally:
        score_cam.tqdm = original


@register("score-cam")
class ScoreCam:
    name: ClassVar[str]

    def __init__(self, settings: ScoreCamSettings) -> None:
        self.settings = settings

    def explain(self, model: ViTAdapter, batch: PixelBatch, outputs: ClassifierOutput, targets: Targets) -> torch.Tensor:
        from pytorch_grad_cam import ScoreCAM

        check_supported([self.name], model.family)
        if len(targets) == 0:
            return torch.zeros(0, *outputs.grid, device=outputs.logits.device)
        pixels = batch.pixel_values
        (width,) = model.attention_norm(model.num_blocks - 1).normalized_shape  # the channels the package masks by
        per_call = max(1, MASKED_BYTES // (width * pixels[0].numel() * 4))

        def configure(cam: object) -> None:
            cam.batch_size = self.settings.batch_size  # type: ignore[attr-defined]

        with _quiet_package():
            maps = torch.cat([package_cams(ScoreCAM, model, pixels[targets.batch_index[rows]], targets.label[rows],
                                           configure)
                              for rows in torch.arange(len(targets), device=pixels.device).split(per_call)])
        return to_grid(maps, outputs, targets)
