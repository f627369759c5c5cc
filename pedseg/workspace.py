"""The output folder's lifecycle for one run: staging, publishing, an earlier run's leftovers and error.json.

Outputs are written into a staging folder inside OUTDIR and moved into place only when every stage and writer
has succeeded, so a failed run leaves complete files only, plus `error.json` saying what went wrong. The work
folder (unpacked archives, converted and preprocessed images: copies of patient data) is deleted on every exit
unless the configuration keeps it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from pedseg.pipeline.atomic import write_text
from pedseg.pipeline.errors import InputError, PipelineError, as_pipeline_error, disk_full, is_disk_full

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".pedseg-staging-"
ERROR_FILE = "error.json"
PROVENANCE_FILE = "provenance.json"  # lists the run's outputs: a later run removes those it no longer writes


class Workspace:
    """`with Workspace(outdir) as workspace:` prepares OUTDIR and makes `staging` and `work`; on leaving, any
    exception becomes a PipelineError written to OUTDIR/error.json (and raised), and staging and work go."""

    def __init__(self, outdir: Path, *, keep_work: bool = False):
        self.outdir = Path(outdir)
        self.keep_work = keep_work
        self.staging = self.work = Path()

    def __enter__(self) -> Workspace:
        self._prepare_outdir()
        self.staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.outdir))
        self.work = Path(tempfile.mkdtemp(prefix="pedseg-work-"))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        if self.keep_work:
            logger.info("work folder kept at %s", self.work)
        else:
            shutil.rmtree(self.work, ignore_errors=True)
        if isinstance(exc, Exception):  # not KeyboardInterrupt or SystemExit: those leave no error.json
            error = as_pipeline_error(exc)
            write_error(self.outdir, error)
            if error is not exc:
                raise error from exc

    def publish(self, outputs: dict[str, Path]) -> dict[str, Path]:
        """Move every staged output to its place in OUTDIR; then remove what an earlier run wrote that this run
        did not (a SEG after a run that found no tumour would otherwise sit beside the new report)."""
        earlier = self._earlier_outputs()
        final = {name: self._move(path) for name, path in outputs.items()}
        self._remove(earlier - {str(path.relative_to(self.outdir)) for path in final.values()})
        (self.outdir / ERROR_FILE).unlink(missing_ok=True)
        return final

    def _prepare_outdir(self) -> None:
        try:
            self.outdir.mkdir(parents=True, exist_ok=True)
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
    """error.json for a failed run; a full disk or a vanished folder must not hide the error itself."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / ERROR_FILE, json.dumps(error.to_dict(), indent=2) + "\n")
    except OSError as exc:
        logger.warning("could not write %s (%s)", ERROR_FILE, exc.strerror)
