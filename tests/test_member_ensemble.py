"""Cross-kind ensembles (pipeline.member_ensemble): members predicting classes and members predicting regions
averaged in one label space, with per-member and per-region weights."""
import numpy as np
import pytest

from pedseg.pipeline.errors import BundleError
from pedseg.pipeline.member_ensemble import LabelSpace, MemberOutput, average, channel_name

LABELS_2023 = {1: "NCR", 2: "ED", 3: "ET"}
REGIONS_2023 = ((1, 2, 3), (1, 3), (3,))  # WT, TC, ET as the BraTS region-based models predict them


def _classes(name, probabilities) -> MemberOutput:
    """A softmax member over background, NCR, ED, ET: `probabilities` (4, n) on a 1 x 1 x n grid."""
    p = np.asarray(probabilities, np.float32)[:, None, None, :]
    return MemberOutput(name, p, ((0,), (1,), (2,), (3,)), has_regions=False)


def _regions(name, probabilities, order=REGIONS_2023) -> MemberOutput:
    p = np.asarray(probabilities, np.float32)[:, None, None, :]
    return MemberOutput(name, p, order, has_regions=True)


def test_class_members_average_with_member_weights():
    a = _classes("a", [[1, 0.1], [0, 0.2], [0, 0.1], [0, 0.6]])
    b = _classes("b", [[0, 0.1], [1, 0.7], [0, 0.1], [0, 0.1]])
    space = LabelSpace.for_members([a, b])
    mean = average([a, b], {"a": [3] * 4, "b": [1] * 4}, space)
    np.testing.assert_allclose(mean[:, 0, 0, 0], [0.75, 0.25, 0, 0])
    np.testing.assert_allclose(mean[:, 0, 0, 1], [0.1, 0.325, 0.1, 0.475], atol=1e-6)
    assert space.labels(mean)[0, 0].tolist() == [0, 3]


def test_class_and_region_members_meet_in_regions():
    """A DeepMedic-like class member and a region member (given in another channel order): the class member's
    whole tumour is the sum of its tumour classes, and labels are painted WT -> ED, TC -> NCR, ET -> ET."""
    classes = _classes("dm", [[0.9, 0.1, 0.1, 0.1], [0.0, 0.1, 0.6, 0.1], [0.1, 0.7, 0.1, 0.1], [0.0, 0.1, 0.2, 0.7]])
    regions = _regions("swin", [[0.0, 0.1, 0.8, 0.9], [0.0, 0.0, 0.1, 0.8], [0.1, 0.8, 0.9, 0.9]],
                       order=((1, 3), (3,), (1, 2, 3)))  # TC, ET, WT
    space = LabelSpace.for_members([classes, regions])
    assert space.has_regions and space.channels == REGIONS_2023 and space.paint_values() == [2, 1, 3]
    mean = average([classes, regions], {"dm": [1, 1, 1], "swin": [1, 1, 1]}, space)
    np.testing.assert_allclose(mean[:, 0, 0], [[0.1, 0.85, 0.9, 0.9],  # WT: the class member's tumour classes summed
                                               [0.0, 0.15, 0.8, 0.85], [0.0, 0.05, 0.15, 0.75]], atol=1e-6)
    assert space.labels(mean)[0, 0].tolist() == [0, 2, 1, 3]


def test_per_region_weights_let_each_member_lead_its_region():
    """The CNMC recipe: one member trusted for the whole tumour, the other for enhancing tumour."""
    a = _regions("a", [[0.9, 0.9], [0.1, 0.1], [0.9, 0.1]])
    b = _regions("b", [[0.1, 0.1], [0.1, 0.1], [0.1, 0.9]])
    space = LabelSpace.for_members([a, b])
    mean = average([a, b], {"a": [1.0, 0.5, 0.0], "b": [0.0, 0.5, 1.0]}, space)
    np.testing.assert_allclose(mean[:, 0, 0, 0], [0.9, 0.1, 0.1], atol=1e-6)
    np.testing.assert_allclose(mean[:, 0, 0, 1], [0.9, 0.1, 0.9], atol=1e-6)
    assert space.labels(mean)[0, 0].tolist() == [2, 3]


def test_region_members_must_agree_and_nest():
    with pytest.raises(BundleError, match="different regions"):
        LabelSpace.for_members([_regions("a", np.zeros((3, 1))), _regions("b", np.zeros((2, 1)), ((1, 2, 3), (3,)))])
    with pytest.raises(BundleError, match="do not nest"):
        LabelSpace.for_members([_regions("a", np.zeros((2, 1)), ((1, 2), (3,)))])


def test_channels_are_named_by_the_label_table():
    names = [channel_name(c, LABELS_2023, "2023") for c in ((0,), *REGIONS_2023)]
    assert names == ["background", "WT", "TC", "ET"]
    assert channel_name((2,), {1: "ET", 2: "NET", 3: "CC", 4: "ED"}, "2024") == "NET"
