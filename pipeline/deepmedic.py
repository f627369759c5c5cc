"""DeepMedic (Kamnitsas et al., Medical Image Analysis 2017) in PyTorch: the network and its own tiling.

Written from the checkpoint's tensors and the description in ../shared/data/deepmedic_reference/ARCHITECTURE.md
(DeepMedic 0.8.4 semantics). Three convolutional pathways see the same tile: the normal one at full resolution,
and one per subsampling factor on every F-th voxel (a wider context). Their outputs are concatenated and
classified per voxel by the fully connected (1x1x1, the first 3x3x3) pathway. Blocks are pre-activation:
[BN or input bias] -> PReLU -> dropout -> convolution, with no convolution bias.

Inference is not one fully convolutional pass: DeepMedic cuts the reflect-padded volume into 45^3 tiles with
stride 29 and samples each tile's subsampled input on a grid whose phase depends on where the tile starts (29 is
not a multiple of 3 or 5). `segment_volume` replicates that tiling, so the labels match the original software.
Arrays are (channel, x, y, z) in NIfTI voxel order, as DeepMedic reads them (BraTS files: the atlas grid).
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from pedseg.pipeline.backend import TORCH_FP32, Execution
from pedseg.pipeline.bundle import DEEPMEDIC_ARCHITECTURE, ModelBundle
from pedseg.pipeline.errors import BundleError, UnsupportedDataError
from pedseg.pipeline.model_output import EnsembleResult
from pedseg.pipeline.normalisation import captk_zscore
from pedseg.pipeline.openvino_backend import OpenVINONetwork

logger = logging.getLogger(__name__)

KERNEL = 3  # every convolution of the pathways is 3x3x3, as in all published DeepMedic configurations
BN_EPSILON = 1.1755e-38  # DeepMedic adds float32's smallest normal number: effectively none


@dataclass(frozen=True)
class DeepMedicArchitecture:
    """A DeepMedic network's shape, from its modelConfig (names in DeepMedic's config keys). Layer numbers of
    residual connections are 1-based as there: layer i's output gets layer (i-1)'s input added."""

    input_channels: int  # numberOfInputChannels
    classes: int  # numberOfOutputClasses, background included
    feature_maps: tuple[int, ...]  # numberFMsPerLayerNormal
    subsampled_feature_maps: tuple[int, ...]  # numberFMsPerLayerSubsampled
    subsample_factors: tuple[int, ...]  # subsampleFactor, isotropic and odd: one subsampled pathway each
    residual_layers: tuple[int, ...]  # layersWithResidualConnNormal (the subsampled pathways' default)
    fc_feature_maps: tuple[int, ...]  # numberFMsPerLayerFC: the hidden FC layers
    fc_first_kernel: int  # kernelDimFor1stFcLayer, its input edge-padded to keep the size
    fc_residual_layers: tuple[int, ...]  # layersWithResidualConnFC
    fc_dropout: tuple[float, ...]  # dropoutRatesFc: one per FC layer, classifier included
    segment: int  # segmentsDimInference: the tile edge

    def __post_init__(self) -> None:
        if len(self.fc_dropout) != len(self.fc_feature_maps) + 1:
            raise ValueError("fc_dropout needs one rate per hidden FC layer plus the classifier")
        if any(f < 1 or f % 2 == 0 for f in self.subsample_factors):
            raise ValueError(f"subsample factors must be odd, got {self.subsample_factors}")
        if len(self.subsampled_feature_maps) != len(self.feature_maps):
            raise ValueError("the subsampled pathways need as many layers as the normal one (same receptive field)")
        if self.output_size < 1:
            raise ValueError(f"segment {self.segment} is smaller than the receptive field {self.receptive_field}")

    @property
    def receptive_field(self) -> int:
        return len(self.feature_maps) * (KERNEL - 1) + 1

    @property
    def output_size(self) -> int:
        """Edge of a tile's output: the segment less the receptive field's margin."""
        return self.segment - self.receptive_field + 1

    def subsampled_input_size(self, factor: int) -> int:
        return math.ceil(self.output_size / factor) + self.receptive_field - 1

    @classmethod
    def from_json(cls, path: Path) -> DeepMedicArchitecture:
        values = json.loads(Path(path).read_text())
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


class _Block(nn.Module):
    """Pre-activation block: BN (inference statistics) -> PReLU -> x keep probability -> convolution."""

    def __init__(self, channels_in: int, channels_out: int, kernel: int, keep: float = 1.0, pad_edges: bool = False):
        super().__init__()
        self.norm = nn.BatchNorm3d(channels_in, eps=BN_EPSILON)
        self.act = nn.PReLU(channels_in)
        self.keep = keep  # DeepMedic's dropout is not inverted: inference scales by the keep probability
        self.pad = (kernel - 1) // 2 if pad_edges else 0
        self.conv = nn.Conv3d(channels_in, channels_out, kernel, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm(x))
        if self.keep != 1.0:
            x = x * self.keep
        if self.pad:  # DeepMedic's "mirror" padding of width 1 repeats the edge voxel
            x = nn.functional.pad(x, (self.pad,) * 6, mode="replicate")
        return self.conv(x)


def _add_residual(out: torch.Tensor, earlier: torch.Tensor) -> torch.Tensor:
    """out + earlier, centre-cropped to out's size and zero-padded in channels (the extra channels get nothing)."""
    crop = (earlier.shape[-1] - out.shape[-1]) // 2
    if crop:
        earlier = earlier[..., crop:-crop, crop:-crop, crop:-crop]
    return out + nn.functional.pad(earlier, (0, 0, 0, 0, 0, 0, 0, out.shape[1] - earlier.shape[1]))


class _Pathway(nn.Module):
    """A convolutional pathway: input bias and convolution, then pre-activation blocks, with residuals."""

    def __init__(self, channels_in: int, feature_maps: tuple[int, ...], residual_layers: tuple[int, ...]):
        super().__init__()
        self.input_bias = nn.Parameter(torch.zeros(channels_in))
        self.first = nn.Conv3d(channels_in, feature_maps[0], KERNEL, bias=False)
        self.blocks = nn.ModuleList(_Block(c_in, c_out, KERNEL) for c_in, c_out in zip(feature_maps, feature_maps[1:]))
        self.residual = frozenset(layer - 1 for layer in residual_layers)  # 0-based layer index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = [x]  # inputs[i]: what layer i received
        x = self.first(x + self.input_bias.view(1, -1, 1, 1, 1))
        for index, block in enumerate(self.blocks, start=1):
            inputs.append(x)
            x = block(x)
            if index in self.residual:
                x = _add_residual(x, inputs[index - 1])
        return x


class DeepMedic(nn.Module):
    def __init__(self, arch: DeepMedicArchitecture):
        super().__init__()
        self.arch = arch
        self.normal = _Pathway(arch.input_channels, arch.feature_maps, arch.residual_layers)
        self.subsampled = nn.ModuleList(_Pathway(arch.input_channels, arch.subsampled_feature_maps,
                                                 arch.residual_layers) for _ in arch.subsample_factors)
        concatenated = arch.feature_maps[-1] + len(arch.subsample_factors) * arch.subsampled_feature_maps[-1]
        widths = (concatenated, *arch.fc_feature_maps, arch.classes)
        kernels = (arch.fc_first_kernel,) + (1,) * len(arch.fc_feature_maps)
        self.fc = nn.ModuleList(
            _Block(c_in, c_out, kernel, keep=1.0 - rate, pad_edges=True)
            for c_in, c_out, kernel, rate in zip(widths, widths[1:], kernels, arch.fc_dropout))
        self.fc_residual = frozenset(layer - 1 for layer in arch.fc_residual_layers)
        self.output_bias = nn.Parameter(torch.zeros(arch.classes))

    def forward(self, x: torch.Tensor, subsampled: list[torch.Tensor]) -> torch.Tensor:
        """Class probabilities (N, classes, out, out, out) of tiles: `x` (N, C, segment^3) at full resolution,
        `subsampled[i]` (N, C, n^3) sampled every subsample_factors[i] voxels (see `subsampled_tile`)."""
        out = self.arch.output_size
        features = [self.normal(x)]
        for pathway, factor, tile in zip(self.subsampled, self.arch.subsample_factors, subsampled):
            low = pathway(tile)
            # Nearest-neighbour upsampling by repetition, then the first `out` voxels (DeepMedic does not centre).
            for axis in (2, 3, 4):
                low = low.repeat_interleave(factor, dim=axis)
            features.append(low[..., :out, :out, :out])
        x = torch.cat(features, dim=1)
        inputs = []
        for index, block in enumerate(self.fc):
            inputs.append(x)
            x = block(x)
            if index in self.fc_residual:
                x = _add_residual(x, inputs[index - 1])
        return torch.softmax(x + self.output_bias.view(1, -1, 1, 1, 1), dim=1)


def tile_starts(size: int, segment: int, stride: int) -> list[int]:
    """Tile starts along one padded axis: every `stride`, the last moved back to end at the border."""
    starts = list(range(0, size - segment + 1, stride))
    if starts[-1] + segment < size:
        starts.append(size - segment)
    return starts


def _subsampled_axis(start: int, factor: int, count: int, receptive_field: int, size: int) -> tuple[int, slice]:
    """Where along one axis a tile's subsampled input comes from: the first destination index, and the source
    slice of the padded volume. Samples sit every `factor` voxels from `low`; those outside the volume keep the
    fill value. DeepMedic's quirk, kept for parity: when `low` is negative the grid restarts at 0."""
    low = start + factor // 2 - (factor - 1) // 2 * receptive_field
    high = min(low + count * factor, size)
    first = 0 if low >= 0 else -low // factor
    return first, slice(max(low, 0), high, factor)


class Tiler:
    """DeepMedic's whole-volume tiling of one (C, x, y, z) volume: reflect padding, tiles and their subsampled
    inputs, and where each tile's output goes."""

    def __init__(self, volume: np.ndarray, arch: DeepMedicArchitecture):
        self.arch = arch
        self.margin = (arch.segment - arch.output_size) // 2
        self.padded = np.pad(volume, [(0, 0)] + [(self.margin, self.margin)] * 3, mode="reflect")
        corners = self.padded[:, [0, -1]][:, :, [0, -1]][:, :, :, [0, -1]]
        self.fill = corners.reshape(len(volume), -1).mean(axis=1).astype(np.float32)  # outside the padded volume
        self.starts = [tile_starts(n, arch.segment, arch.output_size) for n in self.padded.shape[1:]]

    def tiles(self) -> Iterator[tuple[int, int, int]]:
        for x in self.starts[0]:
            for y in self.starts[1]:
                for z in self.starts[2]:
                    yield x, y, z

    def tile(self, start: tuple[int, int, int]) -> np.ndarray:
        seg = self.arch.segment
        return self.padded[:, start[0]:start[0] + seg, start[1]:start[1] + seg, start[2]:start[2] + seg]

    def subsampled_tile(self, start: tuple[int, int, int], factor: int) -> np.ndarray:
        count = self.arch.subsampled_input_size(factor)
        out = np.empty((len(self.padded), count, count, count), np.float32)
        out[:] = self.fill[:, None, None, None]
        firsts, slices = zip(*(_subsampled_axis(s, factor, count, self.arch.receptive_field, n)
                               for s, n in zip(start, self.padded.shape[1:])))
        values = self.padded[(slice(None), *slices)]
        out[(slice(None), *(slice(f, f + n) for f, n in zip(firsts, values.shape[1:])))] = values
        return out

    def output_region(self, start: tuple[int, int, int]) -> tuple[slice, ...]:
        """The original-volume voxels a tile's output covers (padded start + margin, less the padding)."""
        return tuple(slice(s, s + self.arch.output_size) for s in start)


def segment_volume(model: DeepMedic, volume: np.ndarray, device: torch.device, *, roi: np.ndarray | None = None,
                   batch_size: int = 4, execution: Execution = TORCH_FP32) -> np.ndarray:
    """Class probabilities (classes, x, y, z) of a (C, x, y, z) float32 volume, tile by tile as DeepMedic does.
    With `roi` (x, y, z bool), tiles whose output holds no ROI voxel are skipped and left as certain background
    (DeepMedic runs every tile; inside the ROI the result is the same).
    Tiles run 4 at a time in channels-last layout: on 2 AVX-512 cores about 1.4x faster per tile than 8 at a time
    in the default layout (oneDNN's channels-last 3D kernels; bigger batches leave the cache), same labels.
    `execution` runs the network through OpenVINO, or through PyTorch at its autocast precision."""
    arch = model.arch
    openvino = execution.backend == "openvino"
    layout = torch.contiguous_format if openvino else torch.channels_last_3d  # OpenVINO picks its own layout
    network = OpenVINONetwork(model, execution) if openvino else model.to(memory_format=layout)
    autocast = execution.autocast_dtype if not openvino else None
    tiler = Tiler(volume, arch)
    probabilities = np.zeros((arch.classes, *volume.shape[1:]), np.float32)
    probabilities[0] = 1.0
    starts = [s for s in tiler.tiles() if roi is None or roi[tiler.output_region(s)].any()]
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        for first in range(0, len(starts), batch_size):
            batch = starts[first:first + batch_size]
            x = _tensor(np.stack([tiler.tile(s) for s in batch]), device, layout)
            subsampled = [_tensor(np.stack([tiler.subsampled_tile(s, f) for s in batch]), device, layout)
                          for f in arch.subsample_factors]
            result = network(x, subsampled).float().cpu().numpy()
            for start, tile_probabilities in zip(batch, result):
                probabilities[(slice(None), *tiler.output_region(start))] = tile_probabilities
    if openvino:
        network.release()
    return probabilities


def _tensor(tiles: np.ndarray, device: torch.device, layout: torch.memory_format) -> torch.Tensor:
    return torch.from_numpy(tiles).to(device).contiguous(memory_format=layout)


def load_deepmedic(architecture: Path, weights: Path, *, bundle_name: str) -> DeepMedic:
    """The network of a member folder, in inference mode; BundleError when the files do not make one."""
    where = f"Bundle '{bundle_name}': DeepMedic model '{architecture.parent.name}'"
    try:
        arch = DeepMedicArchitecture.from_json(architecture)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{where}: {architecture.name} is malformed ({exc}).",
                          hint="Regenerate it with scripts/convert_deepmedic.py from the model's modelConfig.") from exc
    model = DeepMedic(arch)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise BundleError(f"{where}: {weights.name} is not a readable safetensors file ({exc}).",
                          hint="Regenerate it with scripts/convert_deepmedic.py.") from exc
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k} is {tuple(state[k].shape)}, the architecture needs {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if problems:
        raise BundleError(f"{where}: the weights do not fit {architecture.name} ({'; '.join(problems[:3])}"
                          f"{f' and {len(problems) - 3} more' if len(problems) > 3 else ''}).",
                          hint="Convert the weights and the architecture from the same model.")
    model.load_state_dict(state)
    return model.eval()


def run_deepmedic(images: list[sitk.Image], bundle: ModelBundle, device: torch.device,
                  execution: Execution = TORCH_FP32) -> EnsembleResult:
    """The members' class probabilities on atlas-space `images` (the bundle's channel order, raw intensities,
    zero outside the brain), averaged with the bundle's weights; labels are the argmax class mapped through the
    members' `classes`, exactly as DeepMedic and CaPTk label a volume. Probability channels are per label value
    (the classes that map to one label summed). Only tiles that reach the brain (a non-zero voxel) are run."""
    members = bundle.models
    roles = [role for role, _ in sorted(bundle.inputs.items(), key=lambda item: item[1])]
    if len({tuple(sorted(m.classes.items())) for m in members}) > 1:
        raise BundleError("The bundle's DeepMedic models map their classes to labels differently; their "
                          "probabilities cannot be averaged.", hint="Give every member the same 'classes'.")
    raw = np.stack([sitk.GetArrayViewFromImage(image).T for image in images])  # (C, x, y, z)
    roi = (raw != 0).any(axis=0)
    mean = None
    seconds = {}
    normalised: dict[str, np.ndarray] = {}
    for member in members:
        t0 = time.perf_counter()
        if member.normalisation not in normalised:
            normalised[member.normalisation] = np.stack([_zscore(channel, role) for channel, role in zip(raw, roles)])
        network = load_deepmedic(member.path / DEEPMEDIC_ARCHITECTURE, member.path / member.weights,
                                 bundle_name=bundle.name).to(device)
        weighted = member.weight * segment_volume(network, normalised[member.normalisation], device, roi=roi,
                                                  execution=execution)
        mean = weighted if mean is None else mean + weighted
        seconds[member.name] = round(time.perf_counter() - t0, 2)
        logger.debug("DeepMedic model %s on %s: %.1f s", member.name, device.type, seconds[member.name])
    mean /= sum(m.weight for m in members)
    classes = members[0].classes
    label_values = sorted(set(classes.values()))
    class_to_label = np.array([classes[c] for c in range(len(classes))], np.uint8)
    probabilities = np.stack([mean[[c for c in classes if classes[c] == v]].sum(0) for v in label_values])
    return EnsembleResult(probabilities=probabilities.transpose(0, 3, 2, 1).astype(np.float32),
                          labels=class_to_label[mean.argmax(0)].T, channel_labels=tuple((v,) for v in label_values),
                          has_regions=False, preprocessing_runs=len(normalised), model_seconds=seconds)


def _zscore(channel: np.ndarray, role: str) -> np.ndarray:
    try:
        return captk_zscore(channel)[0]
    except UnsupportedDataError as exc:
        raise UnsupportedDataError(f"The {role} image cannot be normalised as the DeepMedic model expects: "
                                   f"{exc.message}", hint=exc.hint) from exc
