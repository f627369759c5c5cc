"""The committed demo bundle still reaches its documented held-out accuracy (one held-out synthetic case)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from pedseg.evaluation import predict_atlas_case, region_dice
from pedseg.pipeline.config import DEMO_BUNDLE, PipelineConfig
from pedseg.synth.session import HOLDOUT_SEEDS

from factories import write_training_case

pytestmark = pytest.mark.slow


def test_heldout_case_whole_tumour_dice(tmp_path):
    seed = HOLDOUT_SEEDS[0]
    paths, truth = write_training_case(seed, tmp_path)
    pred = sitk.GetArrayFromImage(predict_atlas_case(DEMO_BUNDLE, paths, PipelineConfig(device="cpu", threads=2)))
    scores = region_dice(sitk.GetArrayFromImage(truth), pred)
    assert scores["WT"] >= 0.90, scores
    # The case must match what the bundle documents for it (same data, same model: same numbers).
    documented = json.loads((DEMO_BUNDLE / "bundle.json").read_text())["training"]["holdout_dice"]["per_case"]
    expected = documented[f"syn_{seed:04d}"]
    for region, value in scores.items():
        if value is not None and expected[region] is not None:
            assert value == pytest.approx(expected[region], abs=0.01), region
    assert np.isin(np.unique(pred), [0, 1, 2, 3, 4]).all()
