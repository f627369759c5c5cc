"""`pedseg batch` throughput: 8 synthetic sessions in fast mode on an embedded LocalCluster of 1 and 2 workers.

    .venv/bin/python bench/batch.py [--sessions 8] [--workers 1 2] [--out scratch/bench/batch.json]

Prints, and writes as JSON, per worker count: each session's wall time (as its worker measured it), the
batch's wall time and throughput (sessions per hour), and for one worker its resident memory after session 2
and after the last one: the per-session cost must stay flat, and the worker must not grow (no leak: within
10 % from session 2 to session 8). The CPU is named; the cores are shared out between the workers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from pedseg.batch.cluster import dask_client, this_machine
from pedseg.batch.executor import run_batch
from pedseg.batch.sources import read_sources
from pedseg.pipeline.config import DEMO_BUNDLE, PipelineConfig
from pedseg.synth.session import generate_session


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def worker_rss() -> int:
    return psutil.Process().memory_info().rss


def run(cohort: Path, outroot: Path, workers: int) -> dict:
    plan = this_machine(workers=workers)
    config = PipelineConfig(bundle=DEMO_BUNDLE, device="cpu", fast=True, threads=plan.threads)
    jobs = read_sources([cohort], outroot)
    rss_after: dict[int, dict[str, int]] = {}  # sessions finished -> worker -> bytes

    with dask_client(None, plan, dashboard_address=":0") as client:
        def progress(result, elapsed):
            finished = result.count("done", "failed")
            if finished and finished not in rss_after:
                rss_after[finished] = client.run(worker_rss)

        start = time.perf_counter()
        result = run_batch(client, jobs, outroot, config, progress=progress)
        wall = time.perf_counter() - start
    failed = [row.session for row in result.rows if row.status != "done"]
    if failed:
        raise SystemExit(f"sessions failed: {failed}; see {outroot}/batch-summary.csv")
    per_session = [row.wall_s for row in result.rows]
    figures = {"workers": workers, "threads_per_session": plan.threads, "batch_wall_s": round(wall, 1),
               "sessions_per_hour": round(len(jobs) / wall * 3600, 1), "session_wall_s": per_session,
               "session_wall_median_s": statistics.median(per_session)}
    if workers == 1:
        first, last = (sum(rss_after[n].values()) for n in (2, len(jobs)))
        figures |= {"worker_rss_after_2_mib": round(first / 2**20), f"worker_rss_after_{len(jobs)}_mib":
                    round(last / 2**20), "rss_growth_pct": round(100 * (last - first) / first, 1)}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=Path("scratch/bench/batch.json"))
    args = parser.parse_args()
    report = {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "sessions": args.sessions, "runs": []}
    with tempfile.TemporaryDirectory(prefix="pedseg-bench-batch-") as tmp:
        cohort = Path(tmp) / "cohort"
        cohort.mkdir()
        for seed in range(args.sessions):
            generate_session(Path(tmp) / "synth" / f"s{seed}", seed + 11)
            shutil.move(Path(tmp) / "synth" / f"s{seed}" / "dicom", cohort / f"session-{seed + 1:02d}")
        for workers in args.workers:
            figures = run(cohort, Path(tmp) / f"out-{workers}", workers)
            report["runs"].append(figures)
            print(json.dumps(figures), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['cpu']}, {report['cores']} cores; written to {args.out}")


if __name__ == "__main__":  # Dask's worker processes import this module: keep the work guarded
    main()
