"""What one very large image costs an audit: peak memory and wall time of `eive-audit run` on one generated
W x H JPEG, with and without the HTML report, as a ratio to the same scene at 640 x 480.

The scene is a synthetic planted-cue val image (128 px) enlarged to each size, its boxes scaled with it, so
the model sees the same content at every size. Each audit is its own `eive-audit run` process with the
shipped model; its peak resident memory is that process's `ru_maxrss` (os.wait4), its time the wall clock
around it. Prints JSON:
  {"large": "12000x9000", "runs": {"<size>/<report|no-report>": {"peak_mb", "seconds"}, ...},
   "ratio": {"report": {"peak_mb", "seconds"}, "no-report": {...}}}

    python benchmarks/large_image.py                      # 12000 x 9000 vs 640 x 480, both with and without report
    python benchmarks/large_image.py --large 4000x3000 --no-report-only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from eive_audit.pipeline.sources.synthetic import generate

SMALL = (640, 480)


def _size(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def write_dataset(scene_dir: Path, out: Path, size: tuple[int, int]) -> Path:
    """The synthetic scene `scene_dir` (one val image) enlarged to `size` as a JPEG, with its COCO json."""
    dataset = json.loads((scene_dir / "annotations" / "val.json").read_text())
    entry = dataset["images"][0]
    sx, sy = size[0] / entry["width"], size[1] / entry["height"]
    with Image.open(scene_dir / "images" / "val" / entry["file_name"]) as scene:
        big = scene.convert("RGB").resize(size, Image.BICUBIC)
    (out / "images").mkdir(parents=True, exist_ok=True)
    big.save(out / "images" / "scene.jpg", quality=90)
    del big
    entry |= {"file_name": "scene.jpg", "width": size[0], "height": size[1]}
    for ann in dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        ann["bbox"] = [x * sx, y * sy, w * sx, h * sy]
        ann["area"] = w * sx * h * sy
    dataset.pop("cues", None)  # in 128-px units; the audit does not read them
    (out / "val.json").write_text(json.dumps(dataset))
    return out / "val.json"


def audit(data: Path, store: Path, report: bool, env: dict[str, str]) -> dict[str, float]:
    """Peak RSS (MB) and wall seconds of one `eive-audit run` process on `data`."""
    command = [sys.executable, "-m", "eive_audit.cli", "run", "--coco", str(data / "val.json"),
               "--images", str(data / "images"), "--model", "default", "--out", str(store),
               "--report" if report else "--no-report"]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = process.stderr.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr.decode()[-3000:]}")
    return {"peak_mb": round(usage.ru_maxrss / 1024, 1), "seconds": round(seconds, 1)}  # ru_maxrss is in KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", type=_size, default=(12000, 9000), help="W x H of the large image")
    parser.add_argument("--no-report-only", action="store_true", help="skip the runs with the HTML report")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    modes = [False] if args.no_report_only else [False, True]
    runs: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(root / "scene", n_train=0, n_val=1, seed=args.seed)
        sizes = {"small": SMALL, "large": args.large}
        for name, size in sizes.items():
            data = write_dataset(root / "scene", root / name, size)
            for report in modes:
                label = f"{size[0]}x{size[1]}/{'report' if report else 'no-report'}"
                runs[label] = audit(data.parent, root / f"store-{name}-{report}", report, env)
                print(label, runs[label], file=sys.stderr, flush=True)
    small, large = (f"{w}x{h}" for w, h in sizes.values())
    ratio = {mode: {k: round(runs[f"{large}/{mode}"][k] / runs[f"{small}/{mode}"][k], 2) for k in ("peak_mb", "seconds")}
             for mode in ("no-report", "report")[:len(modes)]}
    print(json.dumps({"large": large, "small": small, "runs": runs, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
