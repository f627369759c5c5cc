"""SQLite measurement store: one file that several pipeline processes (CLI runs, the PACS listener) share.

Concurrency: WAL journal (readers never block the writer), a busy timeout (a writer waits for another rather
than failing), and every write in one `BEGIN IMMEDIATE` transaction (the write lock is taken up front, so two
writers queue instead of deadlocking on a read-to-write upgrade). WAL needs a local file system, not NFS/SMB.

Schema: `PRAGMA user_version` is the number of `MIGRATIONS` applied; opening a file applies the missing ones in
one transaction. Only the subject key (a hash unless the caller chose otherwise) and study date/UID are kept,
never names or PatientIDs.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from pedseg.pipeline.errors import InputError, ResourceError
from pedseg.pipeline.longitudinal import BundleId, TimePoint

BUSY_TIMEOUT_S = 60.0

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: time points and their per-region volumes in both label conventions
        """CREATE TABLE time_points (
            id INTEGER PRIMARY KEY,
            subject_key TEXT NOT NULL,
            study_uid TEXT NOT NULL,
            study_date TEXT NOT NULL,
            bundle_name TEXT NOT NULL,
            bundle_version TEXT NOT NULL,
            bundle_sha256 TEXT NOT NULL,
            label_convention TEXT,
            rapno_region TEXT NOT NULL,
            rapno_product_mm2 REAL,
            qc_flags TEXT NOT NULL,
            recorded_at TEXT NOT NULL,
            UNIQUE (subject_key, study_uid, bundle_sha256))""",
        "CREATE INDEX time_points_by_subject ON time_points (subject_key, study_date)",
        """CREATE TABLE volumes (
            time_point_id INTEGER NOT NULL REFERENCES time_points (id) ON DELETE CASCADE,
            convention TEXT NOT NULL,
            region TEXT NOT NULL,
            volume_ml REAL NOT NULL,
            PRIMARY KEY (time_point_id, convention, region))""",
    ),
)
# Volumes table conventions: "2024" holds ET, NET, CC, ED and the composites TC, WT; "2023" holds NCR, ED, ET;
# "reviewed" the volumes of a radiologist's edited segmentation (2024 regions), beside the automatic ones.
_CONVENTIONS = {"2024": "volumes_ml", "2023": "volumes_2023_ml", "reviewed": "reviewed_volumes_ml"}


def _enable_wal(conn: sqlite3.Connection, timeout_s: float = 60.0) -> None:
    """WAL mode (persistent: recorded in the file). Switching needs the file to itself, and SQLite answers
    'database is locked' at once, without waiting on the busy timeout, while another process opens the same
    new store: so retry for a while."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class SQLiteStore:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as conn:
                _enable_wal(conn)
                if conn.execute("PRAGMA user_version").fetchone()[0] != len(MIGRATIONS):
                    with _transaction(conn):  # re-read inside: another process may have migrated meanwhile
                        _migrate(conn, self.path)
        except sqlite3.DatabaseError as exc:
            raise InputError(f"The measurement store '{self.path}' cannot be opened ({exc}).",
                             hint="Point --db at a pedseg measurement store, or at a new file.") from exc

    def record(self, time_point: TimePoint) -> None:
        tp, b = time_point, time_point.bundle
        recorded_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        with self._connect() as conn, _transaction(conn):
            (row_id,) = conn.execute(
                """INSERT INTO time_points (subject_key, study_uid, study_date, bundle_name, bundle_version,
                       bundle_sha256, label_convention, rapno_region, rapno_product_mm2, qc_flags, recorded_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (subject_key, study_uid, bundle_sha256) DO UPDATE SET
                       study_date = excluded.study_date, bundle_name = excluded.bundle_name,
                       bundle_version = excluded.bundle_version, label_convention = excluded.label_convention,
                       rapno_region = excluded.rapno_region, rapno_product_mm2 = excluded.rapno_product_mm2,
                       qc_flags = excluded.qc_flags, recorded_at = excluded.recorded_at
                   RETURNING id""",
                (tp.subject_key, tp.study_uid, tp.study_date, b.name, b.version, b.sha256, b.label_convention,
                 tp.rapno_region, tp.rapno_product_mm2, json.dumps(list(tp.qc_flags)), recorded_at)).fetchone()
            conn.execute("DELETE FROM volumes WHERE time_point_id = ?", (row_id,))
            conn.executemany("INSERT INTO volumes VALUES (?, ?, ?, ?)",
                             [(row_id, convention, region, volume)
                              for convention, field in _CONVENTIONS.items()
                              for region, volume in getattr(tp, field).items()])

    def history(self, subject_key: str) -> list[TimePoint]:
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM time_points WHERE subject_key = ? ORDER BY study_date, study_uid",
                                (subject_key,)).fetchall()
            volumes: dict[int, dict[str, dict[str, float]]] = {}
            for tp_id, convention, region, volume in conn.execute(
                    "SELECT v.* FROM volumes v JOIN time_points t ON t.id = v.time_point_id WHERE t.subject_key = ?",
                    (subject_key,)):
                volumes.setdefault(tp_id, {}).setdefault(convention, {})[region] = volume
        return [_time_point(row, volumes.get(row["id"], {})) for row in rows]

    def _connect(self) -> contextlib.closing[sqlite3.Connection]:
        # isolation_level=None: no implicit transactions; `_transaction` opens them explicitly.
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys=ON")
        return contextlib.closing(conn)


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:  # still locked after the busy timeout
        raise ResourceError(f"The measurement store stayed locked for {BUSY_TIMEOUT_S:.0f} s ({exc}).",
                            hint="Another process holds it; try again when that run has finished.") from exc
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise InputError(f"The measurement store '{path}' has schema version {version}; this pedseg knows up to "
                         f"{len(MIGRATIONS)}.", hint="Use the pedseg version that wrote it, or a newer one.")
    for statements in MIGRATIONS[version:]:
        for statement in statements:
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")


def _time_point(row: sqlite3.Row, volumes: dict[str, dict[str, float]]) -> TimePoint:
    return TimePoint(
        subject_key=row["subject_key"], study_uid=row["study_uid"], study_date=row["study_date"],
        bundle=BundleId(row["bundle_name"], row["bundle_version"], row["bundle_sha256"], row["label_convention"]),
        volumes_ml=volumes.get("2024", {}), volumes_2023_ml=volumes.get("2023", {}),
        reviewed_volumes_ml=volumes.get("reviewed", {}),
        rapno_region=row["rapno_region"], rapno_product_mm2=row["rapno_product_mm2"],
        qc_flags=tuple(json.loads(row["qc_flags"])),
    )
