"""Chat templates: the text of PPLLaVA's conversation templates (conv.py `plain_v1` / `plain_qwen`), and
`apply_chat_template(..., tokenize=True, return_dict=True)` giving model-ready inputs."""

import dataclasses

import numpy as np
import pytest
import torch
import transformers
from packaging import version
from PIL import Image
from video_test_files import write_video

from ppllava_hf import PPLLaVAForConditionalGeneration
from ppllava_hf.models.ppllava.processing_ppllava import (
    CHATML_CHAT_TEMPLATE,
    VICUNA_V1_CHAT_TEMPLATE,
    default_chat_template,
)
from ppllava_hf.testing.tiny import tiny_config, tiny_processor


def user(text, *media):
    return {"role": "user", "content": [*media, {"type": "text", "text": text}]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


VIDEO = {"type": "video", "path": "clip.mp4"}
IMAGE = {"type": "image", "path": "photo.png"}

# Expected texts, derived by hand from ppllava/conversation/conv.py: `conv.user_query(q, is_mm=True)` gives each media
# token of the query its "\n" (a query without one is prefixed with `<image>\n`); `get_prompt()` joins role + message +
# separator and, after a final user turn, appends the assistant role. Videos use `<video>` where the original reused
# `<image>`.
CASES = {
    "one turn": (
        [user("What happens in the video?", VIDEO)],
        "USER: <video>\nWhat happens in the video? ASSISTANT: ",
        "<|im_start|>user\n<video>\nWhat happens in the video?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "multi-turn": (
        [user("What happens?", VIDEO), assistant("A dog runs."), user("What color is it?")],
        "USER: <video>\nWhat happens? ASSISTANT: A dog runs.</s>USER: What color is it? ASSISTANT: ",
        "<|im_start|>user\n<video>\nWhat happens?<|im_end|>\n<|im_start|>assistant\nA dog runs.<|im_end|>\n"
        "<|im_start|>user\nWhat color is it?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "system (conv_vcg_*)": (
        [{"role": "system", "content": "You are Video-ChatGPT."}, user("Describe it.", VIDEO)],
        "You are Video-ChatGPT. USER: <video>\nDescribe it. ASSISTANT: ",
        "You are Video-ChatGPT.<|im_end|>\n<|im_start|>user\n<video>\nDescribe it.<|im_end|>\n<|im_start|>assistant\n",
    ),
    "two media (each <image> of the query becomes <image>\\n)": (
        [user("Compare them.", IMAGE, VIDEO)],
        "USER: <image>\n<video>\nCompare them. ASSISTANT: ",
        "<|im_start|>user\n<image>\n<video>\nCompare them.<|im_end|>\n<|im_start|>assistant\n",
    ),
    "string content": (
        [{"role": "user", "content": "Hello there"}],
        "USER: Hello there ASSISTANT: ",
        "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["vicuna", "qwen"])
def test_template_text_equals_the_original_conversation(layout, case):
    messages, vicuna_text, chatml_text = CASES[case]
    processor = tiny_processor(layout)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == (vicuna_text if layout == "vicuna" else chatml_text)


@pytest.mark.parametrize(
    "template, expected",
    [
        (VICUNA_V1_CHAT_TEMPLATE, "USER: <video>\nWhat happens? ASSISTANT: A dog runs.</s>"),
        (CHATML_CHAT_TEMPLATE, "<|im_start|>user\n<video>\nWhat happens?<|im_end|>\n<|im_start|>assistant\nA dog runs.<|im_end|>\n"),
    ],
)
def test_a_final_assistant_turn_is_closed_like_the_training_data(template, expected):
    processor = tiny_processor("vicuna")
    messages = [user("What happens?", VIDEO), assistant("A dog runs.")]
    assert processor.apply_chat_template(messages, chat_template=template) == expected


def test_default_template_follows_the_language_model():
    assert default_chat_template("llama") is VICUNA_V1_CHAT_TEMPLATE
    assert default_chat_template("qwen2") is CHATML_CHAT_TEMPLATE
    assert tiny_processor("vicuna").chat_template == VICUNA_V1_CHAT_TEMPLATE
    assert tiny_processor("qwen").chat_template == CHATML_CHAT_TEMPLATE


@pytest.mark.parametrize("layout", ["vicuna", "qwen"])
def test_tokenized_chat_gives_model_ready_tensors(layout, tmp_path):
    video = str(write_video(tmp_path / "clip.mp4", "libx264", 30))
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 120, 3), dtype=np.uint8)).save(image)
    messages = [
        user("What happens?", {"type": "video", "path": video}),
        assistant("A dog runs."),
        user("And what color is the car in this photo?", {"type": "image", "path": str(image)}),
    ]
    processor = tiny_processor(layout)
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, processor_kwargs={"num_frames": 4}
    )
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values_videos", "clip_input_ids",
                           "clip_attention_mask", "pixel_values", "image_sizes"}
    assert inputs["pixel_values_videos"].shape == (1, 4, 3, 84, 84)
    last_user_turn = processor.prompt_tokenizer(
        "And what color is the car in this photo?", padding="max_length", max_length=processor.prompt_max_length
    )
    assert inputs["clip_input_ids"][0].tolist() == last_user_turn["input_ids"]
    bos = processor.tokenizer.bos_token_id
    if layout == "vicuna":
        assert inputs["input_ids"][0, 0] == bos and (inputs["input_ids"] == bos).sum() == 1
    else:
        assert bos is None
    torch.manual_seed(0)
    model = PPLLaVAForConditionalGeneration(tiny_config(layout)).eval()
    with torch.no_grad():
        model(**inputs)


@pytest.mark.parametrize("layout, answer", [("vicuna", "A dog runs.</s>"), ("qwen", "A dog runs.<|im_end|>")])
def test_assistant_mask_covers_the_answer_and_its_separator(layout, answer):
    processor = tiny_processor(layout)
    messages = [user("What happens?", {"type": "video", "video": np.zeros((2, 8, 8, 3), np.uint8)}), assistant("A dog runs.")]
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    mask = torch.as_tensor(inputs["assistant_masks"][0]).bool()
    assert processor.decode(inputs["input_ids"][0][mask]).strip() == answer


@dataclasses.dataclass
class Message:
    role: str
    content: list


@pytest.mark.skipif(
    version.parse(transformers.__version__) < version.parse("5.24"),
    reason="transformers takes chat messages as objects with attributes from 5.24 on",
)
def test_message_objects_give_what_their_dicts_give_the_pooling_prompt_included():
    processor = tiny_processor("vicuna")
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    as_dicts = [user("Where does the ball go?", {"type": "video", "video": frames})]
    as_objects = [Message(message["role"], message["content"]) for message in as_dicts]
    expected, inputs = (
        processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        for messages in (as_dicts, as_objects)
    )
    for name in ("input_ids", "clip_input_ids", "clip_attention_mask"):
        torch.testing.assert_close(inputs[name], expected[name])
