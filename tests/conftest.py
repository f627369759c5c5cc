"""Shared fixtures: the shared test data folder beside the checkout (../shared/data), a copy of the demo bundle,
OpenVINO's bf16 kernel on this CPU."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pedseg.pipeline.config import DEMO_BUNDLE

from factories import SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    return SHARED_DATA


@pytest.fixture
def bundle_copy(tmp_path) -> Path:
    """A copy of the committed demo bundle, for tests that break it."""
    if not (DEMO_BUNDLE / "bundle.json").is_file():
        pytest.fail(f"demo bundle missing at {DEMO_BUNDLE}: run scripts/train_demo_bundle.py")
    dst = tmp_path / "bundle"
    shutil.copytree(DEMO_BUNDLE, dst)
    return dst


@pytest.fixture(scope="session")
def openvino_bf16() -> str:
    """The bf16 accuracy tests run wherever OpenVINO computes bf16, natively or emulated on AVX-512 (same rounding,
    fp32 accumulation, slower); on a CPU where it would silently compute fp32 they would test nothing."""
    from pedseg.pipeline.openvino_backend import bf16_convolution_kernel

    kernel = bf16_convolution_kernel()
    if kernel is None:
        pytest.skip("OpenVINO computes no bf16 on this CPU (neither native nor emulated on AVX-512)")
    return kernel


def pytest_collection_modifyitems(items) -> None:
    """Tests that read the shared data carry its marker, so `-m "not shared_data"` runs without it."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared_data)
