"""Training a ViT image classifier (`eive-audit train --task classify`), and measuring one.

The classification twin of `pipeline.train`, with the same `TrainConfig`, schedule (`_lr_factor`), data
order (`_batches`: a pure function of the step), checkpoint layout and resume rule (`run_identity`): an
interrupted run resumes from `OUT/checkpoint` to the weights an uninterrupted one ends with. The model is
transformers' `ViTForImageClassification`, from scratch (`config.recipe`, `vit-synth` by default) or
fine-tuned from `init` (onto other class names through `pipeline.train.relabel`); the loss is cross-entropy
on the image's class. Images are resized to the model's square input and normalised as its
`preprocessor_config.json` (a `ViTImageProcessor`'s) says, so the saved directory loads with the stock
processor and is fed at audit time exactly as in training.

`evaluate_classifier` measures top-1 on a classification index and, on synthetic planted-cue data, the
shortcut: the cued class's accuracy on its images with the cue and on the same images re-rendered without
it, and how often other classes carrying the cue are called the cued class. The shipped `default-vit`'s card
quotes it (`python -m eive_audit.pipeline.train_classify --evaluate ...`).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageClassification, PreTrainedModel, ViTImageProcessor

from eive_audit.pipeline.config import TrainConfig
from eive_audit.pipeline.models.detr import resolve_device
from eive_audit.pipeline.models.families import VIT_FAMILIES, build_config
from eive_audit.pipeline.models.locate import resolve_model_path
from eive_audit.pipeline.models.preprocess import PreprocessConfig
from eive_audit.pipeline.sources import ImageRecord, open_source
from eive_audit.pipeline.sources.decode import decode_rgb
from eive_audit.pipeline.sources.synthetic_classify import write_without_cues
from eive_audit.pipeline.train import (CHECKPOINT_DIR, TRAINER_STATE, _batches, _lr_factor, relabel,
                                      resume_state, write_checkpoint, write_final)


def labelled_images(index: Path | None, images: Path) -> tuple[list[str], list[tuple[ImageRecord, int]]]:
    """The class names of a classification source (the index over `images`, else an ImageFolder tree), in
    category-id order, and each readable image's record with the position of its class in that list. Images
    the source reports as errors (a missing file, an unknown label) are left out, as training leaves out bad
    COCO entries."""
    source = open_source(Path(images), index=None if index is None else Path(index), task="classify")
    position = {category: k for k, category in enumerate(sorted(source.categories))}
    records = [(record, position[record.class_label]) for record in source
               if isinstance(record, ImageRecord) and record.class_label is not None]
    return [source.categories[category] for category in sorted(source.categories)], records


def pixels(images: list[torch.Tensor], config: PreprocessConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [3, h, w] images -> the model input [B, 3, S, S]: each resized to the square side S
    (`config.shortest_edge`, bilinear, antialiased), scaled to [0, 1] and normalised by the config's mean
    and std, as a `ViTImageProcessor` feeds the model."""
    side = config.shortest_edge
    mean = torch.tensor(config.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=device).view(1, 3, 1, 1)
    batch = []
    for image in images:
        x = image.to(device=device, dtype=torch.float32)[None] / 255.0
        if tuple(x.shape[-2:]) != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        batch.append(x)
    return (torch.cat(batch) - mean) / std


class _TrainSet(torch.utils.data.Dataset):
    """Decoded image and class position of each training example; flipped (seeded by step and index) when
    `hflip`."""

    def __init__(self, examples: list[tuple[ImageRecord, int]], hflip: bool, seed: int) -> None:
        self.examples, self.hflip, self.seed = examples, hflip, seed

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, step = key
        record, class_id = self.examples[index]
        image = decode_rgb(record.path, None)
        if self.hflip and bool(np.random.default_rng([self.seed, step, index]).random() < 0.5):
            image = image.flip(-1)
        return image, class_id


def _build_model(config: TrainConfig, names: list[str]) -> tuple[PreTrainedModel, list[int], PreprocessConfig]:
    """The model to train, the model label of each dataset class id, and its input preprocessing. From
    `init`, the model's head is kept when it has every class name, else relabelled to the dataset's."""
    if config.init is not None:
        path = resolve_model_path(config.init)
        model = AutoModelForImageClassification.from_pretrained(path, attn_implementation="eager")
        if not set(names) <= set(model.config.id2label.values()):
            model = relabel(model, names)
        label_of = {name: int(i) for i, name in model.config.id2label.items()}
        return model, [label_of[name] for name in names], PreprocessConfig.from_dir(Path(path))
    family = VIT_FAMILIES.get(config.recipe)
    if family is None or family.kind != "hf":
        hf = sorted(name for name, f in VIT_FAMILIES.items() if f.kind == "hf")
        raise ValueError(f"a classifier trains from scratch as a transformers ViT family ({', '.join(hf)}), "
                         f"got {config.recipe!r}")
    model = family.model_class(build_config(config.recipe, names))
    side = family.image_size
    return model, list(range(len(names))), PreprocessConfig(side, side, family.mean, family.std)


def _save(model: PreTrainedModel, out: Path, preprocess_config: PreprocessConfig) -> None:
    """Write a loadable model directory with its `ViTImageProcessor` config atomically (temp dir, then rename)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    side = preprocess_config.shortest_edge
    ViTImageProcessor(size={"height": side, "width": side}, image_mean=list(preprocess_config.mean),
                      image_std=list(preprocess_config.std)).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def train_classifier(config: TrainConfig,
                     on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) training a classifier; `on_step(step, logged)` sees each step's `loss` and the batch's
    `accuracy`. Returns a summary with the final values and wall time (also in `OUT/training_config.json`)."""
    if config.task != "classify":
        raise ValueError(f"train_classifier trains a classifier: the config's task is {config.task!r}")
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    names, examples = labelled_images(config.index, config.images)
    if not examples:
        raise ValueError(f"{config.index or config.images}: no readable labelled image to train on")
    out = Path(config.out)
    checkpoint = out / CHECKPOINT_DIR
    resume = (checkpoint / TRAINER_STATE).exists()
    model, label_of, preprocess_config = _build_model(
        config.model_copy(update={"init": checkpoint}) if resume else config, names
    )
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start_step, elapsed = resume_state(checkpoint, config, optimizer, device) if resume else (0, 0.0)
    save = functools.partial(_save, model, preprocess_config=preprocess_config)
    dataset = _TrainSet(examples, config.hflip, config.seed)
    targets = torch.tensor(label_of, device=device)
    started, logged = time.perf_counter() - elapsed, {"loss": math.nan, "accuracy": math.nan}
    for keys in _batches(len(examples), min(config.batch_size, len(examples)), config.seed, start_step, config.steps):
        step = keys[0][1]
        items = [dataset[k] for k in keys]
        batch = pixels([image for image, _ in items], preprocess_config, device)
        labels = targets[torch.tensor([class_id for _, class_id in items], device=device)]
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(step, config)
        logits = model(pixel_values=batch).logits
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
        optimizer.step()
        logged = {"loss": float(loss.detach()), "accuracy": float((logits.argmax(-1) == labels).float().mean())}
        if on_step is not None:
            on_step(step + 1, logged)
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            write_checkpoint(save, checkpoint, config, optimizer, step + 1, time.perf_counter() - started)
    summary = {"steps": config.steps, **{f"final_{k}": v for k, v in logged.items()},
               "train_seconds": round(time.perf_counter() - started, 1), "device": str(device),
               "images": len(examples)}
    write_final(save, config, summary)
    return summary


@torch.inference_mode()
def _predict(model: PreTrainedModel, preprocess_config: PreprocessConfig, paths: list[Path],
             device: torch.device, batch_size: int) -> np.ndarray:
    """The model's top-1 label index for each image file."""
    predicted = []
    for start in range(0, len(paths), batch_size):
        images = [decode_rgb(path, None) for path in paths[start:start + batch_size]]
        predicted.append(model(pixel_values=pixels(images, preprocess_config, device)).logits.argmax(-1).cpu())
    return torch.cat(predicted).numpy()


def _share(hits: np.ndarray) -> float | None:
    return round(float(hits.mean()), 4) if hits.size else None


def evaluate_classifier(model: str | Path, index: Path, images: Path, device: str = "auto",
                        batch_size: int = 64) -> dict[str, Any]:
    """Top-1 accuracy of `model` (a directory, `default-vit` or a hub id) on a classification index, and its
    accuracy per class. Classes meet model labels by name.

    On a synthetic planted-cue index (`synthetic_classify`) also the shortcut, measured on the images with a
    cue and on the same images re-rendered without it (`write_without_cues`, into a temporary folder):
    `cued_with_cue` / `cued_without_cue`, the cued class's accuracy on its cued images; `others_with_cue` /
    `others_without_cue`, the other classes' accuracy on theirs; `others_with_cue_called_cued`, the share of
    those the model calls the cued class; `top1_without_cue`, top-1 of the no-cue copy."""
    resolved = resolve_device(device)
    path = resolve_model_path(model)
    network = AutoModelForImageClassification.from_pretrained(path).to(resolved).eval()
    preprocess_config = PreprocessConfig.from_dir(Path(path))
    names, examples = labelled_images(index, images)
    label_of = {name: int(i) for i, name in network.config.id2label.items()}
    if missing := sorted(set(names) - set(label_of)):
        raise ValueError(f"the model has no label for the classes {missing}")
    truth = np.array([label_of[names[class_id]] for _, class_id in examples])
    predicted = _predict(network, preprocess_config, [record.path for record, _ in examples], resolved, batch_size)
    result: dict[str, Any] = {
        "images": len(examples), "top1": _share(predicted == truth),
        "per_class": {name: _share(predicted[truth == label_of[name]] == label_of[name]) for name in names},
    }
    raw = json.loads(Path(index).read_text())
    meta = raw.get("synthetic")
    if not isinstance(meta, dict) or meta.get("task") != "classify" or meta.get("counterfactual"):
        return result
    cued_label = label_of[meta["cued_category"]]
    cued_ids = {cue["image_id"] for cue in raw["cues"]}
    has_cue = np.array([record.image_id in cued_ids for record, _ in examples], dtype=bool)
    files = {image.get("id", k + 1): image["file"] for k, image in enumerate(raw["images"])}
    with tempfile.TemporaryDirectory() as tmp:
        copy_root = write_without_cues(index, Path(tmp)).parents[1] / "images" / meta["split"]
        no_cue = _predict(network, preprocess_config, [copy_root / files[record.image_id] for record, _ in examples],
                          resolved, batch_size)
    cued, others = has_cue & (truth == cued_label), has_cue & (truth != cued_label)
    result.update({
        "top1_without_cue": _share(no_cue == truth), "cued_category": meta["cued_category"],
        "cued_with_cue_images": int(cued.sum()), "cued_with_cue": _share(predicted[cued] == truth[cued]),
        "cued_without_cue": _share(no_cue[cued] == truth[cued]),
        "others_with_cue_images": int(others.sum()), "others_with_cue": _share(predicted[others] == truth[others]),
        "others_without_cue": _share(no_cue[others] == truth[others]),
        "others_with_cue_called_cued": _share(predicted[others] == cued_label),
    })
    return result


def main(argv: list[str] | None = None) -> None:
    """`python -m eive_audit.pipeline.train_classify --evaluate MODEL --index FILE --images DIR`: print
    `evaluate_classifier`'s result as one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m eive_audit.pipeline.train_classify", description=main.__doc__)
    parser.add_argument("--evaluate", required=True, metavar="MODEL", help="model directory, default-vit or hub id")
    parser.add_argument("--index", required=True, type=Path, help="classification index (json)")
    parser.add_argument("--images", required=True, type=Path, help="image root of the index")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    print(json.dumps(evaluate_classifier(args.evaluate, args.index, args.images, args.device, args.batch_size)),
          file=sys.stdout)


if __name__ == "__main__":
    main()
