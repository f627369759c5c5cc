"""`pedseg listen`: a C-STORE SCP that files instances per study, runs the pipeline on each complete study,
and sends the results to a destination. With a measurement store (`pedseg listen --db`), each run is recorded
under its subject (a salted PatientID hash) and compared with that subject's earlier studies.

Threads: pynetdicom's association threads store instances; a scheduler marks a study complete once no
instance has arrived for the quiet period and no open association has sent to it; `workers` worker threads
(one by default) each run the pipeline and the send, a study at a time. With `pedseg listen --workers N` or
`--scheduler ADDRESS` the runner hands each run to a Dask cluster (pedseg.batch.task.ClusterRunner). Every
state change is written to the journal first, so a listener killed at any point resumes on restart:
interrupted runs are re-run, interrupted sends re-sent; the journal, not the cluster, is the queue.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pynetdicom import evt

from pedseg.pacs.instances import list_instances, remove_partials, write_instance
from pedseg.pacs.journal import (
    FAILED,
    QUEUED,
    RECEIVING,
    RUNNING,
    SEND_FAILED,
    SENDING,
    SENT,
    Journal,
    StudyRecord,
    now_iso,
)
from pedseg.pacs.node import DicomNode
from pedseg.pacs.scp import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS, read_store_request, storage_ae
from pedseg.pacs.send import SendPolicy, result_files, send_files
from pedseg.pipeline.config import PipelineConfig
from pedseg.pipeline.errors import InputError, NetworkError, as_pipeline_error
from pedseg.tracking.store import MeasurementStore

logger = logging.getLogger(__name__)

Runner = Callable[..., object]  # (input_path, outdir, config, store=None), as `pedseg.runner.run_pipeline`


def run_pipeline_lazily(input_path: Path, outdir: Path, config: PipelineConfig,
                        store: MeasurementStore | None = None) -> object:
    from pedseg.runner import run_pipeline  # torch and nnU-Net load only when a study is processed

    return run_pipeline(input_path, outdir, config, store=store)


@dataclass(frozen=True)
class ListenerConfig:
    aet: str
    port: int
    spool: Path
    destination: DicomNode | str  # a DICOM node (C-STORE) or a DICOMweb base URL (STOW-RS)
    bind: str = "0.0.0.0"
    quiet_s: float = 30.0  # a study is complete when nothing arrived for this long
    allowed_calling_aets: tuple[str, ...] = ()  # empty: any calling AE may store
    send: SendPolicy = field(default_factory=SendPolicy)
    max_attempts: int = 3  # pipeline runs per study, counting runs cut short by a listener crash
    poll_s: float = 0.5
    workers: int = 1  # studies processed at once (each by the runner: in this process, or on a Dask cluster)


class _Stopping(Exception):
    """The listener is shutting down: leave the study's state for the next listener to resume."""


class Listener:
    def __init__(self, config: ListenerConfig, pipeline_config: PipelineConfig, runner: Runner = run_pipeline_lazily,
                 store: MeasurementStore | None = None):
        """`store`: shared by every study's run (the SQLite store opens a connection per call, so the worker
        thread may use it); None: no longitudinal tracking."""
        self.config = config
        self.pipeline_config = pipeline_config
        self.runner = runner
        self.store = store
        self.journal = Journal(config.spool)
        self._lock = threading.RLock()
        self._work = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._records: dict[str, StudyRecord] = {}
        self._claimed: set[str] = set()  # studies a worker thread has taken: no other thread takes them too
        self._last_arrival: dict[str, float] = {}
        self._open: dict[int, dict] = {}  # association -> studies it stored to, and instance counts for the log
        self._server = None
        self._lock_file = None
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._take_spool()
        self._recover()
        ae = storage_ae(self.config.aet, list(self.config.allowed_calling_aets))
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_CONN_CLOSE, self._on_close)]
        try:
            self._server = ae.start_server((self.config.bind, self.config.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            self.stop()
            raise NetworkError(f"Cannot listen on {self.config.bind}:{self.config.port} ({exc.strerror}).",
                               hint="Choose a free --port, or stop the program that uses it.") from exc
        loops = [self._schedule_loop] + [self._work_loop] * max(1, self.config.workers)
        for number, target in enumerate(loops):
            thread = threading.Thread(target=target, name=f"pedseg-{target.__name__.strip('_')}-{number}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        with self._lock:
            self._write_status()  # its presence tells scripts and tests that associations are accepted
        logger.info("listening as %s on %s:%d; results go to %s; spool %s; a study is complete after %.0f s of quiet",
                    self.config.aet, self.config.bind, self.config.port, self.config.destination, self.config.spool,
                    self.config.quiet_s)

    def stop(self) -> None:
        """Stop receiving and working; a run in progress is abandoned and re-run by the next listener."""
        self._stop.set()
        with self._work:
            self._work.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        for thread in self._threads:
            thread.join(timeout=self.config.poll_s * 4)
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    def serve_forever(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def records(self) -> dict[str, StudyRecord]:
        with self._lock:
            return {uid: StudyRecord(**vars(r)) for uid, r in self._records.items()}

    def _take_spool(self) -> None:
        self.config.spool.mkdir(parents=True, exist_ok=True)
        handle = open(self.config.spool / "listener.lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise InputError(f"Another listener is using the spool folder '{self.config.spool}'.",
                             hint="Stop it first, or give this listener its own --spool.") from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock_file = handle

    def _recover(self) -> None:
        """Resume what a previous listener left: interrupted runs are queued again, interrupted sends resumed."""
        with self._lock:
            self._records = self.journal.load_all()
            for record in self._records.values():
                dicom = self.journal.dicom_dir(record)
                if removed := remove_partials(dicom):
                    logger.info("study %s: removed %d partly received files", record.study_uid, removed)
                if record.state == RECEIVING:
                    self._last_arrival[record.study_uid] = dicom.stat().st_mtime if dicom.exists() else 0.0
                elif record.state == RUNNING:
                    record.state, record.message = QUEUED, "run interrupted by a listener stop; queued again"
                    self.journal.save(record)
                    logger.warning("study %s: its run was interrupted by a listener stop; running it again",
                                   record.study_uid)
            waiting = sum(r.state in (QUEUED, SENDING, RECEIVING) for r in self._records.values())
            if waiting:
                logger.info("resuming %d unfinished studies from the spool", waiting)

    # ------------------------------------------------------------------------------------------ receiving

    def _on_store(self, event) -> int:
        try:
            study_uid, sop_uid, encoded = read_store_request(event)
        except ValueError as exc:
            logger.warning("refused an instance from %s: %s", event.assoc.requestor.ae_title, exc)
            return CANNOT_UNDERSTAND
        with self._lock:
            record = self._records.get(study_uid)
            if record is not None and sop_uid in record.output_uids:
                return SUCCESS  # our own result routed back to us: not an input
            if record is None:
                record = self._records[study_uid] = StudyRecord(study_uid)
                self.journal.save(record)  # before its first instance: no instance folder without a record
                self._write_status()
                logger.info("study %s: receiving", study_uid)
            counts = self._open.setdefault(id(event.assoc), {"studies": set(), "new": 0, "duplicate": 0})
            counts["studies"].add(study_uid)
            self._last_arrival[study_uid] = time.time()
        try:
            new = write_instance(self.journal.dicom_dir(record), sop_uid, encoded)
        except OSError as exc:
            logger.error("study %s: cannot store an instance (%s)", study_uid, exc.strerror)
            return OUT_OF_RESOURCES
        with self._lock:
            counts["new" if new else "duplicate"] += 1
            if new:
                self._reopen(record)
        return SUCCESS

    def _reopen(self, record: StudyRecord) -> None:
        """A new instance for a study past receiving: process it again once complete."""
        if record.state == RECEIVING:
            return
        if record.state in (RUNNING, SENDING):
            if not record.reopened:
                record.reopened = True
                self.journal.save(record)
            return
        logger.info("study %s: new instances after it was %s; will process it again", record.study_uid, record.state)
        record.state, record.attempts, record.message = RECEIVING, 0, "new instances arrived"
        self.journal.save(record)
        self._write_status()

    def _on_close(self, event) -> None:
        with self._lock:
            counts = self._open.pop(id(event.assoc), None)
        if counts:
            logger.info("association from %s closed: %d new and %d duplicate instances for %d studies",
                        event.assoc.requestor.ae_title, counts["new"], counts["duplicate"], len(counts["studies"]))

    def _schedule_loop(self) -> None:
        while not self._stop.wait(self.config.poll_s):
            with self._lock:
                busy = set().union(*(c["studies"] for c in self._open.values()))
                now = time.time()
                for record in self._records.values():
                    uid = record.study_uid
                    quiet = now - self._last_arrival.get(uid, 0) >= self.config.quiet_s
                    if record.state == RECEIVING and uid not in busy and quiet:
                        count = len(list_instances(self.journal.dicom_dir(record)))
                        record.state, record.queued_at, record.message = QUEUED, now, f"{count} instances received"
                        self.journal.save(record)
                        self._write_status()
                        logger.info("study %s: complete with %d instances; queued", uid, count)
                        self._work.notify()

    # ------------------------------------------------------------------------------------------ working

    def _work_loop(self) -> None:
        while not self._stop.is_set():
            with self._work:
                record = self._next()
                if record is None:
                    self._work.wait(self.config.poll_s)
                    continue
                self._claimed.add(record.study_uid)
            try:
                if record.state == SENDING:
                    self._send(record)
                else:
                    self._run(record)
            except _Stopping:
                return
            finally:
                with self._lock:
                    self._claimed.discard(record.study_uid)

    def _next(self) -> StudyRecord | None:
        # Interrupted sends first: their results are ready.
        ready = [r for r in self._records.values()
                 if r.state in (QUEUED, SENDING) and r.study_uid not in self._claimed]
        return min(ready, key=lambda r: (r.state != SENDING, r.queued_at or 0.0), default=None)

    def _run(self, record: StudyRecord) -> None:
        with self._lock:
            if record.attempts >= self.config.max_attempts:
                self._finish(record, FAILED, f"gave up after {record.attempts} interrupted runs")
                return
            record.state, record.attempts, record.reopened, record.message = RUNNING, record.attempts + 1, False, ""
            self.journal.save(record)
            self._write_status()
        dicom, outdir = self.journal.dicom_dir(record), self.journal.output_dir(record)
        shutil.rmtree(outdir, ignore_errors=True)  # a re-run must not leave an earlier run's results behind
        logger.info("study %s: running the pipeline on %d instances (attempt %d)",
                    record.study_uid, len(list_instances(dicom)), record.attempts)
        try:
            self.runner(dicom, outdir, self.pipeline_config, store=self.store)
        except Exception as exc:  # noqa: BLE001 - one bad study must not stop the listener
            error = as_pipeline_error(exc)  # an unexpected one by type and place only: its text may quote headers
            logger.debug("traceback", exc_info=True)
            self._finish(record, FAILED, f"{error.kind}: {error}")
            return
        self._check_running()
        files = result_files(outdir)
        with self._lock:
            record.output_uids = sorted(set(record.output_uids) | {_sop_uid(f) for f in files})
            if record.reopened:
                self._finish(record, RECEIVING, "")
                return
            record.state, record.message = SENDING, f"{len(files)} result instances to send"
            self.journal.save(record)
            self._write_status()
        self._send(record)

    def _send(self, record: StudyRecord) -> None:
        outdir, destination = self.journal.output_dir(record), self.config.destination
        files = result_files(outdir)
        try:
            send_files(files, destination, calling_aet=self.config.aet, policy=self.config.send, sleep=self._sleep)
        except NetworkError as error:
            message = (f"{error} Results are kept in {outdir}; resend them with "
                       f"`pedseg push {outdir} --to {destination}`.")
            logger.error("study %s: %s", record.study_uid, message)
            self._finish(record, SEND_FAILED, message)
            return
        self._finish(record, SENT, f"sent {len(files)} result instances to {destination}")

    def _finish(self, record: StudyRecord, state: str, message: str) -> None:
        self._check_running()
        with self._lock:
            if record.reopened:
                state, message = RECEIVING, "new instances arrived while it was processed; processing it again"
                self._last_arrival[record.study_uid] = time.time()
            record.state, record.message, record.reopened = state, message, False
            self.journal.save(record)
            self._write_status()
        log = logger.info if state in (SENT, RECEIVING) else logger.error
        log("study %s: %s%s", record.study_uid, state, f" ({message})" if message else "")

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise _Stopping

    def _check_running(self) -> None:
        # A stopped listener never writes again: its successor owns the spool and re-runs this study.
        if self._stop.is_set():
            raise _Stopping

    def _write_status(self) -> None:
        info = {"aet": self.config.aet, "port": self.config.port, "destination": str(self.config.destination),
                "pid": os.getpid(), "updated": now_iso()}
        self.journal.write_status(self._records, info)


def _sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
