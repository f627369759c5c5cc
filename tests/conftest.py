"""Shared fixtures: the shared test data folder beside the checkout (../shared/data), a copy of the demo bundle."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pedseg.pipeline.config import DEFAULT_BUNDLE

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    return SHARED_DATA


@pytest.fixture
def bundle_copy(tmp_path) -> Path:
    """A copy of the committed demo bundle, for tests that break it."""
    if not (DEFAULT_BUNDLE / "bundle.json").is_file():
        pytest.fail(f"demo bundle missing at {DEFAULT_BUNDLE}: run scripts/train_demo_bundle.py")
    dst = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, dst)
    return dst

