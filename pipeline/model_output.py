"""What running a bundle's models gives the inference stage, whatever their kind."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class EnsembleResult:
    probabilities: np.ndarray  # (C, z, y, x) float32 weighted mean over models, on the input grid
    labels: np.ndarray  # (z, y, x) model label values (nnU-Net: its label manager on the mean; DeepMedic: argmax class)
    # Model label values each probability channel stands for: one label per channel (softmax, background
    # first), or for region-based models one region (e.g. whole tumour = all tumour labels) per sigmoid channel.
    channel_labels: tuple[tuple[int, ...], ...]
    has_regions: bool
    preprocessing_runs: int
    model_seconds: dict[str, float]
