"""Video SFT through trl's SFTTrainer on a tiny PPLLaVA: labels keep the assistant turns only (checked against the
template text), the loss falls, the vision tower does not move, and the video reaches the loss; multi-image rows, the
original's training frame sampler (for the preference collator too) and its whole-conversation pooling prompt."""

import random

import numpy as np
import pytest
import torch
from training_tester import (  # noqa: F401  (single_threaded: a module fixture)
    logged,
    needs_training_release,
    single_threaded,
    tiny_model_and_processor,
    tiny_trainer,
)
from video_test_files import write_video

from ppllava_hf.testing.tiny_training_data import color_frames, tiny_sft_rows, write_color_videos
from ppllava_hf.training.dpo import PPLLaVAPreferenceCollator
from ppllava_hf.training.rows import BadRowError
from ppllava_hf.training.sft import PPLLaVASFTCollator, PPLLaVASFTConfig, PPLLaVASFTTrainer, check_conversation_row


pytestmark = needs_training_release


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    return str(folder), tiny_sft_rows(write_color_videos(folder), 8)


@pytest.fixture(scope="module")
def sft_run(media, tmp_path_factory):
    """8 steps (2 epochs of 8 conversations) with the released "sft" preset."""
    folder, rows = media
    output_dir = tmp_path_factory.mktemp("sft")
    trainer, before = tiny_trainer(PPLLaVASFTTrainer, PPLLaVASFTConfig, "sft", rows, folder, output_dir)
    trainer.train()
    return trainer, before


def two_turns(first_video, second_image) -> dict:
    return {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What color is the video?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this image?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
        ],
        "video": first_video,
        "image": second_image,
    }


def test_labels_keep_exactly_the_assistant_turns_of_the_template_text(media):
    folder, _ = media
    _, processor = tiny_model_and_processor()
    image = np.full((60, 90, 3), 200, np.uint8)
    rows = [two_turns("red.mp4", image), tiny_sft_rows({"green": "green.mp4"}, 1)[0]]
    batch = PPLLaVASFTCollator(processor, folder)(rows)
    decode = processor.tokenizer.decode
    text = decode(batch["input_ids"][0])
    assert text.startswith("<s> Answer briefly. USER: <video>")
    image_tokens = "<image>" * processor.num_image_tokens((60, 90))
    assert text.endswith(f"\nWhat color is the video? ASSISTANT: Red.</s>USER: {image_tokens}\nAnd this image? ASSISTANT: Blue.</s>")
    labels = batch["labels"]
    learned = [decode(batch["input_ids"][row][labels[row] != -100]) for row in range(2)]
    assert learned == ["Red.</s>Blue.</s>", "The video is green.</s>"]
    # The learned tokens are contiguous spans: each answer and its separator, nothing of the user turns or padding.
    assert labels[1][batch["attention_mask"][1] == 0].eq(-100).all()
    assert (labels[0] == batch["input_ids"][0]).sum() == (labels[0] != -100).sum()
    for key in ("pixel_values_videos", "pixel_values", "image_sizes", "clip_input_ids", "clip_attention_mask"):
        assert key in batch
    # The pooling prompt is the last question of the conversation.
    question = processor.prompt_tokenizer("And this image?")["input_ids"]
    assert batch["clip_input_ids"][0, : len(question)].tolist() == question


def test_chatml_labels_keep_the_answer_and_its_im_end(media):
    folder, rows = media
    _, processor = tiny_model_and_processor(layout="qwen")
    batch = PPLLaVASFTCollator(processor, folder)(rows[:1])
    assert processor.tokenizer.decode(batch["input_ids"][0][batch["labels"][0] != -100]) == "The video is red.<|im_end|>"


def test_the_loss_falls_and_the_vision_tower_does_not_move(sft_run):
    trainer, before = sft_run
    losses = logged(trainer, "loss")
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5, losses
    frozen = {name for name, param in trainer.model.named_parameters() if not param.requires_grad}
    assert any(name.startswith("model.vision_tower.") for name in frozen)
    assert all(torch.equal(before[name], param) for name, param in trainer.model.named_parameters() if name in frozen)
    moved = {name.split(".")[1] for name, param in trainer.model.named_parameters() if not torch.equal(before[name], param)}
    assert {"btadapter", "multi_modal_projector", "language_model"} <= moved


def test_a_zeroed_video_changes_the_loss(sft_run, media):
    folder, rows = media
    trainer = sft_run[0]
    batch = PPLLaVASFTCollator(trainer.processing_class, folder)(rows[:2])
    zeroed = {**batch, "pixel_values_videos": torch.zeros_like(batch["pixel_values_videos"])}
    with torch.no_grad():
        real, blind = (trainer.compute_loss(trainer.model, dict(inputs)).item() for inputs in (batch, zeroed))
    assert abs(real - blind) > 1e-4


def test_frames_in_the_rows_train_like_files(media, tmp_path):
    """Rows may carry decoded frames instead of paths; here with no media folder at all."""
    rows = [{**row, "video": color_frames(row["video"].removesuffix(".mp4"), 4)} for row in media[1][:4]]
    trainer, _ = tiny_trainer(PPLLaVASFTTrainer, PPLLaVASFTConfig, "sft", rows, None, tmp_path, args={"max_steps": 2})
    trainer.train()
    assert len(logged(trainer, "loss")) == 2 and trainer.skipped_rows == []


def image_list_row(multi_image) -> dict:
    images = [np.full((60 + 20 * index, 90, 3), 40 + 80 * index, np.uint8) for index in range(3)]
    messages = [{"role": "user", "content": "What changes?"}, {"role": "assistant", "content": "It gets brighter."}]
    return {"messages": messages, "images": images, "multi_image": multi_image}


def test_a_multi_image_row_trains_its_image_list_as_one_group_beside_other_rows(media):
    folder, rows = media
    model, processor = tiny_model_and_processor()
    batch = PPLLaVASFTCollator(processor, folder)([image_list_row(True), rows[0]])
    tokens = "<image>" * processor.num_multi_image_tokens()
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert text.startswith(f"<s> USER: {tokens}\n{tokens}\n{tokens}\nWhat changes? ASSISTANT: It gets brighter.</s>")
    assert batch["multi_image"].tolist() == [True, False]
    assert [tuple(group.shape) for group in batch["pixel_values_multi_image"]] == [(3, 3, 84, 84)]
    assert "pixel_values" not in batch
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


@pytest.mark.parametrize("multi_image", [True, False])
def test_the_row_check_counts_an_image_list_as_the_collator_lays_it_out(media, multi_image):
    folder, _ = media
    _, processor = tiny_model_and_processor()
    row = image_list_row(multi_image)
    length = int(PPLLaVASFTCollator(processor, folder)([row])["attention_mask"].sum())
    check_conversation_row(row, processor, folder, max_length=length)
    with pytest.raises(BadRowError, match=f"needs {length} tokens"):
        check_conversation_row(row, processor, folder, max_length=length - 1)


def test_a_multi_image_flag_that_is_not_a_bool_is_a_malformed_row(media):
    _, processor = tiny_model_and_processor()
    with pytest.raises(BadRowError, match="multi_image must be true or false"):
        check_conversation_row(image_list_row("yes"), processor, media[0])


@pytest.mark.parametrize("collator_class", [PPLLaVASFTCollator, PPLLaVAPreferenceCollator])
def test_random_frame_sampling_draws_other_frames_at_each_batch_and_middle_the_same(collator_class, tmp_path):
    """Every frame of the video shows its index, so other frames mean other pixels."""
    random.seed(0)
    write_video(tmp_path / "indexed.mp4", "libx264", 60)
    _, processor = tiny_model_and_processor()
    row = {**tiny_sft_rows({"red": "indexed.mp4"}, 1)[0], "prompt": "Which frames?", "chosen": "A.", "rejected": "B."}
    pixels = {}
    for sampling in ("middle", "random"):
        collate = collator_class(processor, str(tmp_path), frame_sampling=sampling)
        pixels[sampling] = [collate([row])["pixel_values_videos"] for _ in range(2)]
    assert torch.equal(*pixels["middle"])
    assert not torch.equal(*pixels["random"])
    assert processor.video_processor.frame_sampling == "middle"


def test_the_trainers_collator_samples_frames_as_the_config_says_and_the_saved_processor_does_not(media, tmp_path):
    folder, rows = media
    args = {"frame_sampling": "random", "pooling_prompt_source": "conversation", "max_steps": 1}
    trainer, _ = tiny_trainer(PPLLaVASFTTrainer, PPLLaVASFTConfig, "sft", rows[:2], folder, tmp_path, args=args)
    collator = trainer.data_collator
    assert (collator.frame_sampling, collator.pooling_prompt_source) == ("random", "conversation")
    assert trainer.processing_class.video_processor.frame_sampling == "middle"


def test_pooling_on_the_whole_conversation_feeds_the_templated_text_as_the_original_sft(media):
    folder, _ = media
    _, processor = tiny_model_and_processor()
    row = two_turns("red.mp4", np.full((60, 90, 3), 200, np.uint8))
    batch = PPLLaVASFTCollator(processor, folder, pooling_prompt_source="conversation")([row])
    text = "Answer briefly. USER: <image>\nWhat color is the video? ASSISTANT: Red.</s>USER: <image>\nAnd this image? ASSISTANT: Blue.</s>"
    expected = processor.prompt_tokenizer(
        text, padding="max_length", truncation=True, max_length=processor.prompt_max_length, return_tensors="pt"
    )
    assert torch.equal(batch["clip_input_ids"], expected["input_ids"])
    given = PPLLaVASFTCollator(processor, folder, pooling_prompt_source="conversation")([{**row, "pooling_prompt": "Hi"}])
    assert given["clip_input_ids"][0, : len(processor.prompt_tokenizer("Hi")["input_ids"])].tolist() == (
        processor.prompt_tokenizer("Hi")["input_ids"]
    )
