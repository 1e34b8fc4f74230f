"""`eive-audit diff` and a run's diff against the previous run of its dataset (reports.diff), as a scheduled
audit meets it: the same dataset audited first without the planted cue (every image re-rendered without
it), then with it, and the second run fails on `--fail-on new_confirmed_cues>0` after writing everything."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
from cli import invoke, run_ok

from eive_audit.pipeline.config import DIFF_METRICS
from eive_audit.pipeline.sources.synthetic import CUED_CATEGORY, render_counterfactual
from eive_audit.storage.catalog import query

IMAGES = 40  # fewer (24) leave the planted cue short of findings.min_support among the localised instances

pytestmark = pytest.mark.xdist_group("diff")


class Runs(NamedTuple):
    store: Path
    base: str  # the dataset without the cue
    run: str  # the same dataset with it
    failed: object  # the second run's CLI result


@pytest.fixture(scope="module")
def runs(synth: Path, synth_val_subset: Callable[[int, Path], Path], shipped_audit_yaml: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("diff")
    ann = synth_val_subset(IMAGES, root / "val.json")
    images = root / "images"
    images.mkdir()
    files = [image["file_name"] for image in json.loads(ann.read_text())["images"]]
    for image in json.loads(ann.read_text())["images"]:
        render_counterfactual(synth / "annotations" / "val.json", image["id"]).save(images / image["file_name"])
    common = ["--config", shipped_audit_yaml, "--images", images, "--coco", ann, "--out", root / "store"]
    base = run_ok(*common)["run_id"]
    for name in files:  # the cue arrives: the same files, now as rendered with it
        shutil.copyfile(synth / "images" / "val" / name, images / name)
    stat = ann.stat()
    os.utime(ann, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new annotation stamp: a new run
    failed = invoke("run", *common, "--report", "--fail-on", "new_confirmed_cues>0")
    run = json.loads(failed.stdout.strip().splitlines()[-1])["run_id"]
    return Runs(root / "store", base, run, failed)


def _diff(store: Path, *args: str) -> dict:
    result = invoke("diff", "--store", store, *args)
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


def test_a_run_meeting_its_fail_on_condition_exits_1_with_one_line_and_stays_finished(runs: Runs) -> None:
    assert runs.failed.code == 1 and runs.failed.stderr.count("error:") == 1, runs.failed.stderr
    assert f"error: fail-on: new_confirmed_cues>0 against base run {runs.base}" in runs.failed.stderr
    summary = json.loads(runs.failed.stdout.strip().splitlines()[-1])
    assert summary["diff"]["base"] == runs.base and summary["diff"]["summary"]["new_confirmed_cues"] >= 1
    status = query(runs.store, "SELECT run_id, status FROM runs ORDER BY finished_at").to_pylist()
    assert status == [{"run_id": runs.base, "status": "finished"}, {"run_id": runs.run, "status": "finished"}]


def test_the_diff_against_the_previous_run_reports_the_new_planted_cue(runs: Runs) -> None:
    diff = _diff(runs.store)  # defaults: the latest finished run, against the previous run of its dataset
    assert (diff["base"], diff["run"]) == (runs.base, runs.run)
    assert set(diff["summary"]) == set(DIFF_METRICS)
    cued = [cue for cue in diff["cues"]["appeared"] if cue["label_name"] == CUED_CATEGORY and cue["confirmed"]]
    assert cued, diff["cues"]
    planted = query(runs.store, "SELECT cue_id FROM findings WHERE run_id = ? AND label_name = ? AND confirmed",
                    [runs.run, CUED_CATEGORY]).column("cue_id").to_pylist()
    assert {cue["cue_id"] for cue in cued} <= set(planted)
    back = _diff(runs.store, "--base", runs.run, "--run", runs.base)
    assert {cue["cue_id"] for cue in cued} <= {cue["cue_id"] for cue in back["cues"]["vanished"]}
    held = invoke("diff", "--store", runs.store, "--fail-on", "new_confirmed_cues>0")
    assert held.code == 1 and "error: fail-on: new_confirmed_cues>0 holds" in held.stderr


def test_a_run_diffed_against_itself_is_empty(runs: Runs) -> None:
    diff = _diff(runs.store, "--base", runs.run, "--run", runs.run)
    assert all(value == 0 for value in diff["summary"].values()), diff["summary"]
    assert diff["newly_flagged"] == diff["no_longer_flagged"] == []
    assert all(cues == [] for cues in diff["cues"].values())
    assert diff["classes"] and all(shift[measure]["shift"] in (0, None) for shift in diff["classes"]
                                   for measure in ("mass_in_gt", "insertion_auc", "precision", "recall"))


def test_the_report_and_the_prefect_artifact_say_what_changed(runs: Runs) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    cue = _diff(runs.store)["cues"]["appeared"][0]["cue_id"]
    report = (runs.store / "reports" / f"{runs.run}.html").read_text()
    assert f"Changes since run {runs.base}" in report and cue in report
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=[f"audit-{runs.run}-diff"])))
        assert cue in artifact.data and "new_confirmed_cues" in artifact.data
        assert client.read_flow_run(artifact.flow_run_id).state.is_failed(), "alerts can follow the flow run"


def test_a_run_without_an_earlier_run_of_its_dataset_has_nothing_to_diff(runs: Runs) -> None:
    result = invoke("diff", "--store", runs.store, "--run", runs.base)
    assert result.code == 2 and f"run {runs.base} has no earlier finished run of the same dataset" in result.stderr


@pytest.mark.parametrize(("condition", "holds"), [
    ("new_cues>0", True), ("new_cues>=2", True), ("new_cues>2", False), ("vanished_cues==0", True),
    ("vanished_cues!=0", False), ("recall_drop<0.05", False), ("recall_drop<=0.25", True),
])
def test_fail_on_conditions_compare_the_diff_summary(condition: str, holds: bool) -> None:
    from eive_audit.pipeline.config import ReviewConfig
    from eive_audit.reports.diff import breached

    [parsed] = ReviewConfig(fail_on=condition).fail_on
    summary = dict.fromkeys(DIFF_METRICS, 0) | {"new_cues": 2, "recall_drop": 0.25}
    assert breached({"summary": summary}, [parsed]) == ([parsed] if holds else [])
