"""Training needs a newer transformers than the rest of the package (TrainingArguments' `activation_checkpointing`,
5.23): setup.cfg's train extra asks for it, and a training config on an older release names the fix."""

import configparser
from pathlib import Path

import pytest

from ppllava_hf.training import common
from ppllava_hf.training.common import TRAINING_TRANSFORMERS
from ppllava_hf.training.sft import PPLLaVASFTConfig


ROOT = Path(__file__).resolve().parents[1]


def test_the_train_extra_asks_for_the_training_minimum():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    train = setup["options.extras_require"]["train"].split()
    assert f"transformers>={TRAINING_TRANSFORMERS}" in train


def test_a_training_config_on_a_release_without_activation_checkpointing_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(common, "training_arguments_supported", lambda: False)
    with pytest.raises(ImportError, match=r"need transformers>=5\.23 .*pip install 'ppllava_hf\[train\]'"):
        PPLLaVASFTConfig(str(tmp_path), use_cpu=True)
