"""CPU backends side by side in one run: stock nnUNetPredictor, pedseg's PyTorch path, OpenVINO fp32 and OpenVINO
bf16 (only where the CPU has native bf16), on the full-size timing bundle (bench/fullsize_bundle.py) and on the
real model (bundles/captk-deepmedic-brats, PyTorch against OpenVINO). Wall time, ratio to the first variant, peak
RSS, and label Dice against the first variant.

    .venv/bin/python bench/cpu_backends.py [--repeat 1] [--threads N] [--skip-deepmedic] [--skip-nnunet]
    .venv/bin/python bench/cpu_backends.py --network-only [--repeat 3]   # one full-size tile per engine
    (ONNX Runtime joins the one-tile comparison when installed: pip install -e ".[bench]")
    .venv/bin/python bench/cpu_backends.py --full --skip-deepmedic   # 5 folds x 8 mirrorings: long on 2 cores

First, one full-size network on one 128x160x112 tile, each engine alone in a fresh process (in one process the
engines' thread pools slowed one another), the processes alternating engine by engine `--repeat` times (at least
3), so that load from other processes falls on all alike; with the network's FLOPs and the machine's sgemm rate,
how much of the CPU each engine uses. Then the end-to-end runs. Default: one fold, no TTA. `--full`: the
bundle's 5 folds with mirroring TTA (nnU-Net's 8 mirror combinations), run when the machine is otherwise idle.
Each end-to-end variant runs in a fresh child process (peak RSS is its ru_maxrss; OpenVINO's conversion and
compilation of each fold are inside the time); with `--repeat`, the variants alternate.
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


def _variants(kind: str, chosen: str | None) -> list[str]:
    from pedseg.pipeline.backend import cpu_has_native_bf16

    names = (["stock"] if kind == "nnunet" else []) + ["torch", "openvino-fp32"]
    names += ["openvino-bf16"] if cpu_has_native_bf16() else []
    return [n for n in names if chosen is None or n in chosen.split(",")]


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
        # ONNX Runtime's idle threads spin after each call by default, taking the cores from the engine timed next.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, tile):
        import torch

        return torch.from_numpy(self._session.run(["y"], {"x": tile.numpy()})[0])


def gemm_gflops(threads: int) -> float:
    """The machine's practical fp32 ceiling: a 4096x4096 matrix product (oneDNN/MKL sgemm) on `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(5):
        torch.mm(a, b)
    return 5 * 2 * 4096 ** 3 / (time.perf_counter() - t0) / 1e9


def _fullsize_network(threads: int):
    """The full-size timing bundle's first fold and one seeded random tile of its patch size."""
    import torch
    from inference import _members

    from pedseg.pipeline.ensemble import load_member

    torch.set_num_threads(threads)
    predictor = load_member(_members(FULLSIZE, True)[0], torch.device("cpu"), tta=False)
    network = predictor.network.eval()
    network.load_state_dict(predictor.list_of_parameters[0])
    tile = torch.randn(1, 4, *predictor.configuration_manager.patch_size, generator=torch.Generator().manual_seed(0))
    return network, tile


def tile_worker(args) -> None:
    """One engine alone in a fresh process: a first call (OpenVINO converts and compiles in it), then `--calls`
    timed calls. Run in one process, the engines slowed one another: with OpenVINO and ONNX Runtime loaded,
    torch took 9-12 s a tile against 6.8 s for its first call before they were."""
    import numpy as np
    import torch

    from pedseg.pipeline.backend import Execution
    from pedseg.pipeline.openvino_backend import OpenVINONetwork

    network, tile = _fullsize_network(args.threads)
    backend, precision = args.tile_worker.split()
    if backend == "openvino":
        engine = OpenVINONetwork(network, Execution("openvino", precision, args.threads))
    elif backend == "onnxruntime":
        engine = _OnnxRuntimeNetwork(network, tile, args.threads)
    else:
        engine = network
    seconds, cpu = [], []
    with torch.inference_mode():
        t0 = time.perf_counter()
        output = engine(tile)
        first = time.perf_counter() - t0
        for _ in range(args.calls):
            t0, c0 = time.perf_counter(), time.process_time()
            engine(tile)
            seconds.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    np.save(args.output, output.numpy())
    print(json.dumps({"first": first, "seconds": seconds, "cpu": cpu}))


def _tile_output(tmp: Path, engine: str) -> Path:
    return tmp / f"{engine.replace(' ', '_')}.npy"


def network_ratio(repeat: int, threads: int, onnx_runtime: bool, tmp: Path) -> None:
    import statistics

    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pedseg.pipeline.backend import cpu_has_native_bf16
    from pedseg.pipeline.openvino_backend import bf16_convolution_kernel

    kernel = bf16_convolution_kernel()
    engines = ["torch fp32", "openvino fp32"] + (["openvino bf16"] if kernel else [])
    engines += ["onnxruntime fp32"] if onnx_runtime else []
    print(f"OpenVINO's bf16 convolution kernel: {kernel} "
          f"({'native' if cpu_has_native_bf16() else 'emulated: this CPU has no native bf16'})" if kernel else
          "OpenVINO computes no bf16 on this CPU")
    runs: dict[str, dict[str, list[float]]] = {e: {"seconds": [], "cpu": []} for e in engines}
    for rounds in range(repeat):
        for engine in engines if rounds % 2 == 0 else engines[::-1]:
            cmd = [sys.executable, __file__, "--tile-worker", engine, "--calls", "2", "--threads", str(threads),
                   "--output", str(_tile_output(tmp, engine))]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode:
                sys.exit(f"{engine} failed:\n{run.stderr[-3000:]}")
            result = json.loads(run.stdout.strip().splitlines()[-1])
            for key in runs[engine]:
                runs[engine][key] += result[key]
            print(f"  {engine}: first call {result['first']:.1f} s, then "
                  f"{', '.join(f'{s:.2f}' for s in result['seconds'])} s", flush=True)
    network, tile = _fullsize_network(threads)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        network(tile)
    gflop = counter.get_total_flops() / 1e9
    ceiling = gemm_gflops(threads)
    median = {e: statistics.median(runs[e]["seconds"]) for e in engines}
    median_cpu = {e: statistics.median(runs[e]["cpu"]) for e in engines}
    reference = torch.from_numpy(np.load(_tile_output(tmp, "torch fp32")))
    print(f"\none full-size network, one {tuple(tile.shape)} tile; each engine alone in a fresh process, {repeat} "
          f"processes each, alternating, 2 timed calls each after the first (median); {gflop:.0f} GFLOP a tile "
          f"(torch's FlopCounterMode), sgemm ceiling {ceiling:.0f} GFLOP/s:\n"
          "| engine | seconds | vs torch fp32 | CPU seconds | vs torch fp32 | GFLOP/s | of sgemm | max abs logit diff "
          "| argmax agreement |\n|---|---|---|---|---|---|---|---|---|")
    for engine in engines:
        output = torch.from_numpy(np.load(_tile_output(tmp, engine)))
        diff = (output - reference).abs().max().item()
        agree = (output.argmax(1) == reference.argmax(1)).float().mean().item()
        rate = gflop / median[engine]
        print(f"| {engine} | {median[engine]:.2f} | {median['torch fp32'] / median[engine]:.2f}x "
              f"| {median_cpu[engine]:.2f} | {median_cpu['torch fp32'] / median_cpu[engine]:.2f}x | {rate:.0f} "
              f"| {rate / ceiling:.0%} | {diff:.1e} | {agree:.2%} |", flush=True)


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

    variants = _variants(kind, args.variants)
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
    parser.add_argument("--variants", help="comma-separated subset of stock,torch,openvino-fp32,openvino-bf16; "
                        "the first is the reference")
    parser.add_argument("--seed", type=int, default=9001, help="synthetic held-out case for the nnU-Net part")
    parser.add_argument("--network-only", action="store_true", help="only the one-tile comparison")
    parser.add_argument("--skip-nnunet", action="store_true")
    parser.add_argument("--skip-deepmedic", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tile-worker", help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=["nnunet", "deepmedic"], help=argparse.SUPPRESS)
    parser.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.tile_worker:
        return tile_worker(args)

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
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        network_ratio(max(args.repeat, 3), args.threads, importlib.util.find_spec("onnxruntime") is not None, tmp)
        if args.network_only:
            return
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
