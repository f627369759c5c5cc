"""`pedseg batch SOURCE... OUTROOT`: many sessions on a Dask cluster (pedseg.batch does the work)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pedseg.pipeline.config import PipelineConfig

CLUSTER_HELP = ("Dask scheduler of a running cluster (tcp://HOST:8786, or a Slurm/Kubernetes one; README: Batches); "
                "default: an embedded cluster on this machine")


def add_parser(sub, add_run_options) -> argparse.ArgumentParser:
    """`add_run_options`: the run options `pedseg run` has, so a batch takes the same settings."""
    p = sub.add_parser(
        "batch", help="many sessions, each an independent task on a Dask cluster; resumable, with a summary",
        description="Run the pipeline on every session of the SOURCEs, each into OUTROOT/<session>/, as "
                    "independent tasks on a Dask cluster (embedded by default). A SOURCE is a folder holding one "
                    "subfolder or .zip per session, a .zip, or a CSV of input[,subject_key][,outdir]. Sessions "
                    "done before with the same inputs, bundle and settings are skipped; OUTROOT/batch-summary.csv "
                    "and .json hold a row per session.")
    p.add_argument("sources", nargs="+", type=Path, metavar="SOURCE", help="session folders, zips or CSV lists")
    p.add_argument("outroot", type=Path, metavar="OUTROOT", help="one output folder per session goes here (last)")
    add_run_options(p)
    p.add_argument("--db", type=Path, default=os.environ.get("PEDSEG_DB"),
                   help="SQLite measurement store every session is recorded in (default $PEDSEG_DB)")
    p.add_argument("--retry-failed", action="store_true",
                   help="run again the sessions that failed before with the same inputs and settings")
    add_cluster_options(p)
    p.add_argument("--memory-per-worker", type=float, default=None, metavar="GIB",
                   help="memory one session needs at its peak, for sizing the embedded cluster (default 4)")
    return p


def add_cluster_options(p: argparse.ArgumentParser) -> None:
    """--workers and --scheduler, shared with `pedseg listen`."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None,
                       help="worker processes of the embedded cluster (default: as the cores and memory allow)")
    where.add_argument("--scheduler", default=None, metavar="ADDRESS", help=CLUSTER_HELP)


def worker_plan(args: argparse.Namespace):
    from pedseg.batch.cluster import WORKER_MEMORY_GIB, this_machine

    return this_machine(args.workers, args.threads, getattr(args, "memory_per_worker", None) or WORKER_MEMORY_GIB)


def cmd_batch(args: argparse.Namespace, config: PipelineConfig) -> int:
    import dataclasses

    from pedseg.batch.cluster import dashboard, dask_client
    from pedseg.batch.executor import Progress, run_batch
    from pedseg.batch.sources import read_sources

    jobs = read_sources(args.sources, args.outroot)
    plan = worker_plan(args)
    # On a site's cluster a session uses its worker's cores (start workers with `--nthreads 1`; README: Batches).
    config = dataclasses.replace(config, threads=args.threads if args.scheduler else plan.threads)
    with dask_client(args.scheduler, plan, gpu=config.device == "cuda") as client:
        where = (f"scheduler {args.scheduler}" if args.scheduler else
                 f"{plan.workers} local worker(s) x {plan.threads} thread(s)")
        print(f"{len(jobs)} session(s) on {where}; dashboard: {dashboard(client)}", flush=True)
        result = run_batch(client, jobs, args.outroot, config, db=args.db, retry_failed=args.retry_failed,
                           progress=Progress(sys.stderr))
    failed = [row for row in result.rows if row.status in ("failed", "failed_before")]
    for row in failed:
        print(f"failed: {row.session} (exit {row.exit_code}, {row.error}): {row.message}", file=sys.stderr)
    print(f"{result.count('done')} done, {result.count('skipped')} skipped as done before, {len(failed)} failed; "
          f"summary in {result.summary['csv']}")
    return result.exit_code
