"""The trainer configs and what both PPLLaVA trainers do with them: PPLLaVA's options refused early when wrong, the
checkpointing name transformers prefers, the raw rows reaching the collator, frames and freezing preset applied, the
processor saved with the model found, and trl's tags on the model and its card."""

import warnings

import pytest
from datasets import Dataset
from training_tester import cpu_args, needs_training_release, single_threaded, tiny_model_and_processor  # noqa: F401
from trl import DPOConfig, SFTConfig

from ppllava_hf.testing.tiny_training_data import tiny_preference_rows, tiny_sft_rows, write_color_videos
from ppllava_hf.training.common import default_processor
from ppllava_hf.training.dpo import PPLLaVADPOConfig, PPLLaVADPOTrainer
from ppllava_hf.training.sft import PPLLaVASFTConfig, PPLLaVASFTTrainer


pytestmark = needs_training_release


KINDS = {
    "dpo": (PPLLaVADPOTrainer, PPLLaVADPOConfig, DPOConfig, tiny_preference_rows),
    "sft": (PPLLaVASFTTrainer, PPLLaVASFTConfig, SFTConfig, tiny_sft_rows),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    return str(folder), write_color_videos(folder)


def tiny_trainer(kind: str, videos, output_dir, data_collator=None, **settings):
    trainer_class, config_class, _, rows = KINDS[kind]
    folder, names = videos
    model, processor = tiny_model_and_processor()
    return trainer_class(
        model,
        args=cpu_args(config_class, output_dir, media_folder=folder, **settings),
        data_collator=data_collator,
        train_dataset=Dataset.from_list(rows(names, 4)),
        processing_class=processor,
    )


# ----------------------------------------------------------------------------------------------------------------------
# The configs


@pytest.mark.parametrize("kind", KINDS)
def test_the_configs_use_activation_checkpointing_without_deprecation_warnings(kind, tmp_path):
    config_class = KINDS[kind][1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        default = config_class(str(tmp_path), use_cpu=True)
        off = config_class(str(tmp_path), use_cpu=True, activation_checkpointing=False)
    assert default.activation_checkpointing is True and default.gradient_checkpointing is True  # trl's default
    assert off.activation_checkpointing is False and off.gradient_checkpointing is False
    assert config_class(str(tmp_path), use_cpu=True, gradient_checkpointing=False).activation_checkpointing is False


@pytest.mark.parametrize("kind", KINDS)
def test_the_configs_refuse_wrong_ppllava_options_when_built(kind, tmp_path):
    config_class = KINDS[kind][1]
    with pytest.raises(ValueError, match="on_bad_row must be one of"):
        config_class(str(tmp_path), use_cpu=True, on_bad_row="ignore")
    with pytest.raises(ValueError, match="video_check must be one of"):
        config_class(str(tmp_path), use_cpu=True, video_check="skim")
    with pytest.raises(ValueError, match="Unknown freezing preset 'lora'.*'dpo'.*'sft'"):
        config_class(str(tmp_path), use_cpu=True, freezing_preset="lora")
    with pytest.raises(ValueError, match="remove_unused_columns=True would drop the raw columns"):
        config_class(str(tmp_path), use_cpu=True, remove_unused_columns=True)


def test_the_sft_config_always_leaves_tokenizing_to_the_collator(tmp_path):
    config = PPLLaVASFTConfig(str(tmp_path), use_cpu=True, dataset_kwargs='{"skip_prepare_dataset": false}')
    assert config.dataset_kwargs == {"skip_prepare_dataset": True}


@pytest.mark.parametrize("kind", KINDS)
def test_a_trainer_refuses_trls_plain_config_and_names_its_own(kind, videos, tmp_path):
    trainer_class, config_class, trl_config_class, rows = KINDS[kind]
    model, processor = tiny_model_and_processor()
    args = cpu_args(trl_config_class, tmp_path, remove_unused_columns=False)
    with pytest.raises(TypeError, match=f"takes a {config_class.__name__} as args.*media_folder"):
        trainer_class(model, args=args, train_dataset=Dataset.from_list(rows(videos[1], 2)), processing_class=processor)


# ----------------------------------------------------------------------------------------------------------------------
# The trainers


class RecordingCollator:
    """Records the batches of rows a trainer's data loader hands to the collator, and returns a batch of nothing."""

    def __init__(self):
        self.batches = []

    def __call__(self, rows):
        self.batches.append(rows)
        return {}


@pytest.mark.parametrize("kind", KINDS)
def test_the_collator_receives_the_raw_rows(kind, videos, tmp_path):
    collator = RecordingCollator()
    trainer = tiny_trainer(kind, videos, tmp_path, data_collator=collator)
    next(iter(trainer.get_train_dataloader()))
    columns = {*KINDS[kind][3](videos[1], 1)[0], "row_index"}
    first = collator.batches[0]
    assert len(first) == 2 and all(set(row) == columns for row in first)


@pytest.mark.parametrize("kind, preset", [("dpo", "dpo"), ("sft", "sft")])
def test_a_trainer_applies_the_configs_frames_and_freezing_preset(kind, preset, videos, tmp_path):
    trainer = tiny_trainer(kind, videos, tmp_path, num_frames=2, freezing_preset=preset)
    assert (trainer.processing_class.video_processor.num_frames, trainer.processing_class.video_processor.fps) == (2, None)
    batch = trainer.data_collator(list(trainer.train_dataset.select([0])))
    assert batch["pixel_values_videos"].shape[1] == 2
    trained = {name.split(".")[1] for name, param in trainer.model.named_parameters() if param.requires_grad}
    assert "vision_tower" not in trained and "language_model" in trained
    assert ("multi_modal_projector" in trained) is (preset == "sft")


def test_a_freezing_preset_needs_the_model_itself_not_a_path(videos, tmp_path):
    _, processor = tiny_model_and_processor()
    args = cpu_args(PPLLaVADPOConfig, tmp_path, freezing_preset="dpo")
    with pytest.raises(ValueError, match="applies to the PPLLaVA model itself, before LoRA"):
        PPLLaVADPOTrainer("some/folder", args=args, train_dataset=Dataset.from_list([]), processing_class=processor)


def test_the_default_processor_is_the_one_saved_with_the_model(tmp_path):
    model, processor = tiny_model_and_processor()
    with pytest.raises(ValueError, match="not loaded from a folder.*pass processing_class="):
        default_processor(model)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model.config.name_or_path = str(tmp_path)  # what from_pretrained records
    found = default_processor(model)
    assert type(found) is type(processor) and found.tokenizer.get_vocab() == processor.tokenizer.get_vocab()


@pytest.mark.parametrize("kind", KINDS)
def test_the_model_and_its_card_carry_the_trainers_tags(kind, videos, tmp_path):
    trainer = tiny_trainer(kind, videos, tmp_path)
    expected = {"trl", kind, "ppllava"}
    assert expected <= set(trainer.model.model_tags)
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "README.md").read_text()
    front_matter = card.split("---")[1]
    assert all(f"- {tag}\n" in front_matter for tag in expected), front_matter
