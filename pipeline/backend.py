"""How the networks run: which engine (PyTorch, or OpenVINO on the CPU) at which precision, chosen per machine.

`resolve_execution` turns the user's `--backend` and `--precision` into an `Execution`. Precision `auto` is bf16
only where the CPU computes it natively (AMX or AVX512-BF16: emulated bf16 is slower than fp32) and the bundle
allows it (bundle.json `allow_bf16`, default true), else fp32; on CUDA it is what nnU-Net does there, fp16
autocast, for nnU-Net and MONAI members, and fp32 for DeepMedic (validated in fp32). Backend `auto` is PyTorch
on CUDA and OpenVINO on the CPU (MONAI members included: a 96^3 SegResNet window ran 1.9-2.0x faster than on
PyTorch, 2 cores), except for DeepMedic at fp32: its channels-last PyTorch path ran as fast as OpenVINO there
(bench/RESULTS.md), without the conversion.
"""
from __future__ import annotations

import functools
import os
import typing
from dataclasses import dataclass

from pedseg.pipeline.errors import BundleError, InputError

Backend = typing.Literal["auto", "torch", "openvino"]
Precision = typing.Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class Execution:
    """A resolved choice: `backend` torch or openvino, `precision` fp32, bf16 or fp16 (autocast on torch),
    `threads` for OpenVINO's CPU plugin, and why it was chosen (for the log)."""

    backend: str = "torch"
    precision: str = "fp32"
    threads: int | None = None
    reason: str = ""

    @property
    def autocast_dtype(self):
        """The torch autocast dtype of this precision; None for fp32."""
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)


TORCH_FP32 = Execution()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware: OpenVINO lists BF16 among its optimisation capabilities only
    there (AMX or AVX512-BF16); without OpenVINO, the kernel's CPU flags (Linux) tell the same."""
    try:
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except ImportError:
        try:
            with open("/proc/cpuinfo") as fh:
                flags = set(fh.read().split())
        except OSError:
            return False
        return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_execution(backend: str, precision: str, device_type: str, *, bundle_name: str, allow_bf16: bool,
                      kind: str, threads: int | None = None) -> Execution:
    """The backend and precision a run uses on `device_type` (cpu or cuda). Explicit choices the machine or the
    bundle cannot honour are refused, never silently replaced."""
    if backend == "openvino" and device_type == "cuda":
        raise InputError("--backend openvino runs on the CPU, but the run was given a CUDA device.",
                         hint="Use --device cpu with --backend openvino, or --backend torch (or auto) on the GPU.")
    chosen = backend if backend != "auto" else ("torch" if device_type == "cuda" else "openvino")
    native_bf16 = device_type == "cuda" or cpu_has_native_bf16()
    if precision == "bf16":
        if not native_bf16:
            raise InputError("--precision bf16 was requested, but this CPU has no native bf16 (AMX or AVX512-BF16); "
                             "emulated bf16 is slower than fp32.", hint="Use --precision auto or fp32.")
        if not allow_bf16:
            raise BundleError(f"Model bundle '{bundle_name}' does not allow bf16 inference (allow_bf16 is false "
                              "in its bundle.json).", hint="Use --precision auto or fp32.")
    if precision == "fp16" and device_type != "cuda":
        raise InputError("--precision fp16 is for CUDA GPUs (autocast); on the CPU use bf16 or fp32.",
                         hint="Use --precision auto.")
    if precision != "auto":
        chosen_precision, reason = precision, "as requested"
    elif device_type == "cuda":
        chosen_precision, reason = (("fp32", "DeepMedic is validated in fp32") if kind == "deepmedic" else
                                    ("fp16", "fp16 autocast on CUDA, as nnU-Net runs there"))
    elif not cpu_has_native_bf16():
        chosen_precision, reason = "fp32", "this CPU has no native bf16"
    elif not allow_bf16:
        chosen_precision, reason = "fp32", f"bundle '{bundle_name}' does not allow bf16"
    else:
        chosen_precision, reason = "bf16", "native bf16 on this CPU, allowed by the bundle"
    if backend == "auto" and kind == "deepmedic" and chosen_precision == "fp32":
        chosen = "torch"  # as fast as OpenVINO at fp32, without the conversion
    return Execution(chosen, chosen_precision, threads, reason)


def default_threads(threads: int | None) -> int:
    return threads or os.cpu_count() or 1
