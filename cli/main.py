"""`pedseg` command line: translates arguments into one pipeline call and errors into exit codes."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from pedseg.cli.batch import add_cluster_options, cmd_batch
from pedseg.cli.batch import add_parser as add_batch_parser
from pedseg.cli.evaluate import add_parser as add_evaluate_parser
from pedseg.cli.evaluate import cmd_evaluate
from pedseg.cli.review import add_parser as add_review_parser
from pedseg.cli.review import cmd_review
from pedseg.interrupt import stop_on_signals
from pedseg.logs import configure_logging
from pedseg.pipeline.config import (
    DEFAULT_BUNDLE,
    DEMO_BUNDLE,
    SUBJECT_SALT_ENV,
    PipelineConfig,
    parse_role_overrides,
)
from pedseg.pipeline.errors import InputError, InternalError, as_pipeline_error

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pedseg",
                                     description="Pediatric brain tumour segmentation from a DICOM MRI session.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="DICOM session (folder or zip) -> segmentation, volumes, DICOM SEG/SR, PDF",
                         description="Segment one MRI session. Give one or more INPUTs (folders, zips or DICOM files "
                                     "of the same session, e.g. one zip per series), then OUTDIR last.")
    run.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help=_INPUT_HELP)
    run.add_argument("outdir", type=Path, metavar="OUTDIR", help="output folder (the last argument)")
    _add_run_options(run)
    # Only for one session: a listener's studies or a demo's phantom have series numbers of their own.
    run.add_argument("--role", action="append", default=[], metavar="ROLE=SERIES",
                     help="pin a series to a role, overriding identification, e.g. --role t1c=6 (repeatable; ROLE: "
                          f"{', '.join(PipelineConfig.choices('reference_role'))}; SERIES: a SeriesNumber or "
                          "SeriesInstanceUID of the session, as `pedseg identify` lists them)")
    run.add_argument("--db", type=Path, default=os.environ.get("PEDSEG_DB"),
                     help="SQLite measurement store: record this run and compare it with the subject's earlier ones "
                          "(default $PEDSEG_DB; no tracking without either)")
    run.add_argument("--subject-key", default=None,
                     help=f"key the run is recorded under (default: SHA-256 of ${SUBJECT_SALT_ENV} + PatientID)")
    _add_compare_option(run)

    ident = sub.add_parser("identify", help="classify the series of a session as t1n/t1c/t2w/t2f/other")
    ident.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help=_INPUT_HELP)
    ident.add_argument("--json", action="store_true", help="print the full decision record as JSON")

    demo = sub.add_parser("demo", help="generate a synthetic session and run the whole pipeline on it")
    demo.add_argument("outdir", type=Path)
    demo.add_argument("--seed", type=int, default=7)
    _add_run_options(demo, bundle=DEMO_BUNDLE)

    synth = sub.add_parser("synth", help="write a synthetic pediatric DICOM session with ground truth")
    synth.add_argument("outdir", type=Path)
    synth.add_argument("--seed", type=int, default=7)
    synth.add_argument("--growth", type=float, default=1.0, help="tumour volume factor (longitudinal series)")
    synth.add_argument("--subject-seed", type=int, default=None, help="same child across sessions")
    synth.add_argument("--zip", action="store_true", help="also pack the DICOM folder as a zip")

    history = sub.add_parser("history",
                             help="a subject's recorded time points with change vs baseline, nadir, previous")
    history.add_argument("subject",
                         help="the key given to `run --subject-key`, or the PatientID (hashed as run hashes it)")
    history.add_argument("--db", type=Path, default=os.environ.get("PEDSEG_DB"),
                         help="SQLite measurement store (default $PEDSEG_DB)")
    history.add_argument("--csv", nargs="?", const="-", default=None, metavar="PATH",
                         help="CSV instead of the table: to PATH, or to standard output without one")
    _add_compare_option(history)

    listen = sub.add_parser("listen", help="DICOM listener: receive studies, run the pipeline, send SEG, SR and PDF on")
    listen.add_argument("--aet", default="PEDSEG", help="our AE title")
    listen.add_argument("--port", type=int, required=True, help="TCP port of our C-STORE SCP")
    listen.add_argument("--bind", default="0.0.0.0", help="address to listen on")
    listen.add_argument("--dest", required=True, help="where results go: AET@HOST:PORT, or a DICOMweb URL for STOW-RS")
    listen.add_argument("--spool", type=Path, required=True, help="folder for received studies, queue and outputs")
    listen.add_argument("--quiet-seconds", type=float, default=30.0,
                        help="a study is complete after this long without instances")
    listen.add_argument("--allow-aet", action="append", default=[],
                        help="accept only these calling AE titles (repeatable)")
    listen.add_argument("--send-attempts", type=int, default=5, help="C-STORE / STOW-RS attempts, with doubling delays")
    add_cluster_options(listen)  # studies run on a Dask cluster, several at once (README: Batches)
    _add_run_options(listen)
    listen.add_argument("--db", type=Path, default=os.environ.get("PEDSEG_DB"),
                        help="SQLite measurement store: record each study under its subject (SHA-256 of "
                             f"${SUBJECT_SALT_ENV} + PatientID) and compare it with the subject's earlier studies "
                             "(default $PEDSEG_DB; no tracking without either)")
    _add_compare_option(listen)

    push = sub.add_parser("push", help="send a run's SEG, SR and PDF DICOM to a PACS (C-STORE) or DICOMweb (STOW-RS)")
    push.add_argument("outdir", type=Path)
    push.add_argument("--to", required=True, help="AET@HOST:PORT, or a DICOMweb base URL")
    push.add_argument("--aet", default="PEDSEG", help="our AE title")
    push.add_argument("--send-attempts", type=int, default=5)

    pull = sub.add_parser("pull",
                          help="fetch a study from a PACS (C-GET, or C-MOVE with --move-port) or DICOMweb (WADO-RS)")
    pull.add_argument("study_uid")
    pull.add_argument("--from", dest="source", required=True, help="AET@HOST:PORT, or a DICOMweb base URL")
    pull.add_argument("--to", dest="dest", type=Path, required=True, help="folder for the instances")
    pull.add_argument("--aet", default="PEDSEG", help="our AE title")
    pull.add_argument("--move-port", type=int, default=None, help="use C-MOVE to our AE title, received on this port")

    add_evaluate_parser(sub)  # pedseg evaluate PRED GT (cli/evaluate.py)
    add_review_parser(sub)  # pedseg review EDITED_SEG OUTDIR (cli/review.py)
    _add_compare_option(add_batch_parser(sub, _add_run_options))  # pedseg batch SOURCE... OUTROOT (cli/batch.py)
    return parser


_INPUT_HELP = "a folder, zip or DICOM file of the session; several are merged into one session"


def _add_run_options(p: argparse.ArgumentParser, bundle: Path = DEFAULT_BUNDLE) -> None:
    defaults = PipelineConfig()
    p.add_argument("--bundle", type=Path, default=bundle, help=f"model bundle folder (bundle.json); default {bundle}")
    p.add_argument("--device", choices=PipelineConfig.choices("device"), default=defaults.device)
    p.add_argument("--backend", choices=PipelineConfig.choices("backend"), default=defaults.backend,
                   help="what runs the networks: auto = OpenVINO on the CPU (DeepMedic at fp32: PyTorch, as "
                        "fast there), PyTorch on a GPU")
    p.add_argument("--precision", choices=PipelineConfig.choices("precision"), default=defaults.precision,
                   help="auto = bf16 where the CPU has it natively and the bundle allows it, else fp32 (fp16 "
                        "autocast for nnU-Net on a GPU); the log and provenance.json say which ran")
    p.add_argument("--fast", action="store_true", help="fewest folds and no test-time augmentation")
    p.add_argument("--reference", choices=PipelineConfig.choices("reference_role"), default=defaults.reference_role,
                   help="series the others are registered to and the SEG refers to")
    p.add_argument("--label-convention", choices=PipelineConfig.choices("label_convention"),
                   default=defaults.label_convention, help="label values of the NIfTI label maps")
    p.add_argument("--allow-missing", action="store_true", help="run with fewer sequences if the bundle accepts it")
    p.add_argument("--no-pseudonymize", action="store_true", help="print patient name and ID in the PDF")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--keep-workdir", action="store_true")


def _add_compare_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compare-across-bundles", action="store_true",
                   help="also compare time points measured with other model bundles or label conventions")


def _config(args: argparse.Namespace) -> PipelineConfig:
    return PipelineConfig(
        bundle=args.bundle, device=args.device, backend=args.backend, precision=args.precision, fast=args.fast,
        reference_role=args.reference,
        missing_policy="allow" if args.allow_missing else "fail", label_convention=args.label_convention,
        pseudonymize=not args.no_pseudonymize, threads=args.threads, keep_workdir=args.keep_workdir,
        role_overrides=parse_role_overrides(getattr(args, "role", [])),
    )


def _cmd_run(args) -> int:
    from pedseg.runner import run_pipeline
    from pedseg.tracking.sqlite import SQLiteStore

    config = dataclasses.replace(_config(args), subject_key=args.subject_key,
                                 compare_across_bundles=args.compare_across_bundles)
    store = SQLiteStore(args.db) if args.db else None
    result = run_pipeline(args.inputs, args.outdir, config, store=store)
    wt = result.measurements.regions["WT"].volume_ml
    print(f"done: whole tumour {wt:.2f} mL; outputs in {result.outdir}")
    return 0


def _cmd_identify(args) -> int:
    from pedseg.pipeline.identify import classify_session, session_to_json
    from pedseg.pipeline.ingest import ingest

    with tempfile.TemporaryDirectory(prefix="pedseg-identify-") as tmp:
        identification = classify_session(ingest(args.inputs, Path(tmp)))
    if args.json:
        print(session_to_json(identification))
    else:
        for d in identification.decisions:
            mark = "*" if d.chosen else " "
            number = f"{d.series_number}/{d.part}" if d.part else str(d.series_number)  # part of a split series
            reason = d.reasons[0] if d.reasons else ""
            print(f"{mark} {number:>8} {d.description[:40]:<40} {d.role:<5} {d.confidence:.2f}  {reason}")
        if identification.missing:
            print("missing: " + ", ".join(identification.missing))
    return 0


def _cmd_synth(args) -> int:
    import shutil

    from pedseg.synth.session import generate_session

    summary = generate_session(args.outdir, args.seed, growth=args.growth, subject_seed=args.subject_seed)
    if args.zip:
        shutil.make_archive(str(args.outdir / "dicom"), "zip", args.outdir / "dicom")
    print(f"synthetic session (seed {args.seed}, {summary['vendor']}) in {args.outdir}")
    return 0


def _cmd_history(args) -> int:
    from pedseg.pipeline.longitudinal import subject_key, trajectory
    from pedseg.reporting.longitudinal import history_csv, history_rows, history_table, write_history_csv
    from pedseg.tracking.sqlite import SQLiteStore

    if args.db is None or not args.db.is_file():
        raise InputError(f"No measurement store at '{args.db}'." if args.db else "No measurement store given.",
                         hint="Pass --db PATH (the file `pedseg run --db` records into) or set PEDSEG_DB.")
    store = SQLiteStore(args.db)
    salted = subject_key(args.subject, os.environ.get(SUBJECT_SALT_ENV, ""))
    points = store.history(args.subject) or store.history(salted)
    if not points:
        raise InputError("No time points are recorded for this subject.",
                         hint=f"SUBJECT is the key given to `pedseg run --subject-key`, or the PatientID (with "
                              f"the same ${SUBJECT_SALT_ENV} as the runs).")
    timeline = trajectory(points, across_bundles=args.compare_across_bundles)
    rows = history_rows(timeline)
    if args.csv == "-":
        sys.stdout.write(history_csv(rows))
    elif args.csv:
        print(f"{len(timeline)} time point(s) written to {write_history_csv(rows, args.csv)}")
    else:
        print(history_table(rows))
        for longitudinal in timeline:
            for note in longitudinal.notes:
                print(f"note ({longitudinal.current.study_date or 'undated'}): {note}")
    return 0


def _cmd_demo(args) -> int:
    from pedseg.runner import run_pipeline
    from pedseg.synth.session import generate_session

    session_dir = args.outdir / "synthetic-session"
    if not (session_dir / "ground_truth" / "summary.json").exists():
        generate_session(session_dir, args.seed)
    result = run_pipeline(session_dir / "dicom", args.outdir, _config(args))
    truth = json.loads((session_dir / "ground_truth" / "summary.json").read_text())
    wt = result.measurements.regions["WT"].volume_ml
    true_wt = sum(truth["label_voxels_atlas"].values()) / 1000
    print(f"demo done: whole tumour {wt:.1f} mL (phantom truth {true_wt:.1f} mL in atlas frame); "
          f"report: {result.outputs.get('pdf')}")
    return 0


def _cmd_listen(args) -> int:
    from pedseg.pacs.listener import Listener, ListenerConfig
    from pedseg.pacs.node import check_aet, parse_destination
    from pedseg.pacs.send import SendPolicy
    from pedseg.pipeline.bundle import load_bundle
    from pedseg.tracking.sqlite import SQLiteStore

    pipeline_config = dataclasses.replace(_config(args), compare_across_bundles=args.compare_across_bundles)
    load_bundle(pipeline_config.bundle)  # a broken bundle stops the listener now, not every study later
    store = SQLiteStore(args.db) if args.db else None  # likewise an unreadable store
    if store is None:
        logger.info("longitudinal tracking off: no --db or PEDSEG_DB")
    else:
        logger.info("longitudinal tracking: each study is recorded in %s under a hash of its PatientID", args.db)
        if not pipeline_config.subject_salt:
            logger.warning("%s is not set: an unsalted PatientID hash can be reversed by hashing candidate IDs; "
                           "set a site secret (the same for every run and `pedseg history`)", SUBJECT_SALT_ENV)
    config = ListenerConfig(
        aet=check_aet(args.aet), port=args.port, bind=args.bind, spool=args.spool,
        destination=parse_destination(args.dest), quiet_s=args.quiet_seconds,
        allowed_calling_aets=tuple(check_aet(a) for a in args.allow_aet), send=SendPolicy(attempts=args.send_attempts),
    )
    if not (args.workers or args.scheduler):
        Listener(config, pipeline_config, store=store).serve_forever()
        return 0
    from pedseg.batch.cluster import dashboard, dask_client
    from pedseg.batch.task import ClusterRunner
    from pedseg.cli.batch import worker_plan

    plan = worker_plan(args)
    if not args.scheduler:  # each local worker's share of the cores
        pipeline_config = dataclasses.replace(pipeline_config, threads=plan.threads)
    with dask_client(args.scheduler, plan, gpu=pipeline_config.device == "cuda") as client:
        slots = plan.workers if not args.scheduler else sum(client.nthreads().values()) or 1
        logger.info("studies run on %s (%d at once); dashboard: %s", args.scheduler or "an embedded Dask cluster",
                    slots, dashboard(client))
        runner = ClusterRunner(client, gpu=pipeline_config.device == "cuda")
        Listener(dataclasses.replace(config, workers=slots), pipeline_config, runner=runner,
                 store=store).serve_forever()
    return 0


def _cmd_batch(args) -> int:
    return cmd_batch(args, dataclasses.replace(_config(args), compare_across_bundles=args.compare_across_bundles))


def _cmd_push(args) -> int:
    from pedseg.pacs.node import check_aet, parse_destination
    from pedseg.pacs.send import SendPolicy, push_results

    count = push_results(args.outdir, parse_destination(args.to), calling_aet=check_aet(args.aet),
                         policy=SendPolicy(attempts=args.send_attempts))
    print(f"sent {count} instances to {args.to}")
    return 0


def _cmd_pull(args) -> int:
    from pedseg.pacs.node import check_aet, parse_destination
    from pedseg.pacs.retrieve import pull_study

    count = pull_study(args.study_uid, parse_destination(args.source), args.dest, calling_aet=check_aet(args.aet),
                       move_port=args.move_port)
    print(f"{count} instances in {args.dest}")
    return 0


COMMANDS = {"run": _cmd_run, "identify": _cmd_identify, "synth": _cmd_synth, "demo": _cmd_demo,
            "listen": _cmd_listen, "push": _cmd_push, "pull": _cmd_pull, "history": _cmd_history,
            "evaluate": cmd_evaluate, "review": cmd_review, "batch": _cmd_batch}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.verbose)
    # SIGTERM/SIGINT become InterruptedRun, so a stopped run cleans up (its workspace) and exits with its code;
    # the listener handles both itself (it stops taking studies and leaves its spool for the next one).
    stopping = contextlib.nullcontext() if args.command == "listen" else stop_on_signals()
    try:
        with stopping:
            return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line and an exit code, not a traceback that may quote headers
        error = as_pipeline_error(exc)
        logger.error("%s", error, exc_info=args.verbose and isinstance(error, InternalError))
        print(f"error ({error.kind}): {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":  # nnU-Net may spawn worker processes: keep the entry point guarded
    sys.exit(main())
