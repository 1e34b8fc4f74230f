"""Training AHA, the learned explainer (`eive-audit train-explainer --method aha`; METHODS.md 3d), for a frozen
target model: the shipped detector or ViT, or any model the pipeline audits (a detector needs one memory grid).

Each step takes a batch of images (the order a pure function of the step, as `pipeline.train`'s), finds the
instances the model's audit would explain (a classifier's predicted class, and its true class when the
prediction is wrong; a detector's detections above the threshold, best first, at least its best query),
runs the decoder on the frozen model's features and minimises `pipeline.models.aha.aha_loss` on a random
g x g pooling grid (g uniform in grid_min..grid_max) at the step's annealed temperature. Only the decoder
learns; the target's weights take no gradient (the loss differentiates its scores with respect to the
blended pixels only).

Checkpoints, resume and the finished directory follow `pipeline.train` (`resume_state`, `write_checkpoint`,
`write_final`): rerunning the same command resumes from `OUT/checkpoint`, to the weights an uninterrupted run
ends with.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file

from eive_audit.pipeline.config import ExplainerTrainConfig
from eive_audit.pipeline.models.aha import (AHA_WEIGHTS, AhaDecoder, AhaLoss, LossSettings, ScoreFn, adapter_score,
                                           aha_loss, architecture_for, as_map, decoder_inputs, save_explainer, tau_at,
                                           weights_fingerprint)
from eive_audit.pipeline.models.loading import load_model
from eive_audit.pipeline.models.perturb import baseline_images
from eive_audit.pipeline.models.targets import Targets
from eive_audit.pipeline.sources import ImageRecord, open_source
from eive_audit.pipeline.sources.decode import decode_rgb
from eive_audit.pipeline.train import (CHECKPOINT_DIR, TRAINER_STATE, _batches, _lr_factor, resume_state,
                                      write_checkpoint, write_final)

WHOLE_IMAGE = (0.5, 0.5, 1.0, 1.0)  # a classification instance's box (as pipeline.audit_classify's)


def _classify_targets(probs: torch.Tensor, truth: list[int | None]) -> Targets:
    """Each image's predicted class, and its true class (model label) when the prediction is wrong."""
    predicted = probs[:, 0].argmax(-1).tolist()
    pairs = [(i, p) for i, p in enumerate(predicted)]
    pairs += [(i, t) for i, (p, t) in enumerate(zip(predicted, truth)) if t is not None and t != p]
    image, label = (torch.tensor(v, dtype=torch.long, device=probs.device) for v in zip(*sorted(pairs)))
    box = torch.tensor(WHOLE_IMAGE, device=probs.device).expand(len(image), 4)
    return Targets(image, torch.zeros_like(image), label, box.clone())


def _detect_targets(probs: torch.Tensor, boxes: torch.Tensor, instances: int, threshold: float) -> Targets:
    """Each image's detections scoring at least `threshold`, best first, at most `instances`, at least one."""
    scores, labels = probs.max(-1)
    image, query = [], []
    for i in range(scores.shape[0]):
        order = scores[i].argsort(descending=True)[:instances]
        keep = order[(scores[i, order] >= threshold) | (torch.arange(len(order), device=order.device) == 0)]
        image += [i] * len(keep)
        query += keep.tolist()
    image_t, query_t = (torch.tensor(v, dtype=torch.long, device=probs.device) for v in (image, query))
    return Targets(image_t, query_t, labels[image_t, query_t].clone(), boxes[image_t, query_t].float().clone())


def _true_labels(source: Any, adapter: Any) -> dict[int, int]:
    """Dataset class id -> model label, by name (classes the model lacks are left out)."""
    by_name = {name: label for label, name in adapter.label_names.items()}
    return {category: by_name[name] for category, name in source.categories.items() if name in by_name}


def training_step(decoder: AhaDecoder, optimizer: torch.optim.Optimizer, features: torch.Tensor,
                  condition: torch.Tensor, pixels: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor,
                  targets: Targets, score: ScoreFn, grid: tuple[int, int], tau: float, settings: LossSettings,
                  generator: torch.Generator, clip_norm: float) -> AhaLoss:
    """One optimizer step of the decoder on `aha_loss` of its maps of `targets`; returns the loss."""
    logits = decoder(features, targets.batch_index, condition, tuple(pixels.shape[-2:]))
    loss = aha_loss(as_map(logits), pixels, mask, reference, targets, score, grid, tau, settings, generator)
    optimizer.zero_grad(set_to_none=True)
    loss.total.backward()
    torch.nn.utils.clip_grad_norm_(decoder.parameters(), clip_norm)
    optimizer.step()
    return loss


def train_aha(config: ExplainerTrainConfig,
              on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) AHA's training; `on_step(step, logged)` sees each step's loss, its deletion and
    ascending AUCs, its peak penalty and its temperature. Returns the summary (also in
    `OUT/training_config.json`)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    adapter = load_model(config.model, config.device)
    task = adapter.family.task
    if task == "detect" and config.index is not None or task == "classify" and config.coco is not None:
        raise ValueError(f"{config.model} is a {task} model: give its data with "
                         f"{'--coco' if task == 'detect' else '--index'} (or neither)")
    adapter.model.requires_grad_(False)
    source = open_source(config.images, config.coco, config.index, task)
    records = [record for record in source if isinstance(record, ImageRecord)]
    if not records:
        raise ValueError(f"{config.coco or config.index or config.images}: no readable image to train on")
    truth = _true_labels(source, adapter) if task == "classify" else {}
    device = adapter.device
    out = Path(config.out)
    checkpoint = out / CHECKPOINT_DIR
    resume = (checkpoint / TRAINER_STATE).exists()
    decoder = AhaDecoder(architecture_for(adapter, tuple(config.blocks or ()), config.hidden)).to(device).train()
    if resume:
        decoder.load_state_dict(load_file(str(checkpoint / AHA_WEIGHTS)))
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start_step, elapsed = resume_state(checkpoint, config, optimizer, device) if resume else (0, 0.0)
    fingerprint = weights_fingerprint(adapter.model)
    settings = LossSettings(config.percentiles, config.sinkhorn_iterations, config.peak_weight, config.reference,
                            config.blur_sigma, config.tau_end)
    save = functools.partial(save_explainer, decoder=decoder, loss=settings, target_fingerprint=fingerprint,
                             target=config.model)
    score = adapter_score(adapter)
    side = adapter.preprocess_config.longest_edge
    started, logged = time.perf_counter() - elapsed, {"loss": math.nan}
    for keys in _batches(len(records), min(config.batch_size, len(records)), config.seed, start_step, config.steps):
        step = keys[0][1]
        chosen = [records[index] for index, _ in keys]
        batch = adapter.preprocess([decode_rgb(record.path, side) for record in chosen],
                                   [(record.height, record.width) for record in chosen])
        probs, boxes = adapter.predict(batch.pixel_values, batch.pixel_mask)
        targets = (_classify_targets(probs, [truth.get(r.class_label) for r in chosen]) if task == "classify"
                   else _detect_targets(probs, boxes, config.instances, config.score_threshold))
        features, condition = decoder_inputs(adapter, batch, targets, decoder.architecture)
        reference = baseline_images(batch.pixel_values, batch.pixel_mask, config.reference, config.blur_sigma,
                                    config.seed)
        rng = np.random.default_rng([config.seed, step])
        grid = int(rng.integers(config.grid_min, config.grid_max + 1))
        generator = torch.Generator(device=device).manual_seed(int(rng.integers(2**62)))
        tau = tau_at(step, config.steps, config.tau_start, config.tau_end)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(step, config)
        loss = training_step(decoder, optimizer, features, condition, batch.pixel_values, batch.pixel_mask,
                             reference, targets, score, (grid, grid), tau, settings, generator, config.clip_norm)
        logged = {**loss.logged(), "tau": round(tau, 4)}
        if on_step is not None:
            on_step(step + 1, logged)
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            write_checkpoint(save, checkpoint, config, optimizer, step + 1, time.perf_counter() - started)
    summary = {"steps": config.steps, **{f"final_{k}": v for k, v in logged.items()},
               "train_seconds": round(time.perf_counter() - started, 1), "device": str(device),
               "images": len(records), "target_fingerprint": fingerprint}
    write_final(save, config, summary)
    return summary
