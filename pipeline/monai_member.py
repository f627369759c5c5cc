"""MONAI members of a bundle: any network in `monai.networks.nets`, described by its constructor arguments (as a
MONAI bundle's `network_def` is), run with MONAI's own SlidingWindowInferer and intensity transforms.

A member's bundle.json entry (kind "monai"):
  "network":       {"name": "SegResNet", "args": {"spatial_dims": 3, "in_channels": 4, "out_channels": 3, ...}}
  "weights":       "model.safetensors" (or a PyTorch state dict, read with weights_only=True)
  "inference":     {"roi_size": [96, 96, 96], "overlap": 0.5, "mode": "gaussian", "sw_batch_size": 1,
                    "mirror_axes": [0, 1, 2], "crop_to_nonzero": true}
                   mirror_axes: spatial axes flipped for test-time augmentation; crop_to_nonzero: run the window
                   over the box of non-zero input only (as nnU-Net crops to the brain), background outside it
  "normalisation": "zscore-nonzero" (MONAI NormalizeIntensity, per channel, over non-zero voxels) or "none"
  "activation":    "softmax" (one channel per class) or "sigmoid" (one channel per region)
  "outputs":       one list of bundle label values per output channel: [[0], [1], [2], [3]] for classes,
                   [[1, 2, 3], [1, 3], [3]] for regions (each region the union of its labels)
The probabilities come back on the input grid, one channel per `outputs` entry, so a bundle can average them with
other members in one label space (pipeline.members).

The network runs on the backend and at the precision `pipeline.backend` resolved for the run: PyTorch (with its
autocast precision), or OpenVINO on the CPU, compiled for the window shape (the inferer pads every window to
roi_size, so one static shape serves a whole volume).
"""
from __future__ import annotations

import itertools
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pedseg.pipeline.backend import TORCH_FP32, Execution
from pedseg.pipeline.errors import BundleError
from pedseg.pipeline.openvino_backend import OpenVINONetwork

Activation = Literal["softmax", "sigmoid"]
Normalisation = Literal["zscore-nonzero", "none"]
REQUIRED_NETWORKS = ("SwinUNETR", "SegResNet", "DynUNet", "UNet")  # the ones the tests build


@dataclass(frozen=True)
class SlidingWindow:
    """MONAI SlidingWindowInferer's settings, plus the spatial axes mirrored for test-time augmentation."""

    roi_size: tuple[int, int, int]
    overlap: float = 0.5
    mode: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int = 1
    mirror_axes: tuple[int, ...] = ()
    crop_to_nonzero: bool = False

    def mirrorings(self, tta: bool) -> list[tuple[int, ...]]:
        """Tensor dimensions to flip for each pass: the identity, then every non-empty subset of the axes."""
        axes = [2 + a for a in self.mirror_axes] if tta else []
        return [combo for n in range(len(axes) + 1) for combo in itertools.combinations(axes, n)]


@dataclass(frozen=True)
class MonaiSpec:
    network: str
    network_args: dict
    window: SlidingWindow
    normalisation: Normalisation
    activation: Activation
    outputs: tuple[tuple[int, ...], ...]  # bundle label values per output channel

    @classmethod
    def from_entry(cls, entry: dict) -> MonaiSpec:
        """From a bundle.json member entry whose shape the bundle schema has checked already."""
        inference = entry["inference"]
        return cls(network=entry["network"]["name"], network_args=dict(entry["network"].get("args", {})),
                   window=SlidingWindow(roi_size=tuple(inference["roi_size"]),
                                        overlap=inference.get("overlap", 0.5),
                                        mode=inference.get("mode", "gaussian"),
                                        sw_batch_size=inference.get("sw_batch_size", 1),
                                        mirror_axes=tuple(inference.get("mirror_axes", ())),
                                        crop_to_nonzero=inference.get("crop_to_nonzero", False)),
                   normalisation=entry.get("normalisation", "zscore-nonzero"),
                   activation=entry["activation"], outputs=tuple(tuple(o) for o in entry["outputs"]))


def build_network(spec: MonaiSpec, where: str) -> torch.nn.Module:
    """The network class from monai.networks.nets with the declared constructor arguments."""
    from monai.networks import nets

    network_class = getattr(nets, spec.network, None)
    if not isinstance(network_class, type) or not issubclass(network_class, torch.nn.Module):
        raise BundleError(f"{where}: '{spec.network}' is not a network in monai.networks.nets.",
                          hint="Name a class of monai.networks.nets, e.g. SegResNet, SwinUNETR, DynUNet or UNet.")
    try:
        return network_class(**spec.network_args)
    except (TypeError, ValueError, AssertionError) as exc:
        raise BundleError(f"{where}: {spec.network}({spec.network_args}) cannot be built ({exc}).",
                          hint="Give the constructor arguments the network was trained with.") from exc


def load_monai_member(spec: MonaiSpec, weights: Path, where: str) -> torch.nn.Module:
    """The member's network with its trained weights, in inference mode; BundleError when they do not fit."""
    network = build_network(spec, where)
    unreadable = BundleError(f"{where}: {weights.name} cannot be read as a state dict.",
                             hint="Save the weights with safetensors or torch.save(model.state_dict()).")
    try:
        if weights.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_model

            try:  # load_model restores tensors a network shares between modules (DynUNet's skip layers)
                load_model(network, str(weights))
            except (SafetensorError, OSError) as exc:
                raise unreadable from exc
        else:
            try:  # weights_only: never unpickle arbitrary objects from a downloaded bundle
                state = torch.load(weights, map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, OSError, EOFError, RuntimeError) as exc:
                raise unreadable from exc
            network.load_state_dict(state)
    except RuntimeError as exc:
        raise BundleError(f"{where}: the weights in {weights.name} do not fit {spec.network} with the declared "
                          f"arguments ({str(exc).strip().splitlines()[0][:300]}).",
                          hint="Declare the constructor arguments the weights were trained with.") from exc
    out_channels = spec.network_args.get("out_channels")
    if out_channels is not None and out_channels != len(spec.outputs):
        raise BundleError(f"{where}: the network has {out_channels} output channels but 'outputs' maps "
                          f"{len(spec.outputs)}.", hint="Give one 'outputs' entry per output channel.")
    return network.eval()


@torch.inference_mode()
def predict(network: torch.nn.Module, volume: np.ndarray, spec: MonaiSpec, device: torch.device,
            tta: bool = True, execution: Execution = TORCH_FP32) -> np.ndarray:
    """Activated probabilities (C_out, *spatial) of `volume` (C_in, *spatial, raw intensities): the declared
    normalisation, MONAI's sliding window, the logits' mean over mirrorings (each flipped back, as nnU-Net
    averages them) and the activation. `execution`: the backend and precision the network runs with."""
    from monai.inferers import SlidingWindowInferer
    from monai.transforms import NormalizeIntensity

    if spec.window.crop_to_nonzero:
        return _predict_in_nonzero_box(network, volume, spec, device, tta, execution)
    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    if spec.normalisation == "zscore-nonzero":
        x = NormalizeIntensity(nonzero=True, channel_wise=True)(x)
    x = torch.as_tensor(x)[None].to(device)
    inferer = SlidingWindowInferer(roi_size=spec.window.roi_size, sw_batch_size=spec.window.sw_batch_size,
                                   overlap=spec.window.overlap, mode=spec.window.mode)
    openvino = execution.backend == "openvino"
    run = OpenVINONetwork(network, execution) if openvino else network.to(device)
    autocast = None if openvino else execution.autocast_dtype
    passes = spec.window.mirrorings(tta)
    try:
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            logits = sum(torch.flip(inferer(torch.flip(x, dims), run), dims).float() if dims else
                         inferer(x, run).float() for dims in passes) / len(passes)
    finally:
        if openvino:
            run.release()
    probabilities = torch.softmax(logits, 1) if spec.activation == "softmax" else torch.sigmoid(logits)
    return probabilities[0].float().cpu().numpy()


def _predict_in_nonzero_box(network: torch.nn.Module, volume: np.ndarray, spec: MonaiSpec, device: torch.device,
                            tta: bool, execution: Execution) -> np.ndarray:
    """`predict` on the bounding box of the non-zero voxels; outside it, certain background (the channel that
    stands for label 0 when there is one, else nothing)."""
    from dataclasses import replace

    nonzero = np.nonzero(volume.any(0))
    out = np.zeros((len(spec.outputs), *volume.shape[1:]), np.float32)
    if (0,) in spec.outputs:
        out[spec.outputs.index((0,))] = 1
    if not nonzero[0].size:
        return out
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in nonzero)
    uncropped = replace(spec, window=replace(spec.window, crop_to_nonzero=False))
    out[(slice(None), *box)] = predict(network, volume[(slice(None), *box)], uncropped, device, tta, execution)
    return out
