"""PPLLaVAProcessor: placeholder expansion equal to the model's token counts, pooling prompts, batches, bad inputs, and
save/load. The tiny models of both layouts run on the processor's output."""

import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor
from transformers.models.auto.video_processing_auto import AutoVideoProcessor
from video_test_files import write_video

from ppllava_hf import (
    PPLLaVAConfig,
    PPLLaVAForConditionalGeneration,
    PPLLaVAProcessor,
    PPLLaVAVideoProcessor,
    VideoDecodingError,
    sample_frame_indices,
)
from ppllava_hf.testing.tiny import tiny_config, tiny_processor, tiny_prompt_tokenizer, tiny_tokenizer


LAYOUTS = ["vicuna", "qwen"]
MODEL_INPUTS = {"input_ids", "attention_mask", "pixel_values_videos", "clip_input_ids", "clip_attention_mask"}
PROMPT = {"vicuna": "USER: {}\nWhat happens in the video? ASSISTANT: ", "qwen": "<|im_start|>user\n{}\nWhat happens in the video?<|im_end|>\n<|im_start|>assistant\n"}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return {
        "mp4": str(write_video(folder / "clip.mp4", "libx264", 40)),
        "webm": str(write_video(folder / "clip.webm", "libvpx-vp9", 30)),
    }


def tiny_model(config):
    torch.manual_seed(0)
    return PPLLaVAForConditionalGeneration(config).eval()


def frames(count: int, height: int = 40, width: int = 50) -> np.ndarray:
    return np.random.default_rng(count).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def decode_prompt(processor, row) -> str:
    return processor.prompt_tokenizer.decode(row, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------------------------
# Placeholder expansion == the model's token counts


def test_32_frames_of_24x24_patches_with_the_233_kernel_expand_to_1024_tokens():
    # The default (CLIP ViT-L/14-336) sizes, with the vocabulary of the tiny prompt tokenizer.
    prompt_encoder_config = {**PPLLaVAConfig().prompt_encoder_config.to_dict(), "vocab_size": 128, "eos_token_id": 2}
    config = PPLLaVAConfig(image_token_id=300, video_token_id=301, prompt_encoder_config=prompt_encoder_config)
    processor = PPLLaVAProcessor.from_config(config, tiny_tokenizer("vicuna"), tiny_prompt_tokenizer("vicuna"))
    assert processor.patch_grid == (24, 24)
    assert processor.num_video_tokens(32) == 1024
    assert processor.num_video_tokens(32, max_visual_tokens=512) == 512


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "overrides, call_kwargs",
    [
        ({}, {}),
        ({"video_pooling_output_size": [3, 2, 2], "image_pooling_output_size": [1, 3, 3]}, {}),
        ({"video_pooling_kernel": [1, 2, 2], "video_pooling_stride": [1, 2, 2], "image_pooling_kernel": [1, 2, 2],
          "image_pooling_stride": [1, 2, 2]}, {}),
        ({}, {"max_visual_tokens": 8}),
    ],
    ids=["default", "output sizes", "kernel 2x2", "token budget"],
)
def test_every_placeholder_expands_to_the_model_token_count(layout, overrides, call_kwargs, clips):
    config = tiny_config(layout, **overrides)
    processor = tiny_processor(config)
    model = tiny_model(config)
    videos = [frames(1), frames(3), clips["mp4"], frames(13, 30, 90)]
    images = [Image.new("RGB", size) for size in [(40, 40), (200, 90), (90, 260)]]
    text = [
        PROMPT[layout].format("<video><image>"),
        PROMPT[layout].format("<video><video> and <image><image>") + " <video>",
    ]
    inputs = processor(text=text, videos=videos, images=images, **call_kwargs)
    budget = call_kwargs.get("max_visual_tokens")

    lengths = [len(video) for video in inputs["pixel_values_videos"]]
    assert lengths == [1, 3, 8, 13]
    video_counts = [processor.num_video_tokens(n, budget) for n in lengths]
    assert video_counts == [model.model.video_pooling_plan(n, budget).num_tokens for n in lengths]
    image_counts = [processor.num_image_tokens(tuple(size)) for size in inputs["image_sizes"].tolist()]
    assert image_counts == [model.model.num_image_tokens(tuple(size)) for size in inputs["image_sizes"].tolist()]
    assert (inputs["input_ids"] == config.video_token_id).sum(-1).tolist() == [video_counts[0], sum(video_counts[1:])]
    assert (inputs["input_ids"] == config.image_token_id).sum(-1).tolist() == [image_counts[0], sum(image_counts[1:])]

    with torch.no_grad():
        output = model(**inputs, max_visual_tokens=budget)
    assert output.video_hidden_states.shape[0] == sum(video_counts)
    assert output.image_hidden_states.shape[0] == sum(image_counts)


# ----------------------------------------------------------------------------------------------------------------------
# transformers' token-count hook (what vLLM's Transformers backend asks before processing)


def expansion_counts(inputs, config) -> tuple[list[int], list[int]]:
    """Video and image tokens in each row of `input_ids`."""
    ids = inputs["input_ids"]
    return (ids == config.video_token_id).sum(-1).tolist(), (ids == config.image_token_id).sum(-1).tolist()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("call_kwargs", [{}, {"max_visual_tokens": 8}], ids=["no budget", "token budget"])
def test_video_token_counts_by_size_are_what_each_video_expands_to(layout, call_kwargs):
    config = tiny_config(layout)
    processor = tiny_processor(config)
    videos = [frames(1), frames(3), frames(13, 30, 90)]
    counts = processor._get_num_multimodal_tokens(video_sizes=[video.shape[:3] for video in videos], **call_kwargs)
    for video, expected in zip(videos, counts.num_video_tokens):
        inputs = processor(text=PROMPT[layout].format("<video>"), videos=[video], **call_kwargs)
        assert expansion_counts(inputs, config)[0] == [expected]
    assert "num_image_tokens" not in counts


def test_video_token_counts_follow_the_sampler_when_frames_are_sampled():
    config = tiny_config("vicuna")
    processor = tiny_processor(config)
    video = frames(13)
    for options in ({"do_sample_frames": True}, {"do_sample_frames": True, "num_frames": 4}):
        counts = processor._get_num_multimodal_tokens(video_sizes=[video.shape[:3]], **options)
        inputs = processor(text=PROMPT["vicuna"].format("<video>"), videos=[video], **options)
        assert expansion_counts(inputs, config)[0] == counts.num_video_tokens
    assert counts.num_video_tokens == [processor.num_video_tokens(4)]


def test_counting_the_tokens_of_a_video_sampled_by_fps_is_refused_with_the_fix():
    processor = tiny_processor("vicuna")
    with pytest.raises(ValueError, match="needs the video's frame rate.*pass num_frames"):
        processor._get_num_multimodal_tokens(video_sizes=[(13, 40, 50)], do_sample_frames=True, fps=2.0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_image_token_counts_by_size_are_what_each_image_expands_to(layout):
    config = tiny_config(layout)
    processor = tiny_processor(config)
    sizes = [(40, 40), (90, 200), (260, 90)]  # (height, width)
    counts = processor._get_num_multimodal_tokens(image_sizes=sizes)
    assert counts.num_image_patches == [1, 1, 1]
    for (height, width), expected in zip(sizes, counts.num_image_tokens):
        inputs = processor(text=PROMPT[layout].format("<image>"), images=[Image.new("RGB", (width, height))])
        assert expansion_counts(inputs, config)[1] == [expected]


def test_image_token_counts_in_multi_image_mode_are_the_multi_image_expansion():
    config = tiny_config("vicuna")
    processor = tiny_processor(config)
    sizes = [(40, 40), (90, 200)]
    counts = processor._get_num_multimodal_tokens(image_sizes=sizes, multi_image=True)
    images = [Image.new("RGB", (width, height)) for height, width in sizes]
    inputs = processor(text=PROMPT["vicuna"].format("<image><image>"), images=[images], multi_image=True)
    assert expansion_counts(inputs, config)[1] == [sum(counts.num_image_tokens)]
    assert counts.num_image_tokens == [processor.num_multi_image_tokens()] * 2
    with pytest.raises(ValueError, match="one bool for all the images"):
        processor._get_num_multimodal_tokens(image_sizes=sizes, multi_image=[True, False])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_outputs_are_exactly_the_model_inputs(layout, clips):
    processor = tiny_processor(layout)
    inputs = processor(text=PROMPT[layout].format("<video>"), videos=clips["webm"])
    assert set(inputs) == MODEL_INPUTS
    assert inputs["pixel_values_videos"].shape == (1, 8, 3, 84, 84)
    with_metadata = processor(text=PROMPT[layout].format("<video>"), videos=clips["webm"], return_metadata=True)
    assert set(with_metadata) == MODEL_INPUTS | {"video_metadata"}
    assert with_metadata["video_metadata"][0].frames_indices == sample_frame_indices(30, 8)
    with torch.no_grad():
        tiny_model(tiny_config(layout))(**inputs)


def test_generation_from_a_left_padded_batch_with_different_videos_per_sample(clips):
    processor = tiny_processor("vicuna")
    assert processor.tokenizer.padding_side == "left"
    inputs = processor(
        text=[PROMPT["vicuna"].format("<video>"), "USER: <video> <video>\nCompare the two clips in detail. ASSISTANT: "],
        videos=[clips["mp4"], frames(2), clips["webm"]],
    )
    assert isinstance(inputs["pixel_values_videos"], list)
    assert inputs["attention_mask"][0, 0] == 0 and inputs["attention_mask"][:, -1].all()
    output = tiny_model(tiny_config("vicuna")).generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output.shape == (2, inputs["input_ids"].shape[1] + 3)


def test_a_video_given_as_frame_image_files_in_a_chat_is_one_video(tmp_path):
    """As transformers' chat-template tests pass it: `{"type": "video", "path": [frame files]}`."""
    paths = []
    for index, frame in enumerate(frames(5)):
        paths.append(str(tmp_path / f"frame{index}.png"))
        Image.fromarray(frame).save(paths[-1])
    processor = tiny_processor("vicuna")
    messages = [{"role": "user", "content": [{"type": "video", "path": paths}, {"type": "text", "text": "What happens?"}]}]

    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    from_arrays = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True), videos=[frames(5)],
                            pooling_prompt="What happens?")

    assert inputs["pixel_values_videos"].shape == (1, 5, 3, 84, 84)
    torch.testing.assert_close(inputs["pixel_values_videos"], from_arrays["pixel_values_videos"])
    assert (inputs["input_ids"] == processor.video_token_id).sum() == processor.num_video_tokens(5)


@pytest.mark.parametrize("return_tensors, array_type", [("pt", torch.Tensor), ("np", np.ndarray)])
def test_every_output_has_the_requested_tensor_type(return_tensors, array_type, clips):
    processor = tiny_processor("vicuna")
    same_length = processor(text="USER: <video>\nWhat? ASSISTANT: ", videos=clips["mp4"], return_tensors=return_tensors)
    mixed = processor(text="USER: <video><video><image>\nWhat? ASSISTANT: ", videos=[clips["mp4"], frames(2)],
                      images=Image.new("RGB", (120, 60)), return_tensors=return_tensors)
    for name in ("input_ids", "attention_mask", "clip_input_ids", "clip_attention_mask", "pixel_values_videos"):
        assert isinstance(same_length[name], array_type), name
    assert isinstance(mixed["pixel_values_videos"], list)  # different frame counts: one array per video
    assert all(isinstance(video, array_type) for video in mixed["pixel_values_videos"])
    for name in ("input_ids", "clip_input_ids", "pixel_values", "image_sizes"):
        assert isinstance(mixed[name], array_type), name


def test_padding_side_is_configurable_per_call():
    processor = tiny_processor("qwen")
    inputs = processor(text=["a <video>", "a much longer prompt with a <video> inside"], videos=[frames(2), frames(2)],
                       padding_side="left")
    assert inputs["attention_mask"][0, 0] == 0 and inputs["attention_mask"][0, -1] == 1
    inputs = processor(text=["a <video>", "a much longer prompt with a <video> inside"], videos=[frames(2), frames(2)],
                       padding_side="right")
    assert inputs["attention_mask"][0, 0] == 1 and inputs["attention_mask"][0, -1] == 0


# ----------------------------------------------------------------------------------------------------------------------
# Pooling prompt


def test_pooling_prompt_precedence_explicit_then_chat_then_cleaned_text():
    processor = tiny_processor("vicuna")
    text = ["USER: <video>\nWhat color is the car? ASSISTANT: ", "USER: <video>\nWhere is the cat? ASSISTANT: "]
    videos = [frames(2), frames(2)]
    cleaned = processor(text=text, videos=videos)
    assert [decode_prompt(processor, row) for row in cleaned["clip_input_ids"]] == [
        "what color is the car ?", "where is the cat ?"
    ]
    from_chat = processor(text=text, videos=videos, chat_pooling_prompt=["the boy", "the dog"])
    assert [decode_prompt(processor, row) for row in from_chat["clip_input_ids"]] == ["the boy", "the dog"]
    explicit = processor(text=text, videos=videos, chat_pooling_prompt=["the boy", "the dog"], pooling_prompt=["a bird", None])
    assert [decode_prompt(processor, row) for row in explicit["clip_input_ids"]] == ["a bird", "the dog"]
    shared = processor(text=text, videos=videos, pooling_prompt="the lake")
    assert [decode_prompt(processor, row) for row in shared["clip_input_ids"]] == ["the lake", "the lake"]


def test_chat_markup_and_special_tokens_are_removed_from_the_fallback_prompt():
    processor = tiny_processor("qwen")
    text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<video><image>\nWhy does she laugh?<|im_end|>\n"
    assert processor.clean_prompt_text(text) == "Be brief. Why does she laugh?"


def test_text_only_samples_get_a_prompt_row_too():
    processor = tiny_processor("vicuna")
    inputs = processor(text=["USER: <video>\nDescribe the video. ASSISTANT: ", "USER: How are you? ASSISTANT: "],
                       videos=[frames(2)])
    assert inputs["clip_input_ids"].shape == (2, 248)
    assert decode_prompt(processor, inputs["clip_input_ids"][1]) == "how are you ?"


def test_clip_prompts_are_padded_with_endoftext_and_masked():
    processor = tiny_processor("vicuna")
    inputs = processor(text="USER: <video>\nWhat happens? ASSISTANT: ", videos=[frames(2)])
    ids, mask = inputs["clip_input_ids"][0], inputs["clip_attention_mask"][0]
    tokenizer = processor.prompt_tokenizer
    length = int(mask.sum())
    assert ids[0] == tokenizer.bos_token_id == 126 and ids[length - 1] == tokenizer.eos_token_id == 127
    assert ids[length:].eq(127).all() and mask[length:].eq(0).all()
    assert int(ids.argmax()) == length - 1  # where the CLIP text model (eos_token_id=2 legacy) pools


def test_siglip_prompts_attend_to_their_padding_as_in_the_original():
    processor = tiny_processor("qwen")
    inputs = processor(text="<video>\nWhat happens?", videos=[frames(2)])
    assert inputs["clip_input_ids"].shape == (1, 196)
    assert inputs["clip_attention_mask"].eq(1).all()
    assert inputs["clip_input_ids"][0, -1] == processor.prompt_tokenizer.eos_token_id


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_long_prompt_is_truncated_to_the_prompt_encoder_with_a_warning(layout, caplog):
    processor = tiny_processor(layout)
    question = "why does the woman laugh at the end " * 40
    with caplog.at_level(logging.WARNING):
        inputs = processor(text=f"<video>\n{question}", videos=[frames(2)])
    assert "truncated to the prompt encoder's" in caplog.text
    assert inputs["clip_input_ids"].shape[1] == processor.prompt_max_length
    assert inputs["clip_input_ids"][0, -1] == processor.prompt_tokenizer.eos_token_id


# ----------------------------------------------------------------------------------------------------------------------
# Options


def test_timestamps_can_be_written_after_each_video(clips):
    processor = tiny_processor("vicuna")
    inputs = processor(text="USER: <video>\nWhen? ASSISTANT: ", videos=clips["mp4"], num_frames=2, add_timestamps=True,
                       return_metadata=True)
    text = processor.decode(inputs["input_ids"][0], skip_special_tokens=True)
    assert "The video contains 2 frames sampled at 0.4, 1.2 seconds." in text
    assert inputs["video_metadata"][0].timestamps == pytest.approx([0.36, 1.16])  # frames 9 and 29 at 25 fps
    plain = processor(text="USER: <video>\nWhen? ASSISTANT: ", videos=clips["mp4"], num_frames=2)
    assert "sampled at" not in processor.decode(plain["input_ids"][0])


def test_timestamps_of_frame_arrays_need_their_fps():
    processor = tiny_processor("vicuna")
    with pytest.raises(ValueError, match="frame rate"):
        processor(text="<video> When?", videos=[frames(2)], add_timestamps=True)
    inputs = processor(text="<video> When?", videos=[frames(2)], add_timestamps=True, video_metadata=[{"fps": 2.0}])
    assert "sampled at 0.0, 0.5 seconds" in processor.decode(inputs["input_ids"][0])


@pytest.mark.parametrize("flag, written", [("false", False), ("TRUE", True)])
def test_add_timestamps_reads_the_strings_true_and_false(flag, written):
    processor = tiny_processor("vicuna")
    inputs = processor(text="<video> When?", videos=[frames(2)], add_timestamps=flag, video_metadata=[{"fps": 2.0}])
    assert ("sampled at" in processor.decode(inputs["input_ids"][0])) == written


def test_an_add_timestamps_that_is_not_true_or_false_is_refused():
    processor = tiny_processor("vicuna")
    with pytest.raises(ValueError, match="add_timestamps must be True or False .* got 'no'"):
        processor(text="<video> When?", videos=[frames(2)], add_timestamps="no", video_metadata=[{"fps": 2.0}])


def test_num_frames_and_fps_per_call(clips):
    processor = tiny_processor("qwen")
    assert processor(text="<video> hi", videos=clips["mp4"], num_frames=5)["pixel_values_videos"].shape[1] == 5
    assert processor(text="<video> hi", videos=clips["mp4"], fps=2.0)["pixel_values_videos"].shape[1] == 3


# ----------------------------------------------------------------------------------------------------------------------
# Bad inputs: ValueErrors that name the problem and the fix, before any model work


@pytest.mark.parametrize(
    "text, videos, images, message",
    [
        ("<video> <video> what?", [frames(2)], None, r"1 video\(s\) but the text has 2 <video>"),
        ("<video> what?", [frames(2), frames(2)], None, r"2 video\(s\) but the text has 1 <video>"),
        ("What happens?", [frames(2)], None, r"Put one <video> in the text"),
        ("<video> what?", None, None, r"0 video\(s\) but the text has 1"),
        ("<image> what?", None, [Image.new("RGB", (9, 9))] * 2, r"2 image\(s\) but the text has 1 <image>"),
        ("   ", None, None, "Text sample 0 is empty"),
        (None, [frames(2)], None, "needs `text`"),
        ("USER: <video>\n ASSISTANT: ", [frames(2)], None, "empty pooling prompt"),
        ("<video> what?", ["/no/such/video.mp4"], None, "not found"),
    ],
)
def test_bad_inputs_are_value_errors_with_the_fix(text, videos, images, message):
    processor = tiny_processor("vicuna")
    with pytest.raises(ValueError, match=message):
        processor(text=text, videos=videos, images=images)


def test_a_missing_file_is_a_video_decoding_error():
    with pytest.raises(VideoDecodingError):
        tiny_processor("qwen")(text="<video> hi", videos="missing.mp4")


def test_max_length_never_cuts_through_a_visual_span():
    processor = tiny_processor("vicuna")
    text = "USER: <video>\nWhat happens in the video? ASSISTANT: "
    full = processor(text=text, videos=[frames(8)])["input_ids"].shape[1]
    with pytest.raises(ValueError, match="Mismatch in `video` token count.*increase `max_length`"):
        processor(text=text, videos=[frames(8)], truncation=True, max_length=10)
    kept = processor(text=text, videos=[frames(8)], truncation=True, max_length=full - 3)
    assert (kept["input_ids"] == processor.video_token_id).sum() == processor.num_video_tokens(8)


# ----------------------------------------------------------------------------------------------------------------------
# Save / load and consistency with the config


@pytest.mark.parametrize("layout", LAYOUTS)
def test_save_and_load_through_auto_processor(layout, tmp_path, clips):
    config = tiny_config(layout, video_pooling_output_size=[2, 3, 3], max_visual_tokens=12)
    processor = tiny_processor(config, num_frames=6)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "prompt_tokenizer" / "tokenizer.json").is_file()
    assert (tmp_path / "chat_template.jinja").is_file()

    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is PPLLaVAProcessor
    assert type(AutoVideoProcessor.from_pretrained(tmp_path)) is PPLLaVAVideoProcessor
    loaded.check_config(config)
    for name in ("video_pooling_output_size", "max_visual_tokens", "prompt_max_length", "mask_prompt_padding", "patch_grid"):
        assert getattr(loaded, name) == getattr(processor, name)
    assert loaded.video_processor.to_dict() == processor.video_processor.to_dict()
    assert loaded.chat_template == processor.chat_template
    text = PROMPT[layout].format("<video><image>")
    before = processor(text=text, videos=clips["mp4"], images=Image.new("RGB", (120, 60)))
    after = loaded(text=text, videos=clips["mp4"], images=Image.new("RGB", (120, 60)))
    assert set(before) == set(after)
    for key in before:
        torch.testing.assert_close(before[key], after[key])


def test_a_folder_without_its_prompt_tokenizer_is_refused_on_load(tmp_path):
    """transformers falls back to the root folder's (LLM) tokenizer when `prompt_tokenizer/` is missing; its ids would
    index the prompt encoder's embeddings and silently pool wrongly."""
    tiny_processor("vicuna").save_pretrained(tmp_path)
    shutil.rmtree(tmp_path / "prompt_tokenizer")
    with pytest.raises(ValueError, match="is the LLM tokenizer: the folder has no prompt_tokenizer/ subfolder"):
        AutoProcessor.from_pretrained(tmp_path)


def test_a_processor_folder_is_checked_against_the_model_config_beside_it_on_load(tmp_path):
    tiny_processor("vicuna").save_pretrained(tmp_path)
    tiny_config("vicuna", video_pooling_output_size=[2, 2, 2]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"does not match the model config: video_pooling_output_size"):
        AutoProcessor.from_pretrained(tmp_path)


def test_a_prompt_tokenizer_that_is_not_the_prompt_encoders_is_refused():
    """The LLM tokenizer fits inside a larger CLIP vocabulary (32,000 < 49,408), but CLIP pools at its end-of-text
    token, which the LLM tokenizer does not end prompts with."""
    config = tiny_config("vicuna", prompt_vocab_size=512)
    with pytest.raises(ValueError, match=r"the prompt tokenizer ends a prompt with id 2, but the CLIP prompt encoder pools"):
        PPLLaVAProcessor.from_config(config, tiny_tokenizer("vicuna"), tiny_tokenizer("vicuna"))


def test_a_processor_that_disagrees_with_the_config_is_refused():
    processor = tiny_processor("vicuna")
    with pytest.raises(ValueError, match="video_token_id=299"):
        processor.check_config(tiny_config("vicuna", video_token_id=299))
    with pytest.raises(ValueError, match="video_pooling_output_size"):
        processor.check_config(tiny_config("vicuna", video_pooling_output_size=[2, 2, 2]))
    with pytest.raises(ValueError, match="has no '<image>' token"):
        PPLLaVAProcessor(processor.image_processor, processor.video_processor, processor.prompt_tokenizer,
                         processor.prompt_tokenizer)
