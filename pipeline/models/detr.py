"""The DETR-family adapter: one output contract for DETR, Conditional DETR and DAB-DETR.

`forward` returns, besides the final logits and boxes, what the explainers need and transformers does
not hand out directly: per-decoder-layer predictions (each layer's hidden state through the model's own
heads) and the per-layer cross-attention, left on the device. Hooks that capture intermediate tensors
live only for the duration of one forward.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import box_convert
from transformers import AutoConfig, AutoModelForObjectDetection, PreTrainedModel

from eive_audit.pipeline.models.families import Family, family_of
from eive_audit.pipeline.models.hooks import capture_outputs
from eive_audit.pipeline.models.locate import ModelLoadError, read_model_config, resolve_model_path
from eive_audit.pipeline.models.preprocess import PixelBatch, PreprocessConfig, preprocess


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` means CUDA when present, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_hf_model(name: str | Path) -> PreTrainedModel:
    """Load a supported transformers detector with eager attention, or raise ModelLoadError."""
    path = resolve_model_path(name)
    read_model_config(path)  # a local directory's problems, named before transformers reads it
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError depending on the problem
        raise ModelLoadError(f"cannot read the model config of {path}: {exc}") from exc
    try:
        family_of(config.model_type)
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    try:
        return AutoModelForObjectDetection.from_pretrained(path, attn_implementation="eager")
    except Exception as exc:
        raise ModelLoadError(f"cannot load the weights of {path}: {exc}") from exc


@dataclass
class DeformableSampling:
    """Multi-scale deformable cross-attention of every decoder layer (METHODS.md 1b), as the model used it.

    weights [L, B, Q, M, Lv, P] post-softmax (over Lv * P per head); locations [L, B, Q, M, Lv, P, 2] as (x, y)
    in [0, 1] of each padded level map; level_shapes: (h, w) of each level, in the order of the value tokens.
    """

    weights: torch.Tensor
    locations: torch.Tensor
    level_shapes: tuple[tuple[int, int], ...]


@dataclass
class DetectorOutput:
    """One batch's forward, all on the model's device.

    logits [B, Q, C'] (C' = C, or C + 1 with DETR's no-object class), boxes [B, Q, 4] normalised cxcywh;
    layer_logits / layer_boxes [L, B, Q, ...] per decoder layer (the last equals logits / boxes);
    cross_attentions [L, B, M, Q, h*w] post-softmax for single-scale models, None for deformable ones, which
    have `sampling` instead; grid (h, w) of the attention (a deformable model's finest level), token_mask
    [B, h, w].
    """

    logits: torch.Tensor
    boxes: torch.Tensor
    layer_logits: torch.Tensor
    layer_boxes: torch.Tensor
    cross_attentions: torch.Tensor | None
    grid: tuple[int, int]
    token_mask: torch.Tensor
    sampling: DeformableSampling | None = None


@dataclass
class ForwardRecord:
    """One forward with the tensors that gradient and rollout explainers work on, as the graph holds them
    (not copies), so gradients can be taken with respect to them when autograd recorded the forward.

    output: what `forward` returns; encoder_attentions: per encoder layer [B, M, N, N];
    decoder_attentions: per decoder layer, self-attention [B, M, Q, Q]; cross_attentions: per decoder
    layer [B, M, Q, N]; features [B, D, h, w]: the projected backbone map the encoder reads (C5 after the
    1x1 input projection); memory [B, N, D]: the encoder's output, what the decoder cross-attends to; queries [B, Q, D]: each query's
    final state (a deformable model's adapter leaves it None).
    """

    output: DetectorOutput
    encoder_attentions: tuple[torch.Tensor, ...]
    decoder_attentions: tuple[torch.Tensor, ...]
    cross_attentions: tuple[torch.Tensor, ...]
    features: torch.Tensor
    memory: torch.Tensor
    queries: torch.Tensor | None = None  # [B, Q, D]: the decoder's last hidden state, what the heads read


@dataclass
class Detections:
    """Kept detections of one image, on the CPU: boxes xyxy in original pixels [K, 4], scores [K],
    labels (model label index) [K], and the query index each came from [K]."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    queries: torch.Tensor


def _inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class DetrAdapter:
    """A loaded DETR-family detector with batched preprocess / forward / postprocess."""

    def __init__(self, model: PreTrainedModel, preprocess_config: PreprocessConfig, device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.family: Family = family_of(model.config.model_type)
        self.preprocess_config = preprocess_config
        self.device = device
        self.label_names: dict[int, str] = {int(k): v for k, v in model.config.id2label.items()}

    @classmethod
    def load(cls, name: str | Path, device: str | torch.device = "auto") -> "DetrAdapter":
        """Load from a local directory, a hub id, or `default` (the shipped model)."""
        model = load_hf_model(name)
        path = Path(resolve_model_path(name))
        config = PreprocessConfig.from_dir(path) if path.is_dir() else PreprocessConfig()
        return adapter_class(family_of(model.config.model_type))(model, config, resolve_device(device))

    @property
    def num_layers(self) -> int:
        return int(self.model.config.decoder_layers)

    def preprocess(self, images: list[torch.Tensor], sizes: list[tuple[int, int]] | None = None) -> PixelBatch:
        """`models.preprocess.preprocess` on this model's device; `sizes`: the images' original (h, w)."""
        return preprocess(images, self.preprocess_config, self.device, sizes)

    def class_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-class probabilities [..., C]: sigmoid for focal-loss heads, softmax minus no-object for DETR."""
        if self.family.sigmoid_classes:
            return logits.float().sigmoid()
        return logits.float().softmax(-1)[..., :-1]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, batch: PixelBatch) -> DetectorOutput:
        """Run the detector once, capturing per-layer predictions and cross-attention."""
        return self._record(batch).output

    def record(self, batch: PixelBatch, gradients: bool = True) -> ForwardRecord:
        """Run the detector once and keep every attention tensor, the projected features and the encoder
        memory. With `gradients`, autograd records the forward even when the caller is in inference or
        no-grad mode: the pixels are cloned (a batch made under inference mode cannot enter a graph) and
        require grad (so there is a graph even when the weights are frozen). One forward then serves every
        backward an explainer takes (`torch.autograd.grad(..., retain_graph=True)`, which leaves the weights'
        `.grad` alone); the graph lives as long as the record."""
        if not gradients:
            return self._record(batch)
        with torch.inference_mode(False), torch.enable_grad():
            pixels = batch.pixel_values.clone().requires_grad_(True)
            return self._record(PixelBatch(pixels, batch.pixel_mask.clone(), batch.input_sizes, batch.original_sizes))

    def _record(self, batch: PixelBatch) -> ForwardRecord:
        base = self.model.model
        decoder = base.decoder
        watched: dict[str, nn.Module] = {"projection": base.input_projection, "encoder": base.encoder,
                                         "decoder": decoder}
        if self.family.model_type != "dab-detr":
            watched |= {f"layer{i}": layer for i, layer in enumerate(decoder.layers)}
        with capture_outputs(watched) as captured, self._autocast():
            out = self.model(pixel_values=batch.pixel_values, pixel_mask=batch.pixel_mask, output_attentions=True)
            layer_logits, layer_boxes = self._layer_predictions(captured, out)
        features = captured["projection"]
        h, w = features.shape[-2:]  # type: ignore[union-attr]
        token_mask = nn.functional.interpolate(batch.pixel_mask[None].float(), size=(h, w))[0].bool()
        output = DetectorOutput(
            logits=out.logits,
            boxes=out.pred_boxes,
            layer_logits=layer_logits,
            layer_boxes=layer_boxes,
            cross_attentions=torch.stack(out.cross_attentions),
            grid=(int(h), int(w)),
            token_mask=token_mask,
        )
        memory = captured["encoder"][0]  # type: ignore[index]
        return ForwardRecord(output, tuple(out.encoder_attentions), tuple(out.decoder_attentions),
                             tuple(out.cross_attentions), features, memory, out.last_hidden_state)  # type: ignore[arg-type]

    def _layer_predictions(self, captured: dict[str, object], out: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Every decoder layer's logits and boxes, computed with the model's own heads.

        DAB-DETR returns its per-layer states and refined anchors; DETR and Conditional DETR only
        return them when trained with auxiliary loss, so their layer outputs are hooked and passed
        through the decoder's final LayerNorm, as their auxiliary heads see them. The last layer is
        the model's own output in every family.
        """
        model, decoder = self.model, self.model.model.decoder
        if self.family.model_type == "dab-detr":
            dec = captured["decoder"]
            hidden, reference = dec.intermediate_hidden_states, dec.reference_points  # type: ignore[attr-defined]
            logits = model.class_embed(hidden)
            boxes = model.bbox_predictor(hidden)
            boxes[..., : model.query_dim] += _inverse_sigmoid(reference)
            return torch.cat([logits[:-1], out.logits[None]]), torch.cat([boxes[:-1].sigmoid(), out.pred_boxes[None]])
        states = []
        for i in range(self.num_layers - 1):
            layer_out = captured[f"layer{i}"]
            states.append(decoder.layernorm(layer_out[0] if isinstance(layer_out, tuple) else layer_out))
        if not states:
            return out.logits[None], out.pred_boxes[None]
        hidden = torch.stack(states)
        logits = model.class_labels_classifier(hidden)
        boxes = model.bbox_predictor(hidden)
        if self.family.model_type == "conditional_detr":
            reference = captured["decoder"].reference_points  # type: ignore[attr-defined]
            boxes[..., :2] += _inverse_sigmoid(reference).transpose(0, 1)
        return torch.cat([logits, out.logits[None]]), torch.cat([boxes.sigmoid(), out.pred_boxes[None]])

    def postprocess(
        self, output: DetectorOutput, batch: PixelBatch, score_threshold: float = 0.5, max_detections: int = 100
    ) -> list[Detections]:
        """One best class per query; keep scores >= threshold, at most `max_detections`, best first."""
        scores, labels = self.class_probs(output.logits).max(-1)
        sizes = batch.original_sizes.flip(-1).repeat(1, 2).float()  # (w, h, w, h) per image
        boxes = box_convert(output.boxes.float(), "cxcywh", "xyxy") * sizes[:, None, :]
        results = []
        for i in range(scores.shape[0]):
            keep = (scores[i] >= score_threshold).nonzero().flatten()
            keep = keep[scores[i, keep].argsort(descending=True)][:max_detections]
            results.append(Detections(boxes[i, keep].cpu(), scores[i, keep].cpu(), labels[i, keep].cpu(), keep.cpu()))
        return results

    def predict(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor,
                graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Class probabilities [N, Q, C] and boxes [N, Q, 4] (cxcywh) of a plain forward without attention
        capture: the cheap call that re-scores perturbed images. In inference mode, unless `graph` (AHA's
        loss, which differentiates the scores with respect to the perturbed pixels)."""
        with torch.inference_mode(not graph), self._autocast():
            out = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        return self.class_probs(out.logits), out.pred_boxes.float()

    @torch.inference_mode()
    def detect(self, images: list[torch.Tensor], score_threshold: float = 0.5, max_detections: int = 100,
               sizes: list[tuple[int, int]] | None = None) -> list[Detections]:
        """Preprocess, forward and postprocess a list of uint8 [3, h, w] images; boxes in pixels of `sizes`
        (the images' original (h, w); by default their own shapes)."""
        batch = self.preprocess(images, sizes)
        return self.postprocess(self.forward(batch), batch, score_threshold, max_detections)


def adapter_class(family: Family) -> type[DetrAdapter]:
    """The adapter class the family registry names (`Family.adapter`, "module:Class"), imported by name so
    that this module and the subclasses in other modules do not import each other."""
    module, _, name = family.adapter.partition(":")
    return getattr(importlib.import_module(module), name)
