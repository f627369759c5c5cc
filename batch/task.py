"""What one Dask task does: one session through `pedseg.runner.run_pipeline`, as `pedseg run` does it.

The task never raises: a failure comes back as the error model's fields (an exception pickled across
processes would lose its hint), and OUTDIR holds error.json either way. It runs in a worker process, so it
gets plain values and opens the measurement store itself (SQLite in WAL mode with a busy timeout and one
`BEGIN IMMEDIATE` per write: concurrent workers queue, and a re-run replaces its time point).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path

from pedseg.batch.cluster import GPU_RESOURCES
from pedseg.batch.keys import DONE, FAILED, KEY_FILE, write_key_file
from pedseg.batch.sources import SessionJob
from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.errors import PipelineError, as_pipeline_error, error_classes
from pedseg.workspace import ERROR_FILE, write_error


@dataclass(frozen=True)
class Outcome:
    """A finished attempt: exit code 0 and no error, or the error model's kind, exit code and message."""

    exit_code: int
    wall_s: float
    error: str = ""  # the error kind, e.g. "missing_sequence"
    message: str = ""  # what went wrong, then what to do (the error's message and hint)
    hint: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def as_error(self) -> PipelineError:
        """The failure as the error model's class again (for an adapter that reports errors by raising)."""
        cls = next((c for c in error_classes() if c.kind == self.error), PipelineError)
        return cls(self.message, hint=self.hint)


def run_job(job: SessionJob, config: PipelineConfig, db: Path | None, key: str) -> Outcome:
    """Run one batch session; afterwards OUTDIR/batch-key.json records the key and how the attempt ended."""
    (job.outdir / KEY_FILE).unlink(missing_ok=True)  # not "done" while a new attempt is under way
    config = dataclasses.replace(config, subject_key=job.subject_key or config.subject_key)
    outcome = run_one(job.inputs, job.outdir, config, db)
    write_key_file(job.outdir, {"key": key, "status": DONE if outcome.ok else FAILED, **dataclasses.asdict(outcome),
                                "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
    return outcome


def run_one(inputs: Path | tuple[Path, ...], outdir: Path, config: PipelineConfig, db: Path | None) -> Outcome:
    """The pipeline call of `pedseg run`, its errors turned into an Outcome (the listener's workers use it too)."""
    from pedseg.runner import run_pipeline  # torch and nnU-Net load in the worker, not in the client
    from pedseg.tracking.sqlite import SQLiteStore

    start = time.perf_counter()
    try:
        run_pipeline(inputs, outdir, config, store=SQLiteStore(db) if db else None)
    except Exception as exc:  # noqa: BLE001 - one failing session must not stop the others
        error = as_pipeline_error(exc)
        if not (outdir / ERROR_FILE).exists():  # failed before the workspace could write it (e.g. the store)
            write_error(outdir, error)
        return Outcome(error.exit_code, round(time.perf_counter() - start, 1), error.kind, error.message, error.hint)
    return Outcome(0, round(time.perf_counter() - start, 1))


class ClusterRunner:
    """A `pedseg listen` runner: each study goes to a Dask cluster as one task, and the calling thread waits
    for it (the listener's journal, not the cluster, keeps track of the study)."""

    def __init__(self, client, *, gpu: bool = False):
        self.client = client
        self.resources = GPU_RESOURCES if gpu else None

    def __call__(self, input_path: Path, outdir: Path, config: PipelineConfig, store=None) -> Outcome:
        db = getattr(store, "path", None)
        if store is not None and db is None:
            raise TypeError("a cluster's workers reach the measurement store by its path: give a SQLite store")
        outcome = self.client.submit(run_one, input_path, outdir, config, db, pure=False,
                                     resources=self.resources).result()
        if not outcome.ok:
            raise outcome.as_error()
        return outcome
