"""The training examples end to end with tiny settings: they print the trainable parameters, train, and leave a model,
its processor and trainer_state.json in --output_dir that load again; their defaults are the released recipes."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from training_tester import needs_training_release, single_threaded  # noqa: F401
from transformers import AutoModelForImageTextToText, AutoProcessor

from ppllava_hf.training.common import ADAPTER_FOLDER
from ppllava_hf.training.dpo import PPLLaVADPOConfig
from ppllava_hf.training.sft import PPLLaVASFTConfig


pytestmark = needs_training_release


EXAMPLES = Path(__file__).parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

from training_script import parse_script_args  # noqa: E402


def run_example(name: str, monkeypatch, *arguments: str) -> None:
    monkeypatch.setattr(sys, "argv", [name, *arguments])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def assert_loadable_folder(folder: Path) -> list[dict]:
    """The folder loads with the Auto classes and generates; returns its log history."""
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(text="USER: <video>\nWhat color is the video? ASSISTANT:", videos=[str(folder / "tiny_data" / "red.mp4")])
    assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 2
    return json.loads((folder / "trainer_state.json").read_text())["log_history"]


def test_the_dpo_example_trains_and_saves_a_loadable_model(tmp_path, monkeypatch, capsys):
    run_example(
        "train_dpo.py", monkeypatch, "--output_dir", str(tmp_path), "--max_steps", "3", "--tiny_rows", "4",
        "--bf16", "True", "--use_cpu", "True", "--activation_checkpointing", "True",  # bf16 autocast works on CPUs too
    )
    printed = capsys.readouterr().out
    assert "language model" in printed and "vision tower" in printed and "Reward margin" in printed
    history = assert_loadable_folder(tmp_path)
    assert [log["step"] for log in history if "rewards/margins" in log] == [1, 2, 3]


def test_the_sft_example_with_lora_saves_the_adapter_and_the_merged_model(tmp_path, monkeypatch, capsys):
    run_example("train_sft.py", monkeypatch, "--output_dir", str(tmp_path), "--max_steps", "2", "--tiny_rows", "4", "--use_peft")
    assert "Training loss by step" in capsys.readouterr().out
    assert (tmp_path / ADAPTER_FOLDER / "adapter_config.json").is_file()
    history = assert_loadable_folder(tmp_path)
    assert [log["step"] for log in history if "loss" in log] == [1, 2]


@pytest.mark.parametrize(
    "name, config_class, recipe",
    [
        ("train_dpo.py", PPLLaVADPOConfig, dict(learning_rate=5e-6, lr_scheduler_type="linear", warmup_steps=0.1, num_train_epochs=2,
                                         max_length=3072, beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.0],
                                         num_frames=32, frame_sampling="random", freezing_preset="dpo")),
        ("train_sft.py", PPLLaVASFTConfig, dict(learning_rate=2e-5, lr_scheduler_type="cosine", warmup_steps=0.03, num_train_epochs=2,
                                         max_length=4096, num_frames=32, frame_sampling="random", freezing_preset="sft",
                                         pooling_prompt_source="last_user_turn")),
    ],
)
def test_the_defaults_are_the_released_recipe_and_flags_win(name, config_class, recipe, tmp_path):
    module = runpy.run_path(str(EXAMPLES / name))

    def parsed(*arguments):
        dataset_args, training_args, model_args = parse_script_args(config_class, module["RECIPE"], "", arguments)
        assert isinstance(training_args, config_class)
        return {**vars(dataset_args), **vars(training_args), **vars(model_args)}

    real = parsed("--model_name_or_path", "ppllava-7b", "--use_cpu")  # bf16 (the recipe) needs a GPU, or use_cpu
    for key, value in recipe.items():
        assert real[key] == value or str(real[key]) == value, key
    tiny = parsed()
    assert (tiny["learning_rate"], tiny["num_frames"], tiny["bf16"]) == (1e-3, 4, False)
    assert parsed("--learning_rate", "2e-4")["learning_rate"] == 2e-4
    assert parsed("--model_name_or_path", "ppllava-7b", "--use_cpu", "--num_frames", "16")["num_frames"] == 16
    # A --config YAML file (trl's) names the model as well as the command line does, and the command line wins over it.
    config = tmp_path / "recipe.yaml"
    config.write_text("model_name_or_path: ppllava-7b\nuse_cpu: true\nlearning_rate: 3.0e-6\n")
    from_file = parsed("--config", str(config), "--num_frames", "8")
    assert (from_file["learning_rate"], from_file["num_frames"]) == (3e-6, 8)
    assert from_file["lr_scheduler_type"] == real["lr_scheduler_type"]


def test_a_quantized_base_without_lora_is_refused_with_the_fix(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="--load_in_4bit / --load_in_8bit .* add --use_peft"):
        run_example("train_sft.py", monkeypatch, "--output_dir", str(tmp_path), "--load_in_4bit", "True")
