"""`pedseg review EDITED_SEG.dcm OUTDIR`: a radiologist's edited segmentation back into a run's results
(pedseg.reporting.review does the work; with a store, the reviewed volumes join the study's time point)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from pedseg.pipeline.config import SUBJECT_SALT_ENV


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "review", help="measure an edited DICOM SEG (OHIF, Slicer...) and write reviewed SR, tables and PDF",
        description="Read a DICOM SEG edited in a viewer (OHIF, 3D Slicer/dcmqi, or any highdicom writer), map its "
                    "segments to the tumour regions (by code, else by label), measure it on its own grid and write "
                    "OUTDIR/review/: measurements.json/.csv marked reviewed, a DICOM SR that revises the run's SR, "
                    "and a PDF comparing reviewed and automatic volumes. With --db, the reviewed volumes are "
                    "recorded beside the automatic ones, and later comparisons use them.")
    p.add_argument("edited_seg", type=Path, metavar="EDITED_SEG", help="the edited DICOM SEG file")
    p.add_argument("outdir", type=Path, metavar="OUTDIR", help="the output folder of the `pedseg run` it revises")
    p.add_argument("--db", type=Path, default=os.environ.get("PEDSEG_DB"),
                   help="SQLite measurement store to record the reviewed volumes in (default $PEDSEG_DB)")
    p.add_argument("--subject-key", default=None,
                   help=f"key the run was recorded under (default: SHA-256 of ${SUBJECT_SALT_ENV} + the SEG's "
                        "PatientID)")
    return p


def cmd_review(args) -> int:
    import pydicom

    from pedseg.pipeline.longitudinal import subject_key
    from pedseg.reporting.review import review_segmentation

    review = review_segmentation(args.edited_seg, args.outdir)
    for name in ("ET", "NET", "CC", "ED", "TC", "WT"):
        before = review.automatic_volumes_ml.get(name)
        after = review.measurements.regions[name].volume_ml
        print(f"{name:4s} reviewed {after:9.3f} mL   automatic {'—' if before is None else f'{before:9.3f} mL'}")
    print(f"reviewed outputs in {args.outdir / 'review'}")
    if args.db is not None:
        from pedseg.tracking.records import record_review
        from pedseg.tracking.sqlite import SQLiteStore

        key = args.subject_key or subject_key(str(pydicom.dcmread(args.edited_seg, stop_before_pixels=True)
                                                  .get("PatientID", "")), os.environ.get(SUBJECT_SALT_ENV, ""))
        record_review(SQLiteStore(args.db), key, review.study_uid, str(review.bundle.get("sha256", "")),
                      {name: r.volume_ml for name, r in review.measurements.regions.items()})
        print(f"reviewed volumes recorded in {args.db}")
    return 0
