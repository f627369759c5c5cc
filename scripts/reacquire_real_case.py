"""Re-acquire a real BraTS-space case (t1n, t1c, t2w, t2f NIfTI) as a DICOM MR session with ground-truth poses.

    python scripts/reacquire_real_case.py ../shared/data/nifti/TCGA-DU-7294 --outdir /tmp/reacq/TCGA-DU-7294
    python scripts/reacquire_real_case.py T1N T1C T2W T2F --outdir OUT --seed 3 --vendor Philips

OUT/dicom is the session (feed it to `pedseg run`), OUT/ground_truth the poses and summary.json
(see pedseg.synth.reacquire). Prints one line per series written, the time taken and the size on disk.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from pedseg.pipeline.types import ROLES
from pedseg.synth.protocols import VENDORS
from pedseg.synth.reacquire import find_case_images, reacquire_session


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path,
                        help="a case folder (files named *-t1n/-t1c/-t2w/-t2f or *_t1/_t1c/_t2/_fla[ir]), or the "
                             "four images in the order t1n t1c t2w t2f")
    parser.add_argument("--outdir", type=Path, required=True, help="receives dicom/ and ground_truth/")
    parser.add_argument("--seed", type=int, default=0, help="head placement, motion, study date (default 0)")
    parser.add_argument("--vendor", choices=list(VENDORS), default="SIEMENS", help="protocol set (default SIEMENS)")
    parser.add_argument("--age", default="045Y", help="PatientAge, DICOM AS (default 045Y)")
    parser.add_argument("--no-distractors", action="store_true", help="leave out the localizer and DWI series")
    args = parser.parse_args(argv)
    if len(args.inputs) not in (1, len(ROLES)) or (len(args.inputs) == 1 and not args.inputs[0].is_dir()):
        parser.error("give one case folder or four images (t1n t1c t2w t2f)")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    images = find_case_images(args.inputs[0]) if len(args.inputs) == 1 else dict(zip(ROLES, args.inputs))
    start = time.perf_counter()
    dicom_dir = reacquire_session(images, args.outdir, args.seed, vendor=args.vendor, age=args.age,
                                  distractors=not args.no_distractors)
    seconds = time.perf_counter() - start
    summary = json.loads((args.outdir / "ground_truth" / "summary.json").read_text())
    for role, s in summary["series"].items():
        print(f"{s['series_number']:2d} {role:4s} {s['description']:28s} {s['plane']:10s} {s['acquisition_type']} "
              f"size {'x'.join(map(str, s['size']))} spacing {'x'.join(f'{v:g}' for v in s['spacing_mm'])} mm "
              f"thickness {s['slice_thickness_mm']:g} mm rotation {s['head_rotation_deg']:.1f} deg "
              f"scale {s['intensity_scale']:.3f} coverage {s['brain_coverage']}")
    files = [p for p in dicom_dir.rglob("*") if p.is_file()]
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    print(f"{summary['case']}: {len(files)} DICOM files, {size_mb:.1f} MB in {dicom_dir}, {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
