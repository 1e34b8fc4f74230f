"""AHA (METHODS.md 3d): a light decoder on a frozen model's features, trained so that deleting the pixels it
ranks first destroys the prediction and deleting those it ranks last keeps it.

The pieces, each testable alone:
- `gumbel_sinkhorn`: a differentiable sort of a map's cells, a doubly stochastic soft permutation;
- `soft_masks`: from it, how much of each cell is deleted at each percentile, most relevant first (deletion)
  and least relevant first (the ascending order);
- `aha_loss`: the image blended toward a reference under those masks, scored by the frozen model, and the
  loss AUC_deletion + (1 - AUC_ascending) + peak weight * peak penalty;
- `AhaDecoder`: features and a per-instance condition -> a dense, non-negative map at input resolution;
- `decoder_inputs`: what it reads: a ViT's patch tokens of chosen blocks, conditioned on the class; a
  DETR-family detector's encoder memory, conditioned on the instance's query state, box and class (the
  conditioning of a detector is ours: AHA was published for classifiers), so one decoder forward explains
  every instance of an image;
- `refine`: test-time refinement, a few steps of the same loss on the instances' own map logits;
- `save_explainer` / `load_explainer`: an explainer directory, which records the target model's weight
  fingerprint (`weights_fingerprint`) so that it refuses any other model.

Deleting the least relevant cells first, at fraction t, leaves exactly the cells an insertion curve shows at
1 - t, so the ascending AUC equals the insertion AUC the pipeline scores (`pipeline.metrics.faithfulness`):
AHA optimises the two stored faithfulness scores themselves, on the same reference (a blur by default).

Ours, where METHODS.md leaves a choice (each said where it is made): the sort's cost scale, the peak
penalty's form, the decoder's layout and the detector's conditioning.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from eive_audit.pipeline.models.targets import Targets, instance_scores

AHA_CONFIG = "aha_config.json"
AHA_WEIGHTS = "aha.safetensors"

# (perturbed pixels [N, 3, H, W], their mask [N, H, W], label [N], box [N, 4]) -> the instances' scores [N],
# differentiable with respect to the pixels.
ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def gumbel_sinkhorn(values: torch.Tensor, tau: float, iterations: int = 30,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """The soft permutation [K, d, d] that sorts `values` [K, d] (each row in [0, 1]) in descending order:
    entry (i, j) is how much of cell i sits at rank j. log alpha_ij = -(x_i - a_j)^2 against the anchors
    a = linspace(1, 0, d), plus Gumbel noise when a `generator` is given, over `tau`; then `iterations`
    Sinkhorn normalisations in log space (rows, then columns). As tau falls (without noise) it tends to the
    hard permutation of the sort.

    The cost is METHODS.md's unscaled one. At training temperatures (1 -> 0.3) it makes a wide plan: a
    cell's expected rank follows its value, which is what the loss's gradient needs, and 30 iterations bring
    every row sum within 0.1 of 1 (measured up to d = 784 at tau 0.3 with noise); a cost scaled by d, tried
    first, left rows 0.25 off after 100."""
    k, d = values.shape
    anchors = torch.linspace(1, 0, d, device=values.device, dtype=values.dtype)
    log_alpha = -(values[:, :, None] - anchors[None, None, :]) ** 2
    if generator is not None:
        uniform = torch.rand(log_alpha.shape, generator=generator, device=values.device, dtype=values.dtype)
        log_alpha = log_alpha - torch.log(-torch.log(uniform.clamp(1e-10, 1 - 1e-7)))
    log_alpha = log_alpha / tau
    for _ in range(iterations):
        log_alpha = log_alpha - log_alpha.logsumexp(2, keepdim=True)
        log_alpha = log_alpha - log_alpha.logsumexp(1, keepdim=True)
    return log_alpha.exp()


def soft_masks(permutation: torch.Tensor, fractions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How much of each cell is deleted at each fraction f [S]: the mass of the cell in the top round(f d)
    ranks (deletion, most relevant first) and in the bottom round(f d) ranks (least relevant first), each
    [K, S, d]. For a hard permutation these are the 0/1 masks of `faithfulness.step_masks` (same rounding)."""
    k, d, _ = permutation.shape
    counts = torch.round(fractions * d).long()
    cumulative = torch.cat([permutation.new_zeros(k, d, 1), permutation.cumsum(-1)], -1)  # [K, d, d + 1]
    top = cumulative[:, :, counts]
    bottom = cumulative[:, :, -1:] - cumulative[:, :, d - counts]
    return top.transpose(1, 2), bottom.transpose(1, 2)


@dataclass(frozen=True)
class LossSettings:
    """The loss of METHODS.md 3d as an explainer was trained with it (from its ExplainerTrainConfig, recorded in
    its directory, so refinement continues the same loss): `percentiles` deletion steps (fractions 0 to 1),
    `iterations` Sinkhorn normalisations, the peak penalty's weight, the reference deleted pixels become,
    and the final temperature (refinement's)."""

    percentiles: int
    iterations: int
    peak_weight: float
    reference: str
    blur_sigma: float
    tau: float


@dataclass(frozen=True)
class AhaLoss:
    """The loss to minimise and its parts, per instance [K] (`total` is their mean plus the penalty)."""

    total: torch.Tensor
    deletion: torch.Tensor
    insertion: torch.Tensor  # the ascending order's AUC
    peak: torch.Tensor

    def logged(self) -> dict[str, float]:
        return {"loss": float(self.total.detach()), "deletion": float(self.deletion.detach().mean()),
                "insertion": float(self.insertion.detach().mean()), "peak": float(self.peak.detach().mean())}


def _valid_size(mask: torch.Tensor) -> tuple[int, int]:
    """(rows, columns) of an image's valid region in a padded batch (DETR pads at the bottom and right)."""
    return int(mask.any(1).sum()), int(mask.any(0).sum())


def pooled(maps: torch.Tensor, mask: torch.Tensor, image_index: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Dense maps [K, H, W] averaged over a grid of cells laid on each instance's valid image region: [K, g_h * g_w]."""
    cells = []
    for k in range(maps.shape[0]):
        rows, cols = _valid_size(mask[image_index[k]])
        cells.append(F.adaptive_avg_pool2d(maps[k, None, :rows, :cols], grid).flatten())
    return torch.stack(cells)


def _normalised(values: torch.Tensor) -> torch.Tensor:
    low, high = values.amin(-1, keepdim=True), values.amax(-1, keepdim=True)
    return (values - low) / (high - low).clamp(min=1e-8)


def _on_image(cells: torch.Tensor, grid: tuple[int, int], mask: torch.Tensor) -> torch.Tensor:
    """Cell masks [S, g_h * g_w] of one instance spread over its image's valid region (nearest, as the
    faithfulness scores upsample theirs), zero on padding: [S, H, W]."""
    rows, cols = _valid_size(mask)
    spread = F.interpolate(cells.view(-1, 1, *grid), size=(rows, cols), mode="nearest")[:, 0]
    return F.pad(spread, (0, mask.shape[1] - cols, 0, mask.shape[0] - rows))


def aha_loss(maps: torch.Tensor, pixels: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor,
             targets: Targets, score: ScoreFn, grid: tuple[int, int], tau: float, settings: LossSettings,
             generator: torch.Generator | None = None) -> AhaLoss:
    """METHODS.md 3d's loss of dense maps [K, H, W] of `targets` on a preprocessed batch (pixels [B, 3, H, W],
    mask [B, H, W], `reference` what deleted pixels become): pool each map to `grid` over its image, sort the
    cells (`gumbel_sinkhorn` at `tau`), delete the top and the bottom fractions softly, score every blended
    image with `score` (one forward of 2 * percentiles images per instance), and take AUC_deletion +
    (1 - AUC_ascending) by the trapezoid, plus the peak penalty.

    The peak penalty is ours in form (METHODS gives only its weight): the pooled map's largest cell over its
    mean cell, minus 1. It is 0 for a flat map and keeps one cell from taking all the mass, which min-max
    normalising before the sort would otherwise ignore."""
    k = maps.shape[0]
    cells = pooled(maps, mask, targets.batch_index, grid)
    permutation = gumbel_sinkhorn(_normalised(cells), tau, settings.iterations, generator)
    fractions = torch.linspace(0, 1, settings.percentiles, device=maps.device)
    deleted_top, deleted_bottom = soft_masks(permutation, fractions)
    images = targets.batch_index
    blended, which = [], []
    for i in range(k):
        region = _on_image(torch.cat([deleted_top[i], deleted_bottom[i]]), grid, mask[images[i]])[:, None]
        blended.append(pixels[images[i]] * (1 - region) + reference[images[i]] * region)
        which.append(torch.full((region.shape[0],), i, device=maps.device))
    order = torch.cat(which)
    scores = score(torch.cat(blended), mask[images[order]], targets.label[order], targets.box[order])
    curves = scores.view(k, 2, settings.percentiles)
    deletion = torch.trapezoid(curves[:, 0], fractions, dim=-1)
    insertion = torch.trapezoid(curves[:, 1], fractions, dim=-1)
    peak = cells.amax(-1) / cells.mean(-1).clamp(min=1e-8) - 1
    total = (deletion + 1 - insertion).mean() + settings.peak_weight * peak.mean()
    return AhaLoss(total, deletion, insertion, peak)


def adapter_score(adapter: Any) -> ScoreFn:
    """The score of a perturbed image for an instance, as the pipeline's faithfulness scores it
    (`instance_scores`: IoU with the instance's box times the probability of its class; for a classifier the
    class probability), through the adapter's forward with a graph."""
    def score(pixels: torch.Tensor, mask: torch.Tensor, label: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        probs, boxes = adapter.predict(pixels, mask, graph=True)
        return instance_scores(probs, boxes, label, box)

    return score


def tau_at(step: int, steps: int, start: float, end: float) -> float:
    """The Sinkhorn temperature at `step` of `steps`: annealed geometrically from `start` to `end`."""
    return start * (end / start) ** (step / max(steps - 1, 1))


@dataclass(frozen=True)
class Architecture:
    """What an explainer directory's decoder is: the task and the features and condition it reads."""

    task: str  # classify | detect
    in_channels: int
    condition_dim: int
    num_labels: int
    hidden: int = 64
    upsamplings: int = 3  # x2 stages from the feature grid; the last step is a bilinear resize to the input
    blocks: tuple[int, ...] = ()  # a ViT's blocks whose patch tokens are read


def _conv(channels_in: int, channels_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, padding=1), nn.GELU())


class AhaDecoder(nn.Module):
    """Features [B, C, h, w] (normalised, projected) modulated per instance by its condition (FiLM), two
    convolutions, `upsamplings` x2 stages, one output channel resized to the input: map logits [K, H, W]."""

    def __init__(self, architecture: Architecture) -> None:
        super().__init__()
        hidden = architecture.hidden
        self.architecture = architecture
        self.project = nn.Sequential(nn.GroupNorm(1, architecture.in_channels),
                                     nn.Conv2d(architecture.in_channels, hidden, 1))
        self.film = nn.Sequential(nn.Linear(architecture.condition_dim, hidden), nn.GELU(), nn.Linear(hidden, 2 * hidden))
        self.body = nn.Sequential(_conv(hidden, hidden), _conv(hidden, hidden))
        self.up = nn.ModuleList(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                              _conv(hidden, hidden)) for _ in range(architecture.upsamplings))
        self.out = nn.Conv2d(hidden, 1, 1)

    def forward(self, features: torch.Tensor, image_index: torch.Tensor, condition: torch.Tensor,
                size: tuple[int, int]) -> torch.Tensor:
        x = self.project(features)[image_index]
        gamma, beta = self.film(condition).chunk(2, -1)
        x = self.body(x * (1 + gamma[:, :, None, None]) + beta[:, :, None, None])
        for stage in self.up:
            x = stage(x)
        return F.interpolate(self.out(x), size=size, mode="bilinear", align_corners=False)[:, 0]


def as_map(logits: torch.Tensor) -> torch.Tensor:
    """The non-negative map of decoder logits."""
    return F.softplus(logits)


def from_floor(maps: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Maps [K, h, w] less their least value over the valid cells [K, h, w] (zero elsewhere). The loss sees a
    map only through its min-max normalised ranking, so its floor carries no meaning; without it a
    well-ranked map could still spread its mass evenly, and mass is what the localisation scores read."""
    floor = maps.masked_fill(~valid, float("inf")).flatten(1).amin(-1)[:, None, None]
    return (maps - floor).clamp(min=0) * valid


def default_blocks(num_blocks: int) -> tuple[int, ...]:
    """A ViT's blocks read by default: the middle one (still spatial) and the last (what the head reads)."""
    return tuple(sorted({num_blocks // 2, num_blocks - 1}))


def architecture_for(adapter: Any, blocks: tuple[int, ...] | None = None, hidden: int = 64) -> Architecture:
    """The decoder a model needs: its feature channels, condition size and upsamplings from the feature grid to
    the input, read off one forward of a blank image. A detector needs its memory on one grid, so no
    multi-scale deformable model."""
    labels = len(adapter.label_names)
    if adapter.family.task == "detect" and adapter.family.deformable:
        raise ValueError(f"aha reads a detector's encoder memory over one grid, which {adapter.family.name} "
                         "(multi-scale deformable attention) does not have")
    side = adapter.preprocess_config.longest_edge
    batch = adapter.preprocess([torch.zeros(3, side, side, dtype=torch.uint8)])
    with torch.no_grad():
        record = adapter.record(batch, gradients=False)
    (h, _), height = record.output.grid, batch.pixel_values.shape[-2]
    upsamplings = max(0, int(round(math.log2(height / h))))
    if adapter.family.task == "detect":
        width = int(record.memory.shape[-1])
        return Architecture("detect", width, width + 4 + labels, labels, hidden, upsamplings)
    chosen = blocks if blocks else default_blocks(adapter.num_blocks)
    if not all(-adapter.num_blocks <= b < adapter.num_blocks for b in chosen):
        raise ValueError(f"blocks {list(chosen)} out of range for a ViT of {adapter.num_blocks} blocks")
    width = int(record.tokens[0].shape[-1])
    return Architecture("classify", width * len(chosen), labels, labels, hidden, upsamplings,
                        tuple(sorted({b % adapter.num_blocks for b in chosen})))


def decoder_inputs(adapter: Any, batch: Any, targets: Targets,
                   architecture: Architecture) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [B, C, h, w], condition [K, condition_dim]) of a preprocessed batch's instances, from one
    forward of the frozen model without a graph."""
    onehot = F.one_hot(targets.label, architecture.num_labels).float()
    with torch.no_grad():
        record = adapter.record(batch, gradients=False)
        if architecture.task == "classify":
            (h, w), prefix = adapter.grid, adapter.n_prefix
            tokens = [record.tokens[b][:, prefix:].float() for b in architecture.blocks]
            features = torch.cat(tokens, -1).transpose(1, 2).reshape(tokens[0].shape[0], -1, h, w)
            return features, onehot
        h, w = record.output.grid
        features = record.memory.float().transpose(1, 2).reshape(record.memory.shape[0], -1, h, w)
        states = record.queries[targets.batch_index, targets.query].float()
    return features, torch.cat([states, targets.box.float(), onehot], -1)


def refine(logits: torch.Tensor, pixels: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor,
           targets: Targets, score: ScoreFn, grid: tuple[int, int], settings: LossSettings,
           steps: int, lr: float, seed: int = 0) -> torch.Tensor:
    """Test-time refinement: `steps` Adam steps of `aha_loss` on the map logits [K, H, W] themselves (the
    decoder stays as trained), on `grid` (the grid the maps are scored on) at the training's final
    temperature (`settings.tau`), with Gumbel noise of a fixed seed. Each instance's loss is its own, so
    refining a batch of instances refines each as if alone. Returns the refined logits, detached."""
    delta = torch.zeros_like(logits, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=lr)
    generator = torch.Generator(device=logits.device).manual_seed(seed)
    base = logits.detach()
    with torch.inference_mode(False), torch.enable_grad():
        for _ in range(steps):
            loss = aha_loss(as_map(base + delta), pixels, mask, reference, targets, score, grid, settings.tau,
                            settings, generator)
            optimizer.zero_grad(set_to_none=True)
            (loss.total * len(targets)).backward()  # a sum: each instance's step as if refined alone
            optimizer.step()
    return (base + delta).detach()


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of a model's parameters and buffers (names, shapes, dtypes, values): the same weights loaded
    from anywhere give the same fingerprint, and any retraining changes it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def save_explainer(out: Path, decoder: AhaDecoder, loss: LossSettings, target_fingerprint: str, target: str) -> None:
    """Write an explainer directory: the decoder's weights (safetensors) and `aha_config.json` with its
    architecture, its loss, and the target model's fingerprint and name."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}, str(out / AHA_WEIGHTS))
    (out / AHA_CONFIG).write_text(json.dumps({
        "method": "aha", "architecture": asdict(decoder.architecture), "loss": asdict(loss),
        "target": {"fingerprint": target_fingerprint, "model": target}}, indent=2))


class ExplainerMismatch(ValueError):
    """An explainer directory trained for another model than the one it is asked to explain."""


def load_explainer(path: Path, target: nn.Module | None = None,
                   device: torch.device | str = "cpu") -> tuple[AhaDecoder, LossSettings]:
    """The decoder of an explainer directory (on `device`, in eval mode) and the loss it was trained with;
    with `target`, refused (ExplainerMismatch) unless the target's weights are those it was trained on."""
    path = Path(path)
    try:
        meta = json.loads((path / AHA_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not an AHA explainer directory (no readable {AHA_CONFIG}): {exc}") from exc
    if target is not None and weights_fingerprint(target) != meta["target"]["fingerprint"]:
        raise ExplainerMismatch(f"the AHA explainer {path} was trained for another model ({meta['target']['model']}, "
                                f"weights {meta['target']['fingerprint'][:12]}); train one for this model with "
                                "`eive-audit train-explainer --method aha`")
    architecture = meta["architecture"]
    decoder = AhaDecoder(Architecture(**{**architecture, "blocks": tuple(architecture["blocks"])}))
    decoder.load_state_dict(load_file(str(path / AHA_WEIGHTS)))
    return decoder.to(device).eval(), LossSettings(**meta["loss"])
