"""The FiftyOne push on a real audit: counts, attributes, heatmaps, saved views, re-push, two runs, the App.

Every FiftyOne call runs in a subprocess against the session's mongod on a free loopback port
(FIFTYONE_DATABASE_URI, conftest.py): the pytest process never imports fiftyone (whose database is fixed at
import), and what was stored is read back in a fresh process, as the App would see it.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pyarrow as pa
import pytest
from PIL import Image

from eive_audit.reports.views import (FP_BACKGROUND, LOWEST_INSERTION_AUC, MISSED, TP_OFF_OBJECT, cue_view,
                                      explainer_view, view_name)
from eive_audit.storage.catalog import query, refresh_catalog
from eive_audit.storage.writer import read_table, write_table

DATASET = "audit"
N_IMAGES = 20  # of the synth fixture's 40 val images: enough for tp, fp and fn rows, and faster
SECOND_RUN = "copy-of-run"  # the same rows under another id, its json moved away, three rows given a cue, no AUCs
CUE = "eive:circle:0"
DETECTION_COLUMNS = {"image_id", "query", "score", "iou", "gt_annotation_id"}  # the same for every explainer
BOX_COLUMNS = {f"{prefix}_{corner}" for prefix in ("pred", "gt") for corner in ("x0", "y0", "x1", "y1")}

pytestmark = pytest.mark.xdist_group("fiftyone")  # one audited and pushed run for the module

AUDIT = """
import json, sys
from pathlib import Path
from eive_audit.explainers.base import register
from eive_audit.explainers.eive import EIVE
from eive_audit.flows.audit import audit
from eive_audit.pipeline.config import AuditConfig, EiveSettings

@register("eive-last")
class EiveLast(EIVE):
    # A second explainer (last-layer EIVE), named with a dash as a field name may not be.
    def __init__(self) -> None:
        super().__init__(EiveSettings(fusion="last"))

images, coco, out, dataset = sys.argv[1:]
config = AuditConfig(images=images, coco=coco, out=out, explainers=("eive", "eive-last"), faithfulness={"instances": "sample:3"},
                     findings={"off_object": 0.05},  # the shipped model looks at its objects: flag the few that stray
                     review={"report": False, "fiftyone_dataset": dataset})
print(json.dumps(audit(config), default=str))
"""

PUSH = """
import json, sys
import fiftyone as fo
from eive_audit.reports.fiftyone_push import push_run, save_cue_view
args = json.loads(sys.argv[1])
first, second = args["runs"]
results = [push_run(args["store"], first, args["dataset"])]
for name in (args["dataset"], args["dataset"] + "-instances"):  # as an earlier push of the second run left it
    ds = fo.load_dataset(name)
    ds.save_view(args["stale"], ds.limit(1))
results.append(push_run(args["store"], second, args["dataset"]))
cue = args["cue"]
results.append(save_cue_view(args["dataset"], cue["name"], cue["ids"], run_id=cue["run_id"]))
print(json.dumps(results))
"""

DUMP = """
import json, sys
import fiftyone as fo
from fiftyone import ViewField as F
from eive_audit.reports.fiftyone_push import sorted_by

args = json.loads(sys.argv[1])
images, instances = fo.load_dataset(args["dataset"]), fo.load_dataset(args["dataset"] + "-instances")
run = args["runs"][0]
images_of, instances_of = (lambda r: images.match(F("run_id") == r)), (lambda r: instances.match(F("run_id") == r))
plain = lambda sample: {k: sample[k] for k in sample.field_names if isinstance(sample[k], (bool, int, float, str, type(None)))}
views = sorted(set(images.list_saved_views()) | set(instances.list_saved_views()))
print(json.dumps({
    "datasets": fo.list_datasets(),
    "counts": {r: [len(images_of(r)), len(instances_of(r))] for r in args["runs"]},
    "labels": {r: [images_of(r).count(f"{f}.detections") for f in ("predictions", "missed", "ground_truth")]
               for r in args["runs"]},
    "keys_unique": [len(set(ds.values("push_key"))) == len(ds) for ds in (images, instances)],
    "known_detection": {k: v for k, v in images_of(run).filter_labels("predictions", F("audit_instance_id") == args["known"])
                        .first().predictions.detections[0].to_dict().items() if not k.startswith("_")},
    "known_samples": [plain(s) for s in instances_of(run).match(F("instance_id") == args["known"])],
    "schema": sorted(images.get_field_schema(flat=True)),
    "heatmaps": [list(row) for row in zip(*images_of(run).values(
                    ["filepath", "heatmap_eive.map_path", "heatmap_eive_last.map_path"]))]
                + [list(row) for row in zip(*instances_of(run).values(["filepath", "heatmap.map_path"]))],
    "views": {n: [len(ds.load_saved_view(n)) if ds.has_saved_view(n) else None for ds in (images, instances)] for n in views},
    "view_order": {n: [list(pair) for pair in zip(*instances.load_saved_view(n).values(["instance_id", "explainer"]))]
                   for n in views if instances.has_saved_view(n)},
    "sorted": {f: sorted_by(instances_of(run).match(F("explainer") == "eive"), f).values("instance_id")
               for f in ("mass_in_gt", "insertion_auc")},
    "evaluations": images.list_evaluations(),
    "eval_tp": images_of(run).count_values(f"predictions.detections.eval_{run}").get("tp", 0),
    "app": [{"active": ds.app_config.active_fields.paths, "color_by": ds.app_config.color_scheme.color_by,
             "colorscales": {c["path"]: len(fo.app_config.get_colormap(c["name"]))
                             for c in ds.app_config.color_scheme.colorscales},
             "heatmaps": sorted(ds.get_field_schema(embedded_doc_type=fo.Heatmap)),
             "ranges": sorted({tuple(r) for f in ds.get_field_schema(embedded_doc_type=fo.Heatmap)
                               for r in ds.values(f + ".range") if r})}
            for ds in (images, instances)],
    "cue_peaks": {
        "instances": [[i, e, list(k.points[0]), k.label, k["audit_instance_id"], k["explainer"], k["localised"]] for i, e, k in
                      zip(*instances_of(run).exists("cue_peak").values(["instance_id", "explainer", "cue_peak"]))],
        "images": [[image_id, list(k.points[0]), k.label, k["audit_instance_id"], k["explainer"], k["localised"]]
                   for image_id, points in zip(*images_of(run).values(["image_id", "cue_peak.keypoints"]))
                   for k in points or []]},
    "missed_view": [[m.count(f + ".detections") if m.has_field(f) else None for f in fields]
                    for m, fields in ((images.load_saved_view(args["missed"]), ("predictions", "missed", "ground_truth")),
                                      (instances.load_saved_view(args["missed"]), ("prediction", "ground_truth")))],
}))
"""

APP = """
import sys
from eive_audit.reports.fiftyone_push import launch_app
session = launch_app(sys.argv[1], port=int(sys.argv[2]), wait=False)
print("launched", flush=True)
sys.stdin.read()  # serve until the test closes our stdin
session.close()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing answers on 127.0.0.1:{port} after {timeout} s")


def _graphql(port: int, query: str) -> dict:
    """The `data` of a GraphQL query to the App served on `port`."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["data"]


def _python(code: str, *args: str, env: dict[str, str], timeout: int = 300) -> object:
    """Run `code` in a fresh interpreter; its last stdout line, parsed as JSON."""
    result = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _rows(store: Path, sql: str, *params: object) -> list[dict]:
    return query(store, sql, list(params)).to_pylist()


@pytest.fixture(scope="module")
def annotations(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synth val json cut to its first N_IMAGES images."""
    coco = json.loads((synth / "annotations" / "val.json").read_text())
    keep = {image["id"] for image in coco["images"][:N_IMAGES]}
    subset = {**coco, "images": coco["images"][:N_IMAGES],
              "annotations": [a for a in coco["annotations"] if a["image_id"] in keep],
              "cues": [c for c in coco.get("cues", []) if c["image_id"] in keep]}
    path = tmp_path_factory.mktemp("annotations") / "val.json"
    path.write_text(json.dumps(subset))
    return path


@pytest.fixture(scope="module")
def run(synth: Path, annotations: Path, fiftyone_env: dict[str, str],
        tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A real audit with the shipped model and two explainers, pushed by the flow itself (`fiftyone_dataset`);
    (store, run id)."""
    store = tmp_path_factory.mktemp("store")
    summary = _python(AUDIT, str(synth / "images" / "val"), str(annotations), str(store), DATASET,
                      env=fiftyone_env, timeout=1800)
    return store, summary["run_id"]


def _copy_run(store: Path, run_id: str, cue_ids: list[str]) -> None:
    """SECOND_RUN: the run's partitions copied under another id, its annotation file gone (so its GT comes
    from the instance rows), `cue_ids` given CUE as findings would, and no AUCs (a run without faithfulness)."""
    for table in ("runs", "images", "instances", "maps", "errors", "_done"):  # the shards' markers too
        shutil.copytree(store / table / f"run_id={run_id}", store / table / f"run_id={SECOND_RUN}")
    (row,) = read_table(store, "runs", SECOND_RUN, "run").to_pylist()
    config = {**json.loads(row["config_json"]), "coco": str(store / "moved-away.json")}
    write_table(store, "runs", SECOND_RUN, "run", [{**row, "config_json": json.dumps(config)}])
    for shard in (store / "instances" / f"run_id={SECOND_RUN}").glob("*.parquet"):
        rows = read_table(store, "instances", SECOND_RUN, shard.stem).to_pylist()
        write_table(store, "instances", SECOND_RUN, shard.stem,
                    [{**row, "cue_id": CUE if row["instance_id"] in cue_ids else row["cue_id"],
                      "deletion_auc": None, "insertion_auc": None} for row in rows])
    refresh_catalog(store)


@pytest.fixture(scope="module")
def pushed(run: tuple[Path, str], fiftyone_env: dict[str, str]) -> dict:
    """In a second process push the run again and a copy of it as another run (over a view of it an earlier
    push would have saved, which it now selects nothing for), and save a cue view; read everything back in a
    third. Returns the read-back."""
    store, run_id = run
    cue_ids = [r["instance_id"] for r in _rows(store, "SELECT DISTINCT instance_id FROM instances WHERE run_id = ? "
                                                      "AND outcome = 'tp' ORDER BY instance_id LIMIT 3", run_id)]
    _copy_run(store, run_id, cue_ids)
    results = _python(PUSH, json.dumps({"store": str(store), "dataset": DATASET, "runs": [run_id, SECOND_RUN],
                                        "cue": {"name": "cue-test", "ids": cue_ids, "run_id": run_id},
                                        "stale": view_name(SECOND_RUN, LOWEST_INSERTION_AUC)}),
                      env=fiftyone_env)
    known = _rows(store, "SELECT instance_id FROM instances WHERE run_id = ? AND outcome = 'tp' "
                         "ORDER BY insertion_auc NULLS LAST, instance_id LIMIT 1", run_id)[0]["instance_id"]
    dump = _python(DUMP, json.dumps({"dataset": DATASET, "runs": [run_id, SECOND_RUN], "known": known,
                                     "missed": view_name(run_id, MISSED)}), env=fiftyone_env)
    return {**dump, "push": results, "known": known, "cue_ids": cue_ids}


def test_sample_counts_equal_the_tables_after_pushing_twice(run: tuple[Path, str], pushed: dict, annotations: Path) -> None:
    store, run_id = run
    n_images = _rows(store, "SELECT count(*) AS n FROM images WHERE run_id = ? AND status = 'ok'", run_id)[0]["n"]
    n_rows = _rows(store, "SELECT count(*) AS n FROM instances WHERE run_id = ?", run_id)[0]["n"]
    outcomes = {r["outcome"]: r["n"] for r in _rows(
        store, "SELECT outcome, count(DISTINCT instance_id) AS n FROM instances WHERE run_id = ? GROUP BY outcome", run_id)}
    assert n_images == N_IMAGES and outcomes.get("tp", 0) > 0
    assert {DATASET, f"{DATASET}-instances"} <= set(pushed["datasets"])
    n_gt = len(json.loads(annotations.read_text())["annotations"])
    gt_of_rows = _rows(store, "SELECT count(DISTINCT (image_id, gt_annotation_id)) AS n FROM instances "
                              "WHERE run_id = ? AND gt_annotation_id IS NOT NULL", run_id)[0]["n"]
    assert 0 < gt_of_rows <= n_gt
    predictions, missed = sum(outcomes.values()) - outcomes.get("fn", 0), outcomes.get("fn", 0)
    assert pushed["labels"][run_id] == [predictions, missed, n_gt], "GT: every box of the json"
    assert pushed["labels"][SECOND_RUN] == [predictions, missed, gt_of_rows], "GT: the rows' boxes, json gone"
    for pushed_run in (run_id, SECOND_RUN):  # the second run on the same datasets gets samples of its own
        assert pushed["counts"][pushed_run] == [n_images, n_rows]
    assert pushed["keys_unique"] == [True, True]
    assert pushed["evaluations"] == sorted([f"eval_{run_id}", f"eval_{SECOND_RUN.replace('-', '_')}"])
    assert pushed["eval_tp"] == outcomes["tp"], "FiftyOne's COCO-style matching agrees with the audit's"


def test_detections_carry_every_numeric_column_of_every_explainer(run: tuple[Path, str], pushed: dict) -> None:
    store, run_id = run
    table = query(store, "SELECT * FROM instances WHERE run_id = ? AND instance_id = ?", [run_id, pushed["known"]])
    rows = {r["explainer"]: r for r in table.to_pylist()}
    assert sorted(rows) == ["eive", "eive-last"]
    columns = [f.name for f in table.schema if f.name != "label" and f.name not in BOX_COLUMNS
               and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_boolean(f.type))]
    assert {"mass_in_gt", "insertion_auc", "peak_in_gt", "spurious_score", "flag_off_object", "off_object_norm"} \
        <= set(columns)
    det = pushed["known_detection"]
    assert (det["audit_instance_id"], det["outcome"], det["run_id"]) == (pushed["known"], "tp", run_id)
    assert det["confidence"] == rows["eive"]["score"]
    assert det.get("flag_reason") == rows["eive"]["flag_reason"], "why it is flagged, in words, beside the figures"
    for column in columns:
        assert det[column] == rows["eive"][column], column
        if column in DETECTION_COLUMNS:
            assert f"eive_last_{column}" not in det, column
        else:
            assert det[f"eive_last_{column}"] == rows["eive-last"][column], column
    x0, y0, x1, y1 = (rows["eive"][f"pred_{c}"] for c in ("x0", "y0", "x1", "y1"))
    assert det["bounding_box"] == pytest.approx([x0 / 128, y0 / 128, (x1 - x0) / 128, (y1 - y0) / 128])
    assert {"predictions.detections.mass_in_gt", "predictions.detections.eive_last_mass_in_gt",
            "predictions.detections.audit_instance_id", "heatmap_eive", "heatmap_eive_last"} <= set(pushed["schema"])
    samples = {s["explainer"]: s for s in pushed["known_samples"]}
    assert sorted(samples) == ["eive", "eive-last"]
    for explainer, sample in samples.items():
        assert (sample["instance_id"], sample["label_name"]) == (pushed["known"], rows[explainer]["label_name"])
        assert {column: sample.get(column) for column in columns} == {column: rows[explainer][column] for column in columns}


def test_heatmap_pngs_exist_at_the_image_size(run: tuple[Path, str], pushed: dict) -> None:
    store, run_id = run
    n_rows = _rows(store, "SELECT count(*) AS n FROM instances WHERE run_id = ?", run_id)[0]["n"]
    assert len(pushed["heatmaps"]) == N_IMAGES + n_rows
    root = (store / "heatmaps" / f"run_id={run_id}").resolve()
    for image_path, *maps in pushed["heatmaps"]:
        size = Image.open(image_path).size
        assert all(maps), f"a heatmap is missing for {image_path}"
        for map_path in maps:
            assert Path(map_path).resolve().is_relative_to(root)
            with Image.open(map_path) as heatmap:
                assert heatmap.size == size and heatmap.mode == "L"


_LARGE_HEATMAP = """
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image
from eive_audit.reports.fiftyone_push import _heatmap
row = {"width": 12000, "height": 9000, "input_height": 96, "input_width": 128, "padded_height": 128,
       "padded_width": 128}
grid = np.zeros((4, 4), np.float32)
grid[0, 0] = 1.0
heatmap = _heatmap(Path(sys.argv[1]), grid, row)
with Image.open(heatmap.map_path) as image:
    print(json.dumps({"size": image.size, "corner": int(np.asarray(image)[0, 0])}))
"""


def test_a_large_image_s_heatmap_is_drawn_at_the_model_input_size(fiftyone_env: dict[str, str],
                                                                  tmp_path: Path) -> None:
    """A 12000 x 9000 photo's map holds no more than the 128 x 96 input the model saw (and the App stretches
    a heatmap over its image): drawn at that size, not as a 108 M-pixel raster."""
    drawn = _python(_LARGE_HEATMAP, str(tmp_path / "map.png"), env=fiftyone_env)
    assert drawn == {"size": [128, 96], "corner": 255}


def test_saved_views_hold_the_instances_the_tables_name(run: tuple[Path, str], pushed: dict) -> None:
    """Every view the datasets hold, of both runs, shows what SQL over `instances` selects with the view's rule;
    a view that would show nothing is not saved (and a stale one of that name is gone), nor returned."""
    store, run_id = run

    def count(where: str, run: str = run_id) -> list[int | None]:
        """[images whose first-explainer instance qualifies, instance rows]: what the two views should show,
        None for a dataset the view should be missing from (it would show nothing)."""
        row = _rows(store, "SELECT count(DISTINCT image_id) FILTER (explainer = 'eive') AS images, count(*) AS n "
                           f"FROM instances WHERE run_id = ? AND {where}", run)[0]
        return [row["images"] or None, row["n"] or None]

    def rules(run: str) -> dict[str, list[int | None]]:
        """Each view a push of `run` may save: what it should show."""
        cues = [r["cue_id"] for r in _rows(store, "SELECT DISTINCT cue_id FROM instances WHERE run_id = ? "
                                                  "AND cue_id IS NOT NULL", run)]
        return {view_name(run, TP_OFF_OBJECT): count("outcome = 'tp' AND flag_off_object", run),
                view_name(run, FP_BACKGROUND): count("outcome = 'fp' AND flag_background_fp", run),
                view_name(run, MISSED): count("outcome = 'fn'", run),
                view_name(run, LOWEST_INSERTION_AUC): count("insertion_auc IS NOT NULL", run),
                **{explainer_view(run, e): [None, count(f"explainer = '{e}'", run)[1]] for e in ("eive", "eive-last")},
                **{cue_view(run, c): count(f"instance_id IN (SELECT instance_id FROM instances WHERE run_id = '{run}' "
                                           f"AND cue_id = '{c}')", run) for c in cues}}

    expected = {pushed_run: rules(pushed_run) for pushed_run in (run_id, SECOND_RUN)}
    for pushed_run, result in zip((run_id, SECOND_RUN), pushed["push"]):
        saved = {name: shown for name, shown in pushed["views"].items() if name.startswith(f"{pushed_run}-")}
        assert saved == {name: shown for name, shown in expected[pushed_run].items() if shown != [None, None]}
        assert sorted(result["views"]) == sorted(saved), "push_run names the views the datasets hold"
    shown = expected[run_id]
    assert shown[view_name(run_id, LOWEST_INSERTION_AUC)][1] == 3, "sample:3 gave three instances an insertion AUC"
    assert shown[view_name(run_id, MISSED)][1] and shown[view_name(run_id, TP_OFF_OBJECT)][1], "the data has such instances"
    assert expected[SECOND_RUN][view_name(SECOND_RUN, LOWEST_INSERTION_AUC)] == [None, None], \
        "no AUCs in the second run: its empty view is not saved, and the stale one is deleted"
    lowest = _rows(store, "SELECT instance_id, explainer FROM instances WHERE run_id = ? AND insertion_auc IS NOT NULL "
                          "ORDER BY insertion_auc, instance_id, explainer", run_id)
    assert pushed["view_order"][view_name(run_id, LOWEST_INSERTION_AUC)] == [[r["instance_id"], r["explainer"]]
                                                                            for r in lowest]
    cue = count(f"list_contains({pushed['cue_ids']}, instance_id)")
    assert cue[1] == 6, "three instances, two explainers"
    assert pushed["views"]["cue-test"] == cue and pushed["push"][-1] == {"images": cue[0], "instances": cue[1]}
    assert pushed["views"][cue_view(SECOND_RUN, CUE)] == cue, "a cue the findings named gets its view"


def test_the_missed_view_draws_the_missed_box_alone(run: tuple[Path, str], pushed: dict) -> None:
    """On an image only its `missed` boxes (no prediction, no GT box under or beside them); on an instance
    sample only its GT box (not the box of the query that explains the miss)."""
    store, run_id = run
    fn = _rows(store, "SELECT count(DISTINCT instance_id) AS boxes, count(*) AS n FROM instances "
                      "WHERE run_id = ? AND outcome = 'fn'", run_id)[0]
    assert fn["boxes"] > 0
    assert pushed["missed_view"] == [[0, fn["boxes"], None], [None, fn["n"]]]


def test_the_app_opens_on_the_heatmaps_painted_with_a_colorscale(pushed: dict) -> None:
    """Read back in a fresh process: the heatmap fields are active beside FiftyOne's default label fields, and
    the colour scheme colours by value (FiftyOne 1.22.1's App paints a heatmap's colorscale only then)."""
    images, instances = pushed["app"]
    assert images["heatmaps"] == ["heatmap_eive", "heatmap_eive_last"] and instances["heatmaps"] == ["heatmap"]
    assert sorted(images["active"]) == ["cue_peak", "ground_truth", "heatmap_eive", "missed", "predictions"], \
        "the first explainer's map: two at once hide each other"
    assert sorted(instances["active"]) == ["cue_peak", "ground_truth", "heatmap", "prediction"]
    for config in (images, instances):
        assert config["color_by"] == "value"
        assert config["colorscales"] == {path: 256 for path in config["heatmaps"]}, "a colorscale FiftyOne knows"
        ((low, high),) = config["ranges"]
        assert 0 < low < high == 255, "the App leaves a map's pixels below its range's start unpainted"


def test_cue_peaks_mark_where_the_findings_localised(run: tuple[Path, str], pushed: dict) -> None:
    """A keypoint at (peak_x, peak_y) / image size for each row with a peak (here every row has one: the map's
    off-object peak), on its instance sample and on its image, and none elsewhere."""
    store, run_id = run
    rows = _rows(store, "SELECT image_id, instance_id, explainer, label_name, peak_x, peak_y, "
                        "localised_drop IS NOT NULL AS localised FROM instances WHERE run_id = ? AND peak_x IS NOT NULL",
                 run_id)
    assert rows, "the findings put some peaks"
    point = lambda r: [r["peak_x"] / 128, r["peak_y"] / 128]  # noqa: E731 (the synth images are 128 x 128)
    assert sorted(pushed["cue_peaks"]["instances"]) == sorted(
        [r["instance_id"], r["explainer"], point(r), r["label_name"], r["instance_id"], r["explainer"], r["localised"]]
        for r in rows)
    assert sorted(pushed["cue_peaks"]["images"]) == sorted(
        [r["image_id"], point(r), r["label_name"], r["instance_id"], r["explainer"], r["localised"]] for r in rows)


def test_instances_sorted_by_a_score_match_the_sql_order(run: tuple[Path, str], pushed: dict) -> None:
    """Both sides put nulls last and break ties by instance id (insertion AUC is mostly null: mostly ties)."""
    store, run_id = run
    for field in ("mass_in_gt", "insertion_auc"):
        ordered = _rows(store, f"SELECT instance_id FROM instances WHERE run_id = ? AND explainer = 'eive' "
                               f"ORDER BY {field}, instance_id", run_id)
        assert len(ordered) > 1 and pushed["sorted"][field] == [r["instance_id"] for r in ordered], field


def test_launch_app_serves_on_loopback_only_and_stops_cleanly(pushed: dict, fiftyone_env: dict[str, str],
                                                              tmp_path: Path) -> None:
    port = _free_port()
    with (tmp_path / "stderr").open("w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-c", APP, DATASET, str(port)], env=fiftyone_env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
    started: list[psutil.Process] = [psutil.Process(proc.pid)]
    try:
        assert any(line.strip() == "launched" for line in iter(proc.stdout.readline, "")), "the App did not start"
        _wait_for_port(port, 60)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
            assert response.status == 200
        served = _graphql(port, '{ colorscale dataset(name: "%s") '
                                '{ appConfig { colorScheme { colorscales { path rgb } } } } }' % DATASET)
        scales = served["dataset"]["appConfig"]["colorScheme"]["colorscales"]
        assert scales and all(scale["rgb"] == served["colorscale"] for scale in scales), \
            "the App's own colorscale, which paints the heatmaps, is the one the dataset names"
        started += started[0].children(recursive=True)
        listening = [c.laddr for p in started for c in p.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert listening and {addr.ip for addr in listening} == {"127.0.0.1"}
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
        _, alive = psutil.wait_procs(started, timeout=30)
        for leftover in alive:
            leftover.kill()
    assert not alive, f"processes left running: {[p.pid for p in alive]}"
    printed = (tmp_path / "stderr").read_text()
    assert f"http://127.0.0.1:{port}/" in printed.splitlines(), "the App's URL, on a line of its own"
    assert "ssh" not in printed, "no port-forwarding advice for a local App"
