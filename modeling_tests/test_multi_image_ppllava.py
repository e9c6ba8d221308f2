"""Multi-image mode (the original's 'multi-image' media type): the images of a sample squashed to the tower's input and
encoded together as one clip, `multi_image=True` in the processor and the chat template, batches that mix it with
anyres images, and the processor's pixels against the original's (the model's outputs against the original's are in
test_conversion_ppllava)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tolerances import float32_forward
from transformers.image_utils import OPENAI_CLIP_STD

from ppllava_hf import PPLLaVAForConditionalGeneration
from ppllava_hf.testing.tiny import tiny_config, tiny_processor


FIXTURE_CASES = load_file(Path(__file__).parent / "fixtures" / "original_tiny_vicuna_multiimage" / "cases.safetensors")
QUESTION = "USER: {}What is different? ASSISTANT: "


@pytest.fixture(scope="module")
def processor():
    return tiny_processor("vicuna")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PPLLaVAForConditionalGeneration(tiny_config("vicuna")).eval()


def images(*sizes) -> list[Image.Image]:
    rng = np.random.default_rng(len(sizes))
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for height, width in sizes]


def fixture_image(name: str) -> Image.Image:
    return Image.fromarray(FIXTURE_CASES[name].permute(1, 2, 0).numpy())


def prompt(num_images: int) -> str:
    return QUESTION.format("<image>\n" * num_images)


# ----------------------------------------------------------------------------------------------------------------------
# Processor


def test_each_placeholder_of_a_multi_image_sample_expands_to_one_pooled_tile(processor):
    inputs = processor(text=prompt(3), images=images((60, 100), (84, 84), (130, 50)), multi_image=True)
    assert processor.num_multi_image_tokens() == 4  # 6x6 patches, (1, 3, 3) windows, no image_newline
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 3 * 4
    assert [tuple(group.shape) for group in inputs["pixel_values_multi_image"]] == [(3, 3, 84, 84)]
    assert inputs["multi_image"].tolist() == [True]
    assert "pixel_values" not in inputs


def test_multi_image_pixels_are_the_originals_video_processor_squash(processor):
    """The original reads a multi-image sample with its video processor: every image squashed (PIL bicubic) to the
    tower's input. Ours resizes as our video processor does frames (antialiased bicubic, within a few intensity levels
    of PIL's on these white-noise images)."""
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1) * 255
    for reference, names in [
        ("multi_image_3.processor_pixel_values", [f"multi_image_3.raw_image.{i}" for i in range(3)]),
        ("multi_image_2_batch.processor_pixel_values.1", [f"multi_image_2_batch.raw_image.1.{i}" for i in range(4)]),
    ]:
        inputs = processor(text=prompt(len(names)), images=[fixture_image(name) for name in names], multi_image=True)
        levels = ((inputs["pixel_values_multi_image"][0] - FIXTURE_CASES[reference][:, 0]) * std).abs()
        assert levels.mean() < 1.0
        assert levels.max() <= 20


@pytest.mark.parametrize("sample, tokens", [(0, 16), (1, 14)])
def test_odd_aspect_images_get_the_originals_tiles_and_token_count(processor, sample, tokens):
    """200x135 and 147x196 images: the unpadded grid keeps 2 columns / 2 rows (the original truncates), not 4."""
    inputs = processor(text=QUESTION.format("<image>\n"), images=fixture_image(f"image_odd_aspect.raw_image.{sample}"))
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == tokens
    reference = FIXTURE_CASES[f"image_odd_aspect.processor_pixel_values.{sample}"]
    torch.testing.assert_close(inputs["pixel_values"], reference, rtol=0, atol=1e-6)


def test_a_batch_mixes_multi_image_and_anyres_samples_per_sample(processor):
    inputs = processor(
        text=[prompt(2), prompt(1), "USER: No image here. ASSISTANT: "],
        images=[images((70, 90), (120, 60)), images((100, 180)), []],
        multi_image=[True, False, True],
        padding_side="left",
    )
    assert inputs["multi_image"].tolist() == [True, False, True]
    assert [tuple(group.shape) for group in inputs["pixel_values_multi_image"]] == [(2, 3, 84, 84)]
    assert tuple(inputs["image_sizes"].tolist()[0]) == (100, 180)
    counts = (inputs["input_ids"] == processor.image_token_id).sum(-1).tolist()
    assert counts == [2 * 4, processor.num_image_tokens((100, 180)), 0]


def test_a_wrong_image_count_is_reported_with_multi_image(processor):
    with pytest.raises(ValueError, match="the text has 2 <image> placeholder"):
        processor(text=prompt(2), images=images((84, 84)), multi_image=True)


@pytest.mark.parametrize("multi_image", [True, False])
def test_an_empty_image_list_is_a_text_only_sample_the_model_answers(processor, model, multi_image):
    text = "USER: What is in the picture? ASSISTANT: "
    inputs = processor(text=text, images=[], multi_image=multi_image)
    text_only = processor(text=text)
    assert sorted(inputs) == sorted(text_only)
    with torch.no_grad():
        logits = model(**inputs).logits
        torch.testing.assert_close(logits, model(**text_only).logits)


def test_the_model_reads_an_empty_list_of_multi_image_groups_as_none(processor, model):
    inputs = processor(text="USER: What is in the picture? ASSISTANT: ")
    with torch.no_grad():
        logits = model(**inputs, pixel_values_multi_image=[], multi_image=torch.tensor([True])).logits
        torch.testing.assert_close(logits, model(**inputs).logits)


@pytest.mark.parametrize("flag, grouped", [("false", False), ("True", True), (False, False), (np.bool_(True), True)])
def test_the_multi_image_switch_takes_bools_and_the_strings_true_and_false(processor, flag, grouped):
    inputs = processor(text=prompt(1), images=images((84, 84)), multi_image=flag)
    assert ("pixel_values_multi_image" in inputs) == grouped


@pytest.mark.parametrize("flag", ["yes", "0", 1, None, [True, "no"]])
def test_a_multi_image_switch_that_is_not_true_or_false_is_refused(processor, flag):
    with pytest.raises(ValueError, match=r"multi_image must be True or False \(or the string 'true' / 'false'\), got"):
        processor(text=[prompt(1), prompt(1)], images=[images((84, 84)), images((84, 84))], multi_image=flag)


# ----------------------------------------------------------------------------------------------------------------------
# Chat template


def conversation(num_images: int) -> list[dict]:
    blocks = [{"type": "image", "image": image} for image in images(*[(84, 84)] * num_images)]
    return [{"role": "user", "content": [*blocks, {"type": "text", "text": "What is different?"}]}]


def test_the_chat_template_gives_each_image_its_newline_as_the_original_multi_image_data_has_it(processor):
    """The original's multi-image data has `<image>\\n` per image (`user_query` turns each `<image>` into `<image>\\n`)."""
    text = processor.apply_chat_template(conversation(3), add_generation_prompt=True, multi_image=True)
    assert text == "USER: <image>\n<image>\n<image>\nWhat is different? ASSISTANT: "
    assert processor.apply_chat_template(conversation(3), add_generation_prompt=True) == text


def test_apply_chat_template_with_multi_image_gives_model_ready_inputs(processor, model):
    inputs = processor.apply_chat_template(
        conversation(2), add_generation_prompt=True, tokenize=True, return_dict=True, multi_image=True
    )
    assert inputs["multi_image"].tolist() == [True]
    assert [tuple(group.shape) for group in inputs["pixel_values_multi_image"]] == [(2, 3, 84, 84)]
    with torch.no_grad():
        assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_apply_chat_template_takes_one_multi_image_switch_per_conversation(processor):
    inputs = processor.apply_chat_template(
        [conversation(2), conversation(1)], tokenize=True, return_dict=True, multi_image=[True, False],
        processor_kwargs={"padding_side": "left"},
    )
    assert inputs["multi_image"].tolist() == [True, False]
    assert [tuple(group.shape) for group in inputs["pixel_values_multi_image"]] == [(2, 3, 84, 84)]
    assert inputs["image_sizes"].tolist() == [[84, 84]]


# ----------------------------------------------------------------------------------------------------------------------
# Model


def test_the_images_of_a_group_are_encoded_together_in_order(model):
    """One clip: the BT-Adapter attends across the images and the relevance is one softmax over all their patches, so
    an image's tokens depend on the other images and on its place among them."""
    prompt_ids = torch.tensor([[126, 20, 21, 127]])
    first, second = torch.randn(2, 1, 3, 84, 84, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pair = model.get_multi_image_features([torch.cat([first, second])], clip_input_ids=prompt_ids)
        alone = model.get_multi_image_features([first], clip_input_ids=prompt_ids)
        swapped = model.get_multi_image_features([torch.cat([second, first])], clip_input_ids=prompt_ids)
    per_image = model.model.num_multi_image_tokens()
    assert pair.pooler_output[0].shape == (2 * per_image, 64)
    assert pair.relevance[0].shape == (2, 6, 6)
    torch.testing.assert_close(pair.relevance[0].sum(), torch.tensor(1.0))
    assert not torch.allclose(pair.pooler_output[0][:per_image], alone.pooler_output[0], atol=1e-4)
    assert not torch.allclose(pair.pooler_output[0][:per_image], swapped.pooler_output[0][per_image:], atol=1e-4)


def test_each_sample_of_a_mixed_batch_gives_its_logits_alone(processor, model):
    texts = [prompt(2), prompt(4), prompt(1)]
    pictures = [images((70, 90), (120, 60)), images((84, 84), (50, 140), (100, 100), (90, 40)), images((100, 180))]
    flags = [True, True, False]
    batch = processor(text=texts, images=pictures, multi_image=flags, padding_side="left")
    with torch.no_grad():
        batch_logits = model(**batch).logits
        for index, (text, sample_images, flag) in enumerate(zip(texts, pictures, flags)):
            alone = processor(text=text, images=sample_images, multi_image=flag)
            logits = model(**alone).logits[0]
            attended = batch["attention_mask"][index].bool()
            torch.testing.assert_close(batch_logits[index][attended], logits, **float32_forward(logits))


def test_generate_encodes_the_groups_once_and_continues_the_forward(processor, model):
    inputs = processor(
        text=[prompt(3), prompt(1)],
        images=[images((60, 100), (84, 84), (130, 50)), images((100, 180))],
        multi_image=[True, False],
        padding_side="left",
    )
    with torch.no_grad():
        next_tokens = model(**inputs).logits[:, -1].argmax(-1)
        generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert generated[:, inputs["input_ids"].shape[1]].tolist() == next_tokens.tolist()


def test_groups_and_anyres_images_together_need_the_per_sample_switch(processor, model):
    inputs = processor(text=[prompt(2), prompt(1)], images=[images((70, 90), (120, 60)), images((100, 180))],
                       multi_image=[True, False])
    inputs.pop("multi_image")
    with pytest.raises(ValueError, match="pass multi_image"):
        model(**inputs)


def test_a_group_that_does_not_fill_its_placeholders_is_refused(processor, model):
    inputs = processor(text=prompt(3), images=images((60, 100), (84, 84), (130, 50)), multi_image=True)
    inputs["pixel_values_multi_image"] = [inputs["pixel_values_multi_image"][0][:2]]
    with pytest.raises(ValueError, match="the text has 12 multi-image group tokens but the 1 multi-image group"):
        model(**inputs)


def test_the_siglip_layout_letterboxes_and_encodes_multi_image_samples():
    config = tiny_config("qwen")
    siglip_processor = tiny_processor(config)
    torch.manual_seed(0)
    siglip_model = PPLLaVAForConditionalGeneration(config).eval()
    text = "<|im_start|>user\n<image>\n<image>\nWhat is different?<|im_end|>\n<|im_start|>assistant\n"
    inputs = siglip_processor(text=text, images=images((40, 84), (84, 84)), multi_image=True)
    first = inputs["pixel_values_multi_image"][0][0]
    assert torch.equal(first[:, 0], torch.full_like(first[:, 0], -1.0))  # black bar: (0 - 0.5) / 0.5
    with torch.no_grad():
        output = siglip_model(**inputs)
    assert output.image_hidden_states.shape == (2 * siglip_processor.num_multi_image_tokens(), 64)


def test_a_mixed_batch_gives_tokens_in_placeholder_order_and_the_tower_outputs_of_each_kind(processor, model):
    inputs = processor(
        text=[prompt(2), prompt(1)], images=[images((70, 90), (120, 60)), images((100, 180))], multi_image=[True, False]
    )
    with torch.no_grad():
        encoded = model(**inputs, output_hidden_states=True).image_outputs
        anyres = model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], clip_input_ids=inputs["clip_input_ids"][1:],
            clip_attention_mask=inputs["clip_attention_mask"][1:], output_hidden_states=True,
        )
    assert [len(tokens) for tokens in encoded.pooler_output] == [2 * 4, processor.num_image_tokens((100, 180))]
    torch.testing.assert_close(encoded.pooler_output[1], anyres.pooler_output[0])
    assert encoded.last_hidden_state.shape[0] == anyres.last_hidden_state.shape[0] + 2  # its tiles, then 2 images
    assert len(encoded.hidden_states) == len(anyres.hidden_states)
