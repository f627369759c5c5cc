"""CaPTk's DeepMedic input normalisation, reproduced bit for bit in numpy.

CaPTk's DeepMedic application (CBICA/CaPTk src/applications/DeepMedic.cxx) z-scores each channel with its
ZScoreNormalizer (src/applications/Preprocessing/src/depends/ZScoreNormalizer.hxx) before the network sees it,
with quantiles 5/95 and cut-offs at 3 standard deviations and, without `-m`, no brain mask: voxels >= 1 count
as foreground. The quantiles come from an ITK histogram (itkImageToHistogramFilter, itkHistogram::Initialize
and Histogram::Quantile), whose float32 bin edges and in-bin interpolation are copied here because the
thresholds, and so the output, depend on them. The recipe and reference figures:
shared/data/deepmedic_reference/fixture.json ("normalisation").

It is not nnU-Net's z-score: the statistics come from the foreground trimmed to the inner 5-95 % quantiles and
+-3 SD, and the whole volume is shifted and scaled, so the background becomes -mean/std instead of 0. CaPTk's
DeepMedic model was trained on inputs made this way, so any other normalisation feeds it data it never saw.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pedseg.pipeline.errors import UnsupportedDataError

FOREGROUND_MIN = 1.0  # ZScoreNormalizer's default mask: BinaryThreshold with lower threshold 1
QUANTILES = (np.float32(0.05), np.float32(0.95))  # DeepMedic.cxx's 5 and 95, divided by 100 in float32
CUTOFF_SD = 3.0
MARGINAL_SCALE = 1000.0  # ZScoreNormalizer's SetMarginalScale: widens the top bin by 1/1000 of a bin
MIN_FOREGROUND_VOXELS = 1000  # fewer, and the histogram's quantiles say nothing (an image scaled to 0..1)
MAX_BINS = 2**24  # one bin per unit of intensity; beyond float32's exact integers ITK's bin edges collapse

RAW_VALUES_HINT = ("The intensities must be the scanner's raw values: CaPTk's recipe counts voxels >= 1 as "
                   "foreground. Give the series as exported, not rescaled or already normalised.")


@dataclass(frozen=True)
class ZScoreStats:
    """What the normalisation used for one channel: the trimming thresholds, the statistics it divided by and
    how many voxels they came from."""

    lower: float  # the kept intensity range, as float32 like CaPTk's thresholds
    upper: float
    mean: float  # of the kept voxels, in double (the output used them rounded to float32)
    std: float  # N-1
    voxels_in_mask: int  # voxels >= 1
    voxels_kept: int


def captk_zscore(volume: np.ndarray) -> tuple[np.ndarray, ZScoreStats]:
    """One channel normalised as CaPTk's DeepMedic does: float32, the same shape and axis order as `volume`
    (the operation is per voxel, with statistics over the whole array). Raises UnsupportedDataError when the
    channel has too few voxels >= 1, a non-finite value, a range too wide for one bin per unit, or no spread."""
    v = np.asarray(volume, dtype=np.float32)
    if not np.isfinite(v).all():
        raise UnsupportedDataError("The image holds NaN or infinite intensities, which cannot be normalised.",
                                   hint=RAW_VALUES_HINT)
    fg = v[v >= FOREGROUND_MIN].astype(np.float64)
    if fg.size < MIN_FOREGROUND_VOXELS:
        raise UnsupportedDataError(f"Only {fg.size} voxels have an intensity >= 1 (at least "
                                   f"{MIN_FOREGROUND_VOXELS} needed); the image looks empty or scaled to 0..1.",
                                   hint=RAW_VALUES_HINT)
    lo_value, hi_value = fg.min(), fg.max()
    if hi_value >= MAX_BINS:
        raise UnsupportedDataError(f"The intensities reach {hi_value:.6g}, beyond the {MAX_BINS} one-unit histogram "
                                   "bins CaPTk's recipe allows.", hint=RAW_VALUES_HINT)
    mean, sd = fg.mean(), fg.std(ddof=1)
    q_lo, q_hi = _itk_quantiles(fg, lo_value, hi_value)
    # ZScoreNormalizer keeps the thresholds in float variables and compares voxels with them as float32.
    lower = np.float32(max(lo_value, q_lo, mean - CUTOFF_SD * sd))
    upper = np.float32(min(hi_value, q_hi, mean + CUTOFF_SD * sd))
    kept = fg[(fg >= lower) & (fg <= upper)]
    mu, sigma = (kept.mean(), kept.std(ddof=1)) if kept.size > 1 else (0.0, 0.0)
    if not sigma > 0:
        raise UnsupportedDataError(f"The {kept.size} voxels between {lower:g} and {upper:g} all have the same "
                                   "intensity, so there is no spread to divide by.", hint=RAW_VALUES_HINT)
    # ITK's Subtract and Divide filters take their constants as float32 and compute in float32.
    out = (v - np.float32(mu)) / np.float32(sigma)
    return out, ZScoreStats(lower=float(lower), upper=float(upper), mean=float(mu), std=float(sigma),
                            voxels_in_mask=int(fg.size), voxels_kept=int(kept.size))


def _itk_quantiles(values: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """ITK Histogram::Quantile at CaPTk's two p's, on the histogram ZScoreNormalizer builds: floor(max) bins
    from the minimum to the maximum plus a margin of 1/MARGINAL_SCALE of a bin."""
    bins = int(hi)
    upper = hi + (hi - lo) / bins / MARGINAL_SCALE
    # Histogram::Initialize: a float32 bin width, each edge lower + float32(float32(j) * width) in double.
    width = (np.float32(upper) - np.float32(lo)) / np.float32(bins)
    mins = lo + (np.arange(bins, dtype=np.float32) * width).astype(np.float64)
    maxs = np.append(mins[1:], upper)  # bin j's max is bin j+1's min, the last one's is the bound itself
    counts = np.bincount(np.searchsorted(mins, values, side="right") - 1, minlength=bins)
    total = float(values.size)
    p_lo, p_hi = (float(p) for p in QUANTILES)
    # p < 0.5: walk up from the first bin to the first whose cumulative proportion reaches p.
    below = np.cumsum(counts) / total
    k = int(np.argmax(below >= p_lo))
    prev = below[k - 1] if k else 0.0
    q_lo = mins[k] + ((p_lo - prev) / (counts[k] / total)) * (maxs[k] - mins[k])
    # p >= 0.5: walk down from the last bin to the first whose proportion below it (1 - cumulative) is <= p.
    above = 1.0 - np.cumsum(counts[::-1]) / total
    m = int(np.argmax(above <= p_hi))
    prev, k = (above[m - 1] if m else 1.0), bins - 1 - m
    q_hi = maxs[k] - ((prev - p_hi) / (counts[k] / total)) * (maxs[k] - mins[k])
    return float(q_lo), float(q_hi)
