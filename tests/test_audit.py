"""The audit end to end: the real CLI, the real Prefect flow, real Parquet and DuckDB.

Covers resume (a killed run rerun to exactly the rows of an uninterrupted one), bad input as `errors`
rows, read-only SQL, and what the shipped model's maps say about where it looks.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from cli import CLI, invoke, invoke_ok, run_ok as _run

from eive_audit.storage.catalog import query

# Tests of the module's `small_model` (and its `straight` run) share one worker: the model is written once.
SMALL_MODEL = pytest.mark.xdist_group("small-model-audit")


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small_model")
    invoke_ok("init-model", "--family", "conditional-detr-small", "--num-labels", "4", "--out", str(out))
    return out


def _synth_args(synth: Path, model: Path, out: Path, coco: Path | None = None) -> list[str]:
    """The small model on the synth val split. No findings: a random-init model flags nearly every instance,
    which makes findings cost seven times the audit, and what these tests check (resume, SQL, faithfulness
    budgets) lives in the shards' tables, not in findings (tests/test_findings.py). No report either: its
    figures cost half a small run and are tests/test_report.py's. `coco`: a subset of the split instead."""
    return ["--coco", str(coco or synth / "annotations" / "val.json"), "--images", str(synth / "images" / "val"),
            "--model", str(model), "--out", str(out), "--score-threshold", "0", "--max-detections", "5",
            "--shard-size", "4", "--batch-size", "4", "--device", "cpu", "--no-findings", "--no-report"]


def _table_counts(store: Path, run_id: str) -> dict[str, int]:
    return {t: query(store, f"SELECT count(*) AS n FROM {t} WHERE run_id = ?", [run_id]).column("n")[0].as_py()
            for t in ("images", "instances", "maps", "errors")}


@pytest.fixture(scope="module")
def straight(synth: Path, small_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(store, summary) of an uninterrupted `run` of the synth val split with the small model."""
    store = tmp_path_factory.mktemp("straight")
    return store, _run(*_synth_args(synth, small_model, store))


@SMALL_MODEL
def test_killed_run_resumes_to_the_rows_of_an_uninterrupted_run(synth: Path, small_model: Path, tmp_path: Path,
                                                                 straight: tuple[Path, dict],
                                                                 subprocess_env: dict[str, str]) -> None:
    straight_store, straight = straight
    assert straight["images"] == 40 and sum(straight["instances"].values()) > 0

    store = tmp_path / "killed"
    # The one `run` started as a user starts it, so that kill -9 stops a real process mid-run.
    proc = subprocess.Popen([*CLI, "run", *_synth_args(synth, small_model, store)], env=subprocess_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    done = store / "_done" / f"run_id={straight['run_id']}"  # its markers; "[!.]*" leaves out a half-written one
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(done.glob("[!.]*"))) < 3 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_before = len(list(done.glob("[!.]*")))
    assert 3 <= finished_before < 10, "the kill must land mid-run"

    resumed = _run(*_synth_args(synth, small_model, store))
    assert resumed["run_id"] == straight["run_id"], "same command, same config hash"
    assert resumed["shards_skipped"] >= finished_before
    assert _table_counts(store, resumed["run_id"]) == _table_counts(straight_store, straight["run_id"])
    repeats = query(store, "SELECT instance_id, explainer, count(*) AS n FROM instances GROUP BY ALL HAVING n > 1")
    assert repeats.num_rows == 0, "no instance id repeats"

    again = _run(*_synth_args(synth, small_model, store))
    assert again["shards_skipped"] == 10, "a finished run is skipped whole"


@SMALL_MODEL
def test_bad_images_become_error_rows_and_the_run_goes_on(broken: tuple[Path, Path], small_model: Path, tmp_path: Path) -> None:
    ann, images = broken
    summary = _run("--coco", str(ann), "--images", str(images), "--model", str(small_model), "--out", str(tmp_path),
                   "--score-threshold", "0", "--max-detections", "3", "--device", "cpu", "--no-report")
    errors = query(tmp_path, "SELECT image_id, annotation_id, stage, type FROM errors ORDER BY image_id, annotation_id")
    assert [tuple(r.values()) for r in errors.to_pylist()] == [
        (2, None, "source", "missing_file"), (3, None, "source", "unreadable_image"),
        (4, None, "source", "path_escapes_root"), (5, 11, "source", "box_out_of_bounds"),
        (5, 12, "source", "degenerate_box"), (5, 13, "source", "unknown_category"),
    ]
    ok = query(tmp_path, "SELECT image_id FROM images WHERE status = 'ok' ORDER BY image_id").column("image_id").to_pylist()
    assert ok == [1, 5] and summary["images"] == 5


@SMALL_MODEL
def test_sql_cli_answers_over_every_table_and_refuses_writes(straight: tuple[Path, dict]) -> None:
    store, _ = straight
    sql = ["sql", "--store", str(store)]
    out = invoke_ok(*sql, "SELECT count(*) AS n FROM maps JOIN instances USING (run_id, instance_id, explainer)",
                    "--format", "json")
    assert json.loads(out)[0]["n"] > 0
    out = invoke_ok(*sql, "SELECT outcome, count(*) AS n FROM instances GROUP BY outcome", "--format", "csv")
    assert out.splitlines()[0] == "outcome,n"
    blob = 'SELECT grid_h * grid_w * 2 AS size, "map" FROM maps LIMIT 1'  # BLOBs as base64, in JSON and CSV alike
    [row] = json.loads(invoke_ok(*sql, blob, "--format", "json"))
    assert len(base64.b64decode(row["map"], validate=True)) == row["size"]
    assert invoke_ok(*sql, blob, "--format", "csv").splitlines()[1] == f"{row['size']},{row['map']}"
    out = invoke_ok(*sql, "SELECT count(*) FROM errors")
    assert "0" in out
    for statement in ("DROP VIEW instances", "INSERT INTO runs VALUES (1)", "COPY instances TO 'x.csv'"):
        refused = invoke(*sql, statement)
        assert refused.code == 2 and "read-only" in refused.stderr, statement
    assert query(store, "SELECT count(*) AS n FROM instances").column("n")[0].as_py() > 0


def _coco_subset(coco_tiny: Path, tmp_path: Path, n_images: int | None) -> Path:
    raw = json.loads((coco_tiny / "annotations" / "instances_val2017.json").read_text())
    keep = {img["id"] for img in raw["images"][:n_images]}
    raw["images"] = [img for img in raw["images"] if img["id"] in keep]
    raw["annotations"] = [a for a in raw["annotations"] if a["image_id"] in keep]
    path = tmp_path / "subset.json"
    path.write_text(json.dumps(raw))
    return path


# slow (`make test-all`): 800 px DETR-R50 forwards cost a minute of CI's two cores. The default suite keeps the
# published architecture's batched 800 px forward on real COCO images (tests/test_models.py::test_detr_r50_at_800px)
# and the audit path on the small models here.
@pytest.mark.slow
@pytest.mark.parametrize("n_images", [2, None])  # 2: one batch
def test_detr_r50_audit_of_real_coco_images(coco_tiny: Path, detr_r50_dir: Path, tmp_path: Path, n_images: int | None) -> None:
    ann = _coco_subset(coco_tiny, tmp_path, n_images)
    n = len(json.loads(ann.read_text())["images"])
    summary = _run("--coco", str(ann), "--images", str(coco_tiny / "val2017"), "--model", str(detr_r50_dir),
                   "--out", str(tmp_path / "store"), "--score-threshold", "0", "--max-detections", "10",
                   "--batch-size", "2", "--device", "cpu",
                   # every forward at 800 px costs seconds on a CPU and a random-init model's drops are noise: a
                   # verification (one forward an image) shows findings work at real size; nothing is localised
                   "--findings-forward-budget", "1", "--no-report")
    assert summary["images"] == n and summary["errors"] == 0
    store = tmp_path / "store"
    per_image = query(store, "SELECT image_id, count(*) FILTER (WHERE outcome != 'fn') AS kept FROM instances "
                             "GROUP BY image_id")
    assert all(k == 10 for k in per_image.column("kept").to_pylist()), "top 10 detections per image"
    grids = query(store, "SELECT DISTINCT grid_h, grid_w FROM maps").to_pylist()
    assert all(g["grid_h"] * 32 >= 800 - 32 for g in grids), "an 800 px input gives a stride-32 grid"
    masses = query(store, "SELECT min(mass_in_pred) AS lo, max(mass_in_pred) AS hi FROM instances").to_pylist()[0]
    assert 0.0 <= masses["lo"] <= masses["hi"] <= 1.0 + 1e-6
    verified = query(store, "SELECT count(*) AS n FROM instances WHERE verification_drop IS NOT NULL").to_pylist()[0]
    instances = query(store, "SELECT count(*) AS n FROM instances").to_pylist()[0]["n"]
    assert verified["n"] == instances, "findings re-scored every instance at real size, one forward an image"


@SMALL_MODEL
def test_faithfulness_budgets_fill_exactly_the_chosen_rows(synth: Path, synth_val_subset, small_model: Path,
                                                           tmp_path: Path) -> None:
    """Three runs of 12 images (60 instances: room for every budget, and the runs a third of the split's cost)."""
    args = _synth_args(synth, small_model, tmp_path, coco=synth_val_subset(12, tmp_path / "val12.json"))
    sample = _run(*args, "--faithfulness", "sample:5", "--faithfulness-steps", "3")
    rows = query(tmp_path, "SELECT deletion_auc, insertion_auc, faithfulness_steps FROM instances WHERE run_id = ?",
                 [sample["run_id"]]).to_pylist()
    filled = [r for r in rows if r["insertion_auc"] is not None]
    assert len(filled) == 5 == sample["with_faithfulness"]
    assert all(r["deletion_auc"] is not None and r["faithfulness_steps"] == 3 for r in filled)
    assert all(r["deletion_auc"] is None and r["faithfulness_steps"] is None for r in rows if r not in filled)

    flagged = _run(*args, "--faithfulness", "flagged", "--faithfulness-steps", "2", "--score-threshold", "0.05",
                   "--findings-off-object", "0.8", "--findings-background", "0.8")  # a random model looks off-object
    chosen = query(tmp_path, "SELECT outcome, flag_off_object, flag_background_fp, flag_miss_elsewhere, "
                             "insertion_auc FROM instances WHERE run_id = ? ORDER BY instance_id, explainer",
                   [flagged["run_id"]]).to_pylist()
    # the one off-object rule: the flags the audit wrote with each shard choose the instances
    expected = [r for r in chosen if r["flag_off_object"] or r["flag_background_fp"] or r["flag_miss_elsewhere"]]
    assert expected and len(expected) < len(chosen)
    assert [r for r in chosen if r["insertion_auc"] is not None] == expected

    odam = _run(*args, "--faithfulness", "sample:3", "--faithfulness-steps", "2", "--faithfulness-protocol", "odam",
                "--faithfulness-baseline", "noise")
    assert odam["with_faithfulness"] == 3 and odam["run_id"] != sample["run_id"]
    refused = invoke("run", *args, "--faithfulness", "all", "--faithfulness-protocol", "odam")
    assert refused.code == 2 and "noise" in refused.stderr


def test_shipped_model_eive_and_aha_maps_beat_random_maps_on_both_aucs(synth: Path, synth_val_subset,
                                                                     tmp_path: Path) -> None:
    """`run --explainer eive,aha` on the shipped detector (aha: its shipped explainer, MODEL/aha, found by name),
    then the same instances and protocol once more with random maps, on 10 images (about 25 true positives;
    20 or all 40 cost two or four times as much and claim nothing more)."""
    import torch

    from eive_audit.pipeline.shard import model_and_source
    from eive_audit.pipeline.audit import faithfulness_of_rows
    from eive_audit.pipeline.batching import iter_batches
    from eive_audit.pipeline.config import AuditConfig
    from eive_audit.pipeline.metrics.faithfulness import FaithfulnessConfig
    from eive_audit.storage.maps import decode_map

    config = AuditConfig(images=synth / "images" / "val", coco=synth_val_subset(10, tmp_path / "val10.json"), out=tmp_path,
                         faithfulness={"instances": "all", "steps": 10}, device="cpu")
    # --no-findings: this test asks about the faithfulness of the stored maps, which findings do not touch
    summary = _run("--coco", str(config.coco), "--images", str(config.images), "--out", str(tmp_path),
                   "--explainer", "eive,aha", "--faithfulness", "all", "--faithfulness-steps", "10", "--device", "cpu",
                   "--no-findings", "--no-report")
    rows = query(tmp_path, "SELECT i.*, m.grid_h, m.grid_w, m.map FROM instances i JOIN maps m "
                           "USING (run_id, instance_id, explainer) WHERE run_id = ? AND outcome = 'tp' "
                           "ORDER BY image_id, instance_id, explainer", [summary["run_id"]]).to_pylist()
    by_explainer = {name: [r for r in rows if r["explainer"] == name] for name in ("eive", "aha")}
    assert len(by_explainer["eive"]) >= 15 and all(r["insertion_auc"] is not None for r in rows)
    assert [r["instance_id"] for r in by_explainer["aha"]] == [r["instance_id"] for r in by_explainer["eive"]]
    eive = by_explainer["eive"]
    adapter, source, label_map = model_and_source(config)
    generator = torch.Generator().manual_seed(0)
    random_deletion, random_insertion = [], []
    stream = (x for i in sorted({r["image_id"] for r in eive}) for x in source.read(i))
    for item in iter_batches(stream, 8, adapter.preprocess_config.longest_edge):
        mine = [r for r in eive if r["image_id"] in {rec.image_id for rec in item.records}]
        noise = [torch.rand(r["grid_h"], r["grid_w"], generator=generator).numpy() for r in mine]
        assert all(decode_map(r["map"], r["grid_h"], r["grid_w"]).shape == n.shape for r, n in zip(mine, noise))
        result = faithfulness_of_rows(adapter, item, mine, noise, label_map, FaithfulnessConfig(steps=10))
        random_deletion += result.deletion_auc.tolist()
        random_insertion += result.insertion_auc.tolist()
    for name, chosen in by_explainer.items():
        deletion, insertion = np.mean([r["deletion_auc"] for r in chosen]), np.mean([r["insertion_auc"] for r in chosen])
        print(f"{name} deletion {deletion:.3f} vs random {np.mean(random_deletion):.3f}; "
              f"insertion {insertion:.3f} vs random {np.mean(random_insertion):.3f}")
        assert deletion < np.mean(random_deletion), name
        assert insertion > np.mean(random_insertion), name


@SMALL_MODEL
def test_image_folder_audit_has_detections_but_no_false_positives(synth: Path, small_model: Path, tmp_path: Path) -> None:
    summary = _run("--images", str(synth / "images" / "val"), "--model", str(small_model), "--out", str(tmp_path),
                   "--score-threshold", "0", "--max-detections", "2", "--shard-size", "20", "--device", "cpu",
                   "--no-report")
    assert summary["images"] == 40 and summary["instances"] == {"det": 80}
    rows = query(tmp_path, "SELECT count(*) AS n FROM instances WHERE mass_in_gt IS NULL AND mass_in_pred IS NOT NULL")
    assert rows.column("n")[0].as_py() == 80, "no GT: GT scores stay null, the map still scores its own box"


@SMALL_MODEL
def test_an_explainer_that_returns_empty_maps_leaves_null_scores_not_a_failed_run(
        synth: Path, small_model: Path, tmp_path: Path) -> None:
    """Perturbation and gradient methods can give an all-zero map (e.g. D-RISE with few masks on a weak
    model): it locates nothing, so its localisation scores are null, and the run and its other rows go on."""
    import torch

    from eive_audit.explainers.base import _REGISTRY, register
    from eive_audit.flows.audit import audit
    from eive_audit.pipeline.config import AuditConfig

    @register("test-empty")
    class Empty:  # no declared needs: gradient-free, any family
        def explain(self, model, batch, outputs, targets) -> torch.Tensor:  # noqa: ANN001
            return torch.zeros(len(targets), *outputs.grid)

    try:
        summary = audit(AuditConfig(images=synth / "images" / "val", coco=synth / "annotations" / "val.json",
                                    out=tmp_path, model=str(small_model), explainers=("eive", "test-empty"),
                                    score_threshold=0.0, max_detections=2, device="cpu", review={"report": False},
                                    findings={"enabled": False}))
    finally:
        _REGISTRY.pop("test-empty")
    rows = query(tmp_path, "SELECT explainer, count(*) AS n, count(mass_in_pred) AS scored FROM instances "
                           "WHERE run_id = ? GROUP BY explainer ORDER BY explainer", [summary["run_id"]]).to_pylist()
    assert [(r["explainer"], r["scored"] == r["n"] > 0) for r in rows] == [("eive", True), ("test-empty", False)]
    assert rows[1]["scored"] == 0 and rows[1]["n"] == rows[0]["n"]
    assert summary["errors"] == 0


def test_each_worker_thread_loads_its_own_model(small_model: Path) -> None:
    """The adapter adds hooks to its module at every forward: two threads must never share one module."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from eive_audit.pipeline.shard import worker_model

    both_started = threading.Barrier(2)  # so the two loads surely run on two threads

    def load_twice(_: int) -> tuple:
        both_started.wait(timeout=60)
        return worker_model(str(small_model), "cpu"), worker_model(str(small_model), "cpu")

    with ThreadPoolExecutor(2) as pool:
        (a, a_again), (b, b_again) = pool.map(load_twice, range(2))
    assert a is a_again and b is b_again, "a thread keeps its model for its next tasks"
    assert a is not b and a.model is not b.model


def test_a_store_of_another_schema_version_is_refused_before_any_image_is_read(
        synth: Path, small_model: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from eive_audit.cli import app
    from eive_audit.storage.schema import SCHEMA_VERSION, SCHEMA_VERSION_KEY
    from eive_audit.storage.writer import write_table

    old = write_table(tmp_path, "errors", "oldrun", "s00000", [{"shard": "s00000", "stage": "source", "type": "x",
                                                               "message": "written by an older release"}])
    pq.write_table(pq.read_table(old, partitioning=None).replace_schema_metadata(
        {SCHEMA_VERSION_KEY: str(SCHEMA_VERSION - 1).encode()}), old)
    result = CliRunner().invoke(app, ["run", *_synth_args(synth, small_model, tmp_path)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    removal = f"from eive_audit.storage import remove_run; remove_run('{tmp_path}', '<run_id>')"
    assert errors == [f"error: store {tmp_path} holds run(s) oldrun written with schema version {SCHEMA_VERSION - 1}; "
                      f"this version writes {SCHEMA_VERSION}: rerun into a new store or remove those runs with "
                      f"`python -c \"{removal}\"`"]
    assert sorted(p.name for p in tmp_path.glob("*/run_id=*")) == ["run_id=oldrun"], "nothing of the new run written"


@SMALL_MODEL
def test_a_run_where_every_image_failed_keeps_its_rows_and_exits_2(broken: tuple[Path, Path], small_model: Path,
                                                                     tmp_path: Path) -> None:
    ann, images = broken
    data = json.loads(ann.read_text())
    data["images"] = [image for image in data["images"] if image["id"] in (2, 3, 4)]  # the unreadable ones
    data["annotations"] = [ann for ann in data["annotations"] if ann["image_id"] in (2, 3, 4)]
    ann.write_text(json.dumps(data))
    result = invoke("run", "--coco", str(ann), "--images", str(images), "--model", str(small_model),
                    "--out", str(tmp_path), "--device", "cpu")
    assert result.code == 2
    run_id = json.loads(result.stdout.strip().splitlines()[-1])["run_id"]
    assert result.stderr.endswith(f"error: no image could be audited: all 3 failed (3 errors); see them with: "
                                  f"eive-audit sql --store {tmp_path} \"SELECT type, message FROM errors WHERE "
                                  f"run_id = '{run_id}'\"")
    assert result.stderr.count("error:") == 1
    assert json.loads(result.stdout.strip().splitlines()[-1])["audited"] == 0
    assert query(tmp_path, "SELECT count(*) AS n FROM errors").column("n").to_pylist() == [3]


@SMALL_MODEL
def test_a_failed_run_is_failed_with_its_error_and_a_rerun_finishes_it(synth: Path, small_model: Path,
                                                                        tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that raises is `failed` with its error, not `running` for ever; the same command then resumes it,
    and a later rerun that fails in its review step leaves the finished run finished."""
    from eive_audit.flows import audit as flow

    args = _synth_args(synth, small_model, tmp_path)

    def boom(*_: object, **__: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(flow, "faithfulness_selection", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        invoke("run", *args)
    runs = query(tmp_path, "SELECT status, error, finished_at FROM runs").to_pylist()
    assert runs == [{"status": "failed", "error": "RuntimeError: disk on fire", "finished_at": None}]
    monkeypatch.undo()

    run_id = _run(*args)["run_id"]
    finished = query(tmp_path, "SELECT status, error, created_at, finished_at FROM runs").to_pylist()
    assert [(r["status"], r["error"]) for r in finished] == [("finished", None)]

    monkeypatch.setattr(flow, "_review", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        invoke("run", *args)
    assert query(tmp_path, "SELECT status, error, created_at, finished_at FROM runs").to_pylist() == finished
    assert invoke_ok("report", "--store", str(tmp_path), "--out", str(tmp_path / "r.html"))
    assert run_id in (tmp_path / "r.html").read_text()
