"""The shipped training recipes at real sizes, row checks only (no model): with the max_length of examples/train_sft.py
and examples/train_dpo.py, a typical row of the released data (a 32-frame video and its chat text) is accepted by the
checks the trainers run before training, on processors with the real frame and pooling sizes (CLIP ViT-L/14-336:
24x24 patches, SigLIP so400m-384: 27x27; (2,3,3) windows) and the real chat templates (Vicuna v1, ChatML).

The text is counted with `character_tokenizer`, one token per character: Vicuna's and Qwen2's tokenizers need no more
for ASCII text (each of their tokens covers at least one character), so an accepted row is accepted by them too.
"""

import runpy
import sys
from pathlib import Path

import pytest
from video_test_files import write_video

from ppllava_hf import PPLLaVAProcessor
from ppllava_hf.testing.tiny import character_tokenizer, tiny_config, tiny_prompt_tokenizer
from ppllava_hf.training.dpo import check_preference_row
from ppllava_hf.training.rows import BadRowError
from ppllava_hf.training.sft import check_conversation_row, conversation_with_media


EXAMPLES = Path(__file__).parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))  # the examples import their shared training_script.py
# The vision towers of the published checkpoints, at their real input and patch sizes (small widths: no model is built).
REAL_VISION = {
    "vicuna": dict(model_type="clip_vision_model", projection_dim=40, image_size=336),
    "qwen": dict(model_type="siglip_vision_model", vision_use_head=False, image_size=384),
}
VISUAL_TOKENS = {"vicuna": 16 * 8 * 8, "qwen": 16 * 9 * 9}  # 32 frames: 16 temporal windows of 8x8 / 9x9 windows

# Rows shaped like the released data (llava_hound_300k's detailed video captions, sft_dpo_17k's preference pairs).
QUESTION = "Describe what happens in the video in detail, including the people, their actions and the setting."
CAPTION = (
    "The video opens in a bright kitchen where a man in a gray apron stands behind a wooden counter. He picks up a "
    "large knife, steadies an onion with his left hand and slices it into thin rings, pausing now and then to push the "
    "pieces aside. A woman in a red sweater enters from the left, places a basket of tomatoes on the counter and says "
    "something that makes him laugh. She rinses the tomatoes in the sink by the window while he moves on to a green "
    "pepper, cutting it in half and scraping out the seeds. Steam rises from a pot on the stove behind them, and at one "
    "point the man lifts the lid, stirs the contents with a wooden spoon and lowers the heat. The camera then shows a "
    "close view of the cutting board covered with chopped vegetables before the woman hands him a bowl. He slides the "
    "vegetables into it, wipes the board with a towel and the two of them carry the bowl to a table set for four, "
    "where a young girl is already waiting with a glass of juice. The video ends as they sit down together and the "
    "woman begins to serve the salad onto the plates."
)
PREFERENCE = {
    "prompt": "What does the man do after he finishes cutting the vegetables?",
    "chosen": (
        "After he finishes cutting the vegetables, the man slides them from the cutting board into a bowl that the "
        "woman hands him. He then wipes the board clean with a towel, and together they carry the bowl to the table, "
        "where a young girl is waiting, and sit down to eat."
    ),
    "rejected": (
        "After cutting the vegetables, the man puts the knife away, takes off his apron and leaves the kitchen through "
        "the back door, while the woman keeps cooking at the stove on her own."
    ),
}


def recipe(name: str) -> dict:
    return runpy.run_path(str(EXAMPLES / name))["RECIPE"]


def real_size_processor(layout: str, num_frames: int) -> PPLLaVAProcessor:
    tokenizer = character_tokenizer(layout)
    config = tiny_config(
        layout,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, patch_size=14,
            **REAL_VISION[layout],
        ),
    )
    prompt_tokenizer = tiny_prompt_tokenizer(layout, config.prompt_encoder_config.vocab_size)
    return PPLLaVAProcessor.from_config(config, tokenizer, prompt_tokenizer, num_frames=num_frames)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A 4-second clip at 30 fps (120 frames) the recipes sample 32 frames from."""
    return str(write_video(tmp_path_factory.mktemp("real_size") / "clip.mp4", "libx264", 120, rate=30))


def sft_row(video: str) -> dict:
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": CAPTION}]
    return {"messages": messages, "video": video}


@pytest.mark.parametrize("layout", ["vicuna", "qwen"])
def test_a_32_frame_video_is_as_many_tokens_as_the_real_checkpoints_give_it(layout):
    processor = real_size_processor(layout, recipe("train_sft.py")["num_frames"])
    assert processor.patch_grid == ((24, 24) if layout == "vicuna" else (27, 27))
    assert processor.num_video_tokens(32) == VISUAL_TOKENS[layout]


@pytest.mark.parametrize("layout", ["vicuna", "qwen"])
def test_the_sft_recipe_accepts_a_typical_32_frame_caption_row(layout, video):
    settings = recipe("train_sft.py")
    processor = real_size_processor(layout, settings["num_frames"])
    text = processor.apply_chat_template(conversation_with_media(sft_row(video)), tokenize=False)
    length = len(processor.tokenizer(text)["input_ids"]) - 1 + VISUAL_TOKENS[layout]  # the <video> becomes its tokens
    assert length < settings["max_length"] - 1000  # room for answers a thousand characters longer
    check_conversation_row(sft_row(video), processor, max_length=settings["max_length"])
    # The previous default, 1024, was the recipe's model_max_length, which the original never applied: it refused
    # every 32-frame row, whose video alone is 1024 tokens.
    with pytest.raises(BadRowError, match=f"needs {length} tokens"):
        check_conversation_row(sft_row(video), processor, max_length=1024)


def test_the_dpo_recipe_accepts_a_typical_32_frame_preference_pair(video):
    settings = recipe("train_dpo.py")
    processor = real_size_processor("vicuna", settings["num_frames"])
    row = {**PREFERENCE, "video": video}
    check_preference_row(row, processor, max_length=settings["max_length"])
    # Its max_length leaves the original's 2048 text tokens (which counted the video as one placeholder) to the text.
    assert settings["max_length"] - (VISUAL_TOKENS["vicuna"] - 1) >= 2048
