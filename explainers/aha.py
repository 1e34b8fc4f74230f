"""AHA (METHODS.md 3d): the learned explainer. Its decoder, trained for the audited model by `eive-audit
train-explainer --method aha` (pipeline.train_explainer), maps the frozen model's features and each
instance's condition to a dense map in one forward for the whole batch; `refine_steps` > 0 then refines each
instance's map by that many steps of AHA's own loss (pipeline.models.aha.refine).

For a classifier the decoder reads the patch tokens of its chosen blocks and is conditioned on the class;
for a DETR-family detector it reads the encoder memory and is conditioned on the instance's query state, box
and class (our extension: AHA was published for classifiers). The dense map is averaged onto the model's
grid, as every stored map is, so its scores compare like for like with the other explainers'.

The explainer directory records the fingerprint of the weights it was trained on; any other model is refused
with one line (pipeline.models.aha.ExplainerMismatch), since a decoder trained on one model's features means
nothing on another's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from eive_audit.explainers.base import register
from eive_audit.pipeline.config import AhaSettings, AuditConfig
from eive_audit.pipeline.models.aha import (AhaDecoder, LossSettings, adapter_score, as_map, decoder_inputs, from_floor,
                                           load_explainer, refine)
from eive_audit.pipeline.models.loading import load_model
from eive_audit.pipeline.models.perturb import baseline_images
from eive_audit.pipeline.models.preprocess import PixelBatch
from eive_audit.pipeline.models.targets import Targets


def check_trained_for(config: AuditConfig) -> None:
    """Refuse (ValueError, one line) a run whose AHA explainer has no directory, or was trained for another
    model than the one it audits (ExplainerMismatch), before any image is read: the model is loaded once, on
    the CPU, for its weights."""
    missing = config.missing_explainer_model()
    if missing:
        raise ValueError(missing)
    directories = [s.model for s in config.explainers.values() if isinstance(s, AhaSettings)]
    if not directories:
        return
    model = load_model(config.model, "cpu").model
    for directory in directories:
        load_explainer(directory, model)


@register("aha")
class AHA:
    def __init__(self, settings: AhaSettings) -> None:
        self.settings = settings
        self._loaded: tuple[AhaDecoder, LossSettings] | None = None
        self._for: int | None = None  # id of the model the decoder was checked against

    def loaded(self, model: Any) -> tuple[AhaDecoder, LossSettings]:
        """The explainer directory's decoder and loss, checked once against `model`'s weights."""
        if self._loaded is None or self._for != id(model.model):
            self._loaded = load_explainer(self.settings.model, model.model, model.device)  # type: ignore[arg-type]
            self._for = id(model.model)
        return self._loaded

    def explain(self, model: Any, batch: PixelBatch, outputs: Any, targets: Targets) -> torch.Tensor:
        h, w = outputs.grid
        if len(targets) == 0:
            return torch.zeros(0, h, w, device=batch.pixel_values.device)
        decoder, loss = self.loaded(model)
        with torch.inference_mode(False):  # the batch may come from inference mode: copies that can enter a graph
            pixels, mask = batch.pixel_values.clone(), batch.pixel_mask.clone()
            targets = Targets(*(t.clone() for t in (targets.batch_index, targets.query, targets.label, targets.box)))
            copy = PixelBatch(pixels, mask, batch.input_sizes, batch.original_sizes)
            with torch.no_grad():
                features, condition = decoder_inputs(model, copy, targets, decoder.architecture)
                logits = decoder(features, targets.batch_index, condition, tuple(pixels.shape[-2:]))
            if self.settings.refine_steps:
                logits = self._refined(model, logits, pixels, mask, targets, (h, w), loss)
        valid = mask[targets.batch_index, None].float()
        maps = F.adaptive_avg_pool2d(as_map(logits)[:, None] * valid, (h, w))[:, 0]
        return from_floor(maps, outputs.token_mask[targets.batch_index].bool())

    def _refined(self, model: Any, logits: torch.Tensor, pixels: torch.Tensor, mask: torch.Tensor,
                 targets: Targets, grid: tuple[int, int], loss: LossSettings) -> torch.Tensor:
        """The logits refined `refine_steps` steps of the loss the explainer was trained with, `batch_size`
        instances at a time (each on its own loss)."""
        reference = baseline_images(pixels, mask, loss.reference, loss.blur_sigma)
        score, s = adapter_score(model), self.settings
        refined = []
        for chunk in torch.arange(len(targets), device=logits.device).split(s.batch_size):
            part = Targets(targets.batch_index[chunk], targets.query[chunk], targets.label[chunk], targets.box[chunk])
            refined.append(refine(logits[chunk], pixels, mask, reference, part, score, grid, loss, s.refine_steps,
                                  s.refine_lr, s.seed))
        return torch.cat(refined)
