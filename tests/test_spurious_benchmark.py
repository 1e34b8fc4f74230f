"""The planted-cue benchmark's quick mode, run as a user runs it: the real script, audit flow, counterfactual
ground truth, FiftyOne Brain baseline and JSON out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eive_audit.pipeline.config import FindingsConfig

REPO = Path(__file__).resolve().parents[1]
METRICS = {"auroc", "precision@10", "precision@25", "precision@100", "recall@100"}


# slow (`make test-all`): the quick mode audits 120 images with findings and FiftyOne Brain, 80 s of CI's two cores.
# The default suite keeps its parts: findings on the shipped detector's audit (tests/test_findings.py: localised
# peaks of the cued class on the planted cue) and the classification audit ranking cued hexagons first
# (tests/test_classify_audit.py).
@pytest.mark.slow
def test_quick_benchmark_ranks_cue_reliant_instances_first(tmp_path: Path, fiftyone_env: dict[str, str]) -> None:
    env = {**fiftyone_env, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "spurious_recovery.py"), "--quick",
                           "--work", str(tmp_path / "work")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # stdout is the JSON alone: FiftyOne's notices go to stderr
    assert set(result["rankings"]) == {"ours", "random", "1-confidence", "mistakenness", "off-object (normalised)"}
    assert all(set(metrics) == METRICS for metrics in result["rankings"].values())
    assert 0 < result["n_positive"] < result["n_instances"]
    ours = result["rankings"]["ours"]
    baselines = [m["auroc"] for name, m in result["rankings"].items() if name != "ours"]
    # The targets are AUROC >= 0.9 and precision@10 >= 0.8; with the ranking fitted on four worlds of the
    # suite the quick run measured AUROC 0.950, +0.18 over the best baseline (mistakenness 0.771) and
    # precision@10 0.4 (it was 0.7 with the hand-set ranking this one replaced, tuned on this world alone:
    # README "Finding shortcuts" says where the fitted ranking loses). Held one below where they are.
    assert ours["auroc"] >= 0.9 and ours["auroc"] >= max(baselines) + 0.15, result["rankings"]
    assert ours["precision@10"] >= 0.3, result["rankings"]
    # Every instance is verified at the default budget (one forward an image), and what it could not localise
    # is counted; where localised peaks cluster on the cue is tested at a budget that localises more
    # (tests/test_findings.py::test_localised_peaks_of_the_cued_class_sit_on_the_planted_cue).
    assert result["verified"] == result["n_instances"] and 0 < result["localised"] < result["n_instances"]
    assert result["flag_rates"], "flag rates per class"
    rule = f"reach {FindingsConfig().reach_cells}"  # the audit's own rule, beside the raw one it replaced
    assert all(rates["clean"][rule] <= 0.15 for rates in result["flag_rates"].values() if "clean" in rates)
