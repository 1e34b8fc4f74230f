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

from eive_audit.pipeline.models.detr import (
    DeformableSampling,
    DetectorOutput,
    DetrAdapter,
    ForwardRecord,
    _inverse_sigmoid,
)
from eive_audit.pipeline.models.hooks import capture_inputs, capture_outputs
from eive_audit.pipeline.models.preprocess import PixelBatch


class DeformableAdapter(DetrAdapter):
    """DetrAdapter for Deformable DETR and RT-DETR: `forward` fills `DetectorOutput.sampling` (and leaves
    `cross_attentions` None); `grid` and `token_mask` are those of the finest level. `record` holds the
    finest projected map as `features` and all levels' tokens as `memory`, and no attention matrices."""

    def _record(self, batch: PixelBatch) -> ForwardRecord:
        """One forward with each decoder layer's sampling, the finest projected backbone map and the tokens of
        every level the decoder reads; there is no dense attention, so the record's attention tuples are empty."""
        base = self.model.model
        kernels = {f"layer{i}": layer.encoder_attn.attn for i, layer in enumerate(base.decoder.layers)}
        projection = base.input_proj[0] if hasattr(base, "input_proj") else base.encoder_input_proj[0]
        with capture_inputs({**kernels, "decoder": base.decoder}) as inputs, \
                capture_outputs({"projection": projection}) as outputs, self._autocast():
            out = self.model(pixel_values=batch.pixel_values, pixel_mask=batch.pixel_mask)
            layer_logits, layer_boxes = self._layer_predictions(inputs, out)
        calls = [inputs[key] for key in kernels]
        shapes = tuple((int(h), int(w)) for h, w in calls[0]["value_spatial_shapes_list"])  # type: ignore[union-attr]
        sampling = DeformableSampling(
            weights=torch.stack([c["attention_weights"] for c in calls]),  # type: ignore[misc]
            locations=torch.stack([c["sampling_locations"] for c in calls]),  # type: ignore[misc]
            level_shapes=shapes,
        )
        grid = max(shapes, key=lambda hw: hw[0] * hw[1])
        token_mask = nn.functional.interpolate(batch.pixel_mask[None].float(), size=grid)[0].bool()
        output = DetectorOutput(logits=out.logits, boxes=out.pred_boxes, layer_logits=layer_logits,
                                layer_boxes=layer_boxes, cross_attentions=None, grid=grid, token_mask=token_mask,
                                sampling=sampling)
        return ForwardRecord(output, (), (), (), outputs["projection"],  # type: ignore[arg-type]
                             inputs["decoder"]["encoder_hidden_states"])  # type: ignore[arg-type]

    def _layer_predictions(self, captured: dict[str, object], out: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Every decoder layer's logits and boxes [L, B, Q, ...].

        RT-DETR returns them (`intermediate_logits`, `intermediate_reference_points`). Deformable DETR
        returns each layer's hidden state and the reference points it refined; as in its own head, layer l's
        box is its `bbox_embed[l]` output plus the inverse sigmoid of the reference the layer started from
        (the initial one for layer 0), on all four coordinates or only the centre for 2-d references.
        """
        logits = getattr(out, "intermediate_logits", None)
        if logits is not None:
            boxes = out.intermediate_reference_points  # type: ignore[attr-defined]
            return logits.transpose(0, 1), boxes.transpose(0, 1)
        hidden = out.intermediate_hidden_states.transpose(0, 1)  # type: ignore[attr-defined]
        starts = torch.cat([out.init_reference_points[:, None],  # type: ignore[attr-defined]
                            out.intermediate_reference_points[:, :-1]], 1).transpose(0, 1)  # type: ignore[attr-defined]
        logits = torch.stack([head(h) for head, h in zip(self.model.class_embed, hidden)])
        boxes = torch.stack([head(h) for head, h in zip(self.model.bbox_embed, hidden)])
        boxes[..., : starts.shape[-1]] += _inverse_sigmoid(starts)
        return logits, boxes.sigmoid()
