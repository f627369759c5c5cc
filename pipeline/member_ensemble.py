"""Ensembles of members of different kinds: each member's probabilities are brought into one label space and
averaged there with per-member or per-region weights (as the BraTS-PEDs 2023 winner weighted nnU-Net and Swin
UNETR per region).

The space is the members' classes (one channel per label value, softmax-like) when every member predicts classes,
and nested regions (e.g. whole tumour, tumour core, enhancing tumour, as sigmoid channels) as soon as one member
predicts regions: a class member's region probability is the sum of its classes in the region. Labels come from
the averaged probabilities as each kind makes them: the argmax class, or for regions each region above 0.5
painted from the largest to the smallest with the one label the region adds to the next (nnU-Net's region order).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pedseg.pipeline.errors import BundleError
from pedseg.pipeline.labels import REGIONS, base_members

Channels = tuple[tuple[int, ...], ...]  # label values each probability channel stands for


@dataclass(frozen=True)
class MemberOutput:
    """One member's probabilities (C, z, y, x) on the shared grid, and what its channels mean."""

    name: str
    probabilities: np.ndarray
    channels: Channels
    has_regions: bool


@dataclass(frozen=True)
class LabelSpace:
    channels: Channels
    has_regions: bool

    @classmethod
    def for_members(cls, outputs: Sequence[MemberOutput]) -> LabelSpace:
        """Classes when every member predicts classes (their union, background first), else the region members'
        regions (which must agree and nest)."""
        return cls.of([(o.channels, o.has_regions) for o in outputs])

    @classmethod
    def of(cls, declared: Sequence[tuple[Channels, bool]]) -> LabelSpace:
        """`for_members` from what each member declares it predicts, (channels, has_regions), before it runs."""
        region_sets = {channels for channels, has_regions in declared if has_regions}
        if not region_sets:
            values = sorted({v for channels, _ in declared for c in channels for v in c} | {0})
            return cls(tuple((v,) for v in values), has_regions=False)
        if len(region_sets) > 1:
            raise BundleError(f"The bundle's region-based members predict different regions {sorted(region_sets)}; "
                              "their probabilities cannot be averaged.",
                              hint="Train the region-based members on the same regions.")
        regions = tuple(sorted(region_sets.pop(), key=len, reverse=True))
        for larger, smaller in zip(regions, regions[1:]):
            if not set(smaller) < set(larger) or len(set(larger) - set(smaller)) != 1:
                raise BundleError(f"The regions {regions} do not nest one label at a time, so a label map cannot be "
                                  "painted from them.", hint="Use nested regions such as WT ⊃ TC ⊃ ET.")
        return cls(regions, has_regions=True)

    def paint_values(self) -> list[int]:
        """For regions: the label each region adds to the next smaller one (the smallest: its own label)."""
        return [(set(r) - set(n)).pop() for r, n in zip(self.channels, self.channels[1:])] + [self.channels[-1][0]]

    def convert(self, output: MemberOutput) -> np.ndarray:
        """`output`'s probabilities in this space (C_space, z, y, x)."""
        shape = output.probabilities.shape[1:]
        if output.has_regions:
            if tuple(sorted(output.channels, key=len, reverse=True)) != self.channels:
                raise BundleError(f"Member '{output.name}' predicts regions {output.channels}, not {self.channels}.")
            order = [output.channels.index(c) for c in self.channels]
            return output.probabilities[order]
        by_value = {c[0]: p for c, p in zip(output.channels, output.probabilities)}
        zeros = np.zeros(shape, np.float32)
        if not self.has_regions:
            return np.stack([by_value.get(c[0], zeros) for c in self.channels])
        return np.stack([sum((by_value.get(v, zeros) for v in region), zeros) for region in self.channels])

    def labels(self, probabilities: np.ndarray) -> np.ndarray:
        if not self.has_regions:
            values = np.array([c[0] for c in self.channels], np.uint8)
            return values[probabilities.argmax(0)]
        labels = np.zeros(probabilities.shape[1:], np.uint8)
        for value, region in zip(self.paint_values(), probabilities):
            labels[region > 0.5] = value
        return labels


def average(outputs: Sequence[MemberOutput], weights: Mapping[str, Sequence[float]], space: LabelSpace) -> np.ndarray:
    """Per-channel weighted mean: `weights[member]` holds one weight per channel of `space`. Class probabilities
    are renormalised to sum to one (per-class weights would otherwise bend the distribution)."""
    total = np.zeros((len(space.channels), *outputs[0].probabilities.shape[1:]), np.float32)
    weight_sum = np.zeros(len(space.channels), np.float32)
    for output in outputs:
        w = np.asarray(weights[output.name], np.float32)
        total += w[:, None, None, None] * space.convert(output)
        weight_sum += w
    mean = total / weight_sum[:, None, None, None]
    if not space.has_regions:
        mean /= np.maximum(mean.sum(0, keepdims=True), np.finfo(np.float32).tiny)
    return mean


def channel_name(channel: tuple[int, ...], labels: Mapping[int, str], convention: str) -> str:
    """The region a channel stands for, by the label table's names (per-region weights are keyed by them):
    'background', a base region (ET, ...) or the composite its labels make (WT, TC)."""
    if channel == (0,):
        return "background"
    covered = {base for value in channel for base in base_members(convention, labels[value])}
    named = [r.name for r in REGIONS.values() if set(r.members) == covered]
    return named[0] if named else "+".join(labels[v] for v in channel)
