"""One GPU per worker of a local Dask cluster: `distributed.LocalCluster` starts its workers with the parent's
CUDA_VISIBLE_DEVICES, so each would take device 0; this plugin gives each its own before any task runs.
Imported only for `--runner dask` on several GPUs (distributed is the `.[dask]` extra)."""

from __future__ import annotations

import os
from typing import Any

from distributed import WorkerPlugin


def worker_gpu(name: object, visible: list[str]) -> str:
    """The device id a local Dask worker called `name` (LocalCluster numbers them 0, 1, ...) keeps, of the
    `visible` ids its parent saw; a restarted worker keeps its name, so it gets the same device back."""
    return visible[int(name) % len(visible)]


class OneGpuPerWorker(WorkerPlugin):
    """On start, set the worker's CUDA_VISIBLE_DEVICES to its own device (CUDA reads it at its first call)."""

    name = "eive-audit-one-gpu-per-worker"

    def __init__(self, visible: list[str]) -> None:
        self.visible = visible

    @classmethod
    def of_this_machine(cls) -> "OneGpuPerWorker":
        """The plugin for the devices this process sees (CUDA_VISIBLE_DEVICES, or all of them)."""
        import torch

        listed = os.environ.get("CUDA_VISIBLE_DEVICES")
        return cls(listed.split(",") if listed else [str(i) for i in range(torch.cuda.device_count())])

    def setup(self, worker: Any) -> None:
        os.environ["CUDA_VISIBLE_DEVICES"] = worker_gpu(worker.name, self.visible)
