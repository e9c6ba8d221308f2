"""Shared pieces of the training tests: a tiny model and processor, CPU trainer settings, parameter snapshots."""

import pytest
import torch
from datasets import Dataset

from ppllava_hf import PPLLaVAForConditionalGeneration
from ppllava_hf.testing.tiny import tiny_config, tiny_processor
from ppllava_hf.training.dpo import PPLLaVADPOConfig
from ppllava_hf.training.sft import PPLLaVASFTConfig


NUM_FRAMES = 4

# Tests that build a trainer config or checkpoint activations need the train extra's transformers (>= 5.23); the rest
# of the package supports older releases too. conftest.py skips them below that release, and `.ci/run` runs them alone
# (`-m training_release`) at the train extra's minimum.
needs_training_release = pytest.mark.training_release


@pytest.fixture(scope="module", autouse=True)
def single_threaded():
    """Run the module on one CPU thread: the tiny models' operations are too small to gain from more, and on a busy
    machine the idle threads spin (a training run takes several times longer with two threads than with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model_and_processor(seed: int = 0, layout: str = "vicuna"):
    """A tiny random PPLLaVA of `layout` (seeded) and its processor sampling `NUM_FRAMES` frames per video."""
    config = tiny_config(layout)
    torch.manual_seed(seed)
    return PPLLaVAForConditionalGeneration(config), tiny_processor(config, num_frames=NUM_FRAMES)


def cpu_args(config_class: type[PPLLaVADPOConfig] | type[PPLLaVASFTConfig], output_dir, **overrides):
    """Trainer settings for a few quick CPU steps: two rows a step, logging every step, nothing saved or reported."""
    settings = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        logging_steps=1,
        learning_rate=1e-3,
        num_train_epochs=2,
        activation_checkpointing=False,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return config_class(**settings)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter, by name."""
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def logged(trainer, key: str) -> list[float]:
    """The values of one training metric, step by step."""
    return [log[key] for log in trainer.state.log_history if key in log]


def tiny_trainer(trainer_class, config_class, preset: str, rows: list[dict], media_folder, output_dir, args=None, **options):
    """A PPLLaVA trainer (not yet trained) of a tiny model, its config's `freezing_preset` set to `preset`, on `rows`,
    with `cpu_args`; and a snapshot of the model's parameters before training."""
    model, processor = tiny_model_and_processor()
    before = snapshot(model)
    settings = {"freezing_preset": preset, "media_folder": media_folder, **(args or {})}
    trainer = trainer_class(
        model,
        args=cpu_args(config_class, output_dir, **settings),
        train_dataset=Dataset.from_list(rows),
        processing_class=processor,
        **options,
    )
    return trainer, before
