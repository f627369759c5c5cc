"""CPU backends side by side in one run: stock nnUNetPredictor, pedseg's PyTorch path, OpenVINO fp32 and OpenVINO
bf16 (only where the CPU has native bf16), on the full-size timing bundle (bench/fullsize_bundle.py) and on the
real model (bundles/captk-deepmedic-brats, PyTorch against OpenVINO). Wall time, ratio to the first variant, peak
RSS, and label Dice against the first variant.

    .venv/bin/python bench/cpu_backends.py [--repeat 1] [--threads N] [--skip-deepmedic] [--skip-nnunet]
    .venv/bin/python bench/cpu_backends.py --network-only [--repeat 5]   # one full-size tile, interleaved
    (ONNX Runtime joins the one-tile comparison when installed: pip install -e ".[bench]")
    .venv/bin/python bench/cpu_backends.py --full --skip-deepmedic   # 5 folds x 8 mirrorings: long on 2 cores

First, in one process, one full-size network on one 128x160x112 tile: PyTorch and OpenVINO calls interleaved
(`--repeat` each), so that load from other processes falls on both alike; the ratio of medians is the figure to
trust on a shared machine. Then the end-to-end runs. Default: one fold, no TTA. `--full`: the bundle's 5 folds
with mirroring TTA (nnU-Net's 8 mirror combinations), run when the machine is otherwise idle. Each end-to-end
variant runs in a fresh child process (peak RSS is its ru_maxrss; OpenVINO's conversion and compilation of each
fold are inside the time); with `--repeat`, the variants alternate.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
FULLSIZE = ROOT / "scratch" / "bench" / "fullsize-bundle"
DEEPMEDIC = ROOT / "bundles" / "captk-deepmedic-brats"
CASE = "BraTS-GLI-00001-000"
CASE_DIR = ROOT.parent / "shared" / "data" / "nifti" / f"brats_space_{CASE}"


def _variants(kind: str) -> list[str]:
    from pedseg.pipeline.backend import cpu_has_native_bf16

    names = (["stock"] if kind == "nnunet" else []) + ["torch", "openvino-fp32"]
    return names + (["openvino-bf16"] if cpu_has_native_bf16() else [])


def _execution(variant: str, threads: int):
    from pedseg.pipeline.backend import Execution

    if variant.startswith("openvino"):
        return Execution("openvino", variant.split("-")[1], threads)
    return Execution()


class _OnnxRuntimeNetwork:
    """ONNX Runtime's CPU execution provider on the same network, for the comparison only: exported once with
    torch.onnx (static tile shape, as OpenVINO compiles it), every graph optimisation on."""

    def __init__(self, network, tile, threads: int):
        import onnxruntime
        import torch

        self._folder = tempfile.TemporaryDirectory()
        path = Path(self._folder.name) / "network.onnx"
        torch.onnx.export(network, (tile,), str(path), input_names=["x"], output_names=["y"], dynamo=True,
                          external_data=False)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, tile):
        import torch

        return torch.from_numpy(self._session.run(["y"], {"x": tile.numpy()})[0])


def network_ratio(repeat: int, threads: int, onnx_runtime: bool) -> None:
    import statistics

    import torch
    from inference import _members

    from pedseg.pipeline.backend import Execution, cpu_has_native_bf16
    from pedseg.pipeline.ensemble import load_member
    from pedseg.pipeline.openvino_backend import OpenVINONetwork

    torch.set_num_threads(threads)
    predictor = load_member(_members(FULLSIZE, True)[0], torch.device("cpu"), tta=False)
    network = predictor.network.eval()
    network.load_state_dict(predictor.list_of_parameters[0])
    tile = torch.randn(1, 4, *predictor.configuration_manager.patch_size, generator=torch.Generator().manual_seed(0))
    engines = {"torch fp32": network}
    for precision in ["fp32"] + (["bf16"] if cpu_has_native_bf16() else []):
        engines[f"openvino {precision}"] = OpenVINONetwork(network, Execution("openvino", precision, threads))
    if onnx_runtime:
        engines["onnxruntime fp32"] = _OnnxRuntimeNetwork(network, tile, threads)
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    cpu: dict[str, list[float]] = {name: [] for name in engines}  # this process's CPU time: what load cannot inflate
    outputs = {}
    with torch.inference_mode():
        for name, engine in engines.items():  # warm-up: OpenVINO converts and compiles here
            t0 = time.perf_counter()
            outputs[name] = engine(tile)
            print(f"  first call {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        for _ in range(repeat):
            for name, engine in engines.items():
                t0, c0 = time.perf_counter(), time.process_time()
                engine(tile)
                seconds[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    base = statistics.median(seconds["torch fp32"])
    base_cpu = statistics.median(cpu["torch fp32"])
    reference = outputs["torch fp32"]
    print(f"\none full-size network, one {tuple(tile.shape)} tile, {repeat} interleaved calls each "
          "(median):\n| engine | seconds | vs torch fp32 | CPU seconds | vs torch fp32 | max abs logit diff "
          "| argmax agreement |\n|---|---|---|---|---|---|---|")
    for name, times in seconds.items():
        diff = (outputs[name] - reference).abs().max().item()
        agree = (outputs[name].argmax(1) == reference.argmax(1)).float().mean().item()
        used = statistics.median(cpu[name])
        print(f"| {name} | {statistics.median(times):.2f} | {base / statistics.median(times):.2f}x | {used:.2f} "
              f"| {base_cpu / used:.2f}x | {diff:.1e} | {agree:.2%} |", flush=True)


def worker(args) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    execution = _execution(args.worker, args.threads)
    if args.kind == "nnunet":
        from inference import _members, _stock

        from pedseg.pipeline.ensemble import run_ensemble

        case = np.load(args.input)
        data, spacing = case["data"], case["spacing"].tolist()
        members = _members(args.bundle, not args.full)
        t0 = time.perf_counter()
        if args.worker == "stock":
            labels = _stock(data, spacing, members, cpu, args.full)
        else:
            labels = run_ensemble(data, spacing, members, cpu, args.full, execution).labels
    else:
        import SimpleITK as sitk

        from pedseg.pipeline.bundle import load_bundle
        from pedseg.pipeline.deepmedic import run_deepmedic

        bundle = load_bundle(args.bundle)
        order = sorted(bundle.inputs, key=bundle.inputs.get)
        images = [sitk.ReadImage(str(CASE_DIR / f"{CASE}-{role}.nii.gz"), sitk.sitkFloat32) for role in order]
        t0 = time.perf_counter()
        labels = run_deepmedic(images, bundle, cpu, execution).labels
    seconds = time.perf_counter() - t0
    np.save(args.output, np.asarray(labels, np.uint8))
    print(json.dumps({"seconds": round(seconds, 2),
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)}))


def _internal(labels, kind: str):
    from pedseg.pipeline.labels import convert_labels

    return labels if kind == "nnunet" else convert_labels(labels, "2023", "2024")


def compare(kind: str, bundle: Path, args, tmp: Path, case: Path | None) -> None:
    import numpy as np

    from pedseg.evaluation import region_dice

    variants = _variants(kind)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for repetition in range(args.repeat):
        order = variants if repetition % 2 == 0 else variants[::-1]
        for variant in order:
            out = tmp / f"{kind}_{variant}.npy"
            cmd = [sys.executable, __file__, "--worker", variant, "--kind", kind, "--bundle", str(bundle),
                   "--threads", str(args.threads), "--output", str(out)]
            cmd += ["--input", str(case)] if case else []
            cmd += ["--full"] if args.full else []
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode:
                sys.exit(f"{kind} {variant} failed:\n{run.stderr[-3000:]}")
            result = json.loads(run.stdout.strip().splitlines()[-1])
            result["labels"] = _internal(np.load(out), kind)
            runs[variant].append(result)
            print(f"  {kind} {variant:14s} run {repetition + 1}: {result['seconds']:8.1f} s  "
                  f"peak RSS {result['peak_rss_gib']:.2f} GiB", flush=True)
    base = variants[0]
    best = {v: min(r["seconds"] for r in runs[v]) for v in variants}
    print(f"\n{kind} ({'5 folds x 8 mirrorings' if args.full and kind == 'nnunet' else 'one fold, no TTA'}; "
          f"best of {args.repeat}):\n| variant | seconds | vs {base} | peak RSS GiB "
          f"| label Dice vs {base} (WT, TC, ET) |\n|---|---|---|---|---|")
    for v in variants:
        dice = region_dice(runs[base][0]["labels"], runs[v][0]["labels"])
        shown = ", ".join("-" if dice[r] is None else f"{dice[r]:.4f}" for r in ("WT", "TC", "ET"))
        print(f"| {v} | {best[v]:.1f} | {best[base] / best[v]:.2f}x | "
              f"{max(r['peak_rss_gib'] for r in runs[v]):.2f} | {shown} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="all 5 folds with mirroring TTA (long)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant, alternating the order")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=9001, help="synthetic held-out case for the nnU-Net part")
    parser.add_argument("--network-only", action="store_true", help="only the interleaved one-tile comparison")
    parser.add_argument("--skip-nnunet", action="store_true")
    parser.add_argument("--skip-deepmedic", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=["nnunet", "deepmedic"], help=argparse.SUPPRESS)
    parser.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import openvino
    import torch
    from deepmedic import cpu_name
    from inference import _write_case

    from pedseg.pipeline.backend import cpu_has_native_bf16

    print(f"{cpu_name()}, {os.cpu_count()} cores, {args.threads} threads, native bf16: {cpu_has_native_bf16()}; "
          f"torch {torch.__version__}, OpenVINO {openvino.__version__}; load average {os.getloadavg()[0]:.1f}")
    if not (FULLSIZE / "bundle.json").is_file():
        from fullsize_bundle import build

        build(FULLSIZE, folds=5)
    network_ratio(max(args.repeat, 3), args.threads, onnx_runtime=importlib.util.find_spec("onnxruntime") is not None)
    if args.network_only:
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_nnunet:
            case = tmp / "case.npz"
            shape = _write_case(args.seed, case)
            print(f"full-size nnU-Net bundle {FULLSIZE}; synthetic case {args.seed}, shape {shape}")
            compare("nnunet", FULLSIZE, args, tmp, case)
        if not args.skip_deepmedic:
            print(f"\nreal model {DEEPMEDIC.name} on {CASE_DIR.name}")
            compare("deepmedic", DEEPMEDIC, args, tmp, None)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
