"""The Dask cluster a batch runs on: an embedded LocalCluster sized to this machine, or a site's scheduler.

Each worker process runs one session at a time (one Dask thread); the session's torch and SimpleITK threads
are PipelineConfig.threads, and the OpenMP/BLAS pools are sized to match (Dask's nanny pins them to 1 unless
told). Sessions on a GPU ask for the worker resource "GPU", so only workers started with `--resources GPU=1`
take them.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
from distributed import Client, LocalCluster

logger = logging.getLogger(__name__)

GIB = 2**30
# What one worker may need at its peak: a full-size network runs at about 3.1 GiB on CPU (bench/RESULTS.md).
WORKER_MEMORY_GIB = 4.0
GPU_RESOURCES = {"GPU": 1}


@dataclass(frozen=True)
class WorkerPlan:
    workers: int
    threads: int  # CPU threads per session (PipelineConfig.threads)
    memory_limit: int  # bytes per worker; Dask restarts a worker that goes far beyond it


def plan_workers(cores: int, memory_bytes: int, *, workers: int | None = None, threads: int | None = None,
                 memory_per_worker_gib: float = WORKER_MEMORY_GIB) -> WorkerPlan:
    """As many workers as the cores (at `threads` each) and the memory (at `memory_per_worker_gib` each) allow;
    the cores shared out between them unless `threads` is given."""
    if workers is None:
        by_memory = int(memory_bytes // (memory_per_worker_gib * GIB))
        workers = max(1, min(by_memory, cores // (threads or 1)))
    threads = threads or max(1, cores // workers)
    return WorkerPlan(workers, threads, memory_bytes // workers)


def this_machine(workers: int | None = None, threads: int | None = None,
                 memory_per_worker_gib: float = WORKER_MEMORY_GIB) -> WorkerPlan:
    cores = len(os.sched_getaffinity(0))
    return plan_workers(cores, psutil.virtual_memory().available, workers=workers, threads=threads,
                        memory_per_worker_gib=memory_per_worker_gib)


@contextlib.contextmanager
def dask_client(scheduler: str | None, plan: WorkerPlan, *, gpu: bool = False,
                dashboard_address: str = ":8787") -> Iterator[Client]:
    """A client of the site's scheduler at `scheduler`, or of an embedded LocalCluster laid out by `plan`."""
    if scheduler:
        with Client(scheduler) as client:
            if gpu and not any(w.get("resources", {}).get("GPU") for w in client.scheduler_info()["workers"].values()):
                logger.warning("no worker of %s offers the resource GPU yet: GPU sessions wait until one that was "
                               "started with `--resources GPU=1` joins", scheduler)
            yield client
        return
    pools = {name: str(plan.threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    with LocalCluster(n_workers=plan.workers, threads_per_worker=1, processes=True, memory_limit=plan.memory_limit,
                      dashboard_address=dashboard_address, env=pools,
                      resources=GPU_RESOURCES if gpu else None) as cluster, Client(cluster) as client:
        yield client


def dashboard(client: Client) -> str:
    """Where the Dask dashboard is; Dask serves it only where bokeh is installed."""
    if importlib.util.find_spec("bokeh") is None:
        return "none (Dask serves its dashboard only where bokeh is installed: pip install bokeh)"
    return client.dashboard_link
