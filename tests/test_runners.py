"""Scale-out: the same audit on two threads, on a real Dask LocalCluster of two worker processes (one of them
killed by its PID mid-run) and on a local Ray (slow: `make test-all`) stores exactly the rows of the sequential
run, table by table; the runner options reach the config from the CLI, a config file and a schedule; several
GPUs are shared out one per worker. The clusters are real (prefect-dask, prefect-ray), so each run costs tens of
seconds: the runs share one module, one dataset and one sequential baseline."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from typer.testing import CliRunner

from eive_audit import cli
from eive_audit.pipeline.config import AuditConfig
from eive_audit.storage.catalog import query
from test_cli_flags import captured  # noqa: F401 - the configs `run` would audit, Prefect not started

# Every table, ordered by its key; timing columns are the only thing a runner may change.
ORDER = {"instances": "instance_id, explainer", "maps": "instance_id, explainer", "findings": "cue_id",
         "errors": "image_id, annotation_id", "images": "image_id"}
TIMINGS = {"images": " EXCLUDE (forward_ms, explain_ms)"}
SHARDS = 5


@pytest.fixture(scope="module")
def config_of(synth: Path, synth_val_subset, tmp_path_factory: pytest.TempPathFactory):
    """`config_of(out, **runner)`: the shipped model on 20 synth images in 5 shards, with faithfulness and
    findings, so every step the flow submits runs on the runner."""
    annotations = synth_val_subset(20, tmp_path_factory.mktemp("runners") / "val20.json")

    def config(out: Path, **runner: Any) -> AuditConfig:
        """CPU sums depend on torch's thread count and Dask and Ray workers run one: so does every run here."""
        return AuditConfig(torch_threads=1, images=synth / "images" / "val", coco=annotations, out=out, score_threshold=0.3,
                           shard_size=20 // SHARDS, batch_size=2, device="cpu", review={"report": False},
                           faithfulness={"instances": "sample:6", "steps": 2}, findings={"forward_budget": 1.4},
                           **runner)
    return config


def _stored(config: AuditConfig, resumed: bool = False) -> tuple[str, dict[str, list[dict]]]:
    """The run's id and every table's rows; `resumed`: a shard may have been found done by a re-run task."""
    import torch

    from eive_audit.flows.audit import audit

    threads = torch.get_num_threads()
    try:
        summary = audit(config)
    finally:  # the threads runner sets this process's torch: give the next tests their cores back
        torch.set_num_threads(threads)
    assert summary["images"] == 20 and summary["with_faithfulness"] == 6
    assert summary["shards_skipped"] == 0 or resumed
    return summary["run_id"], {
        table: query(config.out, f"SELECT *{TIMINGS.get(table, '')} FROM {table} WHERE run_id = ? ORDER BY {key}",
                     [summary["run_id"]]).to_pylist() for table, key in ORDER.items()}


@pytest.fixture(scope="module")
def sequential(config_of, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, list[dict]]]:
    run_id, tables = _stored(config_of(tmp_path_factory.mktemp("sequential"), workers=1))
    assert len(tables["instances"]) > 20 and len(tables["maps"]) == len(tables["instances"])
    assert any(row["spurious_score"] is not None for row in tables["instances"]), "findings ran"
    return run_id, tables


def _same_rows(got: tuple[str, dict[str, list[dict]]], want: tuple[str, dict[str, list[dict]]]) -> None:
    assert got[0] == want[0], "the runner does not change results, so it stays out of the run hash"
    for table, rows in want[1].items():
        assert got[1][table] == rows, table


def test_two_threads_store_exactly_the_rows_of_one(config_of, sequential, tmp_path: Path) -> None:
    _same_rows(_stored(config_of(tmp_path, workers=2)), sequential)


def _dask_workers() -> list[psutil.Process]:
    """This process's Dask worker processes (LocalCluster spawns them; the nannies are coroutines here); one
    that ends while it is looked at is left out."""
    workers = []
    for child in psutil.Process().children():
        try:
            if "spawn_main" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                workers.append(child)
        except psutil.Error:
            continue
    return workers


# slow (`make test-all`): two spawned workers and the one its nanny restarts each import torch and load the model,
# 130-165 s of CI's two cores, over a sixth of its 12-minute budget. In the fast suite the path it shares (shards
# as tasks, rows merged by key) is the two-threads test's above, a killed run's exact resume is
# test_audit.py's, and benchmarks/kill_campaign.py kills runs at random moments.
@pytest.mark.slow
def test_a_dask_cluster_with_a_worker_killed_mid_run_stores_exactly_the_sequential_rows(
        config_of, sequential, tmp_path: Path) -> None:
    """Two worker processes; once the first shard is done and before the last, one worker is killed with
    SIGKILL. Dask re-runs its task on a worker its nanny restarts: 0 lost, 0 duplicate rows."""
    killed: list[tuple[int, int]] = []  # (pid, shards done when it was killed)
    seen: list[tuple[int, int]] = []  # (shards done, workers alive) as the watcher saw them, for the message

    def kill_one_worker() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            done = len(list(tmp_path.glob("_done/run_id=*/s*")))
            # Workers are looked for only inside the window: a look reads all of /proc, and fifty a second
            # while the workers start took CPU from them. -1: not looked.
            workers = _dask_workers() if 0 < done < SHARDS else None
            seen.append((done, -1 if workers is None else len(workers)))
            if workers is not None and len(workers) == 2:
                with contextlib.suppress(psutil.NoSuchProcess):
                    workers[0].kill()
                    killed.append((workers[0].pid, done))
            time.sleep(0.02)

    threading.Thread(target=kill_one_worker, daemon=True).start()
    got = _stored(config_of(tmp_path, runner="dask", workers=2), resumed=True)
    assert killed and 0 < killed[0][1] < SHARDS, f"no worker killed while shards were left: {sorted(set(seen))}"
    assert not psutil.pid_exists(killed[0][0])
    _same_rows(got, sequential)
    rows = query(tmp_path, "SELECT count(*) AS n, count(DISTINCT (instance_id, explainer)) AS keys FROM instances")
    assert rows.to_pylist() == [{"n": len(sequential[1]["instances"]), "keys": len(sequential[1]["instances"])}]
    assert not _dask_workers(), "the cluster's processes end with the run"


# slow (`make test-all`): a local Ray's start and its two workers' torch imports cost 70 s of CI's two cores, a tenth
# of its budget. The distributed path it shares with Dask (shards as tasks, rows merged by key) is the Dask test's
# above; Ray's own wiring (address, CPUs, no dashboard) is test_every_runner_the_config_offers_is_built_... below.
@pytest.mark.slow
def test_a_local_ray_stores_exactly_the_sequential_rows(config_of, sequential, tmp_path: Path) -> None:
    import ray

    _same_rows(_stored(config_of(tmp_path, runner="ray", workers=2)), sequential)
    assert not ray.is_initialized(), "the Ray the run started is shut down with it"


def test_runner_options_reach_the_config_from_the_cli_and_the_file(tmp_path: Path,
                                                                   captured: list[AuditConfig]) -> None:
    (tmp_path / "images").mkdir()
    config = tmp_path / "audit.yaml"
    config.write_text("images: images\nout: store\nrunner: ray\nray_address: ray://head:10001\nworkers: 3\n")
    assert CliRunner().invoke(cli.app, ["run", "--config", str(config)]).exit_code == 0
    assert (captured[-1].runner, captured[-1].ray_address, captured[-1].workers) == ("ray", "ray://head:10001", 3)

    result = CliRunner().invoke(cli.app, ["run", "--images", str(tmp_path / "images"), "--out", str(tmp_path / "s"),
                                          "--runner", "dask", "--dask-address", "tcp://10.0.0.5:8786",
                                          "--decode-workers", "0"])
    assert result.exit_code == 0, result.output
    assert (captured[-1].runner, captured[-1].dask_address, captured[-1].decode_threads) == (
        "dask", "tcp://10.0.0.5:8786", 0)
    local = captured[-1].model_copy(update={"runner": "threads", "dask_address": None, "decode_workers": None})
    assert captured[-1].run_id == local.run_id, "where a run runs does not change its results or its id"


def test_an_address_for_another_runner_exits_2_in_one_line(tmp_path: Path, captured: list[AuditConfig]) -> None:
    (tmp_path / "images").mkdir()
    result = CliRunner().invoke(cli.app, ["run", "--images", str(tmp_path / "images"), "--out", str(tmp_path / "s"),
                                          "--dask-address", "tcp://10.0.0.5:8786"])
    assert result.exit_code == 2 and not captured
    assert "dask_address is for runner dask, but runner is threads" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_a_schedule_carries_the_runner_to_every_run(tmp_path: Path) -> None:
    from eive_audit.flows.schedule import audit_deployment

    config = AuditConfig(images=tmp_path, out=tmp_path / "store", runner="dask", dask_address="tcp://10.0.0.5:8786",
                         workers=4)
    parameters = audit_deployment(config, "0 2 * * *", "nightly").parameters["config"]
    assert (parameters["runner"], parameters["dask_address"], parameters["workers"]) == ("dask", "tcp://10.0.0.5:8786", 4)
    assert AuditConfig.model_validate(parameters) == config.absolute()


def test_every_runner_the_config_offers_is_built_with_its_workers_and_address(tmp_path: Path) -> None:
    from typing import get_args

    from prefect.task_runners import ThreadPoolTaskRunner

    from eive_audit.flows.runners import TASK_RUNNERS, task_runner

    def runner(**fields: Any) -> Any:
        return task_runner(AuditConfig(images=tmp_path, out=tmp_path, device="cpu", **fields))

    assert set(TASK_RUNNERS) == set(get_args(AuditConfig.model_fields["runner"].annotation))
    assert runner(workers=3) == ThreadPoolTaskRunner(max_workers=3), "a pool of `workers` threads"
    assert runner() == ThreadPoolTaskRunner(max_workers=1), "one worker where no GPU is visible"
    local = runner(runner="dask", workers=2).cluster_kwargs
    assert (local["n_workers"], local["threads_per_worker"], local["host"]) == (2, 1, "127.0.0.1")
    assert local["dashboard_address"].startswith("127.0.0.1:"), "servers bind loopback by default"
    assert runner(runner="dask", dask_address="tcp://10.0.0.5:8786").address == "tcp://10.0.0.5:8786"
    ray_local = runner(runner="ray", workers=2).init_kwargs
    assert ray_local["num_cpus"] == 2 and ray_local["include_dashboard"] is False
    assert runner(runner="ray", ray_address="ray://head:10001").address == "ray://head:10001"


def test_several_gpus_are_shared_out_one_per_worker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No GPU here: the device count is faked. Threads take the GPUs in turn; a Dask worker keeps its own
    device by its name, a restarted one the same; `workers` defaults to one per GPU."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from eive_audit.flows.dask_gpu import worker_gpu
    from eive_audit.flows.runners import worker_count
    from eive_audit.pipeline import shard

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(shard, "_slots", iter(range(100)))
    barrier = threading.Barrier(4)

    def device(_: int) -> tuple[str, str]:
        barrier.wait(timeout=30)
        return shard.worker_device("cuda"), shard.worker_device("cuda")

    with ThreadPoolExecutor(4) as pool:
        devices = list(pool.map(device, range(4)))
    assert all(first == again for first, again in devices), "a thread keeps its GPU"
    assert sorted(first for first, _ in devices) == ["cuda:0", "cuda:0", "cuda:1", "cuda:2"]
    assert shard.worker_device("cuda:1") == "cuda:1" and shard.worker_device("cpu") == "cpu"
    assert worker_count(AuditConfig(images=tmp_path, out=tmp_path, device="cuda")) == 3
    assert worker_count(AuditConfig(images=tmp_path, out=tmp_path, device="cuda:0")) == 1
    assert [worker_gpu(name, ["4", "6"]) for name in (0, 1, 2, "1")] == ["4", "6", "4", "6"]


def test_a_runner_whose_package_is_missing_exits_2_naming_the_extra(tmp_path: Path, captured: list[AuditConfig],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prefect_ray" else find_spec(name, *a))
    (tmp_path / "images").mkdir()
    result = CliRunner().invoke(cli.app, ["run", "--images", str(tmp_path / "images"), "--out", str(tmp_path / "s"),
                                          "--runner", "ray"])
    assert result.exit_code == 2 and not captured
    assert result.output.strip() == ("error: --runner ray needs prefect-ray, which is not installed: "
                                     "pip install 'eive-audit[ray]'")
