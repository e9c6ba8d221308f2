"""The tested transformers range is the package's, not the model folder's: `import ppllava_hf` warns once per
untested release, and a saved or remote-code model carries no release list."""

import logging
from pathlib import Path

import pytest
import transformers

from ppllava_hf import tested_releases
from ppllava_hf.tested_releases import TESTED_TRANSFORMERS, warn_if_untested_transformers
from ppllava_hf.testing.tiny import tiny_config


ROOT = Path(__file__).resolve().parents[1]
MODEL_FOLDER = ROOT / "src" / "ppllava_hf" / "models" / "ppllava"


@pytest.fixture
def fresh_once_flag(monkeypatch):
    """A warning state in which no release has been warned about yet (whatever the suite did before)."""
    monkeypatch.setattr(tested_releases, "_warned_for", set())


def minor_release(bound: str, minor_step: int) -> str:
    """The release `minor_step` minor versions after the major.minor `bound` (before it, if negative)."""
    major, minor = (int(part) for part in bound.split("."))
    return f"{major}.{minor + minor_step}.0"


OLDEST, NEWEST = TESTED_TRANSFORMERS


@pytest.mark.parametrize(
    "installed, outside",
    [
        (f"{OLDEST}.0", False),
        (f"{NEWEST}.3", False),
        (minor_release(NEWEST, 1), True),
        (minor_release(OLDEST, -1), True),
    ],
)
def test_a_transformers_outside_the_tested_range_is_named_in_a_warning(installed, outside, fresh_once_flag, caplog):
    with caplog.at_level(logging.WARNING):
        assert warn_if_untested_transformers(installed) is outside
    assert (f"you have {installed}" in caplog.text) is outside
    if outside:
        assert f"tested with transformers {OLDEST} to {NEWEST}" in caplog.text


def test_the_warning_comes_once_per_release(fresh_once_flag, caplog):
    untested = minor_release(NEWEST, 1)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            warn_if_untested_transformers(untested)
    assert caplog.text.count(f"you have {untested}") == 1


def test_the_tested_range_starts_at_the_declared_minimum_with_no_upper_bound():
    setup = (ROOT / "setup.cfg").read_text()
    requirement = next(line.strip() for line in setup.splitlines() if line.strip().startswith("transformers"))
    assert requirement == f"transformers>={OLDEST}"


def test_a_model_config_says_nothing_about_the_installed_release(fresh_once_flag, monkeypatch, caplog, tmp_path):
    """A converted folder or remote-code checkpoint outlives any release list; only the package knows what CI ran."""
    monkeypatch.setattr(transformers, "__version__", "99.0.0")
    with caplog.at_level(logging.WARNING):
        tiny_config("vicuna").save_pretrained(tmp_path)
        transformers.AutoConfig.from_pretrained(tmp_path)
    assert "99.0.0" not in caplog.text and "tested with" not in caplog.text
    payload = "".join(path.read_text(encoding="utf-8") for path in MODEL_FOLDER.glob("*.py"))
    assert "TESTED_TRANSFORMERS" not in payload and "__version__" not in payload
