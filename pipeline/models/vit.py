"""ViT image classifiers behind one adapter: transformers ViT / DeiT / ViT-MSN classifiers, timm
VisionTransformer checkpoints, and OpenCLIP ViTs as zero-shot classifiers (class names -> prompt embeddings).

A classifier is audited as a detector with one query whose box is the whole image (`predict`), so the
faithfulness scores and the findings' re-scoring read it unchanged.

The adapter runs the transformer itself, block by block (`embed`, `run_block`, `head`: the primitives the
ViT explainers build on), so every block's post-softmax attention and output tokens are at hand as the
graph holds them: transformers' eager attention returns its probabilities (read by a hook on the attention
module), timm's are read where they leave `attn_drop` (fused attention switched off), and OpenCLIP's blocks,
which call nn.MultiheadAttention with need_weights=False, are computed here with the module's own weights
and the same operations. A hook lives for one block call and is removed in `finally`, even on error.

What differs between the libraries sits in three small `_Parts` classes: embedding, one block, the pooled
head and which token rows it reads. Prefix tokens (CLS, distillation, registers) are counted from the model
(its position embeddings, timm's `num_prefix_tokens`), never assumed.
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PreTrainedModel

from eive_audit.pipeline.models.detr import resolve_device
from eive_audit.pipeline.models.families import (DEFAULT_PROMPT, OPEN_CLIP_CONFIG, OPENAI_MEAN, OPENAI_STD,
                                                 VIT_MODEL_TYPES, ViTFamily, family_of_model)
from eive_audit.pipeline.models.hooks import capture_outputs
from eive_audit.pipeline.models.locate import ModelLoadError, resolve_model_path
from eive_audit.pipeline.models.preprocess import PixelBatch, PreprocessConfig

# The transformers classifiers with ViT's layout (embeddings, `layers`, final `layernorm`, linear heads on
# prefix tokens) that a checkpoint's `architectures` may name.
HF_CLASSIFIERS = ("ViTForImageClassification", "DeiTForImageClassification",
                  "DeiTForImageClassificationWithTeacher", "ViTMSNForImageClassification")
WHOLE_IMAGE = (0.5, 0.5, 1.0, 1.0)  # the one "box" of a classification, normalised cxcywh


@dataclass
class ClassifierOutput:
    """One batch's forward, on the model's device: logits [B, C]; per block the post-softmax attention
    [B, H, N, N] (N = n_prefix + h * w tokens, prefix first); grid (h, w) of the patch tokens; token_mask
    [B, h, w], all True (every image fills the input; the detectors' field, for the shared helpers)."""

    logits: torch.Tensor
    attentions: tuple[torch.Tensor, ...]
    grid: tuple[int, int]
    n_prefix: int
    token_mask: torch.Tensor


@dataclass
class ViTRecord:
    """A forward with the tensors gradient explainers differentiate by, as the graph holds them: tokens, each
    block's output Z_l [B, N, D]; features [B, D, h, w], the last block's patch tokens (the findings' peak
    descriptors)."""

    output: ClassifierOutput
    tokens: tuple[torch.Tensor, ...]
    features: torch.Tensor


class ZeroShotClassifier(nn.Module):
    """An OpenCLIP image tower as a classifier over fixed class embeddings (CLIP's zero-shot recipe):
    logits = logit_scale * cos(image embedding, class embedding). The text tower is not kept: its only use is
    the class embeddings, computed once at load."""

    def __init__(self, visual: nn.Module, class_embeddings: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.visual = visual
        self.register_buffer("class_embeddings", F.normalize(class_embeddings.float(), dim=-1))
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    def classify(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Image embeddings [B, E] -> logits [B, C]."""
        return self.logit_scale * F.normalize(embeddings, dim=-1) @ self.class_embeddings.T.to(embeddings.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classify(self.visual(pixel_values))


class _Parts(ABC):
    """One library's ViT: how pixels become tokens, how one block runs (returning its attention
    probabilities), the head with the model's own pooling, and the token rows that pooling reads."""

    blocks: Sequence[nn.Module]
    image_size: tuple[int, int]
    grid: tuple[int, int]
    n_prefix: int

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @abstractmethod
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] -> the tokens entering block 0 [B, N, D]."""

    @abstractmethod
    def block(self, i: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i: its output tokens and post-softmax attention [B, H, N, N], graph-connected."""

    @abstractmethod
    def attention_norm(self, i: int) -> nn.Module:
        """Block i's first LayerNorm, whose output is the tokens its attention reads."""

    @abstractmethod
    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """The last block's tokens [B, N, D] -> logits [B, C]: final norm, the model's pooling, classifier."""

    @abstractmethod
    def readout_rows(self, n_tokens: int) -> list[int]:
        """The token rows the head pools (CLS; CLS and distillation; or the patch tokens of a mean pool)."""

    @abstractmethod
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """The library's own forward, without capture."""


class _HFParts(_Parts):
    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__(model)
        self.base = model.base_model
        self.blocks = self.base.layers
        patches = self.base.embeddings.patch_embeddings
        self.image_size = tuple(patches.image_size)  # type: ignore[assignment]
        self.grid = (patches.image_size[0] // patches.patch_size[0], patches.image_size[1] // patches.patch_size[1])
        self.n_prefix = self.base.embeddings.position_embeddings.shape[1] - patches.num_patches
        # (row, classifier): the logits are the mean of each classifier on its row (DeiT with teacher: CLS
        # and distillation token, averaged as transformers does).
        if hasattr(model, "distillation_classifier"):
            self.heads = [(0, model.cls_classifier), (1, model.distillation_classifier)]
        else:
            self.heads = [(0, model.classifier)]

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.base.embeddings(pixels)

    def block(self, i: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.blocks[i]
        with capture_outputs({"attention": layer.attention}) as captured:
            out = layer(tokens)
        weights = captured["attention"][1]  # type: ignore[index]
        if weights is None:
            raise RuntimeError("the attention returned no probabilities: load the model with attn_implementation='eager'")
        return out, weights

    def attention_norm(self, i: int) -> nn.Module:
        return self.blocks[i].layernorm_before

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        sequence = self.base.layernorm(tokens)
        return sum(classifier(sequence[:, row]) for row, classifier in self.heads) / len(self.heads)

    def readout_rows(self, n_tokens: int) -> list[int]:
        return [row for row, _ in self.heads]

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).logits


class _TimmParts(_Parts):
    """timm's VisionTransformer (and its distilled DeiT): fused attention is switched off on every block so
    that the probabilities exist, and read as the output of the attention's `attn_drop`."""

    def __init__(self, model: nn.Module) -> None:
        from timm.models.vision_transformer import VisionTransformer

        super().__init__(model)
        if not isinstance(model, VisionTransformer):
            raise ModelLoadError(f"timm model {type(model).__name__} is not a VisionTransformer")
        if model.attn_pool is not None or model.global_pool not in ("token", "avg"):
            raise ModelLoadError(f"timm ViT pooling {model.global_pool!r} is not supported (token or avg)")
        for blk in model.blocks:
            if not (hasattr(blk, "attn") and hasattr(blk.attn, "attn_drop") and hasattr(blk.attn, "fused_attn")
                    and hasattr(blk, "norm1")):
                raise ModelLoadError(f"timm block {type(blk).__name__} does not expose its attention probabilities")
            blk.attn.fused_attn = False
        self.blocks = model.blocks
        self.image_size = tuple(model.patch_embed.img_size)  # type: ignore[assignment]
        self.grid = tuple(model.patch_embed.grid_size)  # type: ignore[assignment]
        self.n_prefix = int(model.num_prefix_tokens)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(pixels))))

    def block(self, i: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blk = self.blocks[i]
        with capture_outputs({"attention": blk.attn.attn_drop}) as captured:
            out = blk(tokens)
        return out, captured["attention"]  # type: ignore[return-value]

    def attention_norm(self, i: int) -> nn.Module:
        return self.blocks[i].norm1

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.norm(tokens))

    def readout_rows(self, n_tokens: int) -> list[int]:
        m = self.model
        if getattr(m, "dist_token", None) is not None:  # the distilled DeiT averages its two heads
            return [0, 1]
        if m.global_pool == "token":
            return [0]
        return list(range(0 if getattr(m, "pool_include_prefix", False) else self.n_prefix, n_tokens))

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)


def multihead_self_attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.MultiheadAttention(x, x, x) on batch-first x [B, N, D] with its own weights, returning the
    probabilities [B, H, N, N] as well (its need_weights=False fast path keeps none): packed in-projection,
    scaled dot product, softmax, out-projection; dropout is off in eval."""
    b, n, d = x.shape
    heads = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    weights = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    return attn.out_proj((weights @ v).transpose(1, 2).reshape(b, n, d)), weights


class _OpenClipParts(_Parts):
    """An OpenCLIP VisionTransformer tower (CLS or mean pool, no attentional pooler) in a ZeroShotClassifier;
    its blocks are run here, with the attention computed by `multihead_self_attention`."""

    def __init__(self, model: ZeroShotClassifier) -> None:
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        super().__init__(model)
        visual = model.visual
        if not isinstance(visual, VisionTransformer):
            raise ModelLoadError(f"OpenCLIP tower {type(visual).__name__} is not a VisionTransformer")
        if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
            raise ModelLoadError("OpenCLIP towers with an attentional pooler or no pooling are not supported")
        for blk in visual.transformer.resblocks:
            if (type(blk) is not ResidualAttentionBlock or hasattr(blk, "ln_1_kv")
                    or not blk.attn._qkv_same_embed_dim or blk.attn.bias_k is not None):
                raise ModelLoadError(f"OpenCLIP block {type(blk).__name__} is not a plain self-attention block")
        self.visual = visual
        self.blocks = visual.transformer.resblocks
        self.image_size = tuple(visual.image_size)  # type: ignore[assignment]
        self.grid = tuple(visual.grid_size)  # type: ignore[assignment]
        self.n_prefix = visual.positional_embedding.shape[0] - self.grid[0] * self.grid[1]

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual._embeds(pixels)

    def block(self, i: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blk = self.blocks[i]
        attended, weights = multihead_self_attention(blk.attn, blk.ln_1(tokens))
        x = tokens + blk.ls_1(attended)
        return x + blk.ls_2(blk.mlp(blk.ln_2(x))), weights

    def attention_norm(self, i: int) -> nn.Module:
        return self.blocks[i].ln_1

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.visual._pool(tokens)
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return self.model.classify(pooled)

    def readout_rows(self, n_tokens: int) -> list[int]:
        return [0] if self.visual.pool_type == "tok" else list(range(self.n_prefix, n_tokens))

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)


_PARTS: dict[str, type[_Parts]] = {"hf": _HFParts, "timm": _TimmParts, "open_clip": _OpenClipParts}


@contextlib.contextmanager
def _replaced_output(module: nn.Module, value: torch.Tensor | None) -> Iterator[None]:
    """Within the block, `module` returns `value` instead of its output (nothing changes for None)."""
    handle = None if value is None else module.register_forward_hook(lambda _m, _i, _o: value)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


class ViTAdapter:
    """A loaded ViT classifier with batched preprocess / forward / predict and block-level primitives."""

    task: ClassVar[str] = "classify"

    def __init__(self, model: nn.Module, family: ViTFamily, device: torch.device, label_names: dict[int, str],
                 mean: Sequence[float], std: Sequence[float]) -> None:
        self.family = family
        self._parts = _PARTS[family.kind](model)
        self.model = model.to(device).eval()
        self.device = device
        self.label_names = label_names
        height, width = self.input_size
        self.preprocess_config = PreprocessConfig(min(height, width), max(height, width),
                                                  tuple(mean), tuple(std))  # type: ignore[arg-type]

    @classmethod
    def load(cls, name: str | Path, device: str | torch.device = "auto") -> "ViTAdapter":
        """Load from a local directory (transformers, timm or OpenCLIP layout: pipeline.models.families) or a
        transformers hub id."""
        path = resolve_model_path(name)
        family = family_of_model(path) or _hub_family(path)
        if not isinstance(family, ViTFamily):
            raise ModelLoadError(f"{path} is a {family.task} model ({family.name}), not a ViT classifier")
        model, labels, mean, std = _LOADERS[family.kind](path)
        return cls(model, family, resolve_device(device), labels, mean, std)

    @property
    def num_blocks(self) -> int:
        return len(self._parts.blocks)

    @property
    def grid(self) -> tuple[int, int]:
        return self._parts.grid

    @property
    def n_prefix(self) -> int:
        return self._parts.n_prefix

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) every image is resized to: the model's position embeddings fix it."""
        return self._parts.image_size

    def preprocess(self, images: list[torch.Tensor], sizes: list[tuple[int, int]] | None = None) -> PixelBatch:
        """Resize each uint8 [3, h, w] image to the input size (aspect not kept, as ViT processors do) and
        normalise; the mask is all ones. `sizes`: the images' original (h, w), by default their shapes."""
        if not images:
            raise ValueError("preprocess needs at least one image")
        originals = sizes if sizes is not None else [tuple(image.shape[-2:]) for image in images]
        if len(originals) != len(images):
            raise ValueError(f"{len(originals)} sizes for {len(images)} images")
        config, (height, width) = self.preprocess_config, self.input_size
        mean = torch.tensor(config.mean, device=self.device).view(3, 1, 1)
        std = torch.tensor(config.std, device=self.device).view(3, 1, 1)
        resized = []
        for image in images:
            x = image.to(device=self.device, non_blocking=True).to(torch.float32).div_(255.0)
            if tuple(x.shape[-2:]) != (height, width):
                x = F.interpolate(x[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]
            resized.append((x - mean) / std)
        n = len(images)
        return PixelBatch(
            pixel_values=torch.stack(resized),
            pixel_mask=torch.ones(n, height, width, dtype=torch.long, device=self.device),
            input_sizes=torch.tensor([[height, width]] * n, device=self.device),
            original_sizes=torch.tensor([tuple(size) for size in originals], device=self.device),
        )

    def class_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().softmax(-1)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast on CUDA (as the detectors), nothing on the CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # The primitives the ViT explainers build on, each under the adapter's autocast (so an explainer may call
    # them on a recorded forward's tokens outside it).
    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tokens entering block 0 [B, N, D]."""
        with self.autocast():
            return self._parts.embed(pixel_values)

    def run_block(self, i: int, tokens: torch.Tensor,
                  normed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i on tokens [B, N, D]: (its output tokens, its attention [B, H, N, N]), graph-connected.
        `normed` replaces the output of the block's first LayerNorm (the tokens its attention reads; CDAM's
        T) while the residual stream keeps `tokens`."""
        with _replaced_output(self._parts.attention_norm(i), normed), self.autocast():
            return self._parts.block(i, tokens)

    def attention_norm(self, i: int) -> nn.Module:
        """Block i's first LayerNorm: its output is the tokens block i's attention reads."""
        return self._parts.attention_norm(i)

    def head(self, tokens: torch.Tensor, pool: Literal["model", "mean"] = "model") -> torch.Tensor:
        """Tokens [B, N, D] of the last block (or any block) -> logits [B, C]. `pool="model"`: the model's own
        final norm, pooling and classifier; `"mean"`: the head applied to the mean of all tokens (Norm then
        classifier of the token mean, as LeGrad scores each block), done by handing the model's head a
        sequence whose every token is that mean, so any pooling reads exactly it."""
        if pool == "mean":
            tokens = tokens.mean(1, keepdim=True).expand_as(tokens)
        with self.autocast():
            return self._parts.head(tokens)

    def readout(self, n_tokens: int) -> torch.Tensor:
        """Weights [N] over the token rows the head pools, summing to 1: the CLS row (1, 0, ...), CLS and
        distillation (0.5, 0.5, 0, ...), or the patch tokens of a mean-pooled model."""
        weights = torch.zeros(n_tokens, device=self.device)
        rows = self._parts.readout_rows(n_tokens)
        weights[rows] = 1.0 / len(rows)
        return weights

    def tokens_entering(self, pixel_values: torch.Tensor, block: int) -> torch.Tensor:
        """The tokens entering `block` [B, N, D] (the embedding for block 0)."""
        x = self.embed(pixel_values)
        for i in range(block):
            x = self.run_block(i, x)[0]
        return x

    def forward(self, batch: PixelBatch) -> ClassifierOutput:
        """Run the classifier once, keeping every block's attention."""
        return self._record(batch).output

    def record(self, batch: PixelBatch, gradients: bool = True) -> ViTRecord:
        """Run once and keep every block's tokens and attention. With `gradients`, autograd records the forward
        even in inference or no-grad mode (as DetrAdapter.record): the pixels are cloned and require grad, so
        there is a graph when the weights are frozen; explainers take `torch.autograd.grad(...,
        retain_graph=True)`, which leaves the weights' `.grad` alone."""
        if not gradients:
            return self._record(batch)
        with torch.inference_mode(False), torch.enable_grad():
            pixels = batch.pixel_values.clone().requires_grad_(True)
            return self._record(PixelBatch(pixels, batch.pixel_mask.clone(), batch.input_sizes, batch.original_sizes))

    def _record(self, batch: PixelBatch) -> ViTRecord:
        with self.autocast():
            x = self.embed(batch.pixel_values)
            tokens, attentions = [], []
            for i in range(self.num_blocks):
                x, attention = self.run_block(i, x)
                tokens.append(x)
                attentions.append(attention)
            logits = self.head(x)
        (h, w), b = self.grid, x.shape[0]
        features = x[:, self.n_prefix:].transpose(1, 2).reshape(b, x.shape[-1], h, w)
        output = ClassifierOutput(logits, tuple(attentions), (h, w), self.n_prefix,
                                  torch.ones(b, h, w, dtype=torch.bool, device=x.device))
        return ViTRecord(output, tuple(tokens), features)

    def predict(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor,
                graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Class probabilities [N, 1, C] and boxes [N, 1, 4] (the whole image, cxcywh) of a plain forward
        without capture: a detector's output with one query, for the faithfulness and findings re-scoring. In
        inference mode, unless `graph` (AHA's loss differentiates it)."""
        with torch.inference_mode(not graph), self.autocast():
            probs = self.class_probs(self._parts.logits(pixel_values))
        boxes = torch.tensor(WHOLE_IMAGE, device=probs.device).expand(probs.shape[0], 1, 4)
        return probs[:, None], boxes


Loaded = tuple[nn.Module, dict[int, str], tuple[float, float, float], tuple[float, float, float]]


def _hub_family(path: str) -> ViTFamily:
    """A transformers hub id's family, from its config (downloaded, or the cache offline)."""
    try:
        model_type = AutoConfig.from_pretrained(path).model_type
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError depending on the problem
        raise ModelLoadError(f"cannot read the model config of {path}: {exc}") from exc
    if model_type not in VIT_MODEL_TYPES:
        raise ModelLoadError(f"{path}: model type {model_type!r} is not a supported ViT classifier "
                             f"({', '.join(sorted(VIT_MODEL_TYPES))})")
    return VIT_MODEL_TYPES[model_type]


def _load_hf(path: str) -> Loaded:
    """A transformers ViT classifier with eager attention; its class from the config's `architectures`
    (DeiT with or without teacher), mean and std from preprocessor_config.json when there is one."""
    import transformers

    config = AutoConfig.from_pretrained(path)
    named = (config.architectures or [None])[0]
    model_class = getattr(transformers, named) if named in HF_CLASSIFIERS else AutoModelForImageClassification
    try:
        model = model_class.from_pretrained(path, attn_implementation="eager")
    except Exception as exc:
        raise ModelLoadError(f"cannot load the weights of {path}: {exc}") from exc
    family = VIT_MODEL_TYPES[config.model_type]
    mean, std = family.mean, family.std
    processor = Path(path) / "preprocessor_config.json"
    if processor.is_file():
        raw = json.loads(processor.read_text())
        mean, std = tuple(raw.get("image_mean", mean)), tuple(raw.get("image_std", std))
    return model, {int(k): v for k, v in config.id2label.items()}, mean, std  # type: ignore[return-value]


def _load_timm(path: str) -> Loaded:
    """A timm checkpoint in timm's hub layout (`timm.create_model("local-dir:...")`); label names from its
    config.json, mean and std from its pretrained_cfg."""
    import timm

    try:
        model = timm.create_model(f"local-dir:{path}", pretrained=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the timm model in {path}: {exc}") from exc
    names = json.loads((Path(path) / "config.json").read_text()).get("label_names") or []
    labels = {i: str(names[i]) if i < len(names) else f"LABEL_{i}" for i in range(model.num_classes)}
    cfg = model.pretrained_cfg
    return model, labels, tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))  # type: ignore[return-value]


def _load_open_clip(path: str) -> Loaded:
    """An OpenCLIP checkpoint in OpenCLIP's hub layout as a zero-shot classifier: each class name in the
    recorded prompt template, through the text tower, is its class embedding."""
    import open_clip

    raw = json.loads((Path(path) / OPEN_CLIP_CONFIG).read_text())
    zero_shot = raw.get("zero_shot") or {}
    names = zero_shot.get("class_names")
    if not names:
        raise ModelLoadError(f"{Path(path) / OPEN_CLIP_CONFIG} has no zero_shot.class_names: a zero-shot "
                             "classifier needs the names of its classes")
    if not any(Path(path).glob(pattern) for pattern in ("*.safetensors", "*.bin", "*.pth")):
        raise ModelLoadError(f"{path} has no OpenCLIP weights (open_clip_model.safetensors)")
    try:
        clip = open_clip.create_model(f"local-dir:{path}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    except Exception as exc:
        raise ModelLoadError(f"cannot load the OpenCLIP model in {path}: {exc}") from exc
    template = zero_shot.get("prompt_template", DEFAULT_PROMPT)
    with torch.no_grad():
        clip.eval()
        embeddings = clip.encode_text(tokenizer([template.format(name) for name in names]))
    model = ZeroShotClassifier(clip.visual, embeddings, clip.logit_scale.exp().item())
    pre = raw.get("preprocess_cfg") or {}
    return (model, dict(enumerate(map(str, names))), tuple(pre.get("mean", OPENAI_MEAN)),  # type: ignore[return-value]
            tuple(pre.get("std", OPENAI_STD)))


_LOADERS = {"hf": _load_hf, "timm": _load_timm, "open_clip": _load_open_clip}
