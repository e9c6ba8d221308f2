"""Video DPO through trl's DPOTrainer on a tiny PPLLaVA: the collated pair, one video encoding per pair, the reward
margin rising, only the trained parameters changing, and the three kinds of reference (a frozen copy, LoRA adapters
disabled, precomputed log-probs). Saving: LoRA adapters reload to the same logits, merged and unmerged agree, and the
saved folders load with the Auto classes."""

import inspect
import statistics

import pytest
import torch
from datasets import Dataset
from model_tester import record_calls
from peft import PeftModel
from tolerances import TINY_FORWARD_STEPS, float32_forward, rounding_bound
from training_tester import (  # noqa: F401  (single_threaded: a module fixture)
    NUM_FRAMES,
    cpu_args,
    logged,
    needs_training_release,
    single_threaded,
    snapshot,
    tiny_model_and_processor,
    tiny_trainer,
)
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import DPOTrainer
from trl.trainer import add_fused_lm_head

from ppllava_hf.testing.tiny_training_data import tiny_preference_rows, write_color_videos
from ppllava_hf.training.common import ADAPTER_FOLDER, language_model_lora_config, save_trained_model
from ppllava_hf.training.dpo import PPLLaVADPOConfig, PPLLaVADPOTrainer, PPLLaVAPreferenceCollator, frozen_copy


pytestmark = needs_training_release


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    return str(folder), tiny_preference_rows(write_color_videos(folder), 8)


def train(media, output_dir, **options):
    """A DPO run of 8 steps (2 epochs of 8 pairs) on the colour set, the released "dpo" preset applied first."""
    folder, rows = media
    trainer, before = tiny_trainer(PPLLaVADPOTrainer, PPLLaVADPOConfig, "dpo", rows, folder, output_dir, **options)
    reference = snapshot(trainer.ref_model) if trainer.ref_model is not None else None
    trainer.train()
    return trainer, before, reference


@pytest.fixture(scope="module")
def full_run(media, tmp_path_factory):
    return train(media, tmp_path_factory.mktemp("dpo"))


@pytest.fixture(scope="module")
def lora_run(media, tmp_path_factory):
    return train(
        media,
        tmp_path_factory.mktemp("dpo-lora"),
        peft_config=language_model_lora_config(r=8, lora_dropout=0.0),
        args={"learning_rate": 5e-3, "activation_checkpointing": True},
    )


def assert_margin_rises(trainer):
    margins = logged(trainer, "rewards/margins")
    assert len(margins) == 8
    # The first step scores the untouched policy against its own copy (a frozen copy, or the adapters disabled): zero up
    # to the rounding of two forward passes, which may take other kernel paths, at the scale of the log-probs.
    log_probs = abs(logged(trainer, "logps/chosen")[0]) + abs(logged(trainer, "logps/rejected")[0])
    assert abs(margins[0]) <= trainer.args.beta * rounding_bound(torch.float32, TINY_FORWARD_STEPS, log_probs), margins
    assert statistics.mean(margins[-3:]) > statistics.mean(margins[:3]) + 0.1, margins
    assert logged(trainer, "rewards/accuracies")[-1] == 1.0


def changed(before, model) -> set[str]:
    return {name for name, param in model.named_parameters() if not torch.equal(before[name], param)}


# ----------------------------------------------------------------------------------------------------------------------
# The collated batch


@pytest.mark.parametrize(
    "layout, prompt, end",
    [
        ("vicuna", "<s> USER: {video}\nWhat color is the video? ASSISTANT: ", "</s>"),
        ("qwen", "<|im_start|>user\n{video}\nWhat color is the video?<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>\n"),
    ],
)
def test_a_pair_is_collated_as_chosen_then_rejected_with_the_same_video_and_prompt(media, layout, prompt, end):
    folder, rows = media
    _, processor = tiny_model_and_processor(layout=layout)
    batch = PPLLaVAPreferenceCollator(processor, folder)(rows[:2])
    assert set(batch) == {
        "input_ids", "attention_mask", "completion_mask", "pixel_values_videos", "clip_input_ids", "clip_attention_mask"
    }
    decode = processor.tokenizer.decode
    completions = [decode(ids[mask.bool()]) for ids, mask in zip(batch["input_ids"], batch["completion_mask"])]
    assert completions == [row[answer] + end for answer in ("chosen", "rejected") for row in rows[:2]]
    prompt_part = decode(batch["input_ids"][0][(batch["completion_mask"][0] == 0) & (batch["attention_mask"][0] == 1)])
    assert prompt_part == prompt.format(video="<video>" * processor.num_video_tokens(NUM_FRAMES))
    for pair in (0, 1):
        assert torch.equal(batch["pixel_values_videos"][pair], batch["pixel_values_videos"][pair + 2])
        assert torch.equal(batch["clip_input_ids"][pair], batch["clip_input_ids"][pair + 2])
    assert not torch.equal(batch["pixel_values_videos"][0], batch["pixel_values_videos"][1])


def test_each_video_is_encoded_once_per_pair(media):
    folder, rows = media
    model, processor = tiny_model_and_processor()
    batch = PPLLaVAPreferenceCollator(processor, folder)(rows[:2])
    frames_seen, hook = record_calls(model.model.vision_tower.embeddings, lambda pixels: pixels.shape[0])
    with torch.no_grad():
        model(**{key: value for key, value in batch.items() if key != "completion_mask"})
    hook.remove()
    assert sum(frames_seen) == 2 * NUM_FRAMES  # two videos for four rows


# ----------------------------------------------------------------------------------------------------------------------
# The one trl internal overridden: DPOTrainer._prepare_dataset


def test_trl_prepares_preference_datasets_through_the_one_overridden_hook(media, tmp_path):
    """`PPLLaVADPOTrainer._prepare_dataset` stops trl from tokenizing the rows as text. If this fails, trl changed
    how `DPOTrainer` prepares datasets: check whether trl now leaves PPLLaVA's rows alone (then drop the override) or
    tokenizes them elsewhere (then move the override there)."""
    expected = ["self", "dataset", "processing_class", "args", "dataset_name"]
    assert list(inspect.signature(DPOTrainer._prepare_dataset).parameters) == expected, (
        "trl changed the signature of DPOTrainer._prepare_dataset, which PPLLaVADPOTrainer overrides"
    )
    folder, rows = media
    prepared = []

    class RecordingTrainer(PPLLaVADPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            prepared.append(dataset_name)
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    model, processor = tiny_model_and_processor()
    trainer = RecordingTrainer(
        model,
        args=cpu_args(PPLLaVADPOConfig, tmp_path, media_folder=folder),
        train_dataset=Dataset.from_list(rows[:2]),
        eval_dataset=Dataset.from_list(rows[2:4]),
        processing_class=processor,
    )
    assert prepared == ["train", "eval"], (
        "DPOTrainer.__init__ no longer prepares video preference datasets through _prepare_dataset (trl changed its "
        "dataset preparation)"
    )
    assert trainer.train_dataset.column_names == [*Dataset.from_list(rows).column_names, "row_index"]
    assert trainer.train_dataset["chosen"] == [row["chosen"] for row in rows[:2]]  # no EOS appended, not tokenized


# ----------------------------------------------------------------------------------------------------------------------
# Full fine-tuning with a frozen copy as reference


def test_the_reward_margin_rises(full_run):
    assert_margin_rises(full_run[0])


def test_only_the_language_model_and_lm_head_change(full_run):
    trainer, before, _ = full_run
    model = trainer.model
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trained and all(name.startswith(("model.language_model.", "lm_head.")) for name in trained)
    assert changed(before, model) == trained


def test_the_reference_is_a_frozen_copy_left_untouched(full_run):
    trainer, before, reference = full_run
    assert trainer.ref_model is not trainer.model
    assert not any(param.requires_grad for param in trainer.ref_model.parameters())
    assert changed(reference, trainer.ref_model) == set()
    assert all(torch.equal(reference[name], before[name]) for name in before)


class ZeroedVideoCollator(PPLLaVAPreferenceCollator):
    """The preference collator with every video replaced by zeros."""

    def __call__(self, examples):
        batch = super().__call__(examples)
        return {**batch, "pixel_values_videos": torch.zeros_like(batch["pixel_values_videos"])}


def test_a_run_on_zeroed_videos_gives_other_losses_and_learns_no_preference(full_run, media, tmp_path):
    """Only the video tells the true colour, so without it the pairs cannot be told apart."""
    folder, _ = media
    blind = train(media, tmp_path, data_collator=ZeroedVideoCollator(full_run[0].processing_class, folder))[0]
    real_losses, blind_losses = logged(full_run[0], "loss"), logged(blind, "loss")
    assert real_losses[0] == blind_losses[0]  # the first step compares the policy with itself: log 2 either way
    assert all(abs(real - zeroed) > 1e-3 for real, zeroed in zip(real_losses[1:], blind_losses[1:]))
    real_margins, blind_margins = logged(full_run[0], "rewards/margins"), logged(blind, "rewards/margins")
    assert statistics.mean(blind_margins[-3:]) < statistics.mean(real_margins[-3:]) - 0.1


def test_a_model_partitioned_by_deepspeed_zero3_is_not_copied_into_a_reference():
    model, _ = tiny_model_and_processor()
    next(model.parameters()).ds_id = 0  # what ZeRO-3 leaves on the parameters it partitioned
    with pytest.raises(ValueError, match="ZeRO-3.*ref_model=.*precompute_ref_log_probs"):
        frozen_copy(model)


def test_the_trained_model_and_processor_reload_with_the_auto_classes(full_run, tmp_path):
    trainer = full_run[0]
    trainer.args.output_dir = str(tmp_path)
    saved = save_trained_model(trainer)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert len(trainer.state.log_history) > 0 and (tmp_path / "trainer_state.json").is_file()
    batch = PPLLaVAPreferenceCollator(processor, trainer.data_collator.media_folder)(trainer.train_dataset.select([0]))
    inputs = {key: value for key, value in batch.items() if key != "completion_mask"}
    with torch.no_grad():
        expected = saved.eval()(**inputs).logits
        torch.testing.assert_close(reloaded(**inputs).logits, expected, **float32_forward(expected))


# ----------------------------------------------------------------------------------------------------------------------
# LoRA: the reference is the model with its adapters disabled


def test_lora_training_raises_the_margin_and_changes_only_the_adapters(lora_run):
    trainer, before, reference = lora_run
    assert reference is None and trainer.ref_model is None
    assert_margin_rises(trainer)
    base = trainer.model.get_base_model()
    trained = {name for name, param in base.named_parameters() if param.requires_grad}
    assert trained and all(".lora_" in name and name.startswith("model.language_model.") for name in trained)
    assert all(param.abs().sum() > 0 for name, param in base.named_parameters() if "lora_B" in name)  # they start at 0
    untouched = {name.replace(".base_layer", ""): param for name, param in base.named_parameters() if ".lora_" not in name}
    assert all(torch.equal(before[name], param) for name, param in untouched.items())


def test_a_saved_adapter_reloads_to_identical_logits_and_merging_agrees(lora_run, media, tmp_path):
    trainer = lora_run[0]
    folder, rows = media
    batch = PPLLaVAPreferenceCollator(trainer.processing_class, folder)(rows[:2])
    inputs = {key: value for key, value in batch.items() if key != "completion_mask"}
    adapted = trainer.model.eval()
    with torch.no_grad():
        expected = adapted(**inputs).logits
        with adapted.disable_adapter():
            assert not torch.allclose(adapted(**inputs).logits, expected, atol=1e-4)  # the adapter does something

    adapted.save_pretrained(tmp_path / ADAPTER_FOLDER)
    base, _ = tiny_model_and_processor()
    reloaded = PeftModel.from_pretrained(base, tmp_path / ADAPTER_FOLDER).eval()
    merged = frozen_copy(reloaded).merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, **float32_forward(expected))
        torch.testing.assert_close(merged(**inputs).logits, expected, **float32_forward(expected))

    trainer.args.output_dir = str(tmp_path / "merged")
    save_trained_model(trainer)
    from_folder = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert not any("lora" in name for name in from_folder.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(from_folder(**inputs).logits, expected, **float32_forward(expected))


# ----------------------------------------------------------------------------------------------------------------------
# Precomputed reference log-probs


def test_precomputed_reference_log_probs_are_the_initial_models_and_training_uses_them(media, tmp_path):
    folder, rows = media
    trainer, _, reference = train(media, tmp_path, args={"precompute_ref_log_probs": True})
    assert reference is None and trainer.ref_model is None
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(trainer.train_dataset.column_names)
    initial, processor = tiny_model_and_processor()
    batch = PPLLaVAPreferenceCollator(processor, folder)(rows[:2])
    reference = frozen_copy(initial)
    add_fused_lm_head(reference)  # what DPOTrainer does to the models it scores with
    scored = trainer.compute_ref_log_probs(reference, batch)
    precomputed = trainer.train_dataset.select([0, 1])
    for scored_log_probs, key in zip(scored, ("ref_chosen_logps", "ref_rejected_logps")):
        expected = torch.tensor(precomputed[key])
        torch.testing.assert_close(scored_log_probs, expected, **float32_forward(expected))
    assert_margin_rises(trainer)
