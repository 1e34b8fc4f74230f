"""The adapter of multi-scale deformable detectors: Deformable DETR and RT-DETR (METHODS.md 1b).

Their decoder cross-attention has no dense attention matrix: each query samples P points per head and
level, and transformers returns neither the points nor (for the decoder) the weights. A forward pre-hook on
every decoder layer's `encoder_attn.attn` (the `MultiScaleDeformableAttention` kernel) reads the exact
sampling locations and attention weights the kernel is called with; the encoder's deformable
self-attention is a different module and is not watched. Per-layer predictions come from the models' own
intermediate outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.detr import (
    DeformableSampling,
    DetectorOutput,
    DetrAdapter,
    ForwardRecord,
    _inverse_sigmoid,
    capture_inputs,
)
from pipeline.models.preprocess import PixelBatch

DENSE_ONLY = "rollout, chefer, odam, legrad-detr, cdam-detr"


class DeformableAdapter(DetrAdapter):
    """DetrAdapter for Deformable DETR and RT-DETR: `forward` fills `DetectorOutput.sampling` (and leaves
    `cross_attentions` None); `grid` and `token_mask` are those of the finest level."""

    def forward(self, batch: PixelBatch) -> DetectorOutput:
        """Run the detector once, capturing per-layer predictions and each decoder layer's sampling."""
        kernels = {f"layer{i}": layer.encoder_attn.attn for i, layer in enumerate(self.model.model.decoder.layers)}
        with capture_inputs(kernels) as captured, self._autocast():
            out = self.model(pixel_values=batch.pixel_values, pixel_mask=batch.pixel_mask)
            layer_logits, layer_boxes = self._layer_predictions(captured, out)
        calls = [captured[f"layer{i}"] for i in range(len(kernels))]
        shapes = tuple((int(h), int(w)) for h, w in calls[0]["value_spatial_shapes_list"])  # type: ignore[union-attr]
        sampling = DeformableSampling(
            weights=torch.stack([c["attention_weights"] for c in calls]),  # type: ignore[misc]
            locations=torch.stack([c["sampling_locations"] for c in calls]),  # type: ignore[misc]
            level_shapes=shapes,
        )
        grid = max(shapes, key=lambda hw: hw[0] * hw[1])
        token_mask = nn.functional.interpolate(batch.pixel_mask[None].float(), size=grid)[0].bool()
        return DetectorOutput(logits=out.logits, boxes=out.pred_boxes, layer_logits=layer_logits,
                              layer_boxes=layer_boxes, cross_attentions=None, grid=grid, token_mask=token_mask,
                              sampling=sampling)

    def record(self, batch: PixelBatch, gradients: bool = True) -> ForwardRecord:
        """Refused: the record holds dense attention matrices, which a deformable model does not have."""
        raise ValueError(
            f"{self.family.name} ({self.family.model_type}) uses multi-scale deformable attention, which has no "
            f"dense attention matrix: explainers that read or differentiate one ({DENSE_ONLY}) do not support it; "
            "use eive (the splat of its sampling points) or drise")

    def _layer_predictions(self, captured: dict[str, object], out: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Every decoder layer's logits and boxes [L, B, Q, ...].

        RT-DETR returns them (`intermediate_logits`, `intermediate_reference_points`). Deformable DETR
        returns each layer's hidden state and the reference points it refined; as in its own head, layer l's
        box is its `bbox_embed[l]` output plus the inverse sigmoid of the reference the layer started from
        (the initial one for layer 0), on all four coordinates or only the centre for 2-d references.
        """
        logits = getattr(out, "intermediate_logits", None)
        if logits is not None:
            return logits.transpose(0, 1), out.intermediate_reference_points.transpose(0, 1)  # type: ignore[attr-defined]
        hidden = out.intermediate_hidden_states.transpose(0, 1)  # type: ignore[attr-defined]
        starts = torch.cat([out.init_reference_points[:, None],  # type: ignore[attr-defined]
                            out.intermediate_reference_points[:, :-1]], 1).transpose(0, 1)  # type: ignore[attr-defined]
        logits = torch.stack([head(h) for head, h in zip(self.model.class_embed, hidden)])
        boxes = torch.stack([head(h) for head, h in zip(self.model.bbox_embed, hidden)])
        boxes[..., : starts.shape[-1]] += _inverse_sigmoid(starts)
        return logits, boxes.sigmoid()
