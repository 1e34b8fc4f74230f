"""What EIVE costs on top of the detector's own forward, measured in one process.

Random-init DETR-R50 at 800 px (the published architecture; weights do not change the cost), batch 4.
Times (median of --repeats, interleaved): the bare batched forward; the adapter's forward with attention
capture; that plus postprocess and EIVE (CLHCF) over every kept instance; and EIVE's explain() alone on a
fixed forward (the cleanest figure on a noisy CPU). Prints JSON with the ratios.

    python benchmarks/eive_overhead.py [--repeats 5] [--max-detections 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from eive_audit.explainers import get_explainer
from eive_audit.pipeline.models.detr import DetrAdapter
from eive_audit.pipeline.models.families import write_random_model
from eive_audit.pipeline.models.targets import Targets


def _interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each function, timed in turn within every repeat so machine drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up: first-call allocations and lazy hooks
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def measure(repeats: int, max_detections: int, batch_size: int = 4) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        adapter = DetrAdapter.load(write_random_model("detr-r50", [f"LABEL_{i}" for i in range(80)], Path(tmp)))
    torch.manual_seed(0)
    images = [torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8) for _ in range(batch_size)]
    batch = adapter.preprocess(images)
    eive = get_explainer("eive")

    @torch.inference_mode()
    def bare() -> object:
        with adapter._autocast():
            return adapter.model(pixel_values=batch.pixel_values, pixel_mask=batch.pixel_mask)

    def targets_of(output) -> Targets:
        dets = adapter.postprocess(output, batch, score_threshold=0.0, max_detections=max_detections)
        index = torch.cat([torch.full_like(d.queries, i) for i, d in enumerate(dets)]).to(adapter.device)
        queries = torch.cat([d.queries for d in dets]).to(adapter.device)
        labels = torch.cat([d.labels for d in dets]).to(adapter.device)
        return Targets(index, queries, labels, output.boxes[index, queries].float())

    @torch.inference_mode()
    def with_eive() -> torch.Tensor:
        output = adapter.forward(batch)
        return eive.explain(adapter, batch, output, targets_of(output))

    @torch.inference_mode()
    def captured() -> object:
        return adapter.forward(batch)

    medians = _interleaved_medians({"bare": bare, "capture": captured, "eive": with_eive}, repeats, adapter.device)
    t_bare, t_capture, t_eive = medians["bare"], medians["capture"], medians["eive"]
    with torch.inference_mode():
        output = adapter.forward(batch)
        fixed_targets = targets_of(output)
        t_explain = _interleaved_medians({"explain": lambda: eive.explain(adapter, batch, output, fixed_targets)},
                                         4 * repeats, adapter.device)["explain"]
    return {
        "model": "detr-r50 (random init)", "input": list(batch.pixel_values.shape), "device": str(adapter.device),
        "instances": batch_size * max_detections, "repeats": repeats,
        "bare_forward_s": round(t_bare, 4), "forward_with_attention_s": round(t_capture, 4),
        "forward_plus_eive_s": round(t_eive, 4), "explain_only_s": round(t_explain, 5),
        "eive_over_forward_ratio": round(t_eive / t_bare, 4),
        "eive_added_fraction": round((t_eive - t_bare) / t_bare, 4),
        "explain_over_forward_ratio": round(t_explain / t_bare, 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-detections", type=int, default=10)
    args = parser.parse_args()
    print(json.dumps(measure(args.repeats, args.max_detections)))


if __name__ == "__main__":
    main()
