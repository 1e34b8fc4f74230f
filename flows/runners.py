"""The task runners an audit's shards are submitted to (`config.runner`), and how many workers each gets.

- threads: a pool in the flow's process (Prefect's ThreadPoolTaskRunner); each thread loads its own model.
- dask: `prefect-dask`'s DaskTaskRunner on a `distributed.LocalCluster` of `workers` processes (one thread
  each; scheduler, workers and dashboard on 127.0.0.1), or on the user's cluster at `dask_address`.
- ray: `prefect-ray`'s RayTaskRunner on a local Ray of `workers` CPUs (no dashboard), or the cluster at
  `ray_address`.

A worker process loads its model once and keeps it (`pipeline.shard.worker_model`, cached per thread):
tasks carry only the config and ids, never a model. On CUDA each worker gets one GPU: a local Dask worker
is pinned to its own device when it starts (`flows.dask_gpu`), a Ray task asks for `num_gpus=1` (Ray sets
CUDA_VISIBLE_DEVICES for it) and keeps its process between tasks, and a pool of threads spreads over the
visible devices by thread (`pipeline.shard.worker_device`). On a user's Dask cluster, start one worker per
GPU (dask-cuda's `dask cuda worker` does). Dask and Ray are optional installs (`.[dask]`,
`.[ray]`), imported only when chosen; the CLI says in one line what to install when one is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from prefect.settings import get_current_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from eive_audit.pipeline.config import AuditConfig

DASK_DASHBOARD = "127.0.0.1:8787"  # a local cluster's dashboard, on loopback; Dask takes another port when busy
RAY_OBJECT_STORE_BYTES = 256 * 2**20  # shards pass ids in and counts out: the object store holds next to nothing


def visible_gpus(device: str) -> int:
    """How many GPUs the run may spread over: the visible CUDA devices for `cuda` or `auto`, else 0 (`cuda:N`
    names one device, `cpu` none)."""
    if device not in ("auto", "cuda"):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_count(config: AuditConfig) -> int:
    """`config.workers`, or by default one per visible GPU (one worker per GPU), else 1."""
    return config.workers or max(visible_gpus(config.device), 1)


def _dask_runner(config: AuditConfig) -> TaskRunner:
    from prefect_dask import DaskTaskRunner

    if config.dask_address:
        return DaskTaskRunner(address=config.dask_address)
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": worker_count(config), "threads_per_worker": 1, "processes": True, "host": "127.0.0.1",
        "dashboard_address": DASK_DASHBOARD, "silence_logs": logging.WARNING, "env": _worker_env()})


def _ray_runner(config: AuditConfig) -> TaskRunner:
    from prefect_ray import RayTaskRunner

    if config.ray_address:
        return RayTaskRunner(address=config.ray_address)
    return RayTaskRunner(init_kwargs={"num_cpus": worker_count(config), "include_dashboard": False,
                                      "object_store_memory": RAY_OBJECT_STORE_BYTES, "log_to_driver": False,
                                      "runtime_env": {"env_vars": _worker_env()}})


def _worker_env() -> dict[str, str]:
    """What the local worker processes need beside this process's environment: the Prefect API to report to
    (the flow's ephemeral server, when the user runs none). A user's cluster needs a server its workers reach
    (PREFECT_API_URL), as any distributed Prefect run does."""
    url = api_url_for_workers()
    return {"PREFECT_API_URL": url} if url else {}


def api_url_for_workers() -> str | None:
    """The Prefect API that worker processes of this run should report to: PREFECT_API_URL where set, else this
    process's running ephemeral server (flows.ephemeral). Without it, every Dask or Ray worker would start an
    ephemeral server of its own (seconds each, under the start lock), and the run's task runs would scatter
    over them."""
    url = get_current_settings().api.url
    if url:
        return url
    # Prefect's server module costs seconds to import; without an API URL this process has imported it already.
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer._instances.get(None)  # noqa: SLF001 - Prefect's default-server slot
    return server.api_url if server is not None and server.running else None


# config.runner -> the task runner for the config.
TASK_RUNNERS: dict[str, Callable[[AuditConfig], TaskRunner]] = {
    "threads": lambda config: ThreadPoolTaskRunner(max_workers=worker_count(config)),
    "dask": _dask_runner,
    "ray": _ray_runner,
}


def task_runner(config: AuditConfig) -> TaskRunner:
    """The configured task runner, not yet started."""
    return TASK_RUNNERS[config.runner](config)


def one_gpu_per_task(config: AuditConfig) -> AbstractContextManager[Any]:
    """While the block submits tasks on Ray with CUDA, each task asks for one GPU (`num_gpus=1`: Ray sets its
    CUDA_VISIBLE_DEVICES) and keeps its worker process between tasks, so the model stays loaded (Ray ends a
    GPU task's process after each call by default). Threads and Dask place by worker instead."""
    wants_gpu = config.device.startswith("cuda") or (config.device == "auto" and visible_gpus("auto") > 0)
    if config.runner != "ray" or not wants_gpu:
        return nullcontext()
    from prefect_ray.context import remote_options

    return remote_options(num_gpus=1, max_calls=0)


@contextmanager
def started(config: AuditConfig) -> Iterator[TaskRunner]:
    """The configured runner, started; on CUDA, each worker of a local Dask cluster sees only its own GPU."""
    with task_runner(config) as runner:
        if config.runner == "dask" and not config.dask_address and visible_gpus(config.device) > 1:
            from eive_audit.flows.dask_gpu import OneGpuPerWorker

            runner._client.register_plugin(OneGpuPerWorker.of_this_machine())  # noqa: SLF001 - where prefect-dask keeps it
        yield runner
