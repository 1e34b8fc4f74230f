"""Supported architectures (DETR-family detectors and ViT classifiers) and the random-init configurations
`init-model` writes.

Each detector family maps to a transformers config/model class pair. The "real size" families match the published
checkpoints' architecture (so benchmarks and shape tests run at true cost without downloading weights);
`conditional-detr-small` is the CPU-trainable recipe of the shipped default model.

The registry is plain data: classes are named, not imported (transformers' on first use, the adapter's by
`detr.adapter_class`), so reading a family (the CLI checking explainers against a model directory's
config.json) loads neither torch nor transformers, and the adapter modules need not import each other.

ViT classifiers (`VIT_FAMILIES`, adapter `pipeline.models.vit.ViTAdapter`) come from three libraries, each
with its own checkpoint directory, written here by `write_random_model` and read by `family_of_model`:
- transformers (`kind` "hf"): `save_pretrained` (config.json with `model_type` vit / deit / vit_msn) plus
  a ViTImageProcessor `preprocessor_config.json` (input size, mean, std);
- timm ("timm"): timm's own hub layout (`timm.models.save_for_hf`): config.json with `architecture`,
  `num_classes`, `label_names`, `model_args` (the constructor's keyword arguments) and `pretrained_cfg`
  (`input_size`, `mean`, `std`), plus model.safetensors; loaded with `timm.create_model("local-dir:DIR")`;
- OpenCLIP ("open_clip"): OpenCLIP's own hub layout, `open_clip_config.json` (`model_cfg`, `preprocess_cfg`)
  plus open_clip_model.safetensors, and our key `zero_shot`: {"class_names": [...], "prompt_template":
  "a photo of a {}."}, the class names whose prompt embeddings make the zero-shot classifier.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)  # the mean and std of the original ViT checkpoints and timm's augreg ones
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's, as open_clip.OPENAI_DATASET_MEAN
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


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
    task: str = "detect"  # what explainers check their support against (explainers.base.Needs.tasks)

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


@dataclass(frozen=True)
class ViTFamily:
    """A supported ViT classifier architecture: the library it comes from (`kind`), what builds it (a
    transformers model class name, a timm architecture or an OpenCLIP model config name), its random-init
    keyword arguments, input side and normalisation. `task` and `deformable` are what
    `explainers.base.check_supported` reads of any family."""

    name: str
    model_type: str  # config.json's `model_type` for transformers; "timm" / "open_clip" for those libraries
    kind: Literal["hf", "timm", "open_clip"]
    builder: str
    config_kwargs: dict[str, Any]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    recipe: bool = False  # a training recipe, not a published architecture (no checkpoint maps to it)
    task: str = "classify"
    deformable: bool = False
    adapter: str = "eive_audit.pipeline.models.vit:ViTAdapter"

    @property
    def model_class(self) -> type[PreTrainedModel]:
        """The transformers model class (kind "hf")."""
        import transformers

        return getattr(transformers, self.builder)

    @property
    def config_class(self) -> type[PretrainedConfig]:
        return self.model_class.config_class


# ViT-Ti/16 (12 blocks of width 192, 3 heads): the size of WinKawaks/vit-tiny-patch16-224,
# facebook/deit-tiny-distilled-patch16-224 and timm's vit_tiny_patch16_224.
_TINY = {"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3, "intermediate_size": 768,
         "image_size": 224, "patch_size": 16}

VIT_FAMILIES: dict[str, ViTFamily] = {
    f.name: f
    for f in (
        ViTFamily("vit-tiny", "vit", "hf", "ViTForImageClassification", _TINY, 224, HALF, HALF),
        # The distilled DeiT: a CLS and a distillation token, the logits the mean of one head on each.
        ViTFamily("deit-tiny", "deit", "hf", "DeiTForImageClassificationWithTeacher", _TINY, 224,
                  IMAGENET_MEAN, IMAGENET_STD),
        ViTFamily("vit-msn-small", "vit_msn", "hf", "ViTMSNForImageClassification",
                  {**_TINY, "hidden_size": 384, "num_attention_heads": 6, "intermediate_size": 1536}, 224,
                  IMAGENET_MEAN, IMAGENET_STD),
        ViTFamily("timm-vit-tiny", "timm", "timm", "vit_tiny_patch16_224", {}, 224, HALF, HALF),
        ViTFamily("openclip-vit-b-32", "open_clip", "open_clip", "ViT-B-32", {}, 224, OPENAI_MEAN, OPENAI_STD),
        # The shipped default-vit: 96 px in patches of 8 (a 12 x 12 grid), trainable on two CPU cores.
        ViTFamily("vit-synth", "vit", "hf", "ViTForImageClassification",
                  {"image_size": 96, "patch_size": 8, "hidden_size": 96, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "intermediate_size": 192, "hidden_dropout_prob": 0.0,
                   "attention_probs_dropout_prob": 0.0}, 96, HALF, HALF, recipe=True),
    )
}

# A loaded ViT checkpoint maps to the published family of its model type (as detectors do to MODEL_TYPES).
VIT_MODEL_TYPES: dict[str, ViTFamily] = {f.model_type: f for f in VIT_FAMILIES.values() if not f.recipe}

OPEN_CLIP_CONFIG = "open_clip_config.json"  # OpenCLIP's own name for it: `open_clip.create_model("local-dir:...")`
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
DEFAULT_PROMPT = "a photo of a {}."  # CLIP's zero-shot prompt; a model directory records the one it uses


def family_of_config(config: dict[str, Any]) -> Family | ViTFamily:
    """The family of a parsed config.json: timm's has an `architecture` and no `model_type`; a transformers
    one is a ViT classifier or a detector by its `model_type`."""
    if "model_type" not in config and "architecture" in config:
        return VIT_MODEL_TYPES["timm"]
    model_type = str(config.get("model_type"))
    if model_type in VIT_MODEL_TYPES:
        return VIT_MODEL_TYPES[model_type]
    try:
        return family_of(model_type)
    except ValueError:
        raise ValueError(f"model type {model_type!r} is not supported; supported: detectors "
                         f"{sorted(MODEL_TYPES)}, ViT classifiers {sorted(VIT_MODEL_TYPES)}") from None


def family_of_model(model: str | Path) -> Family | ViTFamily | None:
    """The family of a model directory, read from its config.json (or OpenCLIP's open_clip_config.json)
    without loading torch; None for a hub id (known only once loaded). Raises ValueError (ModelLoadError) for
    a directory that is not a model or an unsupported model type."""
    from eive_audit.pipeline.models.locate import read_model_config, resolve_model_path

    if (Path(resolve_model_path(model)) / OPEN_CLIP_CONFIG).is_file():
        return VIT_MODEL_TYPES["open_clip"]
    config = read_model_config(model)
    return None if config is None else family_of_config(config)


def build_config(family: str, label_names: list[str]) -> PretrainedConfig:
    """A random-init transformers config of `family` (a detector or a transformers ViT) with one label per
    name (ids follow the list order)."""
    if family not in FAMILIES and family not in VIT_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(FAMILIES | VIT_FAMILIES)}")
    if not label_names:
        raise ValueError("a model needs at least one label")
    labels: dict[str, Any] = {"id2label": dict(enumerate(label_names)),
                              "label2id": {n: i for i, n in enumerate(label_names)}}
    if family in VIT_FAMILIES:
        vit = VIT_FAMILIES[family]
        if vit.kind != "hf":
            raise ValueError(f"{family} is a {vit.kind} model, not a transformers one: write_random_model builds it")
        config = vit.config_class(**labels, **vit.config_kwargs)
    else:
        spec = FAMILIES[family]
        kwargs: dict[str, Any] = {"use_pretrained_backbone": False, **spec.config_kwargs}
        if spec.model_type == "dab-detr":
            kwargs.pop("use_pretrained_backbone")
        config = spec.config_class(**labels, **kwargs)
    config._attn_implementation = "eager"
    return config


def write_random_model(family: str, label_names: list[str], out: Path, seed: int = 0) -> Path:
    """Save a random-init model of `family` in its library's checkpoint layout (see the module docstring),
    with its preprocessing, to `out`."""
    import torch

    out = Path(out)
    if family in VIT_FAMILIES and VIT_FAMILIES[family].kind != "hf":
        return _write_random_library_vit(VIT_FAMILIES[family], label_names, out, seed)
    config = build_config(family, label_names)
    torch.manual_seed(seed)
    if family in VIT_FAMILIES:
        VIT_FAMILIES[family].model_class(config).save_pretrained(out)
        save_vit_preprocessor(out, family)
        return out
    spec = FAMILIES[family]
    spec.model_class(config).save_pretrained(out)
    save_preprocessor(out, spec.shortest_edge, spec.longest_edge)
    return out


def _write_random_library_vit(spec: ViTFamily, label_names: list[str], out: Path, seed: int) -> Path:
    import torch

    if not label_names:
        raise ValueError("a model needs at least one label")
    torch.manual_seed(seed)
    if spec.kind == "timm":
        import timm

        model = timm.create_model(spec.builder, pretrained=False, num_classes=len(label_names), **spec.config_kwargs)
        return write_timm_model(model, label_names, out)
    import open_clip

    model = open_clip.create_model(spec.builder, pretrained=None, **spec.config_kwargs)
    return write_open_clip_model(model, open_clip.get_model_config(spec.builder), label_names, out,
                                 spec.mean, spec.std)


def write_timm_model(model: nn.Module, label_names: list[str], out: Path) -> Path:
    """Save a timm model in timm's hub layout (config.json with its constructor arguments, label names and
    preprocessing; model.safetensors), which `timm.create_model("local-dir:OUT", pretrained=True)` reads."""
    from timm.models import save_for_hf

    save_for_hf(model, str(out), model_config={"label_names": list(label_names)}, safe_serialization=True)
    return Path(out)


def write_open_clip_model(model: nn.Module, model_cfg: dict[str, Any], class_names: list[str], out: Path,
                          mean: tuple[float, ...] = OPENAI_MEAN, std: tuple[float, ...] = OPENAI_STD,
                          prompt_template: str = DEFAULT_PROMPT) -> Path:
    """Save an OpenCLIP model in OpenCLIP's hub layout (`model_cfg` is the config it was built from) plus the
    zero-shot classes: `prompt_template` filled with each class name is the text its embedding comes from."""
    from safetensors.torch import save_file

    if "{}" not in prompt_template:
        raise ValueError(f"the prompt template needs a {{}} for the class name, got {prompt_template!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / OPEN_CLIP_WEIGHTS))
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(mean), "std": list(std)},
              "zero_shot": {"class_names": list(class_names), "prompt_template": prompt_template}}
    (out / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2))
    return out


def save_vit_preprocessor(out: Path, family: str) -> None:
    """Write the ViTImageProcessor `preprocessor_config.json` of a transformers ViT family (its square input
    side, mean and std), the file hub checkpoints ship, beside the weights."""
    import transformers

    spec = VIT_FAMILIES[family]
    processor = transformers.ViTImageProcessor(size={"height": spec.image_size, "width": spec.image_size},
                                               image_mean=list(spec.mean), image_std=list(spec.std))
    processor.save_pretrained(out)


def save_preprocessor(out: Path, shortest_edge: int, longest_edge: int) -> None:
    """Write a standard DETR `preprocessor_config.json`, the file hub checkpoints ship, beside the weights."""
    import transformers

    processor = transformers.DetrImageProcessor(
        size={"shortest_edge": shortest_edge, "longest_edge": longest_edge},
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
    )
    processor.save_pretrained(out)
