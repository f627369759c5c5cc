"""The output folder's lifecycle for one run: staging, publishing, an earlier run's leftovers and error.json.

Outputs are written into a staging folder inside OUTDIR and moved into place only when every stage and writer
has succeeded, so a failed run leaves complete files only, plus `error.json` saying what went wrong. The work
folder (unpacked archives, converted and preprocessed images: copies of patient data) is deleted on every exit
unless the configuration keeps it.

One run at a time per OUTDIR: the workspace holds an exclusive flock on OUTDIR/.pedseg.lock from before it touches
anything in OUTDIR until it has cleaned up, so a second run into the same folder stops at once (InputError naming
the running process) instead of deleting the first run's staging. The kernel releases a flock when its process
dies, so a crashed run's lock file blocks nothing. Publishing and cleaning up are not cut short by SIGTERM/SIGINT
(pedseg.interrupt): a signal waits until they are done.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from types import TracebackType

from pedseg import interrupt
from pedseg.pipeline.atomic import write_text
from pedseg.pipeline.errors import InputError, PipelineError, as_pipeline_error, disk_full, is_disk_full

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".pedseg-staging-"
ERROR_FILE = "error.json"
PROVENANCE_FILE = "provenance.json"  # lists the run's outputs: a later run removes those it no longer writes
LOCK_FILE = ".pedseg.lock"  # flock'ed by the run using OUTDIR; holds its PID, host and start time
# A file system that cannot flock (some network mounts): the run goes ahead unlocked, with a warning.
NO_FLOCK_ERRNOS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS})


class Workspace:
    """`with Workspace(outdir) as workspace:` prepares OUTDIR and makes `staging` and `work`; on leaving, any
    exception becomes a PipelineError written to OUTDIR/error.json (and raised), and staging and work go."""

    def __init__(self, outdir: Path, *, keep_work: bool = False):
        self.outdir = Path(outdir)
        self.keep_work = keep_work
        self.staging = self.work = Path()
        self._lock: int | None = None  # the descriptor of OUTDIR/.pedseg.lock while this run holds it

    def __enter__(self) -> Workspace:
        try:
            self._prepare_outdir()
            self.staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.outdir))
            self.work = Path(tempfile.mkdtemp(prefix="pedseg-work-"))
        except BaseException:  # __exit__ will not run: leave nothing behind and no lock held
            self._clean_up(keep_work=False)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if isinstance(exc, interrupt.Stopped):  # SIGTERM/SIGINT under pedseg.interrupt.stop_on_signals
            error = interrupt.interrupted(exc.signum)
        else:  # not KeyboardInterrupt or SystemExit: those leave no error.json
            error = as_pipeline_error(exc) if isinstance(exc, Exception) else None
        with interrupt.holding("cleaning up"):
            self._clean_up(keep_work=self.keep_work, error=error)
        if error is not None and error is not exc:
            raise error from exc

    def _clean_up(self, *, keep_work: bool, error: PipelineError | None = None) -> None:
        """Staging and work go (work stays if asked), error.json is written, and only then the lock is released."""
        if self.staging != Path():
            shutil.rmtree(self.staging, ignore_errors=True)
        if self.work != Path():
            if keep_work:
                logger.info("work folder kept at %s", self.work)
            else:
                shutil.rmtree(self.work, ignore_errors=True)
        if error is not None:
            _write_error(self.outdir, error)
        self._release()

    def publish(self, outputs: dict[str, Path]) -> dict[str, Path]:
        """Move every staged output to its place in OUTDIR; then remove what an earlier run wrote that this run
        did not (a SEG after a run that found no tumour would otherwise sit beside the new report)."""
        interrupt.check()  # a stopped run never publishes, even when a library swallowed the interruption
        with interrupt.holding("publishing"):
            earlier = self._earlier_outputs()
            final = {name: self._move(path) for name, path in outputs.items()}
            self._remove(earlier - {str(path.relative_to(self.outdir)) for path in final.values()})
            (self.outdir / ERROR_FILE).unlink(missing_ok=True)
        return final

    def _prepare_outdir(self) -> None:
        try:
            self.outdir.mkdir(parents=True, exist_ok=True)
            self._acquire()  # before anything in OUTDIR is touched: the staging there may be a live run's
            # A killed run (power cut, SIGKILL) leaves its staging folder, and maybe half an error.json: remove them.
            for stale in self.outdir.glob(f"{STAGING_PREFIX}*"):
                shutil.rmtree(stale)
            for stale in self.outdir.glob(".*.partial*"):
                stale.unlink()
            probe = tempfile.NamedTemporaryFile(dir=self.outdir, prefix=".pedseg-write-test-")
            probe.close()
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full(exc, f"writing to the output folder '{self.outdir}'") from exc
            raise InputError(f"Cannot write to the output folder '{self.outdir}' ({exc.strerror}).",
                             hint="Choose a writable output folder.") from exc

    def _acquire(self) -> None:
        """Take OUTDIR/.pedseg.lock, or raise InputError naming the run that holds it."""
        path = self.outdir / LOCK_FILE
        for _ in range(5):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise _in_use(self.outdir, holder) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno not in NO_FLOCK_ERRNOS:
                    raise
                logger.warning("the output folder's file system cannot lock files (%s): nothing stops another run "
                               "from using '%s' at the same time", exc.strerror, self.outdir)
                return
            # The run before us removes the file on leaving: if it did so between our open and our flock, we hold
            # a lock on a file nobody else sees. Lock the file that is there.
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                current = False
            if current:
                holder = {"pid": os.getpid(), "host": socket.gethostname(),
                          "started": dt.datetime.now().astimezone().isoformat(timespec="seconds")}
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
                self._lock = fd
                return
            os.close(fd)
        raise _in_use(self.outdir, {})

    def _release(self) -> None:
        if self._lock is None:
            return
        with contextlib.suppress(OSError):  # removed while held, so the next run's open cannot race ours
            (self.outdir / LOCK_FILE).unlink()
        os.close(self._lock)  # releases the flock
        self._lock = None

    def _move(self, path: Path) -> Path:
        target = self.outdir / path.relative_to(self.staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        return target

    def _earlier_outputs(self) -> set[str]:
        """The files an earlier run wrote into OUTDIR, from its provenance (none if there was no earlier run)."""
        try:
            listed = json.loads((self.outdir / PROVENANCE_FILE).read_text()).get("outputs", [])
        except (OSError, ValueError, AttributeError):
            return set()
        return {name for name in listed if isinstance(name, str)}

    def _remove(self, names: set[str]) -> None:
        """Only files the earlier run listed, only inside OUTDIR."""
        root = self.outdir.resolve()
        for name in sorted(names):
            path = (self.outdir / name).resolve()
            if path.is_relative_to(root) and path != root and path.is_file():
                path.unlink()
                logger.info("removed %s, an earlier run's output this run does not produce", name)
                if path.parent != root:
                    with contextlib.suppress(OSError):  # the folder still holds other files
                        path.parent.rmdir()


def write_error(folder: Path, error: PipelineError) -> None:
    """error.json for a failed run; a full disk or a vanished folder must not hide the error itself. Not into a
    folder another run holds (see Workspace): that run's error.json, or its clean result, is its own."""
    if _locked_elsewhere(folder):
        logger.warning("%s not written: another pedseg run is using %s", ERROR_FILE, folder)
        return
    _write_error(folder, error)


def _write_error(folder: Path, error: PipelineError) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / ERROR_FILE, json.dumps(error.to_dict(), indent=2) + "\n")
    except OSError as exc:
        logger.warning("could not write %s (%s)", ERROR_FILE, exc.strerror)


def _locked_elsewhere(folder: Path) -> bool:
    """True when a run holds FOLDER's lock (a run of this process counts too: call this outside a Workspace)."""
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _in_use(outdir: Path, holder: dict) -> InputError:
    """The message for a second run into a folder in use: who holds it (PID, host, start time; nothing else)."""
    who = " ".join(f"{label} {holder[key]}" for key, label in (("pid", "process"), ("host", "on"),
                                                                ("started", "started")) if holder.get(key))
    who = who.replace(" started", ", started")
    return InputError(f"The output folder '{outdir}' is in use by another pedseg run"
                      + (f" ({who})." if who else "."),
                      hint="Wait for that run to finish (or stop it), or give this run another output folder.")
