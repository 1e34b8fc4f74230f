"""storage: schema round trips through Parquet and the DuckDB catalog, safe rewrites, read-only queries, maps."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import hypothesis.extra.numpy as hnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from eive_audit.storage import (
    SCHEMA_VERSION,
    SCHEMAS,
    ReadOnlyQueryError,
    SchemaVersionError,
    decode_map,
    encode_map,
    load_map,
    mark_shard_done,
    query,
    refresh_catalog,
    remove_run,
    shard_done,
    write_table,
)
from eive_audit.storage.catalog import _connect_read_only
from eive_audit.storage.schema import SCHEMA_VERSION_KEY
from eive_audit.storage.versions import stale_runs

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
MAP = encode_map(np.array([[0.0, 0.5], [1.0, 0.25]]))

# Per table: a first row with every column, a second with the required columns only (the rest must come back null).
# Floats are exact in float32 so values compare equal after the round trip.
SAMPLES: dict[str, list[dict[str, Any]]] = {
    "runs": [
        dict(config_hash="h1", config_json="{}", created_at=T0, finished_at=T0, status="failed", model="detr", task="detect",
             explainers="eive,chefer", n_images=2, n_instances=3, n_errors=0, seconds=1.5, error="RuntimeError: boom"),
        dict(config_hash="h2", config_json="{}", created_at=T0, status="running", model="detr", task="detect", explainers="eive",
             n_images=0, n_instances=0, n_errors=0, seconds=0.0),
    ],
    "images": [
        dict(image_id=1, shard="s0", file_path="a.jpg", width=640, height=480, input_height=600, input_width=800,
             padded_height=608, padded_width=800, n_gt=2, n_detections=3, status="ok",
             forward_ms=12.5, explain_ms=0.75, exif_orientation=6),
        dict(image_id=2, shard="s0", status="error"),
    ],
    "instances": [
        dict(instance_id="1-q7", image_id=1, shard="s0", explainer="eive", task="detect", outcome="tp", query=7, label=18,
             label_name="dog", score=0.875, pred_x0=1.0, pred_y0=2.0, pred_x1=30.0, pred_y1=40.0,
             gt_annotation_id=900, gt_x0=1.5, gt_y0=2.5, gt_x1=29.0, gt_y1=39.0, iou=0.75, mass_in_pred=0.5,
             mass_in_gt=0.625, mass_on_other_gt=0.125, peak_in_gt=True, compactness=0.25, deletion_auc=0.125,
             insertion_auc=0.5, faithfulness_steps=16, off_object_share=0.375, off_object_norm=0.125,
             spurious_score=0.5, flag_off_object=False, flag_reason=None, flag_background_fp=False, flag_miss_elsewhere=False, cue_id="eive:dog:0",
             verification_drop=0.5, localised_drop=0.5, specificity=0.25, peak_x=12.0,
             peak_y=20.0),
        dict(instance_id="1-q9", image_id=1, shard="s0", explainer="eive", task="detect", outcome="fp", query=9,
             label_name="cat", score=0.5, pred_x0=0.0, pred_y0=0.0, pred_x1=4.0, pred_y1=4.0),
    ],
    "maps": [
        dict(instance_id="1-q7", image_id=1, shard="s0", explainer="eive", grid_h=2, grid_w=2, map=MAP),
        dict(instance_id="1-q9", image_id=1, shard="s0", explainer="eive", grid_h=1, grid_w=1, map=encode_map(np.ones((1, 1)))),
    ],
    "findings": [
        dict(cue_id="eive:cat:1", shard="run", explainer="eive", label_name="cat", support=7, flagged_in_class=9,
             mean_spurious_score=0.625, offset_x=0.75, offset_y=-0.25, colour_mean=[0.5, 0.25, 0.125],
             colour_std=[0.0625, 0.125, 0.25], exemplar_ids=["1-q7"], exemplar_crops=[b"\x89PNG"], verified=3,
             verification_drop=0.5, confirmed=True),
        dict(cue_id="eive:dog:0", shard="run", explainer="eive", label_name="dog", support=5, flagged_in_class=5,
             mean_spurious_score=0.5, offset_x=0.0, offset_y=0.0, colour_mean=[], colour_std=[], exemplar_ids=[],
             exemplar_crops=[], verified=0, confirmed=False),
    ],
    "errors": [
        dict(image_id=3, annotation_id=77, shard="s0", stage="decode", type="unreadable_image", message="bad jpeg",
             path="c.jpg"),
        dict(shard="s0", stage="source", type="bad_json", message="no images key"),
    ],
}


def _files(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def test_samples_cover_every_table_and_column() -> None:
    assert set(SAMPLES) == set(SCHEMAS)
    for table, rows in SAMPLES.items():
        assert set(rows[0]) == set(SCHEMAS[table].names), table
        assert {f.name for f in SCHEMAS[table] if not f.nullable} == set(rows[1]), table


@pytest.mark.parametrize("table", sorted(SCHEMAS))
def test_table_round_trip(tmp_path: Path, table: str) -> None:
    path = write_table(tmp_path, table, "run-1", "s0", SAMPLES[table])
    mark_shard_done(tmp_path, "run-1", "s0")
    assert path == tmp_path / table / "run_id=run-1" / "s0.parquet"
    assert pq.read_schema(path).metadata[b"eive_audit_schema_version"] == str(SCHEMA_VERSION).encode()
    refresh_catalog(tmp_path)

    described = query(tmp_path, f"DESCRIBE {table}").to_pylist()
    assert [row["column_name"] for row in described] == [*SCHEMAS[table].names, "run_id"]
    assert described[-1]["column_type"] == "VARCHAR"
    got = query(tmp_path, f"SELECT * FROM {table} ORDER BY 1").to_pylist()
    expected = [{name: row.get(name) for name in SCHEMAS[table].names} | {"run_id": "run-1"} for row in SAMPLES[table]]
    assert got == expected


@pytest.mark.parametrize("table", sorted(SCHEMAS))
def test_empty_view_has_the_columns_of_a_written_one(tmp_path: Path, table: str) -> None:
    empty, written = tmp_path / "empty", tmp_path / "written"
    refresh_catalog(empty)
    write_table(written, table, "r", "s0", SAMPLES[table])
    mark_shard_done(written, "r", "s0")
    refresh_catalog(written)
    assert query(empty, f"SELECT count(*) AS n FROM {table}").column("n").to_pylist() == [0]
    assert query(empty, f"DESCRIBE {table}").to_pylist() == query(written, f"DESCRIBE {table}").to_pylist()


def test_rewriting_a_shard_replaces_it(tmp_path: Path) -> None:
    for _ in range(2):
        write_table(tmp_path, "images", "r", "s0", SAMPLES["images"])
    write_table(tmp_path, "images", "r", "s1", SAMPLES["images"][:1])
    for shard in ("s0", "s1"):
        mark_shard_done(tmp_path, "r", shard)
    refresh_catalog(tmp_path)
    counts = query(tmp_path, "SELECT count(*) AS n FROM images").column("n").to_pylist()
    assert counts == [3]  # 2 rows in s0 (written twice) + 1 in s1
    assert _files(tmp_path / "images") == ["run_id=r", "run_id=r/s0.parquet", "run_id=r/s1.parquet"]
    assert not list(tmp_path.glob(".*"))  # the catalog's temp file is gone too


def test_write_accepts_an_arrow_table_and_casts_numbers_safely(tmp_path: Path) -> None:
    data = pa.Table.from_pylist(SAMPLES["images"])  # ints inferred as int64, floats as double
    write_table(tmp_path, "images", "r", "s0", data)
    assert pq.read_table(tmp_path / "images" / "run_id=r" / "s0.parquet").schema.equals(SCHEMAS["images"])


def _bad(table: str, **changes: Any) -> list[dict[str, Any]]:
    return [SAMPLES[table][0] | changes]


@pytest.mark.parametrize(
    ("table", "rows", "column"),
    [
        ("images", _bad("images", colour="red"), "colour"),
        ("images", _bad("images", image_id="12"), "image_id"),
        ("images", _bad("images", width=1.5), "width"),
        ("images", _bad("images", width=2**40), "width"),
        ("images", _bad("images", status=None), "status"),
        ("images", [SAMPLES["images"][0], SAMPLES["images"][1] | {"height": "x"}], "height"),
        ("maps", _bad("maps", map="not bytes"), "map"),
        ("instances", _bad("instances", outcome="maybe"), "outcome"),
        ("instances", _bad("instances", peak_in_gt=1), "peak_in_gt"),
        ("runs", _bad("runs", created_at=datetime(2024, 5, 1)), "created_at"),
        ("images", pa.table({"image_id": ["1"]}), "image_id"),
    ],
)
def test_bad_rows_raise_naming_the_column(tmp_path: Path, table: str, rows: Any, column: str) -> None:
    with pytest.raises(ValueError, match=f"'{column}'"):
        write_table(tmp_path, table, "r", "s0", rows)
    assert not (tmp_path / table).exists()


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", "", ".hidden", "a..b", "x\\y", "run 1"])
def test_bad_run_ids_and_shards_raise(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="bad run_id"):
        write_table(tmp_path, "images", name, "s0", SAMPLES["images"])
    with pytest.raises(ValueError, match="bad shard"):
        write_table(tmp_path, "images", "r", name, SAMPLES["images"])
    with pytest.raises(ValueError, match="bad shard"):
        mark_shard_done(tmp_path, "r", name)
    with pytest.raises(ValueError, match="bad run_id"):
        remove_run(tmp_path, name)
    assert not list(tmp_path.rglob("*.parquet"))


def test_unknown_table_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown table"):
        write_table(tmp_path, "verdicts", "r", "s0", [])


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    root = tmp_path / "out"
    for table, rows in SAMPLES.items():
        write_table(root, table, "r", "s0", rows)
    mark_shard_done(root, "r", "s0")
    refresh_catalog(root)
    return root


@pytest.mark.parametrize(
    "sql",
    [
        "DROP VIEW images",
        "INSERT INTO images SELECT * FROM images",
        "CREATE TABLE x AS SELECT 1",
        "CREATE OR REPLACE VIEW images AS SELECT 1",
        "CREATE TEMP TABLE x AS SELECT 1",
        "COPY images TO '{root}/images/run_id=r/copy.parquet'",
        "COPY (SELECT 1) TO '{tmp}/copy.csv'",
        "EXPLAIN ANALYZE COPY (SELECT 1) TO '{root}/images/copy.csv'",
        "ATTACH '{tmp}/other.duckdb' AS other",
        "SET enable_external_access = true",
        "SELECT 1; DROP VIEW images",
    ],
)
def test_writes_through_query_are_refused(catalog: Path, sql: str) -> None:
    before = _files(catalog.parent)
    with pytest.raises(ReadOnlyQueryError, match="the catalog is opened read-only"):
        query(catalog, sql.format(root=catalog, tmp=catalog.parent))
    assert _files(catalog.parent) == before
    assert query(catalog, "SELECT count(*) AS n FROM images").column("n").to_pylist() == [2]


@pytest.mark.parametrize("sql", ["DROP VIEW images", "COPY (SELECT 1) TO '{tmp}/copy.csv'"])
def test_the_query_connection_is_a_backstop(catalog: Path, sql: str) -> None:
    """Below the SELECT-only check: the views live in a throw-away in-memory database, so even a statement run
    on the connection itself changes nothing the next query sees, and files outside the tables are refused."""
    before = _files(catalog.parent)
    with _connect_read_only(catalog) as con:
        try:
            con.execute(sql.format(tmp=catalog.parent))
        except duckdb.Error as exc:
            assert "disabled by configuration" in str(exc)
    assert _files(catalog.parent) == before
    assert query(catalog, "SELECT count(*) AS n FROM images").column("n").to_pylist() == [2]


def test_unfinished_shards_are_invisible_until_marked(catalog: Path) -> None:
    """A shard's tables are written before its marker: a reader during a run sees only finished shards."""
    write_table(catalog, "images", "r", "s1", SAMPLES["images"][:1])
    refresh_catalog(catalog)
    assert query(catalog, "SELECT count(*) AS n FROM images").column("n").to_pylist() == [2]
    mark_shard_done(catalog, "r", "s1")
    assert query(catalog, "SELECT count(*) AS n FROM images").column("n").to_pylist() == [3], \
        "query reads the shards as they are now, without waiting for a refresh"


def test_a_moved_store_is_read_where_it_is_and_only_there(catalog: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing in a store names an absolute path: a copy reads its own files, from any working directory,
    even one holding another store's files under the same relative names; DuckDB opens the moved catalog
    file by itself from inside the store."""
    import shutil

    moved = shutil.copytree(catalog, tmp_path / "moved")
    shutil.rmtree(catalog / "images")  # the original's files are gone: nothing may still point at them
    write_table(tmp_path / "decoy", "images", "r", "s0", SAMPLES["images"] * 5)
    monkeypatch.chdir(tmp_path / "decoy")
    assert query(moved, "SELECT count(*) AS n FROM images").column("n").to_pylist() == [2]
    monkeypatch.chdir(moved)
    with duckdb.connect("catalog.duckdb", read_only=True) as con:
        assert con.sql("SELECT count(*) FROM images").fetchall() == [(2,)]


def test_query_cannot_read_files_outside_the_tables(catalog: Path) -> None:
    secret = catalog.parent / "secret.csv"
    secret.write_text("a\n1\n")
    with pytest.raises(duckdb.PermissionException):
        query(catalog, f"SELECT * FROM read_csv('{secret}')")


def test_query_takes_one_statement(catalog: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        query(catalog, "SELECT 1; SELECT 2")


def test_query_without_a_catalog_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "catalog.duckdb")):
        query(tmp_path, "SELECT 1")


def test_load_map(catalog: Path) -> None:
    np.testing.assert_array_equal(load_map(catalog, "1-q7"), [[0.0, 0.5], [1.0, 0.25]])
    write_table(catalog, "maps", "r", "s1", [SAMPLES["maps"][0] | {"explainer": "chefer", "map": encode_map(np.zeros((2, 2)))}])
    mark_shard_done(catalog, "r", "s1")
    refresh_catalog(catalog)
    with pytest.raises(ValueError, match="2 maps"):
        load_map(catalog, "1-q7")
    np.testing.assert_array_equal(load_map(catalog, "1-q7", explainer="chefer"), np.zeros((2, 2)))
    with pytest.raises(KeyError, match="nope"):
        load_map(catalog, "nope")


def test_done_markers_and_remove_run(tmp_path: Path) -> None:
    for run_id in ("a", "b"):
        for table in ("images", "maps"):
            write_table(tmp_path, table, run_id, "s0", SAMPLES[table])
        mark_shard_done(tmp_path, run_id, "s0")
    assert shard_done(tmp_path, "a", "s0") and not shard_done(tmp_path, "a", "s1")
    assert (tmp_path / "_done" / "run_id=a" / "s0").is_file()

    remove_run(tmp_path, "a")
    remove_run(tmp_path, "never-written")  # nothing to delete is fine
    assert not shard_done(tmp_path, "a", "s0") and shard_done(tmp_path, "b", "s0")
    assert not list(tmp_path.glob("*/run_id=a"))
    refresh_catalog(tmp_path)
    assert query(tmp_path, "SELECT DISTINCT run_id FROM maps").column("run_id").to_pylist() == ["b"]


def _write_with_version(root: Path, table: str, run_id: str, version: bytes | None) -> None:
    """A shard as an older release wrote it: the same rows, its schema stamped `version` (None: unstamped)."""
    path = write_table(root, table, run_id, "s0", SAMPLES[table])
    data = pq.read_table(path, partitioning=None)
    metadata = {SCHEMA_VERSION_KEY: version} if version is not None else None
    pq.write_table(data.replace_schema_metadata(metadata), path)


def test_a_store_with_shards_of_another_schema_version_is_refused(catalog: Path) -> None:
    """union_by_name would fill an old file's missing columns with nulls; the catalog refuses the mix instead."""
    _write_with_version(catalog, "instances", "old", str(SCHEMA_VERSION - 1).encode())
    _write_with_version(catalog, "images", "older", None)
    before = (catalog / "catalog.duckdb").read_bytes()
    assert stale_runs(catalog) == {str(SCHEMA_VERSION - 1): {"old"}, "none": {"older"}}
    with pytest.raises(SchemaVersionError) as refused:
        refresh_catalog(catalog)
    message = str(refused.value)
    assert message.startswith(f"store {catalog.resolve()} holds run(s) old written with schema version "
                              f"{SCHEMA_VERSION - 1}; run(s) older written with schema version none; "
                              f"this version writes {SCHEMA_VERSION}: rerun into a new store or remove those runs")
    assert "remove_run(" in message and "\n" not in message
    assert (catalog / "catalog.duckdb").read_bytes() == before, "the old catalog stays as it was"

    remove_run(catalog, "old")
    remove_run(catalog, "older")
    assert stale_runs(catalog) == {}
    refresh_catalog(catalog)
    assert query(catalog, "SELECT DISTINCT run_id FROM instances").column("run_id").to_pylist() == ["r"]


FLOAT16_MAX = float(np.finfo(np.float16).max)


@settings(database=None, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64]),
        shape=hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=32),
        elements=st.floats(-FLOAT16_MAX, FLOAT16_MAX, allow_nan=False, allow_infinity=False, width=32),
    )
)
def test_map_round_trip(array: np.ndarray) -> None:
    data = encode_map(array)
    assert len(data) == array.size * 2
    decoded = decode_map(data, *array.shape)
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, array.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize(
    "array", [np.zeros(4), np.zeros((2, 2, 2)), np.zeros((0, 3)), np.array([[0.0, np.nan]]), np.array([[np.inf]]),
              np.array([[1e6]])]
)
def test_encode_refuses_bad_maps(array: np.ndarray) -> None:
    with pytest.raises(ValueError):
        encode_map(array)


def test_decode_refuses_a_size_mismatch() -> None:
    with pytest.raises(ValueError, match="2 x 3 float16 grid needs 12"):
        decode_map(encode_map(np.zeros((2, 2))), 2, 3)


def test_files_follow_the_umask(tmp_path: Path) -> None:
    """Shards, markers and the catalog get 0666 less the umask, as every other file the user writes."""
    import os

    previous = os.umask(0o027)
    try:
        write_table(tmp_path, "images", "r", "s0", SAMPLES["images"])
        mark_shard_done(tmp_path, "r", "s0")
        refresh_catalog(tmp_path)
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in tmp_path.rglob("*") if path.is_file()}
    assert modes == {"s0.parquet": 0o640, "s0": 0o640, "catalog.duckdb": 0o640}


def test_a_rerun_never_turns_a_finished_run_back(tmp_path: Path) -> None:
    """The runs row of a rerun (same id) stays `finished` through its start and a failure; a failed run is
    `failed` with its error, and resumes to `finished` keeping its first start time."""
    from eive_audit.storage import RunInfo, fail_run, finish_run, start_run

    def info(at: datetime) -> RunInfo:
        return RunInfo("r", "h", "{}", "detr", ("eive",), at)

    def row() -> dict[str, Any]:
        return query(tmp_path, "SELECT status, error, created_at, n_images FROM runs").to_pylist()[0]

    later = datetime(2024, 5, 2, tzinfo=timezone.utc)
    start_run(tmp_path, info(T0))
    assert row() == {"status": "running", "error": None, "created_at": T0, "n_images": 0}
    fail_run(tmp_path, info(T0), 1.0, KeyboardInterrupt())
    assert row() == {"status": "failed", "error": "KeyboardInterrupt", "created_at": T0, "n_images": 0}
    start_run(tmp_path, info(later))
    finish_run(tmp_path, info(later), 2.0, {"images": 4})
    finished = row()
    assert finished == {"status": "finished", "error": None, "created_at": T0, "n_images": 4}
    start_run(tmp_path, info(later))
    fail_run(tmp_path, info(later), 3.0, ValueError("report broke"))
    assert row() == finished


def _shard_rows(image_id: int, n: int) -> dict[str, list[dict[str, Any]]]:
    """A part of a shard as the audit yields it: `n` instances of one image, maps as float arrays."""
    base = {"image_id": image_id, "explainer": "eive"}
    return {"images": [{"image_id": image_id, "status": "ok"}],
            "instances": [base | {"instance_id": f"{image_id}-q{q}", "task": "detect", "outcome": "tp", "query": q,
                                  "label_name": "dog",
                                  "score": 0.5, "pred_x0": 0.0, "pred_y0": 0.0, "pred_x1": 1.0, "pred_y1": 1.0}
                          for q in range(n)],
            "maps": [base | {"instance_id": f"{image_id}-q{q}", "grid_h": 1, "grid_w": 2,
                             "map": np.array([[q, 1.0]])} for q in range(n)]}


def test_a_shard_writer_prepares_parts_behind_the_audit_and_writes_them_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts are prepared on the writer's thread while the caller goes on (here: while preparing is held,
    two parts are accepted at once), the files hold every part in order, and the marker comes last."""
    import threading

    from eive_audit.storage import shards

    held, prepared = threading.Event(), []
    to_table = shards.to_table

    def slow_to_table(table: str, rows: list) -> pa.Table:
        held.wait(timeout=30)
        prepared.append(table)
        return to_table(table, rows)

    monkeypatch.setattr(shards, "to_table", slow_to_table)
    writer = shards.ShardWriter(tmp_path, "r", "s0")
    writer.add(_shard_rows(1, 2))
    writer.add(_shard_rows(2, 3))  # returns: the writer is two parts deep
    assert not prepared and not shard_done(tmp_path, "r", "s0"), "nothing prepared or written while held"
    held.set()
    writer.close()
    assert writer.counts == {"images": 2, "instances": 5, "maps": 5, "errors": 0}
    rows = pq.read_table(tmp_path / "instances" / "run_id=r" / "s0.parquet").select(["instance_id", "shard"])
    assert rows.to_pylist() == [{"instance_id": i, "shard": "s0"} for i in ("1-q0", "1-q1", "2-q0", "2-q1", "2-q2")]
    maps = pq.read_table(tmp_path / "maps" / "run_id=r" / "s0.parquet").column("map").to_pylist()
    assert [decode_map(m, 1, 2)[0, 0] for m in maps] == [0, 1, 0, 1, 2]


def test_a_shard_that_fails_writes_nothing_and_the_shards_before_it_stay(tmp_path: Path) -> None:
    from eive_audit.storage.shards import ShardWriter

    with ShardWriter(tmp_path, "r", "s0") as writer:
        writer.add(_shard_rows(1, 2))
    before = _files(tmp_path)
    with pytest.raises(RuntimeError, match="the model failed"), ShardWriter(tmp_path, "r", "s1") as writer:
        writer.add(_shard_rows(2, 1))
        raise RuntimeError("the model failed")
    bad = _shard_rows(3, 1)
    bad["instances"][0]["score"] = "high"
    with pytest.raises(ValueError, match="score"), ShardWriter(tmp_path, "r", "s2") as writer:
        writer.add(bad)
    assert _files(tmp_path) == before and shard_done(tmp_path, "r", "s0")
    refresh_catalog(tmp_path)
    assert not shard_done(tmp_path, "r", "s1") and not shard_done(tmp_path, "r", "s2")
    assert query(tmp_path, "SELECT count(*) AS n FROM instances").to_pylist() == [{"n": 2}]
