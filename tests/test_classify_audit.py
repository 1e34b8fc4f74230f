"""Classification audits end to end through the real CLI: `run --task classify` with the task's default model,
the shipped ViT (its quality is tests/test_train_classify.py's), over a fresh synthetic planted-cue val set
(with one index entry whose file is missing), then what a user reads back: the
tables in SQL (a store holding a detection run too), the instances' outcomes against a plain forward of the
model, faithfulness, the report, the FiftyOne push (in a subprocess against the session's mongod), and the
one-line refusals of a run that cannot work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli import invoke, run_ok
from eive_audit.pipeline.models.locate import DEFAULT_MODEL_DIR
from eive_audit.pipeline.models.vit import ViTAdapter
from eive_audit.pipeline.sources.decode import decode_rgb
from eive_audit.pipeline.sources.synthetic_classify import generate_classify
from eive_audit.storage.catalog import query

N_VAL = 16
EXPLAINERS = "legrad,cdam,aha"  # aha: the shipped ViT's shipped explainer (MODEL/aha), found by name alone

pytestmark = pytest.mark.xdist_group("classify-audit")  # one audited run for the module


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh synthetic classification val split (a seed the shipped ViT never saw), its index given one more
    entry whose image file does not exist."""
    root = tmp_path_factory.mktemp("classify")
    index = generate_classify(root, 0, N_VAL, seed=11)["val"]
    content = json.loads(index.read_text())
    content["images"].append({"id": 10_000, "file": "gone.png", "label": "circle"})
    index.write_text(json.dumps(content))
    return root


@pytest.fixture(scope="module")
def audited(data: Path, synth: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The classification run (no --model: the shipped ViT), and a detection run of the shipped detector on 4
    images into the same store."""
    store = tmp_path_factory.mktemp("store") / "store"
    summary = run_ok("--task", "classify", "--index", data / "annotations" / "val.json",
                     "--images", data / "images" / "val", "--out", store, "--explainer", EXPLAINERS,
                     "--faithfulness", "all", "--faithfulness-steps", "5", "--findings-min-support", "3",
                     "--device", "cpu")
    subset = synth / "annotations" / "val4.json"
    coco = json.loads((synth / "annotations" / "val.json").read_text())
    keep = {image["id"] for image in coco["images"][:4]}
    subset.write_text(json.dumps({**coco, "images": [i for i in coco["images"] if i["id"] in keep],
                                  "annotations": [a for a in coco["annotations"] if a["image_id"] in keep]}))
    detection = run_ok("--coco", subset, "--images", synth / "images" / "val", "--out", store, "--no-findings",
                       "--no-report", "--device", "cpu")
    return {"store": store, "summary": summary, "detection": detection, "data": data, "model": "default-vit"}


def test_instances_are_the_prediction_and_the_true_class_of_a_wrong_one(audited: dict) -> None:
    store, run = audited["store"], audited["summary"]["run_id"]
    rows = query(store, "SELECT * FROM instances WHERE run_id = ? ORDER BY image_id, instance_id, explainer",
                 [run]).to_pylist()
    assert {r["task"] for r in rows} == {"classify"} and {r["explainer"] for r in rows} == set(EXPLAINERS.split(","))
    by_image: dict[int, set[tuple[str, str]]] = {}
    for row in rows:
        by_image.setdefault(row["image_id"], set()).add((row["outcome"], row["label_name"]))
        assert (row["pred_x0"], row["pred_y0"], row["pred_x1"], row["pred_y1"]) == (0, 0, 96, 96)  # whole image
        # the index gives object boxes: scored wherever the map has mass (an all-zero map locates nothing)
        assert (row["mass_in_gt"] is None) == (row["mass_in_pred"] is None)
        assert row["mass_in_gt"] is None or 0 <= row["mass_in_gt"] <= 1
        assert row["deletion_auc"] is not None and row["insertion_auc"] is not None
    assert sum(r["mass_in_gt"] is not None for r in rows) > len(rows) / 2
    assert len(by_image) == N_VAL  # the missing file is no image of the audit
    index = json.loads((audited["data"] / "annotations" / "val.json").read_text())
    truth = {image["id"]: image["label"] for image in index["images"]}
    for image_id, instances in by_image.items():
        outcomes = sorted(outcome for outcome, _ in instances)
        assert outcomes in (["correct"], ["missed", "wrong"]), (image_id, instances)
        if outcomes == ["correct"]:
            assert instances == {("correct", truth[image_id])}
        else:
            assert ("missed", truth[image_id]) in instances
    maps = query(store, "SELECT DISTINCT grid_h, grid_w FROM maps WHERE run_id = ?", [run]).to_pylist()
    assert maps == [{"grid_h": 12, "grid_w": 12}]


def test_outcomes_agree_with_a_plain_forward_of_the_model(audited: dict) -> None:
    """What the audit stored as each image's prediction is what the model says on that image alone."""
    store, run = audited["store"], audited["summary"]["run_id"]
    adapter = ViTAdapter.load(audited["model"], "cpu")
    rows = query(store, "SELECT DISTINCT i.image_id, i.label_name, i.score, g.file_path FROM instances i JOIN images g "
                        "USING (run_id, image_id) WHERE run_id = ? AND outcome IN ('correct', 'wrong') "
                        "ORDER BY image_id", [run]).to_pylist()
    images = [decode_rgb(Path(r["file_path"]), None) for r in rows]
    with torch.inference_mode():
        probs = adapter.class_probs(adapter.forward(adapter.preprocess(images)).logits)
    names = [adapter.label_names[int(k)] for k in probs.argmax(-1)]
    assert names == [r["label_name"] for r in rows]
    assert probs.max(-1).values.tolist() == pytest.approx([r["score"] for r in rows], abs=1e-4)


def test_the_shipped_vit_s_shortcut_shows_in_the_audit(audited: dict) -> None:
    """The shipped ViT learned to call a shape with the cue beside it a hexagon: its wrong predictions are
    hexagons on images with the cue, and the findings' ranking puts hexagons with the cue first."""
    store, run = audited["store"], audited["summary"]["run_id"]
    index = json.loads((audited["data"] / "annotations" / "val.json").read_text())
    cued = {cue["image_id"] for cue in index["cues"]}
    wrong = query(store, "SELECT DISTINCT image_id, label_name FROM instances WHERE run_id = ? AND outcome = 'wrong'",
                  [run]).to_pylist()
    assert wrong and all(r["label_name"] == "hexagon" and r["image_id"] in cued for r in wrong), wrong
    top = query(store, "SELECT image_id, label_name FROM instances WHERE run_id = ? "
                       "ORDER BY spurious_score DESC NULLS LAST LIMIT 3", [run]).to_pylist()
    assert all(r["label_name"] == "hexagon" and r["image_id"] in cued for r in top), top


def test_bad_entry_is_an_error_row_and_the_run_goes_on(audited: dict) -> None:
    store, summary = audited["store"], audited["summary"]
    errors = query(store, "SELECT image_id, type FROM errors WHERE run_id = ?", [summary["run_id"]]).to_pylist()
    assert errors == [{"image_id": 10_000, "type": "missing_file"}]
    assert summary["audited"] == N_VAL and summary["images"] == N_VAL + 1


def test_a_store_holds_both_tasks(audited: dict) -> None:
    out = invoke("sql", "--store", audited["store"], "--format", "json",
                 "SELECT r.task, count(DISTINCT i.instance_id) > 0 AS has_rows FROM runs r JOIN instances i "
                 "USING (run_id) GROUP BY r.task ORDER BY r.task")
    assert out.code == 0, out.stderr
    assert json.loads(out.stdout) == [{"task": "classify", "has_rows": True}, {"task": "detect", "has_rows": True}]


def test_report_of_the_classification_run(audited: dict) -> None:
    report = Path(audited["summary"]["report"])
    page = report.read_text()
    assert all(name in page for name in EXPLAINERS.split(",")) and "correct" in page


def test_push_writes_classifications_and_heatmaps(audited: dict, fiftyone_env: dict[str, str]) -> None:
    """`eive-audit push`, then what FiftyOne holds, in one fresh interpreter (this process never imports
    fiftyone, test_fiftyone_push.py says why): one interpreter, not two, saves a torch and fiftyone import."""
    run = audited["summary"]["run_id"]
    done = subprocess.run([sys.executable, "-c", PUSH_AND_DUMP, str(audited["store"]), run], env=fiftyone_env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    pushed, seen = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    n_rows = query(audited["store"], "SELECT count(*) AS n FROM instances WHERE run_id = ?", [run]).to_pylist()[0]["n"]
    assert (pushed["run_id"], pushed["images"], pushed["instances"]) == (run, N_VAL, n_rows)
    assert seen["images"] == N_VAL and seen["instances"] == n_rows
    assert seen["ground_truth"] == "Classification" and seen["prediction"] == "Classification"
    assert {f"heatmap_{name}" for name in EXPLAINERS.split(",")} <= set(seen["fields"])


PUSH_AND_DUMP = """
import json, sys
from typer.testing import CliRunner
from eive_audit.cli import app
store, run = sys.argv[1:]
result = CliRunner().invoke(app, ["push", "--store", store, "--run", run, "--dataset", "cls"])
assert result.exit_code == 0, result.output
print(result.stdout.strip().splitlines()[-1])
import fiftyone as fo
images, instances = fo.load_dataset("cls"), fo.load_dataset("cls-instances")
first = images.first()
print(json.dumps({"images": len(images), "instances": len(instances), "fields": list(images.get_field_schema()),
                  "ground_truth": type(first["ground_truth"]).__name__, "prediction": type(first["prediction"]).__name__}))
"""


@pytest.mark.parametrize(("args", "says"), [
    (["--task", "classify", "--coco", "{index}"], "coco annotations are for task detect"),
    (["--task", "classify", "--index", "{index}", "--model", "{detector}"], "is a detector"),
    (["--task", "classify", "--index", "{index}", "--model", "{vit}", "--explainer", "eive"],
     "eive explains detect models"),
    (["--index", "{index}"], "index is for task classify"),
])
def test_a_run_that_cannot_work_stops_with_one_line(audited: dict, tmp_path: Path, args: list[str], says: str) -> None:
    """Each refused before the Prefect server starts, with one line (exit 2)."""
    index = audited["data"] / "annotations" / "val.json"
    result = invoke("run", "--images", audited["data"] / "images" / "val", "--out", tmp_path / "store",
                    *[a.format(index=index, detector=DEFAULT_MODEL_DIR, vit=audited["model"]) for a in args])
    assert result.code == 2 and says in result.stderr, result.stderr


def test_the_demo_of_the_task_audits_fresh_data_with_the_shipped_vit(tmp_path: Path) -> None:
    """`eive-audit demo --task classify` needs no model and no data: the shipped ViT on a fresh synthetic split."""
    result = invoke("demo", "--task", "classify", "--out", tmp_path / "demo", "--n-val", "8")
    assert result.code == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["images"], summary["errors"]) == (8, 0) and Path(summary["report"]).is_file()
    assert "Predictions most likely right or wrong for the wrong reason" in result.stderr
    [config] = query(tmp_path / "demo", "SELECT config_json FROM runs").column("config_json").to_pylist()
    assert (json.loads(config)["task"], json.loads(config)["model"]) == ("classify", "default-vit")


def test_aha_trained_for_deletion_and_insertion_beats_legrad_on_both(audited: dict) -> None:
    """The shipped AHA explainer optimises the two AUCs the audit stores (on the correct predictions,
    LeGrad's maps of the same instances being the comparison; benchmarks/aha.py has the full table)."""
    rows = query(audited["store"], "SELECT explainer, avg(deletion_auc) AS deletion, avg(insertion_auc) AS insertion "
                                   "FROM instances WHERE run_id = ? AND outcome = 'correct' GROUP BY explainer",
                 [audited["summary"]["run_id"]]).to_pylist()
    means = {r["explainer"]: r for r in rows}
    assert means["aha"]["deletion"] < means["legrad"]["deletion"]
    assert means["aha"]["insertion"] > means["legrad"]["insertion"]
