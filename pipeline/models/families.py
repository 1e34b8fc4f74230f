"""Supported DETR-family architectures and the random-init configurations `init-model` writes.

Each family maps to a transformers config/model class pair. The "real size" families match the published
checkpoints' architecture (so benchmarks and shape tests run at true cost without downloading weights);
`conditional-detr-small` is the CPU-trainable recipe of the shipped default model.

The registry is plain data: classes are named, not imported (transformers' on first use, the adapter's by
`detr.adapter_class`), so reading a family (the CLI checking explainers against a model directory's
config.json) loads neither torch nor transformers, and the adapter modules need not import each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Family:
    """A supported architecture: its transformers classes (by name), random-init config, input size and
    adapter class ("module:Class")."""

    name: str
    model_type: str
    classes: str  # transformers' `{classes}Config` and `{classes}ForObjectDetection`
    config_kwargs: dict[str, Any]
    shortest_edge: int
    longest_edge: int
    sigmoid_classes: bool  # focal-loss heads (one sigmoid per class) vs softmax with a no-object class
    deformable: bool = False  # multi-scale deformable cross-attention: sampled points, no dense attention matrix

    @property
    def adapter(self) -> str:
        """The adapter class, as "module:Class": deformable models record sampled points, not attention."""
        if self.deformable:
            return "eive_audit.pipeline.models.deformable:DeformableAdapter"
        return "eive_audit.pipeline.models.detr:DetrAdapter"

    @property
    def config_class(self) -> type[PretrainedConfig]:
        import transformers

        return getattr(transformers, f"{self.classes}Config")

    @property
    def model_class(self) -> type[PreTrainedModel]:
        import transformers

        return getattr(transformers, f"{self.classes}ForObjectDetection")


_SMALL_BACKBONE = {
    # A narrow two-stage transformers ResNet: stride 8 (a 16x16 attention grid at 128 px), ~6x cheaper
    # than resnet18 cut at the same stride, which is what makes training on two CPU cores feasible.
    "backbone_config": {"model_type": "resnet", "embedding_size": 32, "hidden_sizes": [32, 64],
                        "depths": [2, 2], "layer_type": "basic", "out_features": ["stage2"]},
    "use_timm_backbone": False,
}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("detr-r50", "detr", "Detr", {}, 800, 1333, False),
        Family("conditional-detr", "conditional_detr", "ConditionalDetr", {}, 800, 1333, True),
        Family("dab-detr", "dab-detr", "DabDetr", {}, 800, 1333, True),
        Family(
            "conditional-detr-small", "conditional_detr", "ConditionalDetr",
            {**_SMALL_BACKBONE, "d_model": 128, "encoder_layers": 2, "decoder_layers": 3,
             "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 256,
             "decoder_ffn_dim": 256, "num_queries": 20, "dropout": 0.0, "auxiliary_loss": True},
            128, 128, True,
        ),
        # The published Deformable DETR (single scale in, 4 levels, 300 queries, no box refinement) and RT-DETR
        # R50-vd: transformers' default configs are those architectures.
        Family("deformable-detr", "deformable_detr", "DeformableDetr", {}, 800, 1333, True, deformable=True),
        Family("rt-detr", "rt_detr", "RTDetr", {}, 640, 640, True, deformable=True),
        Family(
            # Two levels (stride 8 from the backbone, stride 16 by Deformable DETR's extra 3x3 conv): the
            # smallest model on which the splat's level merge is exercised, trainable on a CPU in minutes.
            "deformable-detr-small", "deformable_detr", "DeformableDetr",
            {**_SMALL_BACKBONE, "d_model": 64, "encoder_layers": 1, "decoder_layers": 3,
             "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 128,
             "decoder_ffn_dim": 128, "num_queries": 20, "num_feature_levels": 2, "encoder_n_points": 2,
             "decoder_n_points": 2, "dropout": 0.0, "auxiliary_loss": True},
            128, 128, True, deformable=True,
        ),
    )
}

# Small recipes share their model type with a real-size family, which is the one a loaded checkpoint maps to.
MODEL_TYPES: dict[str, Family] = {f.model_type: f for f in FAMILIES.values() if not f.name.endswith("-small")}


def family_of(model_type: str) -> Family:
    """The family of a checkpoint's `model_type` (its config.json); a clear error for unsupported types."""
    family = MODEL_TYPES.get(model_type)
    if family is None:
        raise ValueError(f"model type {model_type!r} is not supported; supported: {sorted(MODEL_TYPES)}")
    return family


def family_of_model(model: str | Path) -> Family | None:
    """The family of a model directory, read from its config.json without loading torch; None for a hub id
    (known only once loaded). Raises ValueError (ModelLoadError) for a directory that is not a model or an
    unsupported model type."""
    from eive_audit.pipeline.models.locate import read_model_config

    config = read_model_config(model)
    return None if config is None else family_of(str(config.get("model_type")))


def build_config(family: str, label_names: list[str]) -> PretrainedConfig:
    """A random-init config of `family` with one label per name (ids follow the list order)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(FAMILIES)}")
    if not label_names:
        raise ValueError("a detector needs at least one label")
    spec = FAMILIES[family]
    kwargs: dict[str, Any] = {"use_pretrained_backbone": False, **spec.config_kwargs}
    if spec.model_type == "dab-detr":
        kwargs.pop("use_pretrained_backbone")
    config = spec.config_class(
        id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)}, **kwargs
    )
    config._attn_implementation = "eager"
    return config


def write_random_model(family: str, label_names: list[str], out: Path, seed: int = 0) -> Path:
    """Save a random-init model of `family` plus its preprocessor config to `out` (save_pretrained)."""
    import torch

    config = build_config(family, label_names)
    spec = FAMILIES[family]
    torch.manual_seed(seed)
    model = spec.model_class(config)
    out = Path(out)
    model.save_pretrained(out)
    save_preprocessor(out, spec.shortest_edge, spec.longest_edge)
    return out


def save_preprocessor(out: Path, shortest_edge: int, longest_edge: int) -> None:
    """Write a standard DETR `preprocessor_config.json`, the file hub checkpoints ship, beside the weights."""
    import transformers

    processor = transformers.DetrImageProcessor(
        size={"shortest_edge": shortest_edge, "longest_edge": longest_edge},
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
    )
    processor.save_pretrained(out)
