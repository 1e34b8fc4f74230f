"""Training AHA for a frozen model: `train-explainer` through the real CLI and Prefect flow writes an explainer
directory that `run --explainer aha --aha-model DIR` reads; an audit of another model with it is refused in one
line before any image is read; an interrupted training resumes to exactly the weights of an uninterrupted one.
(What AHA learns is tests/test_aha.py's; the shipped explainers' quality is benchmarks/aha.py's.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli import invoke, run_ok
from interrupt import Interrupted, crash_at
from eive_audit.pipeline.config import ExplainerTrainConfig
from eive_audit.pipeline.models.aha import AHA_CONFIG, AHA_WEIGHTS, weights_fingerprint
from eive_audit.pipeline.models.vit import ViTAdapter
from eive_audit.pipeline.sources.synthetic_classify import generate_classify
from eive_audit.pipeline.train import CHECKPOINT_DIR
from eive_audit.pipeline.train_explainer import train_aha
from eive_audit.storage.catalog import query


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("aha_data")
    generate_classify(root, n_train=8, n_val=4, seed=21)
    return root


def _config(data: Path, out: Path, **changes: object) -> ExplainerTrainConfig:
    settings = {"model": "default-vit", "index": data / "annotations" / "train.json", "images": data / "images" / "train",
                "out": out, "steps": 4, "batch_size": 2, "grid_min": 3, "grid_max": 6, "percentiles": 6,
                "checkpoint_every": 2, "warmup_steps": 1, "device": "cpu", "threads": 1, **changes}
    return ExplainerTrainConfig(**settings)


def test_train_explainer_writes_a_directory_the_audit_reads_and_another_model_refuses(data: Path, synth: Path,
                                                                                      tmp_path: Path) -> None:
    out = tmp_path / "aha"
    result = invoke("train-explainer", "--model", "default-vit", "--index", data / "annotations" / "train.json",
                    "--images", data / "images" / "train", "--out", out, "--steps", "2", "--batch-size", "2",
                    "--grid-min", "3", "--grid-max", "6", "--percentiles", "6", "--device", "cpu", "--threads", "1",
                    "--log-every", "1")
    assert result.code == 0, result.stderr[-3000:]
    assert re.findall(r"step (\d)/2 loss \d+\.\d+ deletion \d\.\d+ insertion \d\.\d+ peak", result.stderr) == ["1", "2"]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["images"] == 8
    assert {p.name for p in out.iterdir()} == {AHA_CONFIG, AHA_WEIGHTS, "training_config.json"}
    meta = json.loads((out / AHA_CONFIG).read_text())
    assert meta["target"]["fingerprint"] == weights_fingerprint(ViTAdapter.load("default-vit", "cpu").model)
    assert meta["loss"]["percentiles"] == 6 and meta["architecture"]["task"] == "classify"

    store = tmp_path / "store"
    run = run_ok("--task", "classify", "--index", data / "annotations" / "val.json", "--images", data / "images" / "val",
                 "--out", store, "--explainer", "aha", "--aha-model", out, "--aha-refine-steps", "1",
                 "--no-findings", "--no-report", "--device", "cpu")
    rows = query(store, "SELECT explainer, grid_h, grid_w, \"map\" FROM maps WHERE run_id = ?", [run["run_id"]]).to_pylist()
    assert len(rows) >= 4 and {r["explainer"] for r in rows} == {"aha"} and {(r["grid_h"], r["grid_w"]) for r in rows} == {(12, 12)}

    refused = invoke("run", "--coco", synth / "annotations" / "val.json", "--images", synth / "images" / "val",
                     "--out", tmp_path / "other", "--explainer", "eive,aha", "--explainer-model", out, "--device", "cpu")
    assert refused.code == 2 and "trained for another model" in refused.stderr, refused.stderr
    assert not any(p.is_file() for p in (tmp_path / "other").rglob("*")), "refused before anything is written"


def test_an_interrupted_training_resumes_to_the_weights_of_an_uninterrupted_one(data: Path, tmp_path: Path) -> None:
    train_aha(_config(data, tmp_path / "straight"))
    with pytest.raises(Interrupted):
        train_aha(_config(data, tmp_path / "resumed"), on_step=crash_at(3))
    assert (tmp_path / "resumed" / CHECKPOINT_DIR).is_dir()
    with pytest.raises(ValueError, match="written by a run with other settings"):
        train_aha(_config(data, tmp_path / "resumed", tau_end=0.5))
    seen: list[int] = []
    train_aha(_config(data, tmp_path / "resumed"), on_step=lambda step, _logged: seen.append(step))
    assert seen == [3, 4], "the rerun starts after the last checkpoint"
    straight, resumed = (load_file(tmp_path / name / AHA_WEIGHTS) for name in ("straight", "resumed"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-5, rtol=1e-4, msg=key)
