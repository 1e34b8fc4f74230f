"""Throughput and scale of the audit, measured in one run of this script; prints JSON.

- forward: images/s of the bare batched forward (decoded images, no hooks) vs the audit without findings vs
  the audit with findings at the default budget (`shards_seconds` / `findings_seconds` of the run summary,
  so Prefect's start is not in them), for the shipped model and random-init DETR-R50 at 800 px; the headline
  ratio is audit / bare forward.
- workers: audit images/s on 1 and 2 workers of each runner (threads, dask, ray; one torch thread per
  worker, so workers, not intra-op threads, share the cores), the speed-up, and each run's wall time.
- memory: peak RSS of an audit process at 1x, 4x and 16x the dataset (goal: flat).
- prefect: seconds of a flow run's own overhead (the ephemeral server's start, a warm database) and per task.
- duckdb: a filter and a group-by over a store of `--rows` instance rows written as shards by the project's
  writer (goal < 1 s each).

Every audit runs in a fresh process (`--child`), so each peak RSS and start-up is its own.

    python benchmarks/throughput.py [--device cpu|cuda] [--images 16] [--r50-images 4] [--rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CHILD = "--child"


def _dataset(root: Path, n: int, repeat: int = 1) -> tuple[Path, Path]:
    """`n` synthetic val images (the planted-cue world), listed `repeat` times under new ids: `repeat`x the
    dataset without `repeat`x the files."""
    from eive_audit.pipeline.sources.synthetic import generate

    if not (root / "annotations" / "val.json").is_file():
        generate(root, n_train=0, n_val=n, seed=5)
    data = json.loads((root / "annotations" / "val.json").read_text())
    images, annotations = [], []
    for copy in range(repeat):
        offset = copy * 10**6
        images += [{**image, "id": image["id"] + offset} for image in data["images"]]
        annotations += [{**ann, "id": ann["id"] + offset, "image_id": ann["image_id"] + offset}
                        for ann in data["annotations"]]
    path = root / "annotations" / f"val-x{repeat}.json"
    path.write_text(json.dumps({**data, "images": images, "annotations": annotations}))
    return root / "images" / "val", path


def _audit_child(settings: dict[str, Any]) -> dict[str, Any]:
    """In the child: one audit of `settings` (AuditConfig fields); its summary's timings and the peak RSS."""
    from eive_audit.flows.audit import audit
    from eive_audit.pipeline.config import AuditConfig

    started = time.perf_counter()
    summary = audit(AuditConfig(**settings))
    return {"wall_s": round(time.perf_counter() - started, 2), "images": summary["audited"],
            "shards_s": summary["shards_seconds"], "findings_s": summary.get("findings_seconds", 0.0),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def _bare_child(settings: dict[str, Any]) -> dict[str, Any]:
    """In the child: images/s of the model's own batched forward on the decoded dataset (no hooks, no decode)."""
    import torch

    from eive_audit.pipeline.models.detr import DetrAdapter
    from eive_audit.pipeline.sources import open_source
    from eive_audit.pipeline.sources.decode import decode_rgb

    adapter = DetrAdapter.load(settings["model"], settings["device"])
    source = open_source(Path(settings["images"]), Path(settings["coco"]))
    records = [item for image_id in source.image_ids for item in source.read(image_id) if hasattr(item, "path")]
    size = settings["batch_size"]
    batches = [adapter.preprocess([decode_rgb(r.path, adapter.preprocess_config.longest_edge) for r in chunk],
                                  [(r.height, r.width) for r in chunk])
               for chunk in (records[i:i + size] for i in range(0, len(records), size))]

    @torch.inference_mode()
    def run_all() -> None:
        for batch in batches:
            with adapter._autocast():  # noqa: SLF001 - the precision the audit's forward runs in
                adapter.model(pixel_values=batch.pixel_values, pixel_mask=batch.pixel_mask)
        if adapter.device.type == "cuda":
            torch.cuda.synchronize()

    run_all()  # warm-up
    started = time.perf_counter()
    run_all()
    return {"images_per_s": round(len(records) / (time.perf_counter() - started), 3)}


def _prefect_child(settings: dict[str, Any]) -> dict[str, Any]:
    """In the child: a flow run's wall time with nothing in it (the ephemeral server's start), then per task."""
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    import eive_audit.flows  # noqa: F401 - the project's ephemeral server (flows.ephemeral)

    @task
    def nothing(i: int) -> int:
        return i

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=1))
    def tasks(n: int) -> None:
        for future in [nothing.submit(i) for i in range(n)]:
            future.result()

    def seconds(n: int) -> float:
        started = time.perf_counter()
        tasks(n)
        return time.perf_counter() - started

    first = seconds(0)
    empty = sorted(seconds(0) for _ in range(3))[1]
    n = settings["tasks"]
    with_tasks = sorted(seconds(n) for _ in range(3))[1]
    return {"first_run_s": round(first, 2), "next_run_s": round(empty, 3),
            "per_task_ms": round(1000 * (with_tasks - empty) / n, 2)}


def _child(kind: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and return its JSON."""
    done = subprocess.run([sys.executable, __file__, CHILD, kind, json.dumps(settings)], capture_output=True,
                          text=True, env={**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"})
    if done.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _forward_figures(model: str, images: Path, coco: Path, out: Path, device: str, batch_size: int) -> dict[str, Any]:
    base = {"images": str(images), "coco": str(coco), "model": model, "device": device, "batch_size": batch_size,
            "review": {"report": False}}
    bare = _child("bare", base)
    plain = _child("audit", {**base, "out": str(out / "plain"), "findings": {"enabled": False}})
    full = _child("audit", {**base, "out": str(out / "findings")})
    n = plain["images"]
    plain_ips = n / plain["shards_s"]
    full_ips = n / (full["shards_s"] + full["findings_s"])
    return {"images": n, "bare_forward_images_per_s": bare["images_per_s"],
            "audit_images_per_s": round(plain_ips, 3), "audit_with_findings_images_per_s": round(full_ips, 3),
            "audit_over_bare": round(plain_ips / bare["images_per_s"], 3),
            "audit_with_findings_over_bare": round(full_ips / bare["images_per_s"], 3),
            "findings_over_shards_s": round(full["findings_s"] / full["shards_s"], 3)}


def _worker_figures(images: Path, coco: Path, out: Path, device: str) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for runner in ("threads", "dask", "ray"):
        runs = {workers: _child("audit", {"images": str(images), "coco": str(coco), "device": device,
                                          "out": str(out / f"{runner}{workers}"), "runner": runner,
                                          "workers": workers, "torch_threads": 1, "shard_size": 8,
                                          "review": {"report": False}, "findings": {"enabled": False}})
                for workers in (1, 2)}
        ips = {w: run["images"] / run["shards_s"] for w, run in runs.items()}
        figures[runner] = {"images_per_s_1": round(ips[1], 3), "images_per_s_2": round(ips[2], 3),
                           "speedup_2_over_1": round(ips[2] / ips[1], 3),
                           "wall_s_1": runs[1]["wall_s"], "wall_s_2": runs[2]["wall_s"]}
    return figures


def _memory_figures(root: Path, out: Path, n: int, device: str) -> dict[str, Any]:
    peaks = {}
    for repeat in (1, 4, 16):
        images, coco = _dataset(root, n, repeat)
        peaks[repeat] = _child("audit", {"images": str(images), "coco": str(coco), "device": device,
                                         "out": str(out / f"x{repeat}"), "review": {"report": False},
                                         "findings": {"enabled": False}})["peak_rss_mb"]
    return {"images_1x": n, "peak_rss_mb": {f"{k}x": v for k, v in peaks.items()},
            "peak_16x_over_1x": round(peaks[16] / peaks[1], 3)}


def _duckdb_figures(root: Path, rows: int, per_shard: int = 50_000) -> dict[str, Any]:
    """A store of `rows` instance rows in shards of `per_shard` (the project's writer and done markers), then
    the two queries a reviewer runs first, each timed warm (median of 3) through `storage.catalog.query`."""
    import pyarrow as pa

    from eive_audit.storage.catalog import query, refresh_catalog
    from eive_audit.storage.writer import mark_shard_done, write_table

    rng = np.random.default_rng(0)
    outcomes = np.array(["tp", "fp", "dup", "fn"])
    labels = np.array(["square", "disc", "triangle", "bar"])
    started = time.perf_counter()
    for shard_no in range(-(-rows // per_shard)):
        n = min(per_shard, rows - shard_no * per_shard)
        shard = f"s{shard_no:05d}"
        image = rng.integers(0, 10**6, n)
        table = pa.table({
            "instance_id": pa.array([f"{i}-q{j}" for i, j in zip(image, range(n))]), "image_id": image,
            "shard": pa.array([shard] * n), "explainer": pa.array(["eive"] * n), "task": pa.array(["detect"] * n),
            "outcome": outcomes[rng.integers(0, 4, n)], "query": rng.integers(0, 100, n).astype(np.int32),
            "label_name": labels[rng.integers(0, 4, n)], "score": rng.random(n, np.float32),
            **{f"pred_{c}": rng.random(n, np.float32) * 100 for c in ("x0", "y0", "x1", "y1")},
            "off_object_norm": rng.random(n, np.float32), "spurious_score": rng.random(n, np.float32)})
        write_table(root, "instances", "bench", shard, table)
        mark_shard_done(root, "bench", shard)
    refresh_catalog(root)  # as a run does
    write_s = time.perf_counter() - started
    statements = {
        "filter": "SELECT count(*) AS n FROM instances WHERE outcome = 'fp' AND off_object_norm > 0.4 AND score > 0.5",
        "group_by": "SELECT label_name, outcome, count(*) AS n, avg(score) AS mean_score, "
                    "max(spurious_score) AS worst FROM instances GROUP BY ALL ORDER BY ALL"}
    seconds = {}
    for name, sql in statements.items():
        times = []
        for _ in range(3):
            started = time.perf_counter()
            query(root, sql)
            times.append(time.perf_counter() - started)
        seconds[f"{name}_s"] = round(sorted(times)[1], 3)
    return {"rows": rows, "shards": -(-rows // per_shard), "write_s": round(write_s, 1), **seconds}


def _r50(work: Path) -> Path:
    """Random-init DETR-R50 of the published architecture (weights do not change the cost)."""
    from eive_audit.pipeline.models.families import write_random_model

    return write_random_model("detr-r50", [f"LABEL_{i}" for i in range(80)], work / "r50")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=16, help="images of the shipped model's runs (1x)")
    parser.add_argument("--r50-images", type=int, default=4, help="images of the DETR-R50 runs")
    parser.add_argument("--rows", type=int, default=1_000_000, help="instance rows of the DuckDB store")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: forward,workers,memory,"
                                                   "prefect,duckdb")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    results: dict[str, Any] = {"device": args.device, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        images, coco = _dataset(work / "data", args.images)
        parts = {
            "forward": lambda: {
                "shipped": _forward_figures("default", images, coco, work / "shipped", args.device, 8),
                "detr_r50_800px": _forward_figures(str(_r50(work)), *_dataset(work / "r50-data", args.r50_images),
                                                   work / "r50-runs", args.device, 2)},
            "workers": lambda: _worker_figures(images, coco, work / "workers", args.device),
            "memory": lambda: _memory_figures(work / "data", work / "memory", args.images, args.device),
            "prefect": lambda: _child("prefect", {"tasks": 400}),
            "duckdb": lambda: _duckdb_figures(work / "duckdb", args.rows)}
        for name, measure in parts.items():
            if name not in skip:
                results[name] = measure()
                print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)  # kept if a later part fails
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        kind, settings = sys.argv[2], json.loads(sys.argv[3])
        print(json.dumps({"audit": _audit_child, "bare": _bare_child, "prefect": _prefect_child}[kind](settings)))
    else:
        main()
