"""Push an audit run from the store to two persistent FiftyOne datasets, with saved review views.

Everything is read through `storage.catalog.query` (read-only DuckDB); nothing here writes a table.

* Image dataset `<dataset>`: one sample per (image, run) for the images the run audited (status ok), with
  `ground_truth` (every box of the run's COCO json, also of classes the model lacks; without the json, the
  GT boxes the instance rows carry), `predictions` (the kept detections: tp / fp / dup / det), `missed`
  (the fn rows, drawn at their GT box), `heatmap_<explainer>` (the max of the image's instance maps),
  `run_id` and `image_id`. Runs sharing the dataset are separate samples on the same file, so each keeps
  its own predictions, GT and evaluation (eval key `eval_<run_id>`), and a run audited against a corrected
  json never rewrites another run's labels; filter on `run_id` (each push saves views that do).
* Instance dataset `<dataset>-instances`: one sample per (instance, explainer, run) on the same image file,
  with that map as `heatmap`, the explained query's box as `prediction`, its GT box as `ground_truth`, and
  `instance_id`, `explainer`, `outcome`, `label_name`, `run_id` and the scores as sample fields.

A classification run (`runs.task` classify: an instance is the predicted class, its box the whole image, or the
true class of a wrong prediction, outcome missed) is pushed with a classifier's labels instead. On an image,
`ground_truth` is an `fo.Classification` of the true class (from the run's index when it is still there, else
the correct / missed rows), `prediction` the predicted class (`confidence` its probability, `outcome` correct,
wrong or det, the scores as on a detection), `missed` the true class of a wrong prediction with its own scores,
`objects` the index's object boxes of the image's class (else the one box the rows were scored against; unset
without boxes) and `heatmap_<explainer>` the map of the predicted class. An instance sample's `prediction` is the
class its map explains (for a missed row the true class the model should have said), beside the image's
`ground_truth` and `objects`. The evaluation is `evaluate_classifications` over the images with a true class. The
two label layouts cannot share a dataset (`ground_truth` is a Classification here, Detections there): a push into
a dataset of the other task is refused.

Scores come from the `instances` table generically: every numeric or boolean column except the box
corners (they become the boxes) and `label` (the category id, which names the boxes). Columns that
describe the detection itself (`_DETECTION_COLUMNS`) are the same for every explainer; every other one
(the map scores, the findings' `spurious_score` and `flag_*`, any later column) belongs to an explainer.
On a detection the run's first explainer's scores are unprefixed and another's are
`<explainer>_<column>`; FiftyOne reserves `instance_id` on labels, so detections carry `audit_instance_id`.
In field names every character other than a letter, digit or `_` becomes `_` (`eive-last` -> `eive_last`).

Where the findings put a row's off-object peak (`peak_x`, `peak_y`, original pixels: the centre of the
map's off-object peak cell, or of the window whose blurring cost the most score where they localised the
cue), a `cue_peak` keypoint marks it: a single `fo.Keypoint` on the instance sample, and on the image sample
an `fo.Keypoints` with one point per such (instance, explainer), each carrying `audit_instance_id`,
`explainer`, `localised` (the window, not just the map's peak) and the class as `label`; null where the row
has no peak. A keypoint rather than a small box: the columns are a point (the window's size is not stored),
and a dot reads as "here", not as an object.

Re-pushing updates in place: samples are merged on `push_key` (`<run>/<filepath>` or
`<run>/<explainer>/<instance_id>`) with each field replaced whole, so no sample or detection is
duplicated and other runs' samples are untouched. Heatmaps are 8-bit PNGs under
`<store>/heatmaps/run_id=<run>/{images,instances}/<explainer>/`, each map scaled by its own maximum.

Each push also sets both datasets' App config (`app_config`), so the App opens showing the maps: the active
fields are FiftyOne's default ones (every label field but dense ones, which it leaves off) plus the run's
first explainer's heatmap (one map at a time: two drawn at once hide each other), and the colour scheme
colours by value. FiftyOne 1.22.1's App paints a heatmap with a colorscale only when it colours by value or
instance; coloured by field it paints the field's one colour with an alpha of value / range, the faint tint
reviewers saw. By value, every heatmap field gets `HEATMAP_COLORSCALE`, the boxes are coloured by their
`outcome` and the cue keypoints in `CUE_COLOR`. The App leaves a pixel below the heatmap's `range` unpainted,
so each map's range starts at `HEATMAP_FLOOR` of its maximum: where the map is negligible the image shows.
The App served from a Python session gets the dataset's colour scheme without the colours of its per-field
colorscales (1.22.1 sends the scheme as stored; only its GraphQL resolvers compute them) and falls back to
its App config's `colorscale`, so `launch_app` sets that one too.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fiftyone as fo
import fiftyone.utils.coco as fouc
import numpy as np
import pyarrow as pa
from fiftyone import ViewExpression as E
from fiftyone import ViewField as F
from fiftyone.core.collections import SampleCollection
from fiftyone.core.view import DatasetView
from PIL import Image

from eive_audit.pipeline.config import OUTCOME_ROLES, playing
from eive_audit.pipeline.geometry import Geometry
from eive_audit.pipeline.sources.decode import fit_size
from eive_audit.reports.overlay import map_to_image
from eive_audit.reports.views import (FP_BACKGROUND, LOWEST_INSERTION_AUC, MISSED, TP_OFF_OBJECT, cue_view,
                                      explainer_view, view_name)
from eive_audit.storage.catalog import query
from eive_audit.storage.maps import decode_map

KEY_FIELD = "push_key"
LABEL_FIELDS = ("predictions", "missed")  # the image dataset's fields that hold instances
CLASSIFY_LABEL_FIELDS = ("prediction", "missed")  # those of a classification run's images (Classification labels)

# Numeric columns that describe the detection rather than its map: the same for every explainer.
_DETECTION_COLUMNS = frozenset({"image_id", "query", "score", "iou", "gt_annotation_id"})
_CORNERS = ("x0", "y0", "x1", "y1")
_BOX_COLUMNS = frozenset(f"{prefix}_{corner}" for prefix in ("pred", "gt") for corner in _CORNERS)
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")

# The App's colours (see the module docstring). Plotly's "rainbow" is saturated from end to end, with no
# near-black or near-white end (purple, blue, cyan, green, yellow, red at the peak), so a map reads on dark and
# light images alike; a name, as FiftyOne's App config takes it.
HEATMAP_COLORSCALE = "rainbow"
HEATMAP_FLOOR = 0.1  # share of a map's maximum below which the App leaves the image unpainted
_PNG_MAX = 255  # heatmap PNGs are 8-bit
OUTCOME_COLORS = {"tp": "#00e676", "fp": "#ff1744", "dup": "#ff9100", "crowd": "#9e9e9e", "det": "#00b0ff",
                  "fn": "#ff00ff"}  # a miss in magenta: no colorscale entry, no other outcome
# a classifier's outcomes in the colour of the detection outcome each plays
OUTCOME_COLORS |= {outcome: OUTCOME_COLORS[role] for outcome, role in OUTCOME_ROLES.items() if outcome != role}
CUE_COLOR = "#ffffff"  # in no colorscale entry, so a cue's dot stands out on the map it marks
_OUTCOME_FIELDS = ("predictions", "missed", "prediction")  # the detection fields whose boxes carry `outcome`

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class _Run:
    run_id: str
    explainers: list[str]  # in the order of `runs.explainers`: the first one's scores go unprefixed
    coco: Path | None
    task: str = "detect"  # detect or classify (`runs.task`)
    index: Path | None = None  # a classification run's index (json or csv), None for an ImageFolder tree
    images: Path | None = None  # the image root the index's files are relative to


@dataclass(frozen=True)
class _View:
    """A review view: the instances it shows (one expression for instance samples and detections alike)
    and the score it is sorted by, lowest first."""

    suffix: str
    description: str
    condition: Any
    sort_field: str | None = None
    hidden_on_images: tuple[str, ...] = ()  # fields the view leaves out, so that what it is about stands out
    hidden_on_instances: tuple[str, ...] = ()


@contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send whatever is written to file descriptor 1 inside the block to 2, child processes included: FiftyOne
    and the database it starts print notices on stdout, where our commands print only their JSON result.
    Works as a decorator too."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@stdout_to_stderr()
def push_run(store: Path, run_id: str, dataset: str, overwrite_views: bool = True) -> dict[str, Any]:
    """Write or update the run's samples in `dataset` and `<dataset>-instances`, evaluate its predictions,
    save its review views (see `review_views`; names `reports.views.view_name`), one view per explainer on
    the instances (`explainer_view`) and one per candidate cue the findings named (`cue_view`), and set both
    datasets' App config. A view that would show nothing is not saved. `overwrite_views=False` keeps a view
    that already has the name (a reviewer may have edited it). Returns the sample counts, the eval key and
    the names of the views the datasets hold."""
    started = time.perf_counter()
    store = Path(store)
    run = _load_run(store, run_id)
    images = query(store, "SELECT * FROM images WHERE run_id = ? AND status = 'ok' ORDER BY image_id", [run_id])
    instances = query(store, "SELECT * FROM instances WHERE run_id = ? ORDER BY image_id, instance_id, explainer",
                      [run_id])
    image_ds, instance_ds = _dataset(dataset), _dataset(f"{dataset}-instances")
    _check_task(image_ds, instance_ds, run.task)
    samples_of = _classified_samples if run.task == "classify" else _samples
    image_samples, instance_samples = samples_of(store, run, images.to_pylist(), instances)
    for ds, samples in ((image_ds, image_samples), (instance_ds, instance_samples)):
        ds.merge_samples(samples, key_field=KEY_FIELD, merge_lists=False, overwrite=True, progress=False)
        ds.add_dynamic_sample_fields()  # declares the labels' attributes, so the App can filter on them
    eval_key = _evaluate(image_ds, run)
    views = _save_views(image_ds, instance_ds, run, review_views(run.task), overwrite_views)
    for cue_id, ids in _cues(instances).items():
        name = cue_view(run.run_id, cue_id)
        if any(save_cue_view(dataset, name, ids, run_id=run_id, overwrite=overwrite_views).values()):
            views.append(name)
    explainers = instance_ds.distinct("explainer")
    _set_app_config(image_ds, f"heatmap_{field_name(run.explainers[0])}", explainers)
    _set_app_config(instance_ds, "heatmap", explainers)
    return {"run_id": run_id, "dataset": image_ds.name, "instance_dataset": instance_ds.name,
            "images": len(image_samples), "instances": len(instance_samples), "eval_key": eval_key,
            "views": views, "seconds": round(time.perf_counter() - started, 1)}


def review_views(task: str = "detect") -> list[_View]:
    """The views every push of a `task` run saves on both datasets (see `_classifier_views` for classify).

    The off-object views take the flags the audit wrote with each shard (`pipeline.findings.flags`, the run's
    `findings.off_object` and `findings.background` thresholds), so a view holds exactly the instances the
    flag marks, as the report and the findings count them; each flagged instance's `flag_reason` says why. An fp
    has no GT box, so its `mass_on_other_gt` is 1 as soon as its map touches any GT box and cannot tell
    background from another object, while its `off_object_norm` is the share of the map off every GT box. On
    the image dataset, the first explainer's flags decide. The missed view draws the missed box alone: on an
    image its `missed` box, not the GT box under it and the image's other GT boxes; on an instance sample its
    GT box, not the box of the query that explains it (its map is the heatmap).
    """
    if task == "classify":
        return _classifier_views()
    return [
        _View(TP_OFF_OBJECT, "correct detections the audit flags as looking off their object (flag_off_object, "
                               "from the resolution-aware off_object_norm; flag_reason says why; lowest mass_in_gt "
                               "first): right, maybe for the wrong reason",
              (F("outcome") == "tp") & (F("flag_off_object") == True), "mass_in_gt"),  # noqa: E712 (a MongoDB test)
        _View(FP_BACKGROUND, "false positives driven by background: flag_background_fp (enough of the map off "
                               "the cells every GT box reaches, off_object_norm; flag_reason says why)",
              (F("outcome") == "fp") & (F("flag_background_fp") == True)),  # noqa: E712 (a MongoDB test)
        _View(MISSED, "missed GT objects (fn), explained through the query that overlaps them most; only the "
                      "missed box is drawn (the image's other GT boxes and the query's own box are left out)",
              F("outcome") == "fn", hidden_on_images=("ground_truth",), hidden_on_instances=("prediction",)),
        _View(LOWEST_INSERTION_AUC, "instances with an insertion AUC, lowest first: maps the model does not "
                                      "need", F("insertion_auc") != None, "insertion_auc"),  # noqa: E711
    ]


def _classifier_views() -> list[_View]:
    """A classification run's review views: the detection views' rules on the outcomes that play those roles
    (`pipeline.config.OUTCOME_ROLES`), so each holds what the same flag columns select in SQL. A wrong
    prediction's `flag_background_fp` reads its map off every object box of the image (the box of the class it
    wrongly named is the whole image). The missed view shows the true class alone on an image (its `missed`
    label: the prediction is filtered out, the image's `ground_truth`, the same class, left out); on an instance
    sample the explained class is the true one, so nothing is hidden there."""
    return [
        _View(TP_OFF_OBJECT, "correct predictions the audit flags as looking off their object (flag_off_object, "
                               "from the resolution-aware off_object_norm against the object box of the class; "
                               "flag_reason says why; lowest mass_in_gt first): right, maybe for the wrong reason",
              F("outcome").is_in(playing("tp")) & (F("flag_off_object") == True), "mass_in_gt"),  # noqa: E712
        _View(FP_BACKGROUND, "wrong predictions driven by background: flag_background_fp (enough of the map off "
                               "the cells every object box reaches, off_object_norm; flag_reason says why)",
              F("outcome").is_in(playing("fp")) & (F("flag_background_fp") == True)),  # noqa: E712
        _View(MISSED, "the true class of each wrong prediction, explained on the whole image: where the model "
                      "looked for the class it should have said (its map is the instance sample's heatmap; an "
                      "image's heatmap stays its prediction's); on an image only that class is shown",
              F("outcome").is_in(playing("fn")), hidden_on_images=("ground_truth",)),
        _View(LOWEST_INSERTION_AUC, "instances with an insertion AUC, lowest first: maps the model does not "
                                      "need", F("insertion_auc") != None, "insertion_auc"),  # noqa: E711
    ]


def save_cue_view(dataset: str, name: str, instance_ids: Iterable[str], run_id: str | None = None,
                  overwrite: bool = True) -> dict[str, int]:
    """Save view `name` showing these instances on the image dataset (only their detections) and on
    `<dataset>-instances` (their samples, every explainer). Instance ids repeat across runs of the same
    images: pass `run_id` to keep one run. `overwrite=False` keeps a view that already has the name.
    Returns how many images and instance samples the view shows."""
    ids = sorted(set(instance_ids))
    image_ds, instance_ds = fo.load_dataset(dataset), fo.load_dataset(f"{dataset}-instances")
    on_images = _image_view(image_ds, run_id, F("audit_instance_id").is_in(ids))
    on_instances = _of_run(instance_ds, run_id).match(F("instance_id").is_in(ids))
    description = f"{len(ids)} instance(s) sharing a candidate cue"
    _save(image_ds, name, on_images, description, overwrite)
    _save(instance_ds, name, on_instances, description, overwrite)
    return {"images": len(on_images), "instances": len(on_instances)}


def sorted_by(samples: SampleCollection, field: str) -> DatasetView:
    """Instance samples by `field` ascending, nulls last, ties by instance id, explainer and run: the order
    of SQL `ORDER BY <field>, instance_id, explainer, run_id` over the `instances` view (DuckDB puts nulls
    last; MongoDB would put them first without the leading null test)."""
    return samples.sort_by([(F(field) == None, 1), (field, 1),  # noqa: E711 (a MongoDB null test)
                            ("instance_id", 1), ("explainer", 1), ("run_id", 1)])


def launch_app(dataset: str, port: int = 5151, address: str = "127.0.0.1", wait: bool = True,
               view: str | None = None) -> fo.Session:
    """Serve the FiftyOne App on `address:port` (loopback unless asked otherwise) without opening a browser,
    on the saved view `view` of the dataset when given, and print its URL (one line on stderr).

    The session is made as `fo.launch_app` makes it, remote (a remote session opens no browser), but not
    through `fo.launch_app`, which then logs ssh port-forwarding advice instead of the URL. The App server it
    starts takes `HEATMAP_COLORSCALE` as its App config's colorscale (FIFTYONE_APP_COLORSCALE, unless set: the
    module docstring says why). With `wait`, block until interrupted (Ctrl-C), then close the session;
    without, return at once with the App serving until the session is closed or this process ends. Returns
    the session."""
    os.environ.setdefault("FIFTYONE_APP_COLORSCALE", HEATMAP_COLORSCALE)  # read by the server process it starts
    ds = fo.load_dataset(dataset)
    session = fo.Session(ds, view=ds.load_saved_view(view) if view else None, port=port, address=address,
                         remote=True, auto=False)
    print(session.url, file=sys.stderr, flush=True)
    if wait:
        try:
            session.wait(-1)
        except KeyboardInterrupt:
            session.close()
    return session


def _score_columns(schema: pa.Schema) -> list[str]:
    """The `instances` columns pushed as scores: numeric and boolean ones, less box corners and `label`, and
    `flag_reason` (why an instance is flagged, in words, to read beside its heatmap)."""
    return [f.name for f in schema
            if (pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_boolean(f.type)
                or f.name == "flag_reason") and f.name not in _BOX_COLUMNS and f.name != "label"]


def field_name(text: str) -> str:
    """`text` as part of a FiftyOne field name: every character but letters, digits and `_` becomes `_`."""
    return re.sub(r"\W", "_", text, flags=re.ASCII)


def _load_run(store: Path, run_id: str) -> _Run:
    rows = query(store, "SELECT * FROM runs WHERE run_id = ?", [run_id]).to_pylist()
    if not rows:
        raise KeyError(f"no run {run_id!r} in the store at {store}")
    config = json.loads(rows[0]["config_json"])
    coco, index = config.get("coco"), config.get("index")
    return _Run(_safe(run_id), [_safe(name) for name in rows[0]["explainers"].split(",")], Path(coco) if coco else None,
                rows[0].get("task") or "detect", Path(index) if index else None, Path(config["images"]))


def _safe(name: str) -> str:
    """`name`, refused if it could leave the heatmap folder when used as a path part."""
    if not _SAFE_NAME.fullmatch(name) or name.startswith("."):
        raise ValueError(f"{name!r} cannot name a file: use letters, digits, '_', '-', '.', not starting with '.'")
    return name


def _grids(store: Path, run: _Run) -> dict[tuple[str, str], np.ndarray]:
    """The run's maps, decoded, by (instance id, explainer)."""
    maps = query(store, 'SELECT instance_id, explainer, grid_h, grid_w, "map" FROM maps WHERE run_id = ?', [run.run_id])
    return {(m["instance_id"], m["explainer"]): decode_map(m["map"], m["grid_h"], m["grid_w"])
            for m in maps.to_pylist()}


def _by_image(instances: pa.Table) -> dict[int, Rows]:
    by_image: dict[int, Rows] = {}
    for row in instances.to_pylist():
        by_image.setdefault(row["image_id"], []).append(row)
    return by_image


def _samples(store: Path, run: _Run, images: Rows, instances: pa.Table) -> tuple[list[fo.Sample], list[fo.Sample]]:
    """The image samples and the instance samples of the run, writing their heatmap PNGs."""
    grids = _grids(store, run)
    sizes = {image["image_id"]: (image["width"], image["height"]) for image in images}
    ground_truth, categories = _ground_truth(run.coco, instances, sizes)
    by_image = _by_image(instances)
    columns = _score_columns(instances.schema)
    image_samples, instance_samples = [], []
    for image in images:
        image_id = image["image_id"]
        gt = None if ground_truth is None else ground_truth.get(image_id, [])
        sample, mine = _image_samples(store, run, image, by_image.get(image_id, []), grids, columns, gt, categories)
        image_samples.append(sample)
        instance_samples.extend(mine)
    return image_samples, instance_samples


def _ground_truth(coco: Path | None, instances: pa.Table, sizes: dict[int, tuple[int, int]]
                  ) -> tuple[dict[int, list[fo.Detection]] | None, dict[int, str]]:
    """(image id -> GT detections, category id -> name): from the COCO json when it is still there (it holds
    every box), else the distinct GT boxes of the tp / fn rows (partial); None for an image-folder run."""
    if coco is None:
        return None, {}
    if coco.is_file():
        _, classes, _, images, annotations = fouc.load_coco_detection_annotations(str(coco))
        return {image_id: [obj.to_detection((image["width"], image["height"]), classes, include_id=True)
                           for obj in (annotations or {}).get(image_id, [])]
                for image_id, image in images.items()}, classes
    boxes: dict[int, dict[int, fo.Detection]] = {}
    for row in instances.to_pylist():
        if row["gt_annotation_id"] is not None and row["image_id"] in sizes:
            boxes.setdefault(row["image_id"], {}).setdefault(row["gt_annotation_id"], fo.Detection(
                label=row["label_name"], bounding_box=_relative_box(row, "gt", sizes[row["image_id"]]),
                coco_id=row["gt_annotation_id"]))
    return {image_id: list(found.values()) for image_id, found in boxes.items()}, {}


def _image_samples(store: Path, run: _Run, image: dict[str, Any], rows: Rows, grids: dict[tuple[str, str], np.ndarray],
                   columns: list[str], gt: list[fo.Detection] | None, categories: dict[int, str]
                   ) -> tuple[fo.Sample, list[fo.Sample]]:
    """One image's sample and its instance samples."""
    size = (image["width"], image["height"])
    common = {"filepath": image["file_path"], "metadata": fo.ImageMetadata(width=size[0], height=size[1]),
              "run_id": run.run_id}
    folder = store / "heatmaps" / f"run_id={run.run_id}"
    by_instance: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_instance.setdefault(row["instance_id"], {})[row["explainer"]] = row
    labels: dict[str, list[fo.Detection]] = {field: [] for field in LABEL_FIELDS}
    peaks: list[fo.Keypoint] = []
    instance_samples = []
    for instance_id, per_explainer in by_instance.items():
        facts = next(iter(per_explainer.values()))
        label = _label(facts, categories)
        missed = facts["outcome"] == "fn"
        labels["missed" if missed else "predictions"].append(fo.Detection(
            label=label, bounding_box=_relative_box(facts, "gt" if missed else "pred", size), confidence=facts["score"],
            audit_instance_id=instance_id, outcome=facts["outcome"], run_id=run.run_id,
            **_merged_scores(per_explainer, run.explainers, columns)))
        for explainer, row in per_explainer.items():
            gt_box = _relative_box(row, "gt", size)
            heatmap, peak = _instance_marks(folder, instance_id, explainer, row, label, grids, image)
            peaks.extend([peak] if peak else [])
            instance_samples.append(fo.Sample(
                **common, **{column: row[column] for column in columns}, heatmap=heatmap, cue_peak=peak,
                instance_id=instance_id, explainer=explainer, outcome=row["outcome"], label_name=row["label_name"],
                prediction=fo.Detections(detections=[fo.Detection(
                    label=label, bounding_box=_relative_box(row, "pred", size), confidence=row["score"],
                    outcome=row["outcome"])]),
                ground_truth=fo.Detections(detections=[fo.Detection(label=label, bounding_box=gt_box)] if gt_box else []),
                **{KEY_FIELD: f"{run.run_id}/{explainer}/{instance_id}"}))
    heatmaps = {}
    for explainer in run.explainers:
        mine = [_unit(grids[key]) for key in ((iid, explainer) for iid in by_instance) if key in grids]
        if mine:
            heatmaps[f"heatmap_{field_name(explainer)}"] = _heatmap(
                folder / "images" / explainer / f"{image['image_id']}.png", np.max(mine, axis=0), image)
    truth = {} if gt is None else {"ground_truth": fo.Detections(detections=gt)}
    sample = fo.Sample(**common, **truth, **heatmaps, image_id=image["image_id"],
                       cue_peak=fo.Keypoints(keypoints=peaks) if peaks else None,
                       **{field: fo.Detections(detections=found) for field, found in labels.items()},
                       **{KEY_FIELD: f"{run.run_id}/{image['file_path']}"})
    return sample, instance_samples


@dataclass(frozen=True)
class _Truth:
    """What a classification index says of one image: its class and its object boxes (xyxy, original pixels)."""

    label: str
    boxes: list[list[float]]


def _read_index(index: Path | None, images: Path | None) -> tuple[dict[Path, _Truth], dict[int, str]]:
    """(resolved image path -> its `_Truth`, class id -> name) from a classification index (json, or csv with
    `file`, `label` and optional `x0..y1`; the format of `pipeline.sources`), read again because reports do not
    import the sources; empty for a run without one or whose index is gone. Images are matched by file, which
    every index format names (ids are optional in them)."""
    if index is None or images is None or not index.is_file():
        return {}, {}
    entries: dict[Path, _Truth] = {}
    if index.suffix.lower() == ".csv":
        with index.open(newline="") as handle:
            for row in csv.DictReader(handle):
                truth = entries.setdefault((images / row["file"]).resolve(), _Truth(row["label"], []))
                if (row.get("x0") or "").strip():
                    truth.boxes.append([float(row[corner]) for corner in _CORNERS])
        classes = sorted({truth.label for truth in entries.values()})
    else:
        data = json.loads(index.read_text())
        for image in data["images"]:
            entries[(images / image["file"]).resolve()] = _Truth(image["label"], [list(map(float, box))
                                                                                   for box in image.get("boxes") or []])
        classes = data.get("classes") or sorted({truth.label for truth in entries.values()})
    return entries, dict(enumerate(classes))


def _classified_samples(store: Path, run: _Run, images: Rows, instances: pa.Table
                        ) -> tuple[list[fo.Sample], list[fo.Sample]]:
    """A classification run's image samples and instance samples, writing their heatmap PNGs."""
    grids = _grids(store, run)
    index, categories = _read_index(run.index, run.images)
    by_image = _by_image(instances)
    columns = _score_columns(instances.schema)
    image_samples, instance_samples = [], []
    for image in images:
        rows = by_image.get(image["image_id"], [])
        truth = index.get(Path(image["file_path"]).resolve()) or _truth_of_rows(rows, categories)
        sample, mine = _classified_image(store, run, image, rows, grids, columns, truth, categories)
        image_samples.append(sample)
        instance_samples.extend(mine)
    return image_samples, instance_samples


def _truth_of_rows(rows: Rows, categories: dict[int, str]) -> _Truth | None:
    """An image's true class and object box as its rows know them, where the index is gone or was an ImageFolder
    tree: the class of its correct or missed row and the one box the rows were scored against; None for an
    unlabelled image, or one whose class the model lacks (its wrong prediction has no missed row)."""
    known = [row for row in rows if OUTCOME_ROLES[row["outcome"]] in ("tp", "fn")]
    if not known:
        return None
    box = [known[0][f"gt_{corner}"] for corner in _CORNERS]
    return _Truth(_label(known[0], categories), [] if None in box else [box])


def _classified_image(store: Path, run: _Run, image: dict[str, Any], rows: Rows,
                      grids: dict[tuple[str, str], np.ndarray], columns: list[str], truth: _Truth | None,
                      categories: dict[int, str]) -> tuple[fo.Sample, list[fo.Sample]]:
    """One classified image's sample and its instance samples. Labels are made afresh for every sample (a
    label is a document with its own id)."""
    size = (image["width"], image["height"])
    common = {"filepath": image["file_path"], "metadata": fo.ImageMetadata(width=size[0], height=size[1]),
              "run_id": run.run_id}

    def known() -> dict[str, Any]:
        """The image's true class and object boxes, as labels."""
        if truth is None:
            return {"ground_truth": None, "objects": None}
        boxes = [fo.Detection(label=truth.label, bounding_box=_relative(box, size)) for box in truth.boxes]
        return {"ground_truth": fo.Classification(label=truth.label),
                "objects": fo.Detections(detections=boxes) if boxes else None}

    folder = store / "heatmaps" / f"run_id={run.run_id}"
    by_instance: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_instance.setdefault(row["instance_id"], {})[row["explainer"]] = row
    labels: dict[str, fo.Classification | None] = {"prediction": None, "missed": None}  # a re-push clears them too
    predicted: str | None = None
    peaks: list[fo.Keypoint] = []
    instance_samples = []
    for instance_id, per_explainer in by_instance.items():
        facts = next(iter(per_explainer.values()))
        label = _label(facts, categories)
        missed = OUTCOME_ROLES[facts["outcome"]] == "fn"
        predicted = predicted if missed else instance_id
        labels["missed" if missed else "prediction"] = fo.Classification(
            label=label, confidence=facts["score"], audit_instance_id=instance_id, outcome=facts["outcome"],
            run_id=run.run_id, **_merged_scores(per_explainer, run.explainers, columns))
        for explainer, row in per_explainer.items():
            heatmap, peak = _instance_marks(folder, instance_id, explainer, row, label, grids, image)
            peaks.extend([peak] if peak else [])
            instance_samples.append(fo.Sample(
                **common, **known(), **{column: row[column] for column in columns}, heatmap=heatmap, cue_peak=peak,
                instance_id=instance_id, explainer=explainer, outcome=row["outcome"], label_name=row["label_name"],
                prediction=fo.Classification(label=label, confidence=row["score"], outcome=row["outcome"]),
                **{KEY_FIELD: f"{run.run_id}/{explainer}/{instance_id}"}))
    heatmaps = {f"heatmap_{field_name(explainer)}": _heatmap(
        folder / "images" / explainer / f"{image['image_id']}.png", grids[(predicted, explainer)], image)
        for explainer in run.explainers if (predicted, explainer) in grids}
    sample = fo.Sample(**common, **known(), **labels, **heatmaps, image_id=image["image_id"],
                       cue_peak=fo.Keypoints(keypoints=peaks) if peaks else None,
                       **{KEY_FIELD: f"{run.run_id}/{image['file_path']}"})
    return sample, instance_samples


def _merged_scores(per_explainer: dict[str, dict[str, Any]], explainers: list[str], columns: list[str]) -> dict[str, Any]:
    """A detection's attributes: its own columns once, the first explainer's scores unprefixed, the others'
    as `<explainer>_<column>`."""
    facts = next(iter(per_explainer.values()))
    attributes = {column: facts[column] for column in columns if column in _DETECTION_COLUMNS}
    for rank, explainer in enumerate(explainers):
        if explainer in per_explainer:
            prefix = f"{field_name(explainer)}_" if rank else ""
            attributes |= {prefix + column: per_explainer[explainer][column]
                           for column in columns if column not in _DETECTION_COLUMNS}
    return attributes


def _label(row: dict[str, Any], categories: dict[int, str]) -> str:
    """The dataset's category name, so predictions and COCO GT agree whatever the model calls its classes."""
    return categories.get(row["label"], row["label_name"]) if row["label"] is not None else row["label_name"]


def _relative_box(row: dict[str, Any], prefix: str, size: tuple[int, int]) -> list[float] | None:
    """`<prefix>_x0..y1` (absolute xyxy) as FiftyOne's relative [x, y, w, h]; None where the row has no such box."""
    box = [row[f"{prefix}_{corner}"] for corner in _CORNERS]
    return None if box[0] is None else _relative(box, size)


def _relative(box: list[float], size: tuple[int, int]) -> list[float]:
    """An absolute xyxy box as FiftyOne's relative [x, y, w, h] on an image of `size` (width, height)."""
    x0, y0, x1, y1 = box
    width, height = size
    return [x0 / width, y0 / height, (x1 - x0) / width, (y1 - y0) / height]


def _instance_marks(folder: Path, instance_id: str, explainer: str, row: dict[str, Any], label: str,
                    grids: dict[tuple[str, str], np.ndarray], image: dict[str, Any]
                    ) -> tuple[fo.Heatmap | None, fo.Keypoint | None]:
    """What an instance sample draws of its explainer's row: the map's heatmap PNG (None where the run stored no
    map) and the findings' cue peak (None where they put none)."""
    key = (instance_id, explainer)
    heatmap = (_heatmap(folder / "instances" / explainer / f"{_safe(instance_id)}.png", grids[key], image)
               if key in grids else None)
    return heatmap, _cue_peak(row, label, (image["width"], image["height"]))


def _cue_peak(row: dict[str, Any], label: str, size: tuple[int, int]) -> fo.Keypoint | None:
    """The row's off-object peak (`peak_x`, `peak_y`, original pixels) in relative coordinates, as the
    keypoint both datasets draw; None where the findings put no peak."""
    if row["peak_x"] is None:
        return None
    width, height = size
    return fo.Keypoint(label=label, points=[(row["peak_x"] / width, row["peak_y"] / height)],
                       audit_instance_id=row["instance_id"], explainer=row["explainer"],
                       localised=row["localised_drop"] is not None)


def _unit(grid: np.ndarray) -> np.ndarray:
    """A map scaled to [0, 1] by its maximum (maps are raw and differ in scale); negative evidence is not shown."""
    positive = np.clip(grid, 0, None)
    peak = positive.max()
    return positive / peak if peak > 0 else positive


def _heatmap(path: Path, grid: np.ndarray, image: dict[str, Any]) -> fo.Heatmap:
    """Write the grid map laid over the original image of its `images` row (`reports.overlay`) as an 8-bit
    PNG scaled by the map's maximum (255 at its peak); its `fo.Heatmap`, whose range starts at `HEATMAP_FLOOR`
    of that maximum (the App leaves lower pixels unpainted). Drawn at the image's size, or at the model's
    input size where that is smaller (the map holds no finer detail, and the App stretches a heatmap over its
    image): a 12000 x 9000 photo's map is not a 100 MB raster."""
    width, height = fit_size(image["width"], image["height"], max(image["input_width"], image["input_height"]))
    values = map_to_image(_unit(grid), Geometry.from_image_row(image, grid.shape), raster=(height, width))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(values, 0, 1) * _PNG_MAX).astype(np.uint8)).save(path)
    return fo.Heatmap(map_path=str(path), range=[round(HEATMAP_FLOOR * _PNG_MAX), _PNG_MAX])


def _cues(instances: pa.Table) -> dict[str, list[str]]:
    """Candidate cue id -> the ids of the instances the findings put in it (none without a `cue_id` column)."""
    if "cue_id" not in instances.column_names:
        return {}
    cues: dict[str, list[str]] = {}
    for row in instances.select(["cue_id", "instance_id"]).to_pylist():
        if row["cue_id"] is not None:
            cues.setdefault(row["cue_id"], []).append(row["instance_id"])
    return cues


def _dataset(name: str) -> fo.Dataset:
    """The persistent dataset `name`, created empty the first time."""
    return fo.load_dataset(name) if fo.dataset_exists(name) else fo.Dataset(name, persistent=True)


def _evaluate(image_ds: fo.Dataset, run: _Run) -> str | None:
    """FiftyOne's evaluation of the run's predictions against its GT: COCO-style for a detection run with a
    COCO json, `evaluate_classifications` over a classification run's images that have a true class (each
    image's boolean `eval_<run>` says whether its prediction is right); returns the eval key, None when there
    is nothing to evaluate against.

    One evaluation per run, none per explainer: an explainer explains the predictions and changes none, so
    each would evaluate the same labels to the same result. Explainers differ in their maps, which the scores
    (`mass_in_gt`, the AUCs, the flags) and the per-explainer views compare."""
    eval_key = f"eval_{field_name(run.run_id)}"
    if run.task == "classify":
        judged = _of_run(image_ds, run.run_id).exists("ground_truth").exists("prediction")
        if not len(judged):
            return None
    elif run.coco is None:
        return None
    if eval_key in image_ds.list_evaluations():
        image_ds.delete_evaluation(eval_key)  # a re-push evaluates afresh
    if run.task == "classify":
        judged.evaluate_classifications("prediction", gt_field="ground_truth", eval_key=eval_key, progress=False)
    else:
        _of_run(image_ds, run.run_id).evaluate_detections("predictions", gt_field="ground_truth", eval_key=eval_key,
                                                          progress=False)
    return eval_key


def _check_task(image_ds: fo.Dataset, instance_ds: fo.Dataset, task: str) -> None:
    """Refuse to push a `task` run into datasets holding the other task's runs: their label fields have the
    same names and other types (Detections, Classification), which one dataset cannot hold."""
    held = _held_task(image_ds, instance_ds)
    if held not in (None, task):
        raise ValueError(f"dataset {image_ds.name!r} holds {held} runs, whose labels are not a {task} run's: push "
                         "this run to another dataset (--dataset)")


def _held_task(image_ds: fo.Dataset, instance_ds: fo.Dataset) -> str | None:
    """The task of the runs the datasets hold, None while they hold none."""
    if image_ds.has_field("predictions"):
        return "detect"
    for ds in (image_ds, instance_ds):
        if ds.has_field("prediction"):
            return "classify" if ds.get_field("prediction").document_type is fo.Classification else "detect"
    return None


def _of_run(ds: fo.Dataset, run_id: str | None) -> DatasetView:
    return ds.match(F("run_id") == run_id) if run_id is not None else ds.view()


def _label_fields(ds: fo.Dataset) -> dict[str, bool]:
    """The image dataset's fields that hold instances, each with whether it is a list (Detections) rather than
    one label (a classification run's Classification)."""
    if ds.has_field("predictions"):
        return dict.fromkeys(LABEL_FIELDS, True)
    return {field: False for field in CLASSIFY_LABEL_FIELDS if ds.has_field(field)}


def _image_view(ds: fo.Dataset, run_id: str | None, condition: Any) -> DatasetView:
    """The run's images that have an instance (prediction or miss) meeting `condition`, showing only those."""
    view = _of_run(ds, run_id)
    fields = _label_fields(ds)
    for field in fields:
        view = view.filter_labels(field, condition, only_matches=False)
    counts = [F(f"{field}.detections").length() if listed else F(field).exists().if_else(1, 0)
              for field, listed in fields.items()]
    return view.match(sum(counts, E(0)) > 0)


def _lowest_over_labels(ds: fo.Dataset, field: str) -> Any:
    """The smallest `field` over an image's remaining instances: what an image view is sorted by."""
    values = [F(f"{label_field}.detections.{field}") if listed else E([F(f"{label_field}.{field}")])
              for label_field, listed in _label_fields(ds).items()]
    return E([]).extend(*values).min()


def _save_views(image_ds: fo.Dataset, instance_ds: fo.Dataset, run: _Run, views: list[_View], overwrite: bool) -> list[str]:
    """Save the run's review views on both datasets and one view per explainer on the instances; the names
    of those the datasets hold."""
    names = []
    for view in views:
        name = view_name(run.run_id, view.suffix)
        on_images = _image_view(image_ds, run.run_id, view.condition)
        on_instances = _of_run(instance_ds, run.run_id).match(view.condition)
        if view.sort_field is not None:
            on_images = on_images.sort_by([(_lowest_over_labels(image_ds, view.sort_field), 1), ("filepath", 1)])
            on_instances = sorted_by(on_instances, view.sort_field)
        saved = [_save(ds, name, _without(shown, hidden), view.description, overwrite) for ds, shown, hidden in (
            (image_ds, on_images, view.hidden_on_images), (instance_ds, on_instances, view.hidden_on_instances))]
        names.extend([name] if any(saved) else [])
    for explainer in run.explainers:
        name = explainer_view(run.run_id, explainer)
        if _save(instance_ds, name, _of_run(instance_ds, run.run_id).match(F("explainer") == explainer),
                 f"the maps of explainer {explainer}", overwrite):
            names.append(name)
    return names


def _without(view: DatasetView, fields: tuple[str, ...]) -> DatasetView:
    """`view` less those of `fields` its dataset has."""
    present = [field for field in fields if view.has_field(field)]
    return view.exclude_fields(present) if present else view


def _save(ds: fo.Dataset, name: str, view: DatasetView, description: str, overwrite: bool) -> bool:
    """Save `view` as `name` (with `overwrite`, or where the name is free); an empty view is not saved, and
    overwriting with one deletes the view of that name, which would show what the rule no longer selects.
    Returns whether `ds` holds a view `name` now."""
    if overwrite or not ds.has_saved_view(name):
        if len(view):
            ds.save_view(name, view, description=description, overwrite=True)
        elif ds.has_saved_view(name):
            ds.delete_saved_view(name)
    return ds.has_saved_view(name)


def _set_app_config(ds: fo.Dataset, heatmap: str, explainers: list[str]) -> None:
    """Open the App on `ds` showing FiftyOne's default active fields and `heatmap` (the module docstring says
    why), coloured by `_color_scheme`."""
    paths = fo.DatasetAppConfig.default_active_fields(ds).paths
    ds.app_config.active_fields = fo.ActiveFields(paths=[*paths, heatmap] if ds.has_field(heatmap) else paths)
    ds.app_config.color_scheme = _color_scheme(ds, explainers)
    ds.save()


def _color_scheme(ds: fo.Dataset, explainers: list[str]) -> fo.ColorScheme:
    """Colour by value: `HEATMAP_COLORSCALE` on every heatmap field of `ds`, boxes by their `outcome`, the cue
    keypoints of every explainer in `CUE_COLOR`; the GT boxes keep FiftyOne's colour per class."""
    outcomes = [{"value": outcome, "color": color} for outcome, color in OUTCOME_COLORS.items()]
    fields = [{"path": path, "colorByAttribute": "outcome", "valueColors": outcomes}
              for path in _OUTCOME_FIELDS if ds.has_field(path)]
    fields.append({"path": "cue_peak", "colorByAttribute": "explainer",
                   "valueColors": [{"value": explainer, "color": CUE_COLOR} for explainer in explainers]})
    return fo.ColorScheme(color_by="value", fields=fields, colorscales=[
        {"path": path, "name": HEATMAP_COLORSCALE} for path in ds.get_field_schema(embedded_doc_type=fo.Heatmap)])
