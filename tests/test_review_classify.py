"""Reviewing a classification run: the FiftyOne push (Classification labels, the index's object boxes, the
predicted class's heatmap, saved views holding what SQL's flag columns hold, `evaluate_classifications`), the
HTML report in a classifier's words (cards with the object box and no whole-image box, as Chromium renders
them) and the Prefect artifacts' words.

One small audit for the module: a random-init ViT (`vit-synth`) on 16 synthetic planted-cue images, whose
predictions are mostly wrong, so every outcome (correct, wrong, missed) is there. FiftyOne runs in subprocesses
against the session's mongod, as in test_fiftyone_push.py.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eive_audit.reports.artifacts import summary_markdown, worst_detections
from eive_audit.reports.plots import GT_COLOUR, PRED_COLOUR
from eive_audit.reports.views import (FP_BACKGROUND, LOWEST_INSERTION_AUC, MISSED, TP_OFF_OBJECT, cue_view,
                                      explainer_view, view_name)
from eive_audit.storage.catalog import query
from test_fiftyone_push import _python
from test_report import CHROMIUM, _chromium, _section, _Tags

CLASSES = ["circle", "square", "triangle", "hexagon"]
N_VAL = 16
DATASET = "classify-review"
TOP_FAILURES = 6

pytestmark = pytest.mark.xdist_group("review-classify")  # one audited classification run for the module


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """(store, run id, index) of a classification audit: LeGrad, findings at a 0.05 off-object share (the
    random model looks everywhere: most instances are flagged), a faithfulness sample for the AUC view."""
    from eive_audit.flows.audit import audit
    from eive_audit.pipeline.config import AuditConfig
    from eive_audit.pipeline.models.families import write_random_model
    from eive_audit.pipeline.sources.synthetic_classify import generate_classify

    root = tmp_path_factory.mktemp("classify_review")
    model = write_random_model("vit-synth", CLASSES, root / "model")
    index = generate_classify(root, 0, N_VAL, seed=5)["val"]
    summary = audit(AuditConfig(task="classify", images=root / "images" / "val", index=index, out=root / "store",
                                model=str(model), explainers=["legrad"], device="cpu",
                                findings={"off_object": 0.05, "min_support": 2},
                                faithfulness={"instances": "sample:6", "steps": 5}, review={"report": False}))
    return root / "store", summary["run_id"], index


def _rows(store: Path, sql: str, *params: object) -> list[dict]:
    return query(store, sql, list(params)).to_pylist()


# ---------------------------------------------------------------- the FiftyOne push

PUSH = """
import json, sys
from dataclasses import replace
from pathlib import Path
import fiftyone as fo
from eive_audit.reports.fiftyone_push import _classified_samples, _load_run, push_run
from eive_audit.storage.catalog import query

args = json.loads(sys.argv[1])
result = push_run(args["store"], args["run"], args["dataset"])
run = replace(_load_run(Path(args["store"]), args["run"]), index=None)  # as if the index were gone: the rows' truth
image_rows = query(args["store"], "SELECT * FROM images WHERE run_id = ? AND status = 'ok'", [args["run"]]).to_pylist()
without_index, _ = _classified_samples(Path(args["store"]), run, image_rows, query(
    args["store"], "SELECT * FROM instances WHERE run_id = ?", [args["run"]]))
detections = fo.Dataset(args["dataset"] + "-detect")  # a detection run's layout: a classify push is refused
detections.add_sample(fo.Sample(filepath="/x.png", predictions=fo.Detections()))
fo.Dataset(args["dataset"] + "-detect-instances")
try:
    push_run(args["store"], args["run"], args["dataset"] + "-detect")
    refused = None
except ValueError as error:
    refused = str(error)

images, instances = fo.load_dataset(args["dataset"]), fo.load_dataset(args["dataset"] + "-instances")
label = lambda c: None if c is None else {k: v for k, v in c.to_dict().items() if not k.startswith("_")}
boxes = lambda d: None if d is None else [[o.label, *o.bounding_box] for o in d.detections]
views = sorted(set(images.list_saved_views()) | set(instances.list_saved_views()))
missed = images.load_saved_view(args["missed"])
print(json.dumps({
    "push": result, "refused": refused,
    "images": [{"image_id": s.image_id, "filepath": s.filepath, "truth": label(s.ground_truth),
                "prediction": label(s.prediction), "missed": label(s.missed), "objects": boxes(s.objects),
                "heatmap": s.heatmap_legrad.map_path, "eval": s[result["eval_key"]],
                "cue_peak": [[k.label, k["audit_instance_id"], *k.points[0]] for k in s.cue_peak.keypoints]
                            if s.cue_peak else []} for s in images],
    "instances": [{"instance_id": s.instance_id, "explainer": s.explainer, "outcome": s.outcome,
                   "label_name": s.label_name, "run_id": s.run_id, "insertion_auc": s.insertion_auc,
                   "flag_reason": s.flag_reason, "prediction": label(s.prediction), "truth": label(s.ground_truth),
                   "objects": boxes(s.objects), "heatmap": s.heatmap.map_path} for s in instances],
    "schema": {name: field.document_type.__name__ for name, field in images.get_field_schema().items()
               if hasattr(field, "document_type")},
    "views": {n: [len(ds.load_saved_view(n)) if ds.has_saved_view(n) else None for ds in (images, instances)]
              for n in views},
    "image_order": images.load_saved_view(args["lowest"]).values("image_id"),
    "instance_order": instances.load_saved_view(args["lowest"]).values("instance_id"),
    "without_index": {s.filepath: [s.ground_truth.label, boxes(s.objects)] for s in without_index},
    "missed_view": [missed.count("prediction"), missed.count("missed"), missed.has_field("ground_truth")],
    "evaluations": images.list_evaluations(),
    "app": [sorted(ds.app_config.active_fields.paths) + [ds.app_config.color_scheme.color_by]
            for ds in (images, instances)],
}))
"""


@pytest.fixture(scope="module")
def pushed(run: tuple[Path, str, Path], fiftyone_env: dict[str, str]) -> dict:
    """The run pushed to DATASET and read back, and its image samples as a push without the index would make
    them, in one subprocess (one FiftyOne start for the module)."""
    store, run_id, _ = run
    return _python(PUSH, json.dumps({"store": str(store), "run": run_id, "dataset": DATASET,
                                     "missed": view_name(run_id, MISSED),
                                     "lowest": view_name(run_id, LOWEST_INSERTION_AUC)}), env=fiftyone_env)


def _index(index: Path) -> dict[str, dict]:
    """The index's images by resolved file path."""
    data = json.loads(index.read_text())
    return {str((index.parent.parent / "images" / "val" / image["file"]).resolve()): image for image in data["images"]}


def test_one_image_sample_per_image_with_its_true_class_prediction_and_object_boxes(run: tuple[Path, str, Path],
                                                                                     pushed: dict) -> None:
    store, run_id, index = run
    truth = _index(index)
    rows = {(r["image_id"], r["outcome"]): r for r in _rows(store, "SELECT * FROM instances WHERE run_id = ?", run_id)}
    outcomes = {outcome for _, outcome in rows}
    assert outcomes == {"correct", "wrong", "missed"}, "the random model gets some right, most wrong"
    assert pushed["push"]["images"] == N_VAL == len(pushed["images"])
    assert pushed["push"]["instances"] == len(rows) == len(pushed["instances"]), "one explainer: a sample a row"
    assert {k: pushed["schema"][k] for k in ("ground_truth", "prediction", "missed", "objects", "heatmap_legrad")} == {
        "ground_truth": "Classification", "prediction": "Classification", "missed": "Classification",
        "objects": "Detections", "heatmap_legrad": "Heatmap"}
    for sample in pushed["images"]:
        entry = truth[str(Path(sample["filepath"]).resolve())]
        assert sample["truth"]["label"] == entry["label"], "the true class, from the index"
        assert sample["objects"] == [[entry["label"], x0 / 96, y0 / 96, (x1 - x0) / 96, (y1 - y0) / 96]
                                     for x0, y0, x1, y1 in entry["boxes"]], "the index's object boxes, relative"
        prediction = sample["prediction"]
        row = rows.get((sample["image_id"], "correct")) or rows[(sample["image_id"], "wrong")]
        assert (prediction["label"], prediction["confidence"], prediction["outcome"], prediction["audit_instance_id"]) \
            == (row["label_name"], row["score"], row["outcome"], row["instance_id"])
        for column in ("mass_in_gt", "off_object_norm", "flag_off_object", "flag_background_fp", "spurious_score",
                       "insertion_auc", "flag_reason"):
            assert prediction[column] == row[column], column
        assert sample["eval"] == (row["outcome"] == "correct"), "evaluate_classifications agrees with the audit"
        if row["outcome"] == "wrong":
            miss = rows[(sample["image_id"], "missed")]
            assert (sample["missed"]["label"], sample["missed"]["confidence"], sample["missed"]["outcome"]) == (
                entry["label"], miss["score"], "missed"), "the true class the model should have said"
            assert sample["missed"]["flag_miss_elsewhere"] == miss["flag_miss_elsewhere"]
        else:
            assert sample["missed"] is None
        peaks = [[r["label_name"], r["instance_id"], r["peak_x"] / 96, r["peak_y"] / 96] for r in rows.values()
                 if r["image_id"] == sample["image_id"] and r["peak_x"] is not None]
        assert sorted(sample["cue_peak"]) == sorted(peaks)
    assert pushed["push"]["eval_key"] == f"eval_{run_id}" and pushed["evaluations"] == [f"eval_{run_id}"]


def test_without_the_index_the_truth_comes_from_the_rows(run: tuple[Path, str, Path], pushed: dict) -> None:
    """The true class of the correct or missed row, and the one object box the rows were scored against (the
    largest of the image's class)."""
    store, run_id, index = run
    truth = _index(index)
    assert len(pushed["without_index"]) == N_VAL
    for filepath, (label, objects) in pushed["without_index"].items():
        entry = truth[str(Path(filepath).resolve())]
        largest = max(entry["boxes"], key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
        x0, y0, x1, y1 = largest
        ((box_label, *box),) = objects
        assert label == box_label == entry["label"]
        assert box == pytest.approx([x0 / 96, y0 / 96, (x1 - x0) / 96, (y1 - y0) / 96], abs=1e-5)


def test_instance_samples_explain_their_class_beside_the_image_s_truth(run: tuple[Path, str, Path],
                                                                       pushed: dict) -> None:
    """A missed row's sample explains the true class: its `prediction` is that class, with its probability."""
    store, run_id, index = run
    truth = {image["id"]: image for image in json.loads(index.read_text())["images"]}
    rows = {r["instance_id"]: r for r in _rows(store, "SELECT * FROM instances WHERE run_id = ?", run_id)}
    for sample in pushed["instances"]:
        row = rows[sample["instance_id"]]
        entry = truth[row["image_id"]]
        assert (sample["outcome"], sample["label_name"], sample["run_id"], sample["insertion_auc"],
                sample["flag_reason"]) == (row["outcome"], row["label_name"], run_id, row["insertion_auc"],
                                           row["flag_reason"])
        assert (sample["prediction"]["label"], sample["prediction"]["confidence"], sample["prediction"]["outcome"]) \
            == (row["label_name"], row["score"], row["outcome"])
        assert sample["truth"]["label"] == entry["label"] and len(sample["objects"]) == len(entry["boxes"])
        if row["outcome"] == "missed":
            assert sample["prediction"]["label"] == entry["label"]


def test_an_image_s_heatmap_is_the_map_of_its_predicted_class(pushed: dict) -> None:
    maps = {s["instance_id"]: s["heatmap"] for s in pushed["instances"]}
    for sample in pushed["images"]:
        own_map = maps[sample["prediction"]["audit_instance_id"]]
        with Image.open(sample["heatmap"]) as heatmap, Image.open(own_map) as own:
            assert heatmap.size == (96, 96) and heatmap.mode == "L"
            np.testing.assert_array_equal(np.asarray(heatmap), np.asarray(own))


def test_every_saved_view_holds_what_sql_selects_with_its_flag(run: tuple[Path, str, Path], pushed: dict) -> None:
    """[images, instance samples] of each view equals SQL's count over `instances` with the view's rule; a rule
    selecting nothing saves no view; views sorted by a score follow SQL's order on both datasets."""
    store, run_id, _ = run

    def count(where: str) -> list[int | None]:
        row = _rows(store, f"SELECT count(DISTINCT image_id) AS images, count(*) AS n FROM instances "
                           f"WHERE run_id = ? AND {where}", run_id)[0]
        return [row["images"] or None, row["n"] or None]

    cues = [r["cue_id"] for r in _rows(store, "SELECT DISTINCT cue_id FROM instances WHERE run_id = ? AND "
                                              "cue_id IS NOT NULL", run_id)]
    expected = {view_name(run_id, TP_OFF_OBJECT): count("outcome = 'correct' AND flag_off_object"),
                view_name(run_id, FP_BACKGROUND): count("outcome = 'wrong' AND flag_background_fp"),
                view_name(run_id, MISSED): count("outcome = 'missed'"),
                view_name(run_id, LOWEST_INSERTION_AUC): count("insertion_auc IS NOT NULL"),
                explainer_view(run_id, "legrad"): [None, count("true")[1]],
                **{cue_view(run_id, c): count(f"cue_id = '{c}'") for c in cues}}
    assert cues and all(expected[view_name(run_id, v)][1] for v in (TP_OFF_OBJECT, FP_BACKGROUND, MISSED)), \
        "the data has every kind"
    assert pushed["views"] == {name: shown for name, shown in expected.items() if shown != [None, None]}
    assert sorted(pushed["push"]["views"]) == sorted(pushed["views"])
    lowest = _rows(store, "SELECT image_id, instance_id FROM instances WHERE run_id = ? AND insertion_auc IS NOT NULL "
                          "ORDER BY insertion_auc, instance_id", run_id)
    assert pushed["instance_order"] == [r["instance_id"] for r in lowest]
    assert pushed["image_order"] == list(dict.fromkeys(r["image_id"] for r in lowest)), "by each image's lowest"
    assert pushed["missed_view"] == [0, expected[view_name(run_id, MISSED)][0], False], "the true class alone"


def test_the_app_opens_on_the_heatmap_and_the_push_keeps_tasks_apart(pushed: dict) -> None:
    images, instances = pushed["app"]
    assert images == ["cue_peak", "ground_truth", "heatmap_legrad", "missed", "objects", "prediction", "value"]
    assert instances == ["cue_peak", "ground_truth", "heatmap", "objects", "prediction", "value"]
    assert "holds detect runs" in pushed["refused"], "a classification run is not merged into detection labels"


# ---------------------------------------------------------------- the HTML report and the artifacts


@pytest.fixture(scope="module")
def report(run: tuple[Path, str, Path], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The run's report, with a diff against itself (every section of a classification run on the page)."""
    from eive_audit.reports.diff import run_diff
    from eive_audit.reports.html_report import write_report

    store, run_id, _ = run
    out = tmp_path_factory.mktemp("classify_report") / "report.html"
    return write_report(store, run_id, out, TOP_FAILURES, diff=run_diff(store, run_id, run_id)).read_text()


def _png(src: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_the_report_speaks_of_predictions_and_true_classes(run: tuple[Path, str, Path], report: str) -> None:
    store, run_id, _ = run
    gallery = _Tags(_section(report, "failures")).plain()
    for title in ("The true class of wrong predictions", "Wrong predictions",
                  "Correct predictions, but looking elsewhere"):
        assert f"{title} (" in gallery, title
    summary = _section(report, "summary")
    assert "<th>correct</th><th>wrong</th><th>missed</th><th>all</th>" in summary, "outcomes in a classifier's order"
    heads = [text for text in _Tags(_section(report, "failures")).text if " · " in text]
    assert heads and not any("IoU" in text for text in heads), "a classifier's card has no IoU"
    assert "predicted, but the true class is" in gallery
    assert "the true class, which the model missed: it said" in gallery
    page = _Tags(report).plain()
    for section in ("summary", "changes", "findings", "failures", "plots"):
        text = _Tags(_section(report, section)).plain()
        for word in ("detection", "detector", "false positive", "IoU"):
            assert word not in text, (section, word)
    assert "A correct prediction is flagged from 0.050 off its object" in page
    assert "a classifier's boxes are all the whole image" in _Tags(_section(report, "changes")).plain()
    assert "correct predictions flagged off their object" in _Tags(_section(report, "findings")).plain()
    for view in (TP_OFF_OBJECT, FP_BACKGROUND, MISSED):  # the FiftyOne blocks name the push's views
        assert f"view {view_name(run_id, view)}" in gallery, view


def test_cards_draw_the_object_box_and_no_whole_image_box(report: str) -> None:
    overlays = [a["src"] for t, a in _Tags(_section(report, "failures")).tags
                if t == "img" and a.get("class") == "overlay"]
    assert len(overlays) == TOP_FAILURES
    cyan, green = (np.array(tuple(bytes.fromhex(c[1:]))) for c in (PRED_COLOUR, GT_COLOUR))
    for src in overlays:
        pixels = _png(src)
        assert (np.abs(pixels - green).max(-1) <= 8).sum() > 100, "the object box, dashed"
        assert not (np.abs(pixels - cyan).max(-1) <= 8).any(), "no predicted box round the whole image"


def test_the_artifacts_name_correct_predictions(run: tuple[Path, str, Path]) -> None:
    store, run_id, _ = run
    text = summary_markdown(store, run_id, None, None)
    assert "wrong predictions driven by background" in text and "background false positives" not in text
    worst = worst_detections(store, run_id)
    assert worst and {r["instance_id"] for r in worst} <= {r["instance_id"] for r in _rows(
        store, "SELECT instance_id FROM instances WHERE run_id = ? AND outcome = 'correct'", run_id)}


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless check needs Debian's chromium at /usr/bin/chromium")
def test_chromium_renders_the_classification_gallery(report: str, tmp_path: Path) -> None:
    """Every image decodes, and a screenshot of the gallery (tmp_path/gallery.png, for a reviewer to look at)
    shows the cards."""
    head = report[:report.index("<body>")]
    header = report[report.index('<header class="top">'):report.index("</header>")]
    page = tmp_path / "gallery.html"
    page.write_text(f"{head}<body>{header}</header>{_section(report, 'failures')}</section></body></html>")
    shot = tmp_path / "gallery.png"
    _chromium(f"--screenshot={shot}", "--window-size=1280,1400", page.as_uri(), profile=tmp_path / "profile")
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB")).astype(int).reshape(-1, 3)
    green = np.array(tuple(bytes.fromhex(GT_COLOUR[1:])))
    assert pixels.std() > 10 and (np.abs(pixels - green).max(-1) <= 10).sum() > 100, "the cards, with their boxes"
