"""Done-keys: what a session's outputs were made from, so a batch run again skips what is already done.

The key hashes the input files' names, sizes and modification times (as `make` and rsync judge a change),
the bundle's weights hash, the settings that shape the outputs, and the measurement store the run recorded
into. It is written as OUTDIR/batch-key.json after every attempt, with the attempt's status; a session is
done when that file says "done" under the key it would have now, and OUTDIR holds no error.json.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from pedseg.pipeline.atomic import write_text
from pedseg.pipeline.config import PipelineConfig

KEY_FILE = "batch-key.json"
DONE, FAILED = "done", "failed"
# Fields that do not change what a run writes: where the bundle lies (its hash counts), CPU threads, keeping the
# work folder; the salt is a secret and never written anywhere, even hashed.
_NOT_IN_KEY = frozenset({"bundle", "threads", "keep_workdir", "subject_salt"})


def done_key(inputs: Sequence[Path], bundle_sha256: str, config: PipelineConfig, db: Path | None) -> str:
    digest = hashlib.sha256()
    for root in inputs:
        for path, size, mtime_ns in _listing(root):
            digest.update(f"{path}\0{size}\0{mtime_ns}\n".encode())
    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in _NOT_IN_KEY}
    digest.update(json.dumps(settings, sort_keys=True, default=repr).encode())
    digest.update(f"bundle {bundle_sha256}\nstore {Path(db).absolute() if db else ''}\n".encode())
    return digest.hexdigest()


def read_key_file(outdir: Path) -> dict:
    """The last attempt's record ({} when there was none or it cannot be read)."""
    try:
        record = json.loads((outdir / KEY_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def write_key_file(outdir: Path, record: dict) -> None:
    write_text(outdir / KEY_FILE, json.dumps(record, indent=2) + "\n")


def _listing(root: Path) -> list[tuple[str, int, int]]:
    if root.is_file():
        stat = root.stat()
        return [(root.name, stat.st_size, stat.st_mtime_ns)]
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder, name)
            stat = path.stat()
            found.append((str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns))
    return found
