"""Training rows for the PPLLaVA trainers: bad rows are named and skipped with a count (or refused), lengths include
the expanded visual tokens and are never truncated, and both row formats (strings, chat messages) are read."""

import logging
import os
import re
from functools import partial

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from training_tester import (  # noqa: F401  (single_threaded: a module fixture)
    NUM_FRAMES,
    cpu_args,
    needs_training_release,
    single_threaded,
    tiny_model_and_processor,
)
from video_test_files import write_video

from ppllava_hf.testing.tiny_training_data import (
    QUESTION,
    color_frames,
    tiny_preference_rows,
    tiny_sft_rows,
    write_color_videos,
)
from ppllava_hf.training.dpo import (
    PPLLaVADPOConfig,
    PPLLaVADPOTrainer,
    PPLLaVAPreferenceCollator,
    check_preference_row,
    render_preference,
)
from ppllava_hf.training.rows import BadRowError, check_rows, token_count, visual_tokens_added
from ppllava_hf.training.sft import PPLLaVASFTCollator, check_conversation_row, conversation_with_media


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A folder with the colour videos, a file that is not a video, and an mkv cut short whose header still opens."""
    folder = tmp_path_factory.mktemp("media")
    videos = write_color_videos(folder)
    (folder / "corrupt.mp4").write_bytes(b"definitely not a video " * 40)
    whole = write_video(folder / "whole.mkv", "libx264", 60).read_bytes()
    (folder / "truncated.mkv").write_bytes(whole[: len(whole) * 3 // 10])
    return str(folder), videos


@pytest.fixture(scope="module")
def processor():
    return tiny_model_and_processor()[1]


def bad_preference_rows(videos) -> list[dict]:
    """Rows 1-4 are bad, each for one reason; rows 0 and 5 are good."""
    rows = tiny_preference_rows(videos, 6)
    rows[1]["video"] = "missing.mp4"
    rows[2]["video"] = "corrupt.mp4"
    rows[3]["rejected"] = rows[3]["chosen"]
    rows[4]["prompt"] = "Describe the video in detail. " * 60
    return rows


def check(processor, folder, rows, on_bad_row="skip", max_length=128, video_check="open", check_row=check_preference_row):
    row_check = partial(check_row, processor=processor, media_folder=folder, max_length=max_length, video_check=video_check)
    return check_rows(Dataset.from_list(rows), row_check, on_bad_row, "train")


# ----------------------------------------------------------------------------------------------------------------------
# Bad rows


def test_bad_preference_rows_are_skipped_and_named_with_their_reason(media, processor, caplog):
    folder, videos = media
    with caplog.at_level(logging.WARNING):
        dataset, skipped = check(processor, folder, bad_preference_rows(videos))
    assert dataset["id"] == ["pair-0", "pair-5"]
    assert dataset["row_index"] == [0, 5]
    assert [(row.index, row.row_id, row.kind) for row in skipped] == [
        (1, "pair-1", "unreadable video"),
        (2, "pair-2", "unreadable video"),
        (3, "pair-3", "chosen equals rejected"),
        (4, "pair-4", "too long"),
    ]
    assert "missing.mp4" in skipped[0].reason and "not found" in skipped[0].reason
    assert "corrupt.mp4" in skipped[1].reason
    assert "max_length=128" in skipped[3].reason
    assert "Skipped 4 of 6 train rows (2 unreadable video, 1 chosen equals rejected, 1 too long)" in caplog.text
    assert "row 3 (id 'pair-3')" in caplog.text


def test_on_bad_row_raise_refuses_the_dataset_and_lists_every_bad_row(media, processor):
    folder, videos = media
    with pytest.raises(BadRowError) as error:
        check(processor, folder, bad_preference_rows(videos), on_bad_row="raise")
    message = str(error.value)
    assert message.startswith("4 of 6 train rows cannot be trained on")
    for index in range(1, 5):
        assert f"row {index} (id 'pair-{index}')" in message
    assert "row 0 " not in message and "row 5 " not in message


def test_a_dataset_without_any_good_row_is_refused(media, processor):
    folder, videos = media
    rows = tiny_preference_rows(videos, 2)
    for row in rows:
        row["video"] = "missing.mp4"
    with pytest.raises(BadRowError, match="No train row can be trained on"):
        check(processor, folder, rows)


def test_decoding_check_catches_a_file_whose_header_opens(media, processor):
    folder, videos = media
    rows = tiny_preference_rows(videos, 2)
    rows[1]["video"] = "truncated.mkv"
    assert check(processor, folder, rows, video_check="open")[1] == []
    _, skipped = check(processor, folder, rows, video_check="decode")
    assert [(row.index, row.kind) for row in skipped] == [(1, "unreadable video")]


@pytest.mark.parametrize("video_check", ["open", "decode"])
def test_a_frame_folder_video_is_kept_and_counted_alike_under_either_check(media, processor, tmp_path, video_check):
    folder, videos = media
    frames = tmp_path / "red_frames"
    frames.mkdir()
    for index, frame in enumerate(color_frames("red", NUM_FRAMES)):
        Image.fromarray(frame).save(frames / f"{index:03d}.png")
    (tmp_path / "empty_frames").mkdir()
    rows = tiny_preference_rows(videos, 3)
    rows[1]["video"], rows[2]["video"] = str(frames), str(tmp_path / "empty_frames")
    dataset, skipped = check(processor, folder, rows, video_check=video_check)
    assert len(dataset) == 2 and [(row.index, row.kind) for row in skipped] == [(2, "unreadable video")]
    paths = (str(frames), os.path.join(folder, "red.mp4"))
    added = {visual_tokens_added(processor, [path], [], video_check) for path in paths}
    assert added == {processor.num_video_tokens(NUM_FRAMES) - 1}


def test_a_video_that_fails_while_training_names_its_row(media, processor):
    folder, videos = media
    rows = tiny_preference_rows(videos, 2)
    rows[1]["video"] = "truncated.mkv"
    dataset, _ = check(processor, folder, rows)
    collator = PPLLaVAPreferenceCollator(processor, folder)
    with pytest.raises(BadRowError, match=r"row 1 \(id 'pair-1'\): .*truncated.mkv.*video_check='decode'"):
        collator(list(dataset))


def test_bad_conversation_rows_are_skipped_with_their_reason(media, processor):
    folder, videos = media
    rows = tiny_sft_rows(videos, 5)
    for row in rows:  # a datasets column holds either strings or block lists, not both
        user, assistant = row["messages"]
        user["content"] = [{"type": "video"}, {"type": "text", "text": user["content"]}]
        assistant["content"] = [{"type": "text", "text": assistant["content"]}]
    rows[1]["messages"] = rows[1]["messages"][:1]
    rows[2]["video"] = "missing.mp4"
    rows[3]["messages"][0]["content"].insert(0, {"type": "video"})
    rows[4]["messages"][1]["content"][0]["text"] = "red " * 200
    dataset, skipped = check(processor, folder, rows, check_row=check_conversation_row)
    assert dataset["row_index"] == [0]
    assert [row.kind for row in skipped] == [
        "no assistant turn", "unreadable video", "media placeholders do not match", "too long"
    ]


@needs_training_release
def test_the_trainer_drops_bad_rows_before_training_and_lists_them(media, tmp_path):
    folder, videos = media
    model, processor = tiny_model_and_processor()
    trainer = PPLLaVADPOTrainer(
        model,
        args=cpu_args(PPLLaVADPOConfig, tmp_path, max_length=128, media_folder=folder),
        train_dataset=Dataset.from_list(bad_preference_rows(videos)),
        eval_dataset=Dataset.from_list(bad_preference_rows(videos)[:2]),
        processing_class=processor,
    )
    assert len(trainer.train_dataset) == 2 and len(trainer.eval_dataset) == 1
    assert [(row.dataset, row.index) for row in trainer.skipped_rows] == [
        ("train", 1), ("train", 2), ("train", 3), ("train", 4), ("eval", 1)
    ]
    with pytest.raises(ValueError, match="on_bad_row"):
        cpu_args(PPLLaVADPOConfig, tmp_path, on_bad_row="ignore")
    # A dataset given to evaluate() is checked the same way.
    metrics = trainer.evaluate(Dataset.from_list(bad_preference_rows(videos)[2:]), metric_key_prefix="test")
    assert "test_loss" in metrics
    assert [(row.dataset, row.index) for row in trainer.skipped_rows[5:]] == [("test", 0), ("test", 1), ("test", 2)]


# ----------------------------------------------------------------------------------------------------------------------
# Lengths: the visual tokens count, nothing is truncated


def test_the_checked_length_is_the_collated_length(media, processor):
    """The row check counts the `<video>` expansion: its length is exactly the longer row of the collated pair."""
    folder, videos = media
    row = tiny_preference_rows(videos, 1)[0]
    row["rejected"] = "The video is not red, it is another colour."
    texts = render_preference(row, processor)
    added = visual_tokens_added(processor, [os.path.join(folder, row["video"])], [], "open")
    assert added == processor.num_video_tokens(NUM_FRAMES) - 1
    expected = token_count(processor, texts.prompt + texts.rejected) + added
    batch = PPLLaVAPreferenceCollator(processor, folder)([row])
    assert batch["attention_mask"].sum(-1).tolist()[1] == expected
    check_preference_row(row, processor, folder, max_length=expected)
    with pytest.raises(BadRowError, match="too long|max_length"):
        check_preference_row(row, processor, folder, max_length=expected - 1)


def test_collators_refuse_instead_of_truncating(media, processor):
    folder, videos = media
    preference = tiny_preference_rows(videos, 1)
    with pytest.raises(BadRowError, match=r"row 0 \(id 'pair-0'\) \(\d+ tokens\)"):
        PPLLaVAPreferenceCollator(processor, folder, max_length=20)(preference)
    with pytest.raises(BadRowError, match=r"row 0 \(id 'chat-0'\)"):
        PPLLaVASFTCollator(processor, folder, max_length=20)(tiny_sft_rows(videos, 1))


# ----------------------------------------------------------------------------------------------------------------------
# Row formats


def test_a_string_prompt_and_its_chat_form_render_the_same(media, processor):
    folder, videos = media
    plain = tiny_preference_rows(videos, 1)[0]
    chat = {
        **plain,
        "prompt": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}],
        "chosen": [{"role": "assistant", "content": plain["chosen"]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": plain["rejected"]}]}],
    }
    original_style = {**plain, "prompt": f"<video>\n{QUESTION}"}
    expected = render_preference(plain, processor)
    assert render_preference(chat, processor) == expected == render_preference(original_style, processor)
    assert expected.prompt == f"USER: <video>\n{QUESTION} ASSISTANT: "
    assert (expected.chosen, expected.pooling_prompt) == ("The video is red.</s>", QUESTION)
    assert render_preference({**plain, "pooling_prompt": "colours"}, processor).pooling_prompt == "colours"


def test_videos_fill_the_conversation_in_order_from_paths_or_frames(media):
    folder, _ = media
    frames = color_frames("blue", 3)
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "First?"}]},
            {"role": "assistant", "content": "Red."},
            {
                "role": "user",
                "content": [{"type": "video", "path": "/abs/green.mp4"}, {"type": "video"}, {"type": "text", "text": "And?"}],
            },
            {"role": "assistant", "content": "Green, blue."},
        ],
        "videos": ["red.mp4", frames.tolist()],
    }
    conversation = conversation_with_media(row, folder)
    videos = [block["video"] for message in conversation for block in message["content"] if block["type"] == "video"]
    assert videos[:2] == [os.path.join(folder, "red.mp4"), "/abs/green.mp4"]
    assert np.issubdtype(videos[2].dtype, np.integer) and np.array_equal(videos[2], frames)  # values kept as given
    messages = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    simple = conversation_with_media({"messages": messages, "video": "red.mp4"}, folder)
    video_first = [{"type": "video", "video": os.path.join(folder, "red.mp4")}, {"type": "text", "text": "Q?"}]
    assert simple[0]["content"] == video_first


def test_an_images_column_holding_one_path_string_is_that_one_image(media):
    folder, _ = media
    messages = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    conversation = conversation_with_media({"messages": messages, "images": "a.png"}, folder)
    assert conversation[0]["content"][0] == {"type": "image", "image": os.path.join(folder, "a.png")}
    assert len(conversation[0]["content"]) == 2


def test_rows_with_frames_instead_of_files_train_the_same_way(media, processor):
    """A row may carry decoded frames (as a `datasets` column gives them back: nested lists)."""
    folder, videos = media
    from_file = tiny_preference_rows(videos, 1)[0]
    frames = color_frames("red", 16)[np.linspace(0, 15, NUM_FRAMES).round().astype(int)]
    from_frames = Dataset.from_list([{**from_file, "video": frames}])[0]
    assert isinstance(from_frames["video"], list)
    batch = PPLLaVAPreferenceCollator(processor)([from_frames])
    reference = PPLLaVAPreferenceCollator(processor, folder)([from_file])
    assert batch["pixel_values_videos"].shape == reference["pixel_values_videos"].shape
    assert torch.equal(batch["input_ids"], reference["input_ids"])


SHAREGPT_TURNS = [{"from": "human", "value": "Which colour is the video?"}, {"from": "gpt", "value": "Red."}]


@pytest.mark.parametrize(
    "messages, problem",
    [
        (SHAREGPT_TURNS, "ShareGPT form"),
        ([{"role": "user", "content": [{"text": "Which colour?"}]}, {"role": "assistant", "content": "Red."}],
         "needs a 'type'"),
        ([{"content": "Which colour?"}, {"role": "assistant", "content": "Red."}], "needs a 'role'"),
        ([{"role": "user", "content": [{"type": "text"}]}, {"role": "assistant", "content": "Red."}],
         "a text block needs its 'text'"),
        ("USER: Which colour? ASSISTANT: Red.", "must be a non-empty list of turns"),
    ],
)
def test_a_malformed_conversation_is_a_bad_row_saying_what_to_fix(media, processor, messages, problem):
    folder, videos = media
    row = {"messages": messages, "video": tiny_sft_rows(videos, 1)[0]["video"]}
    with pytest.raises(BadRowError, match=re.escape(problem)) as caught:
        check_conversation_row(row, processor, media_folder=folder, max_length=512)
    assert caught.value.kind == "malformed"


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_sharegpt_rows_are_named_counted_and_skipped_or_refused(media, processor, policy):
    folder, videos = media
    rows = tiny_sft_rows(videos, 3)
    rows[1] = {**rows[1], "messages": None, "conversations": SHAREGPT_TURNS}
    rows[2] = {**rows[2], "messages": [{"role": None, "content": None, "from": "human", "value": "Which colour?"}]}
    if policy == "raise":
        with pytest.raises(BadRowError, match="2 of 3 train rows cannot be trained on"):
            check(processor, folder, rows, on_bad_row="raise", check_row=check_conversation_row)
        return
    dataset, skipped = check(processor, folder, rows, check_row=check_conversation_row)
    assert dataset["row_index"] == [0]
    assert [(row.index, row.kind) for row in skipped] == [(1, "malformed"), (2, "malformed")]
    assert "ShareGPT form" in skipped[1].reason


def test_float_frames_in_a_row_train_like_the_same_frames_in_uint8(media, processor):
    """Frames in [0, 1] are the processor's to convert; they never become black uint8 video."""
    folder, videos = media
    row = tiny_preference_rows(videos, 1)[0]
    frames = color_frames("red", NUM_FRAMES)
    as_uint8 = PPLLaVAPreferenceCollator(processor)([{**row, "video": frames}])
    as_float = PPLLaVAPreferenceCollator(processor)([{**row, "video": (frames / 255.0).tolist()}])
    torch.testing.assert_close(as_float["pixel_values_videos"], as_uint8["pixel_values_videos"])
    assert float(as_float["pixel_values_videos"].std()) > 0
