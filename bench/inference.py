"""Inference benchmark: the stock nnU-Net predictor against pedseg's ensemble engine, same bundle, same input,
in one run: wall time, peak memory, the speed ratio and how far the two label maps agree.

    .venv/bin/python bench/inference.py [--bundle bundles/pedseg-demo] [--device cpu|cuda|all] [--no-tta]
                                        [--fast] [--threads N] [--seed 9001] [--precision fp32|fp16|bf16]
                                        [--variants stock,ours]

Stock: per bundle model, nnUNetPredictor.initialize_from_trained_model_folder and predict_single_npy_array
(returning probabilities), averaged with the bundle weights (what pipeline/infer.py ran before the engine).
Ours: pedseg.pipeline.ensemble.run_ensemble through PyTorch (bench/cpu_backends.py compares the CPU backends),
at `--precision` (autocast; default fp32 on the CPU, nnU-Net's fp16 on CUDA). The input is one synthetic
held-out case (atlas space, 240x240x155).
Each variant runs in a fresh child process; time runs from model loading to the label map (imports and input
loading excluded); peak RSS is the child's (ru_maxrss), peak GPU memory torch's maximum reserved.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = ("stock", "ours")


def _members(bundle_dir: Path, fast: bool):
    from pedseg.pipeline.bundle import load_bundle
    from pedseg.pipeline.ensemble import Member

    return [Member(model, folds) for model, folds in load_bundle(bundle_dir).folds_to_run(fast)]


def _stock(data, spacing, members, device, tta):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    mean, total, label_manager = 0, 0.0, None
    for member in members:
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta,
                                    perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                    allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(member.model.path), tuple(int(f) for f in member.folds),
                                                       member.model.checkpoint)
        _, probabilities = predictor.predict_single_npy_array(data, {"spacing": spacing}, None, None, True)
        mean = mean + member.model.weight * probabilities
        total += member.model.weight
        label_manager = predictor.label_manager
    return label_manager.convert_probabilities_to_segmentation(mean / total)


def worker(args) -> None:
    import numpy as np
    import torch

    from pedseg.pipeline.backend import Execution
    from pedseg.pipeline.ensemble import run_ensemble

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    case = np.load(args.input)
    data, spacing = case["data"], case["spacing"].tolist()
    members = _members(args.bundle, args.fast)
    t0 = time.perf_counter()
    if args.worker == "stock":
        labels = _stock(data, spacing, members, device, args.tta)
    else:
        precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
        labels = run_ensemble(data, spacing, members, device, args.tta, Execution("torch", precision)).labels
    seconds = time.perf_counter() - t0
    np.save(args.output, np.asarray(labels, np.uint8))
    print(json.dumps({
        "variant": args.worker, "device": device.type, "seconds": round(seconds, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
        "peak_gpu_gib": round(torch.cuda.max_memory_reserved() / 2 ** 30, 2) if device.type == "cuda" else None,
    }))


def _write_case(seed: int, path: Path) -> tuple[int, ...]:
    import numpy as np

    from pedseg.pipeline.ensemble import nnunet_input
    from pedseg.pipeline.types import ROLES
    from pedseg.synth.session import generate_training_case

    images, _ = generate_training_case(seed)
    data, spacing = nnunet_input([images[role] for role in ROLES])  # the demo bundles' channel order
    np.savez(path, data=data, spacing=np.asarray(spacing))
    return data.shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles" / "pedseg-demo")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all", help="all: CPU, and CUDA if present")
    parser.add_argument("--no-tta", dest="tta", action="store_false", help="without mirroring TTA")
    parser.add_argument("--fast", action="store_true", help="the bundle's fast folds only")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=9001, help="synthetic held-out case")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="autocast precision of ours")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="which to run, comma-separated")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import numpy as np
    import torch

    from pedseg.evaluation import region_dice

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    members = _members(args.bundle, args.fast)
    print(f"bundle {args.bundle.name}: " + ", ".join(f"{m.model.path.name} folds {','.join(m.folds)} weight "
                                                     f"{m.model.weight}" for m in members)
          + f"; TTA {args.tta}; {args.threads} CPU threads; {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        case = Path(tmp) / "case.npz"
        print(f"input: synthetic case {args.seed}, shape {_write_case(args.seed, case)}")
        for device in devices:
            results = {}
            for variant in args.variants.split(","):
                out = Path(tmp) / f"{variant}_{device}.npy"
                cmd = [sys.executable, __file__, "--worker", variant, "--device", device, "--bundle", str(args.bundle),
                       "--threads", str(args.threads), "--input", str(case), "--output", str(out)]
                cmd += [] if args.tta else ["--no-tta"]
                cmd += ["--fast"] if args.fast else []
                cmd += ["--precision", args.precision] if args.precision else []
                run = subprocess.run(cmd, capture_output=True, text=True, check=True)
                results[variant] = json.loads(run.stdout.strip().splitlines()[-1])
                results[variant]["labels"] = np.load(out)
                r = results[variant]
                print(f"{device:4s} {variant:5s} {r['seconds']:8.1f} s  peak RSS {r['peak_rss_gib']:.2f} GiB"
                      + (f"  peak GPU {r['peak_gpu_gib']:.2f} GiB" if r["peak_gpu_gib"] is not None else ""),
                      flush=True)
            if len(results) < 2:
                continue
            agreement = region_dice(results["stock"]["labels"], results["ours"]["labels"])
            print(f"{device:4s} speed-up {results['stock']['seconds'] / results['ours']['seconds']:.2f}x; "
                  "label Dice ours vs stock: " + ", ".join(f"{k} {'-' if v is None else f'{v:.4f}'}"
                                                           for k, v in agreement.items()))


if __name__ == "__main__":
    main()
