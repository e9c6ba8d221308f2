"""Make the shared test helpers (model_tester.py) importable from every test module, and skip the tests marked
`training_release` where the installed transformers is older than the train extra's minimum."""

import sys
from pathlib import Path

import pytest

from ppllava_hf.training.common import TRAINING_TRANSFORMERS, training_arguments_supported


sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "training_release: builds a trainer config or checkpoints activations (the train extra's transformers)"
    )


def pytest_collection_modifyitems(config, items):
    if training_arguments_supported():
        return
    skip = pytest.mark.skip(reason=f"PPLLaVA's training needs transformers>={TRAINING_TRANSFORMERS} (the train extra)")
    for item in items:
        if item.get_closest_marker("training_release"):
            item.add_marker(skip)
