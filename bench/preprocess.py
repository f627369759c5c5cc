"""Preprocessing benchmark: our SimpleITK preprocessing against brainles-preprocessing (ANTs backend) on one
full-size synthetic DICOM session, in one run: seconds and peak resident memory per step, the speed ratio, and
each tool's registration error against the ground-truth pose that `synth` saved for every series.

    make bench-preprocess        # or: .venv/bin/python bench/preprocess.py [--seed 6] [--workdir scratch/bench] [--n4]

brainles-preprocessing pins older rich/click/scipy than this project (installing it into .venv would break
huggingface-hub's click requirement), so `make` gives it its own virtual environment layered over ours by a
.pth file, and the benchmark runs it there in a child process.

Each tool runs in a fresh child process; a step's peak memory is the process's peak resident set size
between the step's start and end (Linux VmHWM, reset through /proc/self/clear_refs). Brain extraction is ours
only: brainles' HD-BET needs a weights download, so the like-for-like ratio leaves it out of both.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ROLES = ("t1c", "t1n", "t2w", "t2f")
DEFAULT_BRAINLES_PYTHON = ROOT / "scratch" / "bench" / "brainles-venv" / "bin" / "python"
# Steps that both tools do (registration, resampling into BraTS space, writing); the rest is ours only.
OURS_ONLY = ("convert", "brain extraction", "quality checks", "bias correction")


# --------------------------------------------------------------------------------------------- measuring


@dataclass
class Step:
    name: str
    seconds: float
    peak_mib: float


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set size


def _peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


# ------------------------------------------------------------------------------------------ ours (child)


class _StepLines(logging.Handler):
    """Turns preprocess's "preprocess step NAME: S s" log lines into Steps with the peak memory since the last."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.steps: list[Step] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("preprocess step"):
            name, seconds = record.args
            self.steps.append(Step(name, float(seconds), round(_peak_mib(), 1)))
            _reset_peak()


def run_ours(session_dir: Path, workdir: Path, out_json: Path, n4: bool) -> None:
    from pedseg.pipeline.config import PipelineConfig
    from pedseg.pipeline.identify import identify
    from pedseg.pipeline.ingest import ingest
    from pedseg.pipeline.preprocess import preprocess

    config = PipelineConfig(n4_for_registration=n4)
    t0 = time.perf_counter()
    session = ingest(session_dir / "dicom", workdir / "input")
    identification = identify(session, config)
    steps = [Step("ingest + identify (not compared)", round(time.perf_counter() - t0, 2), round(_peak_mib(), 1))]
    lines = _StepLines()
    logging.getLogger("pedseg.pipeline.preprocess").addHandler(lines)
    logging.getLogger("pedseg.pipeline.preprocess").setLevel(logging.DEBUG)  # the per-step lines
    _reset_peak()
    pre = preprocess(session, identification, workdir / "pre", config)
    out_json.write_text(json.dumps({
        "steps": [asdict(s) for s in steps + lines.steps],
        "native": {role: str(p) for role, p in pre.native.items()},
        "atlas_to_native": {role: [str(p)] for role, p in pre.atlas_to_native.items()},
        "qc": pre.qc.as_dict(),
    }, indent=2))


# -------------------------------------------------------------------------------------- brainles (child)


def run_brainles(native_json: Path, workdir: Path, out_json: Path) -> None:
    from brainles_preprocessing.modality import CenterModality, Modality
    from brainles_preprocessing.preprocessor import AtlasCentricPreprocessor
    from brainles_preprocessing.registration import ANTsRegistrator

    from pedseg.pipeline.atlas import ATLAS_T1

    native = json.loads(native_json.read_text())["native"]
    out = workdir / "out"
    center = CenterModality("t1c", native["t1c"], raw_skull_output_path=out / "t1c.nii.gz")
    moving = [Modality(role, native[role], raw_skull_output_path=out / f"{role}.nii.gz") for role in ROLES[1:]]
    # Our atlas file is the BraTS/SRI24 T1 that early brainles wheels shipped (its default downloads it).
    pre = AtlasCentricPreprocessor(center, moving, registrator=ANTsRegistrator(), atlas_image_path=ATLAS_T1,
                                   temp_folder=workdir / "tmp", use_gpu=False)
    steps: list[Step] = []

    def timed(name, method):
        def wrapper(*args, **kwargs):
            _reset_peak()
            t0 = time.perf_counter()
            result = method(*args, **kwargs)
            steps.append(Step(name, round(time.perf_counter() - t0, 2), round(_peak_mib(), 1)))
            _reset_peak()
            return result
        return wrapper

    for name in ("coregistration", "atlas_registration", "atlas_correction", "n4_bias_correction", "brain_extraction"):
        setattr(pre, f"run_{name}", timed(name.replace("_", " "), getattr(pre, f"run_{name}")))
    transforms = workdir / "transforms"
    t0 = time.perf_counter()
    _reset_peak()
    pre.run(save_dir_transformations=transforms, log_file=workdir / "brainles.log")
    total = time.perf_counter() - t0
    steps.append(Step("writing outputs and the rest", round(total - sum(s.seconds for s in steps), 2),
                      round(_peak_mib(), 1)))

    def mat(role: str, step: str) -> list[str]:
        return [str(p) for p in sorted((transforms / role).glob(f"{step}_*.mat"))]

    # ANTs transforms map fixed points to moving points, like SimpleITK's. Atlas -> native of a moving series:
    # its atlas correction first (atlas -> atlas), then t1c's atlas registration, then its co-registration.
    chains = {"t1c": mat("t1c", "2")}
    for role in ROLES[1:]:
        chains[role] = mat(role, "3") + mat("t1c", "2") + mat(role, "1")
    out_json.write_text(json.dumps({"steps": [asdict(s) for s in steps], "atlas_to_native": chains}, indent=2))


# ---------------------------------------------------------------------------------------- errors (parent)


def _atlas_brain_points(stride: int):
    """(brain centroid, every `stride`-th brain voxel centre) of the atlas, as LPS points in mm."""
    import numpy as np
    import SimpleITK as sitk

    from pedseg.pipeline.atlas import load_atlas_brain_mask

    brain = load_atlas_brain_mask()  # the phantom's brain is the atlas brain, shrunk by head_scale at imaging
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(brain > 0, sitk.sitkUInt8))
    ijk = np.argwhere(sitk.GetArrayViewFromImage(brain) > 0)[::stride, ::-1]
    direction = np.asarray(brain.GetDirection()).reshape(3, 3)
    points = (np.asarray(brain.GetOrigin()) + ijk * np.asarray(brain.GetSpacing())) @ direction.T
    return np.asarray(stats.GetCentroid(1)), points


def _chain(paths: list[str]):
    """One transform from a tool's saved atlas -> native chain of .tfm files."""
    import SimpleITK as sitk

    from pedseg.pipeline.registration import compose

    return compose(*[sitk.ReadTransform(p) for p in paths])


def _transform_points(transform, points):
    import numpy as np

    return np.array([transform.TransformPoint(tuple(float(v) for v in p)) for p in points])


def _median_worst(distances) -> dict:
    import numpy as np

    return {"median_mm": round(float(np.median(distances)), 2), "max_mm": round(float(distances.max()), 2)}


def tool_agreement(results: dict, reference: str = "ours", stride: int = 50) -> dict:
    """How far each tool's t1c -> atlas alignment lands from `reference`'s, over the atlas brain (median and
    worst mm): for a smaller head the brain-centred ideal is a convention, so agreement between two
    independent optimisers shows where mutual information puts the head."""
    import numpy as np

    _, points = _atlas_brain_points(stride)

    def mapped(name: str) -> np.ndarray:
        return _transform_points(_chain(results[name]["atlas_to_native"]["t1c"]), points)

    ours = mapped(reference)
    return {name: _median_worst(np.linalg.norm(mapped(name) - ours, axis=1)) for name in results if name != reference}


def registration_errors(session_dir: Path, chains: dict[str, list[str]], stride: int = 50) -> dict:
    """Errors over the child's brain, per series. Co-registration t1c -> series: exact truth (both poses known),
    median and worst mm. Atlas -> native: a rigid alignment of a smaller head is exact in rotation but its centring
    is a convention; against the brain-centred ideal, the rotation error in degrees, the offset of the brain
    centre in mm, and median and worst mm."""
    import numpy as np
    import SimpleITK as sitk

    from pedseg.pipeline.registration import compose, inverse
    from pedseg.synth.acquire import scale_about

    truth_dir = session_dir / "ground_truth"
    head_scale = json.loads((truth_dir / "summary.json").read_text())["tumour"]["head_scale"]
    centre, atlas_points = _atlas_brain_points(stride)
    points = centre + head_scale * (atlas_points - centre)  # where the child's brain sits in the atlas frame
    # Scanner point -> phantom point poses; a smaller head centred on the atlas brain is a rigid alignment.
    truth = {role: compose(scale_about(centre, head_scale),
                           sitk.ReadTransform(str(truth_dir / f"pose_{role}.tfm")).GetInverse())
             for role in ROLES}
    found = {role: _chain(chains[role]) for role in ROLES}

    def rotation_deg(a, b) -> float:
        """Angle between the linear parts of two rigid transforms, from finite differences about the centre."""
        basis = centre + 10.0 * np.vstack([np.zeros(3), np.eye(3)])
        ma, mb = (np.diff(_transform_points(t, basis)[[0, 1, 0, 2, 0, 3]].reshape(3, 2, 3),
                          axis=1)[:, 0].T / 10.0 for t in (a, b))
        return float(np.degrees(np.arccos(np.clip((np.trace(ma @ mb.T) - 1) / 2, -1, 1))))

    true_native = {role: _transform_points(truth[role], points) for role in ROLES}
    t1c_back = _transform_points(inverse(found["t1c"]),
                                 true_native["t1c"])  # true t1c positions through the found t1c alignment
    result = {}
    for role in ROLES:
        atlas = _median_worst(np.linalg.norm(_transform_points(found[role], points) - true_native[role], axis=1))
        atlas["rotation_deg"] = round(rotation_deg(found[role], truth[role]), 2)
        centre_offset = _transform_points(found[role], [centre]) - _transform_points(truth[role], [centre])
        atlas["centre_mm"] = round(float(np.linalg.norm(centre_offset)), 2)
        result[f"{role} atlas"] = atlas
        if role != "t1c":
            through_t1c = _transform_points(found[role], t1c_back)
            result[f"{role} to t1c"] = _median_worst(np.linalg.norm(through_t1c - true_native[role], axis=1))
    return result


# ---------------------------------------------------------------------------------------------- parent


def _child(python: Path, *args: str) -> dict:
    """Run a worker; return its CPU seconds (user + system: less sensitive than wall time to a shared CPU) and
    the 1-minute load average before and after it."""
    env = {**os.environ, "BRAINLES_PREPROCESSING_CITATION_REMINDER": "false", "PYTHONUNBUFFERED": "1"}
    before, load = resource.getrusage(resource.RUSAGE_CHILDREN), os.getloadavg()[0]
    subprocess.run([str(python), str(Path(__file__).resolve()), *args], check=True, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"cpu_seconds": round(cpu, 1), "load": f"{load:.1f} -> {os.getloadavg()[0]:.1f}"}


def _table(name: str, steps: list[dict]) -> list[str]:
    rows = [f"| {name} | {s['name']} | {s['seconds']:.1f} | {s['peak_mib']:.0f} |" for s in steps]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=6, help="synthetic session seed (6: Siemens, 3-5 year-old head)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "scratch" / "bench")
    parser.add_argument("--brainles-python", type=Path, default=DEFAULT_BRAINLES_PYTHON)
    parser.add_argument("--n4", action="store_true", help="also run ours with N4 driving registration")
    sub = parser.add_subparsers(dest="worker")
    ours = sub.add_parser("ours")
    ours.add_argument("session", type=Path)
    ours.add_argument("workdir", type=Path)
    ours.add_argument("out", type=Path)
    ours.add_argument("--n4", action="store_true")
    brainles = sub.add_parser("brainles")
    brainles.add_argument("native_json", type=Path)
    brainles.add_argument("workdir", type=Path)
    brainles.add_argument("out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.worker == "ours":
        run_ours(args.session, args.workdir, args.out, args.n4)
        return 0
    if args.worker == "brainles":
        run_brainles(args.native_json, args.workdir, args.out)
        return 0

    from pedseg.synth.session import generate_session

    work = args.workdir.resolve()
    session = work / f"session-seed{args.seed}"
    if not (session / "ground_truth" / "summary.json").exists():
        generate_session(session, args.seed)
    results: dict[str, dict] = {}
    runs = [("ours", [])] + ([("ours + N4", ["--n4"])] if args.n4 else [])
    for name, extra in runs:
        run_dir = work / name.replace(" + ", "-")
        usage = _child(Path(sys.executable), "ours", str(session), str(run_dir), str(run_dir / "result.json"), *extra)
        results[name] = {**json.loads((run_dir / "result.json").read_text()), **usage}
    brainles_dir = work / "brainles"
    if args.brainles_python.exists():
        usage = _child(args.brainles_python, "brainles", str(work / "ours" / "result.json"), str(brainles_dir),
                       str(brainles_dir / "result.json"))
        results["brainles (ANTs)"] = {**json.loads((brainles_dir / "result.json").read_text()), **usage}
    else:
        print(f"brainles-preprocessing not run: {args.brainles_python} missing (see this script's docstring)")

    lines = [f"session seed {args.seed}, {platform.node()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}",
             "", "| tool | step | seconds | peak MiB |", "|---|---|---|---|"]
    totals = {}
    for name, result in results.items():
        lines += _table(name, result["steps"])
        timed = [s for s in result["steps"] if "not compared" not in s["name"]]
        compared = [s for s in timed if not s["name"].startswith(OURS_ONLY)]
        totals[name] = (sum(s["seconds"] for s in compared), sum(s["seconds"] for s in timed),
                        max(s["peak_mib"] for s in result["steps"]))
    lines += ["", "| tool | registration + resampling + writing, s | whole preprocessing, s | CPU s (whole process) | "
                  "peak MiB | load average |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {a:.1f} | {b:.1f} | {results[name]['cpu_seconds']:.0f} | {m:.0f} | {results[name]['load']} |"
              for name, (a, b, m) in totals.items()]
    if "brainles (ANTs)" in totals:
        theirs = totals["brainles (ANTs)"]
        lines += ["", f"speed-up, like for like (registration + resampling + writing): "
                      f"{theirs[0] / totals['ours'][0]:.1f}x; whole preprocessing (ours with conversion and "
                      f"deepbet, theirs without brain extraction): {theirs[1] / totals['ours'][1]:.1f}x; CPU seconds: "
                      f"{results['brainles (ANTs)']['cpu_seconds'] / results['ours']['cpu_seconds']:.1f}x"]
    errors = {name: registration_errors(session, result["atlas_to_native"]) for name, result in results.items()}
    lines += ["", "registration error over the child's brain: median / worst mm (atlas rows: also rotation error and",
              "brain-centre offset against the brain-centred ideal)", "",
              "| alignment | " + " | ".join(errors) + " |", "|---" * (len(errors) + 1) + "|"]
    for key in next(iter(errors.values())):
        cells = [f"{e[key]['median_mm']:.2f} / {e[key]['max_mm']:.2f}"
                 + (f"; {e[key]['rotation_deg']:.2f} deg, centre {e[key]['centre_mm']:.2f} mm"
                    if "rotation_deg" in e[key] else "")
                 for e in errors.values()]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    agreement = tool_agreement(results)
    lines += ["", "t1c -> atlas alignment against ours, over the atlas brain (median / worst mm): "
              + "; ".join(f"{name} {a['median_mm']:.2f} / {a['max_mm']:.2f}" for name, a in agreement.items())]
    report = "\n".join(lines)
    print(report)
    (work / "report.md").write_text(report + "\n")
    (work / "results.json").write_text(json.dumps({"results": results, "errors": errors, "agreement": agreement},
                                                  indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
