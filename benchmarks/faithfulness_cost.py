"""What deletion / insertion costs per instance, as a ratio to one bare forward, batched vs naive.

For each model: EIVE maps of the top detections of a few images, then deletion and insertion AUC for every
instance twice, once with all perturbed images in large batches and once the naive way (one instance at a
time, one perturbed image per forward). Both must give the same AUCs. Prints JSON.

    python benchmarks/faithfulness_cost.py            # shipped model + random-init DETR-R50, CPU-sized
    python benchmarks/faithfulness_cost.py --steps 20 --detr-images 4 --detr-batch 32   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from eive_audit.explainers import get_explainer
from eive_audit.pipeline.metrics.faithfulness import FaithfulnessConfig, deletion_insertion
from eive_audit.pipeline.models.detr import DetrAdapter
from eive_audit.pipeline.models.families import write_random_model
from eive_audit.pipeline.models.targets import Targets
from eive_audit.pipeline.sources.synthetic import SynthParams, make_scene, render


def _seconds(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


@torch.inference_mode()
def measure(adapter: DetrAdapter, images: list[torch.Tensor], per_image: int, steps: int, batch: int) -> dict[str, float]:
    pixels = adapter.preprocess(images)
    output = adapter.forward(pixels)
    dets = adapter.postprocess(output, pixels, score_threshold=0.0, max_detections=per_image)
    index = torch.cat([torch.full_like(d.queries, i) for i, d in enumerate(dets)]).to(adapter.device)
    queries = torch.cat([d.queries for d in dets]).to(adapter.device)
    targets = Targets(index, queries, torch.cat([d.labels for d in dets]).to(adapter.device),
                      output.boxes[index, queries].float())
    maps = get_explainer("eive").explain(adapter, pixels, output, targets)
    single = adapter.preprocess(images[:1])
    adapter.predict(single.pixel_values, single.pixel_mask)  # warm-up
    bare = statistics.median(_seconds(lambda: adapter.predict(single.pixel_values, single.pixel_mask))[0] for _ in range(3))

    def run(config: FaithfulnessConfig, t: Targets, m: torch.Tensor):
        return deletion_insertion(adapter.predict, pixels.pixel_values, pixels.pixel_mask, m, t, config)

    t_batched, batched = _seconds(lambda: run(FaithfulnessConfig(steps=steps, batch_size=batch), targets, maps))

    def naive() -> list:
        return [run(FaithfulnessConfig(steps=steps, batch_size=1),
                    Targets(*(x[k:k + 1] for x in (targets.batch_index, targets.query, targets.label, targets.box))),
                    maps[k:k + 1]) for k in range(len(targets))]

    t_naive, singles = _seconds(naive)
    gap = max(abs(float(a.insertion_auc[0]) - float(b)) for a, b in zip(singles, batched.insertion_auc))
    n = len(targets)
    return {"instances": n, "steps": steps, "forwards_per_instance": 2 * (steps + 1), "batch_size": batch,
            "bare_forward_s": round(bare, 4),
            "batched_per_instance_over_forward": round(t_batched / n / bare, 2),
            "naive_per_instance_over_forward": round(t_naive / n / bare, 2),
            "naive_over_batched": round(t_naive / t_batched, 2), "max_auc_difference": gap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--small-images", type=int, default=4)
    parser.add_argument("--detr-images", type=int, default=1)
    parser.add_argument("--detr-steps", type=int, default=4)
    parser.add_argument("--detr-batch", type=int, default=10)
    args = parser.parse_args()
    params = SynthParams()
    synthetic = [torch.from_numpy(np.asarray(render(make_scene(99, "val", i, params), params))).permute(2, 0, 1)
                 for i in range(args.small_images)]
    report = {"device": "cuda" if torch.cuda.is_available() else "cpu",
              "shipped": measure(DetrAdapter.load("default"), synthetic, 5, args.steps, 64)}
    with tempfile.TemporaryDirectory() as tmp:
        detr = DetrAdapter.load(write_random_model("detr-r50", [f"LABEL_{i}" for i in range(80)], Path(tmp)))
    photos = [torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8) for _ in range(args.detr_images)]
    report["detr_r50_random"] = measure(detr, photos, 2, args.detr_steps, args.detr_batch)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
