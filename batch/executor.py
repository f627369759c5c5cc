"""A batch: every session an independent Dask task, collected as they finish, the summary kept current.

The client decides what to run (done-keys), submits one task per session, and as each one ends rewrites the
summary and the progress line. Nothing is shared between tasks but the measurement store, whose writes queue.
A batch stopped at any point resumes: finished sessions carry their done-key, an interrupted one has none and
runs again (its workspace clears the staging the stopped run left).
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from distributed import Client, KilledWorker, wait

from pedseg.batch import summary
from pedseg.batch.cluster import GPU_RESOURCES
from pedseg.batch.keys import DONE, FAILED, done_key, read_key_file, write_key_file
from pedseg.batch.sources import SessionJob
from pedseg.batch.summary import Row, write_summary
from pedseg.batch.task import Outcome, run_job
from pedseg.pipeline.bundle import load_bundle
from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.errors import ResourceError, as_pipeline_error
from pedseg.workspace import ERROR_FILE, PROVENANCE_FILE, write_error

REFRESH_S = 2.0  # how often the summary and the progress line catch up with sessions that started


@dataclass
class BatchResult:
    rows: list[Row]
    summary: dict[str, Path] = field(default_factory=dict)  # "csv", "json"

    def count(self, *statuses: str) -> int:
        return sum(row.status in statuses for row in self.rows)

    @property
    def exit_code(self) -> int:
        """0 when no session failed; else the lowest exit code among the failures."""
        codes = [row.exit_code for row in self.rows if row.status in (summary.FAILED, summary.FAILED_BEFORE)]
        return min(codes, default=0) or 0


def plan(jobs: Sequence[SessionJob], config: PipelineConfig, db: Path | None, *,
         retry_failed: bool = False) -> tuple[dict[str, str], list[Row]]:
    """Each session's done-key, and its row: skipped (done with this key, its outputs in place), failed before
    (failed with this key, kept unless `retry_failed`), or queued."""
    bundle_sha256 = load_bundle(config.bundle).sha256  # a broken bundle stops the batch before any task
    keys, rows = {}, []
    for job in jobs:
        keys[job.name] = key = done_key(job.inputs, bundle_sha256, config, db)
        row = Row.for_job(job)
        record = read_key_file(job.outdir)
        if (record.get("key") == key and record.get("status") == DONE and not (job.outdir / ERROR_FILE).exists()
                and (job.outdir / PROVENANCE_FILE).is_file()):  # outputs deleted by hand: run it again
            row.status, row.exit_code, row.wall_s = summary.SKIPPED, 0, record.get("wall_s")
            row.read_outputs()
        elif record.get("key") == key and record.get("status") == FAILED and not retry_failed:
            row.status, row.exit_code, row.wall_s = summary.FAILED_BEFORE, record.get("exit_code"), record.get("wall_s")
            row.error = record.get("error", "")
            row.message = f"{record.get('message', '')} {record.get('hint', '')}".strip()
        rows.append(row)
    return keys, rows


def run_batch(client: Client, jobs: Sequence[SessionJob], outroot: Path, config: PipelineConfig, *,
              db: Path | None = None, retry_failed: bool = False,
              progress: Callable[[BatchResult, float], None] | None = None) -> BatchResult:
    """Run every session not done yet on `client`'s cluster; `config.threads` is each session's CPU threads."""
    keys, rows = plan(jobs, config, db, retry_failed=retry_failed)
    result = BatchResult(rows)
    outroot.mkdir(parents=True, exist_ok=True)
    by_name = {row.session: row for row in rows}
    resources = GPU_RESOURCES if config.device == "cuda" else None
    futures = {}
    for job in jobs:
        if by_name[job.name].status == summary.QUEUED:
            future = client.submit(run_job, job, config, db, keys[job.name], key=f"pedseg-{job.name}-{keys[job.name]}",
                                   resources=resources, pure=False)
            futures[future] = job
    result.summary = write_summary(outroot, rows)
    start, pending = time.monotonic(), set(futures)
    if progress:
        progress(result, 0.0)
    while pending:
        try:  # wake up now and then to show which sessions a worker has started
            finished = wait(pending, timeout=REFRESH_S, return_when="FIRST_COMPLETED").done
        except TimeoutError:
            finished = set()
        for future in finished:
            job = futures[future]
            _finish(by_name[job.name], job, _outcome(future, job, keys[job.name]))
        pending -= finished
        if _mark_running(client, futures, by_name) or finished:
            result.summary = write_summary(outroot, rows)
        if progress:
            progress(result, time.monotonic() - start)
    return result


def _outcome(future, job: SessionJob, key: str) -> Outcome:
    """The task's Outcome; a worker that died under it (killed for memory, most often) is a failure too."""
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - Dask's KilledWorker and the like: the session failed, not the batch
        error = (ResourceError("Every worker that ran this session died under it: most often it ran out of memory.",
                               hint="Give each worker more memory (--memory-per-worker) or run fewer workers.")
                 if isinstance(exc, KilledWorker) else as_pipeline_error(exc))
        write_error(job.outdir, error)
        outcome = Outcome(error.exit_code, 0.0, error.kind, error.message, error.hint)
        write_key_file(job.outdir, {"key": key, "status": FAILED, **asdict(outcome)})
        return outcome


def _finish(row: Row, job: SessionJob, outcome: Outcome) -> None:
    row.status = summary.DONE if outcome.ok else summary.FAILED
    row.exit_code, row.error, row.wall_s = outcome.exit_code, outcome.error, outcome.wall_s
    row.message = f"{outcome.message} {outcome.hint}".strip()
    if outcome.ok:
        row.read_outputs()


def _mark_running(client: Client, futures: dict, by_name: dict[str, Row]) -> bool:
    """Rows of tasks a worker is processing now: 'running'; the rest wait as 'queued'. True if any changed."""
    processing = {key for keys in client.processing().values() for key in keys}
    changed = False
    for future, job in futures.items():
        row = by_name[job.name]
        if row.status in (summary.QUEUED, summary.RUNNING):
            status = summary.RUNNING if future.key in processing else summary.QUEUED
            changed, row.status = changed or status != row.status, status
    return changed


class Progress:
    """done / failed / running and an ETA: one line redrawn on a terminal, a line per finished session otherwise."""

    def __init__(self, stream: TextIO = sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self._reported = 0

    def __call__(self, result: BatchResult, elapsed: float) -> None:
        finished = result.count(summary.DONE, summary.FAILED)
        waiting = result.count(summary.QUEUED, summary.RUNNING)
        if finished == self._reported and finished and not self.tty:
            return
        self._reported = finished
        eta = f", ETA {_duration(elapsed / finished * waiting)}" if finished and waiting else ""
        line = (f"{result.count(summary.DONE)} done, {result.count(summary.FAILED)} failed, "
                f"{result.count(summary.RUNNING)} running, {result.count(summary.QUEUED)} queued, "
                f"{result.count(summary.SKIPPED, summary.FAILED_BEFORE)} from before; {_duration(elapsed)}{eta}")
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if not waiting else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s"
