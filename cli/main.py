"""`pedseg` command line: translates arguments into one pipeline call and errors into exit codes."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from pipeline.config import DEFAULT_BUNDLE, PipelineConfig
from pipeline.errors import PipelineError

logger = logging.getLogger("pedseg")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pedseg", description="Pediatric brain tumour segmentation from a DICOM MRI session.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="DICOM session (folder or zip) -> segmentation, volumes, DICOM SEG/SR, PDF")
    run.add_argument("input", type=Path)
    run.add_argument("outdir", type=Path)
    _add_run_options(run)

    ident = sub.add_parser("identify", help="classify the series of a session as t1n/t1c/t2w/t2f/other")
    ident.add_argument("input", type=Path)
    ident.add_argument("--json", action="store_true", help="print the full decision record as JSON")

    demo = sub.add_parser("demo", help="generate a synthetic session and run the whole pipeline on it")
    demo.add_argument("outdir", type=Path)
    demo.add_argument("--seed", type=int, default=7)
    _add_run_options(demo)

    synth = sub.add_parser("synth", help="write a synthetic pediatric DICOM session with ground truth")
    synth.add_argument("outdir", type=Path)
    synth.add_argument("--seed", type=int, default=7)
    synth.add_argument("--growth", type=float, default=1.0, help="tumour volume factor (longitudinal series)")
    synth.add_argument("--subject-seed", type=int, default=None, help="same child across sessions")
    synth.add_argument("--zip", action="store_true", help="also pack the DICOM folder as a zip")
    return parser


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="model bundle folder (bundle.json)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--fast", action="store_true", help="fewest folds and no test-time augmentation")
    p.add_argument("--reference", choices=["t1n", "t1c", "t2w", "t2f"], default="t1c", help="series the SEG refers to")
    p.add_argument("--label-convention", choices=["2024", "2023"], default="2024")
    p.add_argument("--allow-missing", action="store_true", help="run with fewer sequences if the bundle accepts it")
    p.add_argument("--no-pseudonymize", action="store_true", help="print patient name and ID in the PDF")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--keep-workdir", action="store_true")


def _config(args: argparse.Namespace) -> PipelineConfig:
    return PipelineConfig(
        bundle=args.bundle, device=args.device, fast=args.fast, reference_role=args.reference,
        missing_policy="allow" if args.allow_missing else "fail", label_convention=args.label_convention,
        pseudonymize=not args.no_pseudonymize, threads=args.threads, keep_workdir=args.keep_workdir,
    )


def _cmd_run(args) -> int:
    from pipeline.runner import run_pipeline

    result = run_pipeline(args.input, args.outdir, _config(args))
    wt = result.measurements.regions["WT"].volume_ml
    print(f"done: whole tumour {wt:.2f} mL; outputs in {result.outdir}")
    return 0


def _cmd_identify(args) -> int:
    from pipeline.identify import classify_session, session_to_json
    from pipeline.ingest import ingest

    with tempfile.TemporaryDirectory(prefix="pedseg-identify-") as tmp:
        identification = classify_session(ingest(args.input, Path(tmp)))
    if args.json:
        print(session_to_json(identification))
    else:
        for d in identification.decisions:
            mark = "*" if d.chosen else " "
            print(f"{mark} {d.series_number!s:>4} {d.description[:40]:<40} {d.role:<5} {d.confidence:.2f}  {d.reasons[0] if d.reasons else ''}")
        if identification.missing:
            print("missing: " + ", ".join(identification.missing))
    return 0


def _cmd_synth(args) -> int:
    import shutil

    from synth.session import generate_session

    summary = generate_session(args.outdir, args.seed, growth=args.growth, subject_seed=args.subject_seed)
    if args.zip:
        shutil.make_archive(str(args.outdir / "dicom"), "zip", args.outdir / "dicom")
    print(f"synthetic session (seed {args.seed}, {summary['vendor']}) in {args.outdir}")
    return 0


def _cmd_demo(args) -> int:
    from pipeline.runner import run_pipeline
    from synth.session import generate_session

    session_dir = args.outdir / "synthetic-session"
    if not (session_dir / "ground_truth" / "summary.json").exists():
        generate_session(session_dir, args.seed)
    result = run_pipeline(session_dir / "dicom", args.outdir, _config(args))
    truth = json.loads((session_dir / "ground_truth" / "summary.json").read_text())
    wt = result.measurements.regions["WT"].volume_ml
    true_wt = sum(truth["label_voxels_atlas"].values()) / 1000
    print(f"demo done: whole tumour {wt:.1f} mL (phantom truth {true_wt:.1f} mL in atlas frame); report: {result.outputs.get('pdf')}")
    return 0


COMMANDS = {"run": _cmd_run, "identify": _cmd_identify, "synth": _cmd_synth, "demo": _cmd_demo}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except PipelineError as error:
        logger.error("%s", error)
        print(f"error ({error.kind}): {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # nnU-Net may spawn worker processes: keep the entry point guarded
    sys.exit(main())
