"""Train or fine-tune a DETR-family detector on a COCO-format dataset with transformers' set loss.

Checkpoints go to `OUT/checkpoint/` every `checkpoint_every` steps (weights, optimizer, step); rerunning
the same command resumes from there. The finished model is a plain `save_pretrained` directory that
every other command loads.

Training from scratch needs trainable batch norm: transformers freezes the backbone's BatchNorm (right
for pretrained backbones, fatal for random ones), so `trainable_batch_norm` swaps in real BatchNorm
while training; the saved state dict keeps the frozen layout, so checkpoints load with the stock class.

Fine-tuning (`init`) onto a dataset whose category names are all labels of the model keeps the model's
head and maps categories by name. Onto any other label set, the model is relabelled first (`relabel`): its
labels become the dataset's categories, and its class head gains a row per category, copied from the old
head where the names agree (those classes are detected from the first step, and a fine-tune that adds one
class does not unlearn the others) and freshly initialised, as transformers initialises a new head, for the
rest. That is transformers' `ignore_mismatched_sizes=True` made to work by name: that option re-initialises
a head only when its size changes, so a dataset with as many categories as the model under other names
would keep the old rows under the new names, and it never carries a row over.

With `aajts` the loss gains the attention terms of `pipeline.aajts` (METHODS.md 1d); without it the step is
exactly transformers' set loss.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torchvision.ops import box_convert
from transformers import PretrainedConfig, PreTrainedModel

from eive_audit.pipeline.aajts import joint_loss, require_dense_attention
from eive_audit.pipeline.config import TrainConfig
from eive_audit.pipeline.models.detr import load_hf_model, resolve_device
from eive_audit.pipeline.models.families import FAMILIES, build_config, save_preprocessor
from eive_audit.pipeline.models.labels import label_to_category
from eive_audit.pipeline.models.locate import resolve_model_path
from eive_audit.pipeline.models.preprocess import PixelBatch, PreprocessConfig, preprocess
from eive_audit.pipeline.sources.coco import CocoSource
from eive_audit.pipeline.sources.decode import decode_rgb
from eive_audit.pipeline.sources.records import ImageRecord

CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE = "trainer_state.pt"


# Settings that may change between an interrupted run and its resumption: where and how fast it runs, how
# often it checkpoints and logs, and how long it goes on (the schedule is a function of the final step count).
RESUMABLE_CHANGES = frozenset({"out", "device", "threads", "checkpoint_every", "log_every", "steps"})


def run_identity(config: TrainConfig) -> str:
    """The settings a checkpoint was trained under, as canonical JSON; a resume must match them."""
    return json.dumps(config.model_dump(mode="json", exclude=set(RESUMABLE_CHANGES)), sort_keys=True)


def trainable_batch_norm(model: nn.Module) -> int:
    """Replace every frozen BatchNorm (buffers only) by a trainable nn.BatchNorm2d with the same stats."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__.endswith("FrozenBatchNorm2d"):
                bn = nn.BatchNorm2d(child.weight.numel()).to(child.weight.device)
                with torch.no_grad():
                    for key in ("weight", "bias", "running_mean", "running_var"):
                        getattr(bn, key).copy_(getattr(child, key))
                setattr(parent, name, bn)
                swapped += 1
    return swapped


def _frozen_layout_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as the stock (frozen-BN) class expects it: no BatchNorm step counters."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def fine_tune_label_map(source: CocoSource, model_labels: dict[int, str]) -> dict[int, int]:
    """Dataset category id -> model label index, matched by name; fine-tuning needs every name to match."""
    mapping, how = label_to_category(model_labels, source.categories)
    if how != "name":
        missing = sorted(set(source.categories.values()) - set(model_labels.values()))
        raise ValueError(f"the model has no label for the dataset categories {missing}")
    return {category: label for label, category in mapping.items()}


def _with_labels(config: PretrainedConfig, names: list[str]) -> PretrainedConfig:
    """A copy of `config` whose labels are `names`, in that order (the label count follows)."""
    config = copy.deepcopy(config)
    config.id2label, config.label2id = dict(enumerate(names)), {name: i for i, name in enumerate(names)}
    return config


def _label_axes(model: PreTrainedModel) -> dict[str, int]:
    """The state-dict tensors that hold one slice per label, and the axis of those slices: the tensors
    whose shape changes in a twin of the model with one label more. Found by shape rather than by name, so
    every family's heads are covered (DETR's classifier with its no-object row, Deformable DETR's per-layer
    heads, RT-DETR's encoder head and denoising embedding); the twin is built on the meta device, so it
    costs neither memory nor an initialisation."""
    config = _with_labels(model.config, [*model.config.id2label.values(), "(one more)"])
    with torch.device("meta"):
        shapes = {key: tensor.shape for key, tensor in type(model)(config).state_dict().items()}
    return {key: next(axis for axis, (a, b) in enumerate(zip(tensor.shape, shapes[key])) if a != b)
            for key, tensor in model.state_dict().items() if tensor.shape != shapes[key]}


def relabel(model: PreTrainedModel, names: list[str]) -> PreTrainedModel:
    """`model` with the labels `names`: every weight kept but the label slices, which are copied where the
    old label of the same name had one and freshly initialised (the library's own init of a new model)
    otherwise. Slices past the labels (DETR's no-object class, RT-DETR's padding embedding) are kept."""
    axes, old_count = _label_axes(model), len(model.config.id2label)
    old_index = {name: int(i) for i, name in model.config.id2label.items()}
    fresh = type(model)(_with_labels(model.config, names))
    kept = [(i, old_index[name]) for i, name in enumerate(names) if name in old_index]
    state = fresh.state_dict()
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key not in axes:
                state[key] = value
                continue
            axis = axes[key]
            extra = [(len(names) + e, old_count + e) for e in range(value.shape[axis] - old_count)]
            if pairs := kept + extra:
                new, old = (torch.tensor(index) for index in zip(*pairs))
                state[key].index_copy_(axis, new, value.index_select(axis, old))
    fresh.load_state_dict(state)
    return fresh


class _TrainSet(torch.utils.data.Dataset):
    """Decoded image (to fit `max_side`, the model's longest input edge; None: full size) and normalised
    cxcywh targets of each valid training record: targets are fractions of the image, so they hold for the
    decoded copy too."""

    def __init__(self, records: list[ImageRecord], cat_to_label: dict[int, int], hflip: bool, seed: int,
                 max_side: int | None = None) -> None:
        self.records, self.cat_to_label, self.hflip, self.seed = records, cat_to_label, hflip, seed
        self.max_side = max_side

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index, step = key
        record = self.records[index]
        image = decode_rgb(record.path, self.max_side)
        boxes = torch.as_tensor(record.boxes).reshape(-1, 4).clone()
        flip = self.hflip and bool(np.random.default_rng([self.seed, step, index]).random() < 0.5)
        if flip:
            image = image.flip(-1)
            boxes[:, [0, 2]] = record.width - boxes[:, [2, 0]]
        scale = torch.tensor([record.width, record.height, record.width, record.height], dtype=torch.float32)
        target = {
            "class_labels": torch.tensor([self.cat_to_label[int(c)] for c in record.labels], dtype=torch.long),
            "boxes": box_convert(boxes / scale, "xyxy", "cxcywh"),
        }
        return image, target


def _batches(n_items: int, batch_size: int, seed: int, start_step: int, steps: int) -> Iterator[list[tuple[int, int]]]:
    """(index, step) keys of each step's batch; a pure function of the step, so a resumed run sees the same data."""
    per_epoch = max(1, n_items // batch_size)
    for step in range(start_step, steps):
        epoch, offset = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n_items)
        yield [(int(i), step) for i in order[offset * batch_size:(offset + 1) * batch_size]]


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    return 0.1 if step >= config.lr_drop_fraction * config.steps else 1.0


def _build_model(config: TrainConfig, source: CocoSource) -> tuple[PreTrainedModel, dict[int, int], PreprocessConfig]:
    if config.init is not None:
        model = load_hf_model(config.init)
        if not set(source.categories.values()) <= set(model.config.id2label.values()):
            model = relabel(model, [source.categories[c] for c in sorted(source.categories)])
        preprocess_config = PreprocessConfig.from_dir(Path(resolve_model_path(config.init)))
        return model, fine_tune_label_map(source, model.config.id2label), preprocess_config
    cat_ids = sorted(source.categories)  # from scratch: one label per category, in id order
    names, cat_to_label = [source.categories[c] for c in cat_ids], {c: i for i, c in enumerate(cat_ids)}
    family = FAMILIES[config.recipe]
    model = family.model_class(build_config(config.recipe, names))
    return model, cat_to_label, PreprocessConfig(family.shortest_edge, family.longest_edge)


def _save(model: PreTrainedModel, out: Path, preprocess_config: PreprocessConfig) -> None:
    """Write a loadable model directory atomically (temp dir, then rename)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=_frozen_layout_state(model))
    save_preprocessor(tmp, preprocess_config.shortest_edge, preprocess_config.longest_edge)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def resume_state(checkpoint: Path, config: TrainConfig, optimizer: torch.optim.Optimizer,
                 device: torch.device) -> tuple[int, float]:
    """Load the optimizer state of `checkpoint` (written by `write_checkpoint`) and return the step it reached
    and the training seconds spent so far; refuse a checkpoint of a run with other settings (`run_identity`)."""
    state = torch.load(checkpoint / TRAINER_STATE, map_location=device, weights_only=True)
    if state.get("identity", run_identity(config)) != run_identity(config):  # older checkpoints have none
        raise ValueError(f"{checkpoint} was written by a run with other settings; remove it or use another --out "
                         f"(checkpoint: {state['identity']})")
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), float(state["elapsed"])


def write_checkpoint(save: Callable[[Path], None], checkpoint: Path, config: TrainConfig,
                     optimizer: torch.optim.Optimizer, step: int, elapsed: float) -> None:
    """The model (`save(directory)`) and what a resume needs: the optimizer, the step, the run's identity."""
    save(checkpoint)
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "identity": run_identity(config),
                "elapsed": elapsed}, checkpoint / TRAINER_STATE)


def write_final(save: Callable[[Path], None], config: TrainConfig, summary: dict[str, Any]) -> None:
    """The trained model in `config.out` with `training_config.json` (config and summary), written beside it
    first and moved in, and the checkpoint removed: an interrupted finish leaves the checkpoint to resume."""
    out = Path(config.out)
    final = out / ".final"
    save(final)
    (final / "training_config.json").write_text(
        json.dumps({"config": json.loads(config.model_dump_json()), "summary": summary}, indent=2)
    )
    for path in final.iterdir():
        path.replace(out / path.name)
    final.rmdir()
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)


def _step_loss(model: PreTrainedModel, batch: PixelBatch, labels: list[dict[str, torch.Tensor]],
               config: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss to minimise and its logged parts: transformers' set loss, plus the AAJTS terms when on."""
    if config.aajts:
        joint = joint_loss(model, batch.pixel_values, batch.pixel_mask, labels, config.lambda_in, config.lambda_stab)
        return joint.total, joint.logged()
    loss = model(pixel_values=batch.pixel_values, pixel_mask=batch.pixel_mask, labels=labels).loss
    return loss, {"loss": float(loss.detach())}


def train(config: TrainConfig, on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
    """Run (or resume) training; `on_step(step, losses)` sees each step's logged losses (`loss`, and with
    AAJTS its parts). Returns a summary with the final losses and wall time."""
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    source = CocoSource(config.coco, config.images)
    records = [r for r in source if isinstance(r, ImageRecord) and len(r.labels) > 0]
    if not records:
        raise ValueError(f"{config.coco}: no readable image with annotations to train on")
    out = Path(config.out)
    checkpoint = out / CHECKPOINT_DIR
    resume = (checkpoint / TRAINER_STATE).exists()
    model, cat_to_label, preprocess_config = _build_model(
        config.model_copy(update={"init": checkpoint}) if resume else config, source
    )
    if config.init is None:
        trainable_batch_norm(model)
        model.requires_grad_(True)  # transformers freezes a ResNet stem meant to be pretrained
    if config.aajts:
        require_dense_attention(model)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start_step, elapsed = resume_state(checkpoint, config, optimizer, device) if resume else (0, 0.0)
    save = functools.partial(_save, model, preprocess_config=preprocess_config)
    dataset = _TrainSet(records, cat_to_label, config.hflip, config.seed, preprocess_config.longest_edge)
    started, logged = time.perf_counter() - elapsed, {"loss": math.nan}
    for keys in _batches(len(records), min(config.batch_size, len(records)), config.seed, start_step, config.steps):
        step = keys[0][1]
        items = [dataset[k] for k in keys]
        batch = preprocess([img for img, _ in items], preprocess_config, device)
        labels = [{k: v.to(device) for k, v in t.items()} for _, t in items]
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(step, config)
        loss, logged = _step_loss(model, batch, labels, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
        optimizer.step()
        if on_step is not None:
            on_step(step + 1, logged)
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            write_checkpoint(save, checkpoint, config, optimizer, step + 1, time.perf_counter() - started)
    summary = {"steps": config.steps, **{f"final_{k}": v for k, v in logged.items()},
               "train_seconds": round(time.perf_counter() - started, 1), "device": str(device),
               "images": len(records)}
    write_final(save, config, summary)
    return summary
