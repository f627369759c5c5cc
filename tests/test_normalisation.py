"""CaPTk's DeepMedic z-score (pipeline/normalisation.py): bit for bit against CaPTk's output on the shared case,
and its refusals on inputs the recipe cannot handle."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from pedseg.pipeline.errors import UnsupportedDataError
from pedseg.pipeline.normalisation import captk_zscore

from factories import SHARED_DATA, needs_shared_data

CASE = "BraTS-GLI-00001-000"
REFERENCE = SHARED_DATA / "deepmedic_reference"
# CaPTk's channel name -> the BraTS file suffix of its raw input.
CHANNELS = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}


def _array(path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


@needs_shared_data
@pytest.mark.parametrize("channel", CHANNELS)
def test_matches_captk_on_the_shared_case(channel):
    raw = _array(SHARED_DATA / "nifti" / f"brats_space_{CASE}" / f"{CASE}-{CHANNELS[channel]}.nii.gz")
    expected = json.loads((REFERENCE / "fixture.json").read_text())["normalisation"]["per_channel"][channel]

    out, stats = captk_zscore(raw)

    # The thresholds are float32 in CaPTk and compared exactly; the statistics differ only by summation order.
    assert (stats.lower, stats.upper) == (expected["lower_thresh"], expected["upper_thresh"])
    assert (stats.voxels_in_mask, stats.voxels_kept) == (expected["n_mask"], expected["n_keep"])
    assert stats.mean == pytest.approx(expected["norm_mean"], rel=1e-12)
    assert stats.std == pytest.approx(expected["norm_std"], rel=1e-12)
    assert out.dtype == np.float32 and out.shape == raw.shape
    assert np.all(out[raw == 0] == np.float32(expected["background_value"]))
    reference = _array(REFERENCE / f"{CASE}_input_{channel}_captk_zscore.nii.gz")
    assert reference.shape == raw.shape
    np.testing.assert_array_equal(out, reference)


def _brain(rng: np.random.Generator, shape=(20, 20, 20)) -> np.ndarray:
    """A cube of raw-looking intensities (about 500 +- 100) in a zero background."""
    volume = np.zeros(shape, np.int16)
    volume[4:-4, 4:-4, 4:-4] = rng.normal(500, 100, (shape[0] - 8,) * 3).clip(1, None)
    return volume


def test_background_becomes_minus_mean_over_std():
    volume = _brain(np.random.default_rng(0))
    out, stats = captk_zscore(volume)
    assert out[0, 0, 0] == np.float32(-np.float32(stats.mean) / np.float32(stats.std))
    assert stats.voxels_in_mask == 12**3 > stats.voxels_kept
    assert stats.lower > volume[volume > 0].min() and stats.upper < volume.max()
    # The kept voxels, and only they, were z-scored to mean 0 and std 1.
    kept = (volume >= stats.lower) & (volume <= stats.upper)
    assert kept.sum() == stats.voxels_kept
    assert abs(out[kept].mean()) < 1e-5 and out[kept].std(ddof=1) == pytest.approx(1, abs=1e-5)


def test_an_image_scaled_to_0_1_is_refused():
    volume = _brain(np.random.default_rng(1)).astype(np.float32) / 1000
    with pytest.raises(UnsupportedDataError, match="scaled to 0..1") as err:
        captk_zscore(volume)
    assert "raw values" in str(err.value) and err.value.exit_code == 4


def test_an_empty_image_is_refused():
    with pytest.raises(UnsupportedDataError, match="Only 0 voxels"):
        captk_zscore(np.zeros((16, 16, 16), np.float32))


def test_a_flat_image_is_refused():
    volume = np.zeros((20, 20, 20), np.float32)
    volume[2:-2, 2:-2, 2:-2] = 300
    with pytest.raises(UnsupportedDataError, match="no spread"):
        captk_zscore(volume)


def test_non_finite_intensities_are_refused():
    volume = _brain(np.random.default_rng(2)).astype(np.float32)
    volume[10, 10, 10] = np.nan
    with pytest.raises(UnsupportedDataError, match="NaN"):
        captk_zscore(volume)
