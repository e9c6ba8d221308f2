"""PPLLaVAModel and PPLLaVAForConditionalGeneration on tiny random models of both layouts.

`vicuna`: CLIP + BT-Adapter + Llama. `qwen`: SigLIP + Qwen2, no BT-Adapter.
"""

import copy
import inspect
import math

import pytest
import torch
from model_tester import PPLLaVAModelTester, record_calls, record_pooling_windows
from safetensors.torch import load_file, save_file
from tolerances import float32_forward
from training_tester import needs_training_release
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    LogitsProcessor,
    LogitsProcessorList,
    StaticCache,
)

import ppllava_hf  # noqa: F401  (registers the Auto classes)
from ppllava_hf import PPLLaVAConfig, PPLLaVAForConditionalGeneration, PPLLaVAModel


LAYOUTS = ["vicuna", "qwen"]


@pytest.fixture(scope="module", params=LAYOUTS)
def tester(request) -> PPLLaVAModelTester:
    return PPLLaVAModelTester(request.param)


def attended_logits(model, batch: dict) -> list[torch.Tensor]:
    """Logits of each sample at its attended positions."""
    with torch.no_grad():
        logits = model(**batch).logits
    return [row[mask.bool()] for row, mask in zip(logits, batch["attention_mask"])]


def greedy(model, batch: dict, new_tokens: int = 6, **kwargs) -> torch.Tensor:
    output = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)
    return output[:, batch["input_ids"].shape[1] :]


# ---------------------------------------------------------------------------------------------------------------------
# Forward


def test_base_model_keeps_the_sequence_length_with_visual_inputs(tester):
    batch = tester.collate([tester.video_sample(), tester.image_sample()])
    outputs = tester.model.model(**batch)
    assert outputs.last_hidden_state.shape[:2] == batch["input_ids"].shape
    num_video_tokens = int((batch["input_ids"] == tester.config.video_token_id).sum())
    assert outputs.video_hidden_states.shape == (num_video_tokens, tester.config.text_config.hidden_size)


def test_video_tokens_follow_the_pooling_plan(tester):
    # 8 frames of 6x6 patches with (2, 3, 3) windows: 4 x 2 x 2 tokens.
    assert tester.model.model.video_pooling_plan(8).num_tokens == 16
    sample = tester.video_sample(frames=8)
    features = tester.model.get_video_features(
        sample["video"][None], clip_input_ids=sample["clip_ids"][None], clip_attention_mask=sample["clip_mask"][None]
    )
    assert [tokens.shape for tokens in features.pooler_output] == [(16, tester.config.text_config.hidden_size)]
    assert features.relevance[0].shape == (8, 6, 6)
    torch.testing.assert_close(features.relevance[0].sum(), torch.tensor(1.0))


def test_image_tokens_are_the_anyres_layout_with_newlines(tester):
    # A 100x180 image picks the 2x2 grid of 84-pixel tiles; each tile pools to 2x2, the grid to 4x4, unpadded to 2
    # rows of 4 plus one newline each: 4 (base) + 2 * 5 tokens.
    assert tester.model.model.num_image_tokens((100, 180)) == 14
    sample = tester.image_sample(100, 180)
    features = tester.model.get_image_features(
        sample["image"][None], sample["image_size"][None], clip_input_ids=sample["clip_ids"][None]
    )
    tokens = features.pooler_output[0]
    assert tokens.shape[0] == 14
    newline = tester.model.model.image_newline
    torch.testing.assert_close(tokens[8], newline)
    torch.testing.assert_close(tokens[13], newline)


def test_video_features_follow_the_llava_output_contract(tester):
    """Pooled tokens per video in `pooler_output`; the selected features of every frame in `last_hidden_state`; the
    vision tower's own hidden states and attentions when asked (argument or config); all plain tensors."""
    model = tester.fresh_model(attn_implementation="eager")
    videos = [tester.video(4), tester.video(6)]
    prompts = torch.stack([tester.prompt()[0], tester.prompt()[0]])
    vision = tester.config.vision_config

    plain = model.get_video_features(videos, clip_input_ids=prompts)
    full = model.get_video_features(videos, clip_input_ids=prompts, output_hidden_states=True, output_attentions=True)
    model.config.output_hidden_states = True
    from_config = model.get_video_features(videos, clip_input_ids=prompts)

    patches = tester.config.patch_grid[0] * tester.config.patch_grid[1]
    assert [tokens.shape for tokens in plain.pooler_output] == [
        (model.model.video_pooling_plan(frames).num_tokens, tester.config.text_config.hidden_size) for frames in (4, 6)
    ]
    assert plain.last_hidden_state.shape == (10, patches, vision.hidden_size)
    assert plain.hidden_states is None and plain.attentions is None
    assert len(full.hidden_states) == len(from_config.hidden_states) == vision.num_hidden_layers + 1
    assert len(full.attentions) == vision.num_hidden_layers
    assert full.hidden_states[0].shape[0] == full.attentions[0].shape[0] == 10
    torch.testing.assert_close(full.pooler_output, plain.pooler_output)
    assert all(isinstance(value, (torch.Tensor, list, tuple)) for value in full.to_tuple())



def test_forward_outputs_carry_the_encoder_outputs_of_each_modality(tester):
    """`image_outputs` / `video_outputs`, as transformers' multimodal outputs carry them: the tokens that were scattered
    in, their relevance, and the vision tower's hidden states and attentions over every frame or tile when asked."""
    model = tester.fresh_model(attn_implementation="eager")
    batch = tester.collate([tester.video_sample(frames=4), tester.image_sample()])
    with torch.no_grad():
        plain = model(**batch)
        full = model(**batch, output_hidden_states=True, output_attentions=True)
    for output in (plain, full):
        torch.testing.assert_close(torch.cat(output.video_outputs.pooler_output), output.video_hidden_states)
        torch.testing.assert_close(torch.cat(output.image_outputs.pooler_output), output.image_hidden_states)
        assert len(output.video_outputs.relevance) == len(output.image_outputs.relevance) == 1
    assert plain.video_outputs.attentions is None and plain.image_outputs.hidden_states is None
    vision_layers = tester.config.vision_config.num_hidden_layers
    assert len(full.video_outputs.attentions) == len(full.image_outputs.attentions) == vision_layers
    assert len(full.video_outputs.hidden_states) == vision_layers + 1
    assert full.video_outputs.hidden_states[0].shape[0] == 4  # frames
    assert len(full.attentions) == tester.config.text_config.num_hidden_layers  # the language model's own

def test_the_projector_and_the_vision_tower_export_with_torch_export(tester):
    """Every submodule of the visual path takes tensors and plain config, so exporters can trace it."""
    model = tester.model.model
    patches = torch.randn(1, 4, 6, 6, tester.config.vision_config.hidden_size)
    relevance = torch.softmax(torch.randn(1, 4 * 6 * 6), -1).view(1, 4, 6, 6)
    pixels = tester.video(2)

    projector = torch.export.export(model.multi_modal_projector, (patches, relevance, (2, 3, 3), (2, 3, 3)))
    tower = torch.export.export(model.vision_tower, (pixels,), {"output_hidden_states": True})

    torch.testing.assert_close(
        projector.module()(patches, relevance, (2, 3, 3), (2, 3, 3)),
        model.multi_modal_projector(patches, relevance, (2, 3, 3), (2, 3, 3)),
    )
    torch.testing.assert_close(
        tower.module()(pixels, output_hidden_states=True).hidden_states[-2],
        model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2],
    )


def test_alignment_buffers_start_at_the_values_init_weights_gives_them(tester):
    """A load that skips initialisation (or misses the buffers) still scores with the CLIP/SigLIP temperature."""
    alignment = type(tester.model.model.prompt_alignment)(tester.config)
    initial = {name: buffer.clone() for name, buffer in alignment.named_buffers() if name.startswith("logit_")}
    tester.model._init_weights(alignment)
    expected_scale = math.log(10.0) if tester.layout == "qwen" else math.log(1 / 0.07)
    assert float(initial["logit_scale"]) == pytest.approx(expected_scale)
    if tester.layout == "qwen":
        assert float(initial["logit_bias"]) == -10.0
    for name, value in initial.items():
        torch.testing.assert_close(getattr(alignment, name), value)


def test_loss_with_labels_ignores_minus_100(tester):
    batch = tester.collate([tester.video_sample()])
    labels = batch["input_ids"].clone()
    labels[labels == tester.config.video_token_id] = -100
    outputs = tester.model(**batch, labels=labels)
    logits = outputs.logits[0, :-1]
    targets = labels[0, 1:]
    expected = torch.nn.functional.cross_entropy(logits[targets != -100], targets[targets != -100])
    torch.testing.assert_close(outputs.loss, expected)


def test_batch_equals_each_sample_alone(tester):
    samples = [tester.video_sample(before=2), tester.video_sample(before=6), tester.image_sample(), tester.text_sample()]
    batched = attended_logits(tester.model, tester.collate(samples))
    for sample, logits in zip(samples, batched):
        torch.testing.assert_close(logits, attended_logits(tester.model, tester.collate([sample]))[0], **float32_forward(logits))


def test_each_sample_is_pooled_by_its_own_prompt(tester):
    samples = [tester.video_sample(), tester.video_sample(), tester.video_sample()]
    order = [2, 0, 1]
    logits = attended_logits(tester.model, tester.collate(samples))
    permuted = attended_logits(tester.model, tester.collate([samples[i] for i in order]))
    for position, index in enumerate(order):
        torch.testing.assert_close(permuted[position], logits[index], **float32_forward(logits[index]))
    swapped = dict(samples[0], clip_ids=samples[1]["clip_ids"], clip_mask=samples[1]["clip_mask"])
    assert not torch.allclose(attended_logits(tester.model, tester.collate([swapped]))[0], logits[0])


def test_videos_of_different_lengths_in_one_batch(tester):
    samples = [tester.video_sample(frames=4), tester.video_sample(frames=8)]
    batch = tester.collate(samples)
    assert isinstance(batch["pixel_values_videos"], list)
    for sample, logits in zip(samples, attended_logits(tester.model, batch)):
        torch.testing.assert_close(logits, attended_logits(tester.model, tester.collate([sample]))[0], **float32_forward(logits))


def test_mismatched_placeholders_are_reported_with_both_counts(tester):
    batch = tester.collate([tester.video_sample(frames=8)])
    batch["input_ids"] = batch["input_ids"][:, 1:]
    batch["attention_mask"] = batch["attention_mask"][:, 1:]
    batch["input_ids"][0, batch["input_ids"][0].tolist().index(tester.config.video_token_id)] = 5
    with pytest.raises(ValueError, match="the text has 15 video tokens but the 1 video\\(s\\) give 16"):
        tester.model(**batch)


def test_visual_inputs_need_a_pooling_prompt(tester):
    batch = tester.collate([tester.video_sample()])
    del batch["clip_input_ids"], batch["clip_attention_mask"]
    with pytest.raises(ValueError, match="pass `clip_input_ids`"):
        tester.model(**batch)


def test_precomputed_visual_tokens_skip_the_vision_tower(tester):
    batch = tester.collate([tester.video_sample(frames=8), tester.image_sample()])
    encoded = tester.model.encode_multimodal(**{k: v for k, v in batch.items() if k != "attention_mask"})
    frames, handle = record_calls(tester.model.model.vision_tower.embeddings, lambda pixels: pixels.shape[0])
    try:
        text_only = {k: batch[k] for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            reused = tester.model(**text_only, mm_encoder_outputs=encoded).logits
            assert frames == []
            fresh = tester.model(**batch).logits
    finally:
        handle.remove()
    assert sum(frames) == 8 + batch["pixel_values"].shape[1]
    torch.testing.assert_close(reused, fresh)


def test_a_decoding_step_ignores_visual_tokens_it_has_no_placeholders_for(tester):
    """After prefill the step's input holds no placeholders: precomputed tokens handed to it change nothing, whether
    or not transformers drops them outside prefill."""
    batch = tester.collate([tester.video_sample()])
    encoded = tester.model.encode_multimodal(
        input_ids=batch["input_ids"], pixel_values_videos=batch["pixel_values_videos"],
        clip_input_ids=batch["clip_input_ids"], clip_attention_mask=batch["clip_attention_mask"],
    )
    with torch.no_grad():
        prefill = tester.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], mm_encoder_outputs=encoded, use_cache=True
        )
        cache_name = "cache" if "cache" in prefill else "past_key_values"
        step = {"input_ids": torch.tensor([[5]]), "attention_mask": torch.cat([batch["attention_mask"], torch.ones(1, 1)], -1)}
        plain = tester.model(**step, **{cache_name: copy.deepcopy(prefill[cache_name])}).logits
        with_tokens = tester.model(**step, **{cache_name: copy.deepcopy(prefill[cache_name])}, mm_encoder_outputs=encoded)
    torch.testing.assert_close(with_tokens.logits, plain)


@pytest.mark.parametrize("modality", ["video", "image"])
def test_placeholders_with_nothing_to_fill_them_are_refused(tester, modality):
    sample = tester.video_sample() if modality == "video" else tester.image_sample()
    batch = tester.collate([sample])
    with pytest.raises(ValueError, match=f"{modality} placeholder tokens but no {modality} to fill them"):
        tester.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


@pytest.mark.parametrize("modality", ["video", "image"])
def test_a_several_token_step_after_the_prompt_is_text_even_with_placeholder_ids(tester, modality):
    """Assisted decoding checks several candidate tokens in one step; a candidate that equals a placeholder id is a
    generated token, not a placeholder to fill: only the prompt's placeholders need visual tokens."""
    batch = tester.collate([tester.text_sample()])
    placeholder = tester.model.config.video_token_id if modality == "video" else tester.model.config.image_token_id
    with torch.no_grad():
        prompt = tester.model(**batch, use_cache=True)
        cache_name = "cache" if "cache" in prompt else "past_key_values"
        candidates = torch.tensor([[5, placeholder, 7]])
        attention_mask = torch.cat([batch["attention_mask"], torch.ones(1, 3, dtype=torch.long)], -1)
        step = tester.model(input_ids=candidates, attention_mask=attention_mask, **{cache_name: prompt[cache_name]})
    assert step.logits.shape[:2] == (1, 3) and bool(step.logits.isfinite().all())


@pytest.mark.parametrize("modality", ["video", "image"])
def test_placeholders_in_inputs_embeds_with_nothing_to_fill_them_are_refused(tester, modality):
    sample = tester.video_sample() if modality == "video" else tester.image_sample()
    batch = tester.collate([sample])
    inputs_embeds = tester.model.get_input_embeddings()(batch["input_ids"])
    with pytest.raises(ValueError, match=f"{modality} placeholder tokens but no {modality} to fill them"):
        tester.model(inputs_embeds=inputs_embeds, attention_mask=batch["attention_mask"])


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs: refused where they enter, naming the argument and the fix


@pytest.mark.parametrize("modality", ["video", "image"])
def test_integer_pixels_are_refused_instead_of_run_as_if_normalised(tester, modality):
    batch = tester.collate([tester.video_sample() if modality == "video" else tester.image_sample()])
    key = "pixel_values_videos" if modality == "video" else "pixel_values"
    batch[key] = (batch[key].clamp(0, 1) * 255).to(torch.uint8)
    with pytest.raises(ValueError, match=rf"{key}(\[0\])? has dtype torch.uint8, but the model takes normalised float pixels"):
        tester.model(**batch)


def test_channels_last_videos_are_refused_naming_the_permute(tester):
    batch = tester.collate([tester.video_sample()])
    batch["pixel_values_videos"] = batch["pixel_values_videos"].permute(0, 1, 3, 4, 2)
    with pytest.raises(ValueError, match=r"looks channels-last .* pixel_values_videos.permute\(0, 1, 4, 2, 3\)"):
        tester.model(**batch)
    with pytest.raises(ValueError, match="looks channels-last"):
        tester.model.get_video_relevance(batch["pixel_values_videos"], batch["clip_input_ids"])


@pytest.mark.parametrize("problem", ["out of vocabulary", "negative", "float"])
def test_bad_clip_input_ids_name_the_argument_and_the_prompt_vocabulary(tester, problem):
    batch = tester.collate([tester.video_sample()])
    vocab = tester.config.prompt_encoder_config.vocab_size
    if problem == "out of vocabulary":
        batch["clip_input_ids"][0, 3] = vocab + 5  # e.g. LLM ids fed to the prompt encoder
        message = f"clip_input_ids holds ids from .* to {vocab + 5}, but the vocabulary has {vocab} tokens"
    elif problem == "negative":
        batch["clip_input_ids"][0, 3] = -1
        message = f"clip_input_ids holds ids from -1 .* the vocabulary has {vocab} tokens"
    else:
        batch["clip_input_ids"] = batch["clip_input_ids"].float()
        message = "clip_input_ids has dtype torch.float32, but token ids are integers"
    with pytest.raises(ValueError, match=message):
        tester.model(**batch)


def test_input_ids_beyond_the_llm_vocabulary_are_refused(tester):
    batch = tester.collate([tester.text_sample()])
    batch["input_ids"][0, 2] = tester.config.text_config.vocab_size
    with pytest.raises(ValueError, match=f"input_ids holds ids .* but the vocabulary has {tester.config.text_config.vocab_size}"):
        tester.model(**batch)


def test_a_batch_row_with_an_all_zero_attention_mask_is_refused(tester):
    batch = tester.collate([tester.text_sample(), tester.text_sample()], padding_side="right")
    batch["attention_mask"][1] = 0
    with pytest.raises(ValueError, match=r"Row\(s\) \[1\] of attention_mask are all zeros"):
        tester.model(**batch)
    with pytest.raises(ValueError, match=r"Row\(s\) \[1\] of attention_mask are all zeros"):
        tester.model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_labels_of_the_unexpanded_text_are_refused_naming_the_expanded_input_ids(tester):
    batch = tester.collate([tester.video_sample()])
    unexpanded = torch.tensor([[1, 5, 6, tester.config.video_token_id, 7, 8]])
    with pytest.raises(ValueError, match=r"labels has shape \(1, 6\) but the inputs \(1, \d+\): build the labels from"):
        tester.model(**batch, labels=unexpanded)


def test_outputs_carry_the_language_models_cache_under_the_installed_name(tester):
    """The output classes come from transformers' own, so the cache field is named as the installed release names it
    (`past_key_values` up to 5.23, `cache` from 5.24) and `generate` finds it."""
    batch = tester.collate([tester.text_sample()])
    with torch.no_grad():
        outputs = tester.model(**batch, use_cache=True)
        base_outputs = tester.model.model(**batch, use_cache=True)
    language_model_fields = set(tester.model.model.language_model(input_ids=batch["input_ids"], use_cache=True).keys())
    cache_name = (language_model_fields - {"last_hidden_state"}).pop()
    assert cache_name in outputs and cache_name in base_outputs
    assert outputs[cache_name].get_seq_length() == batch["input_ids"].shape[1]


def test_return_dict_false_gives_tuples(tester):
    batch = tester.collate([tester.video_sample()])
    with torch.no_grad():
        as_dict = tester.model(**batch)
        as_tuple = tester.model(**batch, return_dict=False)
        features = tester.model.get_video_features(
            batch["pixel_values_videos"], clip_input_ids=batch["clip_input_ids"], return_dict=False
        )
    assert isinstance(as_tuple, tuple) and isinstance(features, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.logits)


def test_a_video_shared_by_two_rows_with_one_prompt_is_encoded_once(tester):
    # The shape of a preference pair: chosen and rejected rows carry the same video and the same pooling prompt.
    chosen = tester.video_sample(frames=8)
    rejected = dict(chosen, ids=chosen["ids"][:-4] + tester.text(6))
    other_prompt = dict(chosen, clip_ids=tester.prompt()[0])
    frames, handle = record_calls(tester.model.model.vision_tower.embeddings, lambda pixels: pixels.shape[0])
    try:
        pair = attended_logits(tester.model, tester.collate([chosen, rejected]))
        assert sum(frames) == 8
        attended_logits(tester.model, tester.collate([chosen, other_prompt]))
        assert sum(frames) == 8 + 16
    finally:
        handle.remove()
    for sample, logits in zip([chosen, rejected], pair):
        torch.testing.assert_close(logits, attended_logits(tester.model, tester.collate([sample]))[0], **float32_forward(logits))


def test_a_sample_with_several_images_pools_each_under_the_sample_prompt(tester):
    first, second = tester.image_sample(100, 180), tester.image_sample(180, 100)
    sample = dict(first, ids=first["ids"] + second["ids"][1:])
    batch = tester.collate([sample])
    batch["pixel_values"] = torch.stack([first["image"], second["image"]])
    batch["image_sizes"] = torch.stack([first["image_size"], second["image_size"]])
    outputs = tester.model.model(**batch)
    prompt = dict(clip_input_ids=batch["clip_input_ids"].expand(2, -1), clip_attention_mask=batch["clip_attention_mask"].expand(2, -1))
    separately = tester.model.get_image_features(batch["pixel_values"], batch["image_sizes"], **prompt).pooler_output
    torch.testing.assert_close(outputs.image_hidden_states, torch.cat(separately))


def test_per_call_token_budget_coarsens_the_temporal_pooling(tester):
    sample = tester.video_sample(frames=8)
    windows, hook = record_pooling_windows(tester.model.model)
    try:
        features = tester.model.get_video_features(
            sample["video"][None], clip_input_ids=sample["clip_ids"][None], max_visual_tokens=8
        )
    finally:
        hook.remove()
    plan = tester.model.model.video_pooling_plan(8, max_visual_tokens=8)
    assert features.pooler_output[0].shape[0] == 8
    assert plan.output_size == (2, 2, 2)
    assert windows == [(plan.kernel, plan.stride)]


# ---------------------------------------------------------------------------------------------------------------------
# Generation


def test_generate_with_and_without_cache_agree(tester):
    batch = tester.collate([tester.video_sample()])
    torch.testing.assert_close(greedy(tester.model, batch), greedy(tester.model, batch, use_cache=False))


def test_left_padded_batch_generates_what_each_sample_generates_alone(tester):
    samples = [tester.video_sample(before=1), tester.video_sample(before=7), tester.image_sample(), tester.text_sample()]
    batched = greedy(tester.model, tester.collate(samples, padding_side="left"))
    for sample, tokens in zip(samples, batched):
        torch.testing.assert_close(tokens, greedy(tester.model, tester.collate([sample]))[0])


def test_right_padded_batch_generates_the_same_tokens(tester):
    samples = [tester.video_sample(before=1), tester.video_sample(before=7)]
    left = greedy(tester.model, tester.collate(samples, padding_side="left"))
    right = greedy(tester.model, tester.collate(samples, padding_side="right"))
    torch.testing.assert_close(right, left)


def test_a_static_cache_generates_what_the_dynamic_cache_generates(tester):
    batch = tester.collate([tester.video_sample(), tester.image_sample()], padding_side="left")
    torch.testing.assert_close(greedy(tester.model, batch, cache_implementation="static"), greedy(tester.model, batch))


def test_generate_returns_the_language_models_attentions_and_hidden_states_of_every_step(tester):
    model = tester.fresh_model(attn_implementation="eager")
    batch = tester.collate([tester.video_sample()])
    output = model.generate(
        **batch, max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
        output_attentions=True, output_hidden_states=True,
    )
    num_layers = model.config.text_config.num_hidden_layers
    assert [len(step) for step in output.attentions] == [num_layers] * 3
    assert [len(step) for step in output.hidden_states] == [num_layers + 1] * 3
    prompt_length = batch["input_ids"].shape[1]
    assert output.attentions[0][0].shape[-2:] == (prompt_length, prompt_length)
    assert output.hidden_states[-1][-1].shape[1] == 1


def test_a_decoding_step_compiles_as_one_graph_and_gives_the_eager_logits():
    """`_can_compile_fullgraph`: after prefill into a static cache, the step `generate` compiles is one graph."""
    tester = PPLLaVAModelTester("qwen")
    model, batch = tester.model, tester.collate([tester.video_sample()])
    length = batch["input_ids"].shape[1]
    cache_name = "cache" if "cache" in inspect.signature(model.model.language_model.forward).parameters else "past_key_values"
    cache = StaticCache(config=model.config, max_cache_len=length + 2)
    with torch.no_grad():
        next_token = model(**batch, use_cache=True, **{cache_name: cache}).logits[:, -1:].argmax(-1)
        step = {"input_ids": next_token, "position_ids": torch.tensor([[length]]), "use_cache": True, cache_name: cache}
        compiled = torch.compile(model, fullgraph=True)(**step).logits
        eager = model(
            **{**batch, "input_ids": torch.cat([batch["input_ids"], next_token], -1),
               "attention_mask": torch.ones(1, length + 1, dtype=torch.long)}
        ).logits[:, -1:]
    assert PPLLaVAForConditionalGeneration._can_compile_fullgraph
    torch.testing.assert_close(compiled, eager, **float32_forward(eager))


def test_visual_encoders_run_once_per_generate_even_with_beams(tester):
    model = tester.model.model
    frames, tower = record_calls(model.vision_tower.embeddings, lambda pixels: pixels.shape[0])
    prompts, prompt_encoder = record_calls(model.prompt_alignment.text_model, lambda ids: ids.shape[0])
    poolings, pooling = record_calls(model.multi_modal_projector.pooling, lambda features: features.shape[0])
    samples = [tester.video_sample(frames=8), tester.video_sample(frames=8, before=5)]
    try:
        output = greedy(tester.model, tester.collate(samples), num_beams=3, num_return_sequences=2)
    finally:
        for handle in (tower, prompt_encoder, pooling):
            handle.remove()
    assert output.shape[0] == 4
    # Each frame through the tower once, both prompts in one encoder call, one pooling per video; nothing while decoding.
    assert sum(frames) == 16
    assert prompts == [2]
    assert poolings == [1, 1]


def test_an_assistant_model_drafts_from_the_visual_tokens_and_greedy_tokens_stay_the_same(tester):
    assistant = tester.fresh_model()
    visual_calls = []
    handle = assistant.register_forward_pre_hook(
        lambda _, args, kwargs: visual_calls.append(kwargs.get("mm_encoder_outputs") is not None), with_kwargs=True
    )
    batch = tester.collate([tester.video_sample()])
    try:
        assisted = greedy(tester.model, batch, assistant_model=assistant)
    finally:
        handle.remove()
    torch.testing.assert_close(assisted, greedy(tester.model, batch))
    assert visual_calls[0] and not any(visual_calls[1:])  # the prompt with its video, then text-only drafting steps


class ForceTokenFirst(LogitsProcessor):
    """Makes the first generated token `token_id`."""

    def __init__(self, token_id: int, prompt_length: int):
        self.token_id, self.prompt_length = token_id, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] == self.prompt_length:
            scores = torch.full_like(scores, -math.inf)
            scores[:, self.token_id] = 0
        return scores


def test_a_generated_token_equal_to_a_placeholder_id_is_decoded_as_text(tester):
    batch = tester.collate([tester.video_sample()])
    video_token = tester.config.video_token_id
    force = LogitsProcessorList([ForceTokenFirst(video_token, batch["input_ids"].shape[1])])
    tokens = greedy(tester.model, batch, new_tokens=4, logits_processor=force)
    assert tokens[0, 0] == video_token and tokens.shape == (1, 4)


def test_sampling_and_beam_search_return_the_requested_sequences(tester):
    batch = tester.collate([tester.video_sample()])
    sampled = tester.model.generate(**batch, max_new_tokens=4, do_sample=True, top_k=5, num_return_sequences=3, pad_token_id=0)
    assert sampled.shape == (3, batch["input_ids"].shape[1] + 4)
    beams = greedy(tester.model, batch, new_tokens=4, num_beams=2)
    assert beams.shape == (1, 4)


# ---------------------------------------------------------------------------------------------------------------------
# Saving, loading, Auto classes, dtypes, attention back-ends, initialisation


def test_save_and_reload_give_identical_logits(tester, tmp_path):
    batch = tester.collate([tester.video_sample(), tester.image_sample()])
    tester.model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, PPLLaVAForConditionalGeneration)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, tester.model(**batch).logits, rtol=0, atol=0)


def test_auto_classes_resolve(tester, tmp_path):
    tester.config.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PPLLaVAConfig)
    assert type(AutoModel.from_config(tester.config)) is PPLLaVAModel
    assert type(AutoModelForImageTextToText.from_config(tester.config)) is PPLLaVAForConditionalGeneration
    assert type(AutoModelForMultimodalLM.from_config(tester.config)) is PPLLaVAForConditionalGeneration


def test_auto_dtype_keeps_the_checkpoint_dtype(tester, tmp_path):
    tester.fresh_model().to(torch.bfloat16).save_pretrained(tmp_path)
    reloaded = PPLLaVAForConditionalGeneration.from_pretrained(tmp_path, dtype="auto")
    assert reloaded.dtype == torch.bfloat16
    assert reloaded.model.prompt_alignment.text_model.embeddings.position_embedding_base.dtype == torch.bfloat16


# Stated tolerance: total-variation distance between the half-precision and float32 relevance distributions under 5%
# (bf16) / 1% (fp16). The softmax runs in float32; the remaining error comes from the tower and projections in half.
@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_relevance_in_half_precision_stays_close_to_float32(tester, dtype, tolerance):
    sample = tester.video_sample()
    inputs = dict(clip_input_ids=sample["clip_ids"][None], clip_attention_mask=sample["clip_mask"][None])
    reference = tester.model.get_video_relevance(sample["video"][None], **inputs)[0]
    half = tester.fresh_model().to(dtype)
    relevance = half.get_video_relevance(sample["video"][None].to(dtype), **inputs)[0]
    assert relevance.dtype == torch.float32 and torch.isfinite(relevance).all()
    torch.testing.assert_close(relevance.sum(), torch.tensor(1.0))
    assert 0.5 * (relevance - reference).abs().sum() < tolerance
    features = half.get_video_features(sample["video"][None].to(dtype), **inputs).pooler_output[0]
    assert features.dtype == dtype and torch.isfinite(features).all()


def test_sdpa_is_the_default_and_eager_gives_the_same_logits(tester):
    assert tester.model.config._attn_implementation == "sdpa"
    assert tester.model.model.vision_tower.config._attn_implementation == "sdpa"
    assert tester.model.model.prompt_alignment.text_model.config._attn_implementation == "sdpa"
    eager = tester.fresh_model(attn_implementation="eager")
    assert eager.model.language_model.config._attn_implementation == "eager"
    batch = tester.collate([tester.video_sample(), tester.image_sample()])
    for eager_logits, sdpa_logits in zip(attended_logits(eager, batch), attended_logits(tester.model, batch)):
        torch.testing.assert_close(eager_logits, sdpa_logits, **float32_forward(sdpa_logits))


def test_the_modules_kept_out_of_quantization_are_the_visual_parts_the_layout_has(tester):
    model = tester.model
    assert model.model._keep_in_fp32_modules == {"vision_tower", "prompt_alignment", "multi_modal_projector"} | (
        {"btadapter"} if tester.config.use_btadapter else set()
    )
    keys = model.state_dict().keys()
    for name in model._keep_in_fp32_modules:
        assert any(key.startswith(f"{name}.") or f".{name}." in key for key in keys), name
    # Declared once, on the instance, from the parts built: quantizers match paths from the root.
    assert "_keep_in_fp32_modules" not in vars(PPLLaVAForConditionalGeneration)
    assert {f"model.{name}" for name in model.model._keep_in_fp32_modules} <= model._keep_in_fp32_modules


def test_every_weight_is_initialised(tester):
    model = PPLLaVAForConditionalGeneration(copy.deepcopy(tester.config))
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        assert torch.isfinite(tensor).all(), name
    hidden = tester.config.text_config.hidden_size
    assert 0.5 < model.model.image_newline.std().item() * hidden**0.5 < 1.5
    embeddings = model.model.prompt_alignment.text_model.embeddings
    torch.testing.assert_close(embeddings.position_embedding_residual, embeddings.position_embedding_base)
    if model.model.btadapter is not None:
        assert all(layer.temporal_fc.weight.abs().sum() == 0 for layer in model.model.btadapter.temporal_layers)


def test_weights_missing_from_a_checkpoint_are_initialised_not_left_empty(tester, tmp_path):
    tester.model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.image_newline"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    reloaded = PPLLaVAForConditionalGeneration.from_pretrained(tmp_path)
    newline = reloaded.model.image_newline
    assert torch.isfinite(newline).all() and newline.std() > 0


def test_device_map_auto_loads(tester, tmp_path):
    tester.model.save_pretrained(tmp_path)
    loaded = PPLLaVAForConditionalGeneration.from_pretrained(tmp_path, device_map="auto")
    assert loaded.device.type == "cpu"


# ---------------------------------------------------------------------------------------------------------------------
# Training


@needs_training_release
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tester):
    model = tester.fresh_model(btadapter_drop_path_rate=0.0)
    batch = tester.collate([tester.video_sample()])
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == tester.config.video_token_id, -100)

    def loss_and_grad():
        model.zero_grad()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        return loss.detach(), model.model.multi_modal_projector.linear_1.weight.grad.clone()

    model.train()
    plain = loss_and_grad()
    model.activation_checkpointing_enable()
    checkpointed = loss_and_grad()
    torch.testing.assert_close(checkpointed[0], plain[0])
    torch.testing.assert_close(checkpointed[1], plain[1])


def test_a_few_optimiser_steps_overfit_one_sample(tester):
    model = tester.fresh_model()
    batch = tester.collate([tester.video_sample()])
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == tester.config.video_token_id, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(12):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
