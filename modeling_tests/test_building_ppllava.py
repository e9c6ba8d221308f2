"""Building a fresh PPLLaVA from tiny random backbones saved to folders: LLaVA-NeXT + CLIP (`vicuna`) and
LLaVA-OneVision + SigLIP (`qwen`)."""

import copy
import runpy
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPModel, PreTrainedModel

import ppllava_hf  # noqa: F401  (registers the Auto classes)
from ppllava_hf import PPLLaVAForConditionalGeneration
from ppllava_hf.conversion.building import FRESH_KEY_PREFIXES, build_ppllava_from_backbones, build_ppllava_processor
from ppllava_hf.conversion.prompt_positions import stretch_position_embeddings
from ppllava_hf.testing.tiny import tiny_backbones, tiny_prompt_tokenizer, tiny_tokenizer


LAYOUTS = ["vicuna", "qwen"]
BTADAPTER_DEPTH = 2  # of the tiny towers' 4 layers, so "the last layers" differ from "all layers"


@dataclass
class Built:
    layout: str
    llava: PreTrainedModel
    clip: PreTrainedModel
    model: PPLLaVAForConditionalGeneration
    llava_path: Path
    clip_path: Path


@pytest.fixture(scope="module", params=LAYOUTS)
def built(request, tmp_path_factory) -> Built:
    torch.manual_seed(0)
    llava, clip = tiny_backbones(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    llava.save_pretrained(folder / "llava")
    clip.save_pretrained(folder / "clip")
    model = build_ppllava_from_backbones(folder / "llava", folder / "clip", btadapter_depth=BTADAPTER_DEPTH)
    return Built(request.param, llava, clip, model, folder / "llava", folder / "clip")


def source_prompt_embeds(clip: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """What the stock CLIP (SigLIP) model scores prompts with: the projected (SigLIP: head-pooled) text output."""
    pooled = clip.text_model(input_ids=input_ids).pooler_output
    return clip.text_projection(pooled) if isinstance(clip, CLIPModel) else pooled


def with_vision_changes(clip: PreTrainedModel, **changes) -> PreTrainedModel:
    """A random CLIP/SigLIP model like `clip` but for these vision-config fields."""
    config = type(clip.config).from_dict(clip.config.to_dict())
    config.vision_config = type(config.vision_config).from_dict({**config.vision_config.to_dict(), **changes})
    return type(clip)(config)


def video_batch(model: PPLLaVAForConditionalGeneration, frames: int = 4) -> dict:
    """One video sample with its placeholders expanded and a short pooling prompt."""
    config = model.config
    generator = torch.Generator().manual_seed(3)
    count = model.model.video_pooling_plan(frames).num_tokens
    ids = [1] + torch.randint(3, 250, (4,), generator=generator).tolist() + [config.video_token_id] * count + [5, 6]
    size = config.vision_config.image_size
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values_videos": torch.randn(1, frames, 3, size, size, generator=generator),
        "clip_input_ids": torch.randint(3, 100, (1, 8), generator=generator),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Config


def test_config_is_read_from_the_backbones(built):
    config, llava = built.model.config, built.llava.config
    assert config.vision_config.hidden_size == llava.vision_config.hidden_size
    assert config.vision_config.num_hidden_layers == llava.vision_config.num_hidden_layers
    assert config.text_config.model_type == llava.text_config.model_type
    assert config.text_config.vocab_size == llava.text_config.vocab_size
    assert config.image_grid_pinpoints == llava.image_grid_pinpoints
    assert config.vision_feature_layer == llava.vision_feature_layer
    assert config.vision_feature_select_strategy == llava.vision_feature_select_strategy
    assert config.image_token_id == llava.image_token_id == 300
    # LLaVA-OneVision brings its video token; LLaVA-NeXT has none, so the first free row after the image token is used.
    assert config.video_token_id == 301
    assert config.prompt_keep_positions == 20
    if built.layout == "vicuna":
        assert config.prompt_encoder_config.max_position_embeddings == 20 + 4 * (77 - 20) == 248
        assert config.use_btadapter and config.btadapter_depth == BTADAPTER_DEPTH
        assert config.freeze_prompt_encoder  # the original's CLIP text encoder runs without gradient
    else:
        assert config.prompt_encoder_config.max_position_embeddings == 20 + 4 * (64 - 20) == 196
        assert not config.use_btadapter
        assert not config.freeze_prompt_encoder  # its SigLIP text encoder runs with gradient


def test_config_fields_can_be_overridden_but_not_the_sub_configs(built):
    model = build_ppllava_from_backbones(
        built.llava, built.clip, video_pooling_kernel=[4, 3, 3], max_visual_tokens=32, video_token_id=310
    )
    assert model.config.video_pooling_kernel == [4, 3, 3]
    assert model.config.max_visual_tokens == 32
    assert model.config.video_token_id == 310
    with pytest.raises(TypeError, match="text_config come from the backbones"):
        build_ppllava_from_backbones(built.llava, built.clip, text_config={})


def test_video_token_skips_rows_the_llava_config_names():
    llava, clip = tiny_backbones("vicuna", pad_token_id=301)
    assert build_ppllava_from_backbones(llava, clip).config.video_token_id == 302


def test_no_free_row_for_the_video_token_is_an_error_that_says_what_to_do():
    llava, clip = tiny_backbones("vicuna", image_token_index=319)  # the last of 320 rows
    with pytest.raises(ValueError, match=r"no free row after id 319 for the video placeholder.*video_token_id="):
        build_ppllava_from_backbones(llava, clip)


# ---------------------------------------------------------------------------------------------------------------------
# The LLaVA parts


def test_every_llava_weight_is_copied_unchanged(built):
    ours = built.model.state_dict()
    for key, tensor in built.llava.state_dict().items():
        assert torch.equal(ours[key], tensor), key


def test_vision_tower_gives_the_llava_hidden_states(built):
    pixels = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        ours = built.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        theirs = built.llava.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs)
    for mine, source in zip(ours, theirs):
        torch.testing.assert_close(mine, source, rtol=0, atol=0)


def test_language_model_gives_the_llava_logits_on_text(built):
    input_ids = torch.randint(3, 250, (2, 9))
    with torch.no_grad():
        ours = built.model(input_ids=input_ids).logits
        theirs = built.llava(input_ids=input_ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_projector_gives_the_llava_outputs(built):
    features = torch.randn(7, built.model.config.vision_config.hidden_size)
    with torch.no_grad():
        ours = built.model.model.multi_modal_projector(features)
        theirs = built.llava.model.multi_modal_projector(features)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# The alignment parts


def test_prompt_encoder_scores_a_short_prompt_like_the_source_text_model(built):
    # Positions below 20 are the source's own rows, so a prompt shorter than that is encoded exactly as before.
    input_ids = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        ours = built.model.model.prompt_alignment.encode_prompt(input_ids)
        theirs = source_prompt_embeds(built.clip, input_ids)
    torch.testing.assert_close(ours, theirs)


def test_prompt_encoder_accepts_prompts_beyond_the_source_context(built):
    source_positions = built.clip.config.text_config.max_position_embeddings
    input_ids = torch.randint(3, 100, (1, source_positions + 50))
    with torch.no_grad():
        assert built.model.model.prompt_alignment.encode_prompt(input_ids).isfinite().all()


def test_both_position_tables_start_as_the_stretched_source_table(built):
    source = built.clip.text_model.embeddings.position_embedding.weight
    embeddings = built.model.model.prompt_alignment.text_model.embeddings
    expected = stretch_position_embeddings(source.detach())
    torch.testing.assert_close(embeddings.position_embedding_base, expected, rtol=0, atol=0)
    torch.testing.assert_close(embeddings.position_embedding_residual.detach(), expected, rtol=0, atol=0)
    # Training the residual table must not move the frozen base table.
    assert embeddings.position_embedding_base.data_ptr() != embeddings.position_embedding_residual.data_ptr()


def test_prompt_token_embeddings_are_the_pretrained_ones_by_default(built):
    ours = built.model.model.prompt_alignment.text_model.embeddings.token_embedding.weight
    assert torch.equal(ours, built.clip.text_model.embeddings.token_embedding.weight)


def test_random_prompt_token_embeddings_reproduce_the_original_fresh_table(built):
    torch.manual_seed(1)
    model = build_ppllava_from_backbones(built.llava, built.clip, random_prompt_token_embeddings=True)
    embeddings = model.model.prompt_alignment.text_model.embeddings
    pretrained = built.clip.text_model.embeddings.token_embedding.weight
    assert embeddings.token_embedding.weight.shape == pretrained.shape
    assert not torch.allclose(embeddings.token_embedding.weight, pretrained)
    # N(0, 1), what the nn.Embedding the original creates starts from.
    assert 0.9 < embeddings.token_embedding.weight.std() < 1.1
    # Only the token table changes: the positions still come from the source.
    default = built.model.model.prompt_alignment.text_model.embeddings
    assert torch.equal(embeddings.position_embedding_residual, default.position_embedding_residual)


def test_alignment_heads_come_from_the_clip_model(built):
    alignment, clip = built.model.model.prompt_alignment, built.clip
    vision = clip.vision_model
    assert torch.equal(alignment.visual_layernorm.weight, vision.post_layernorm.weight)
    assert torch.equal(alignment.visual_layernorm.bias, vision.post_layernorm.bias)
    assert torch.equal(alignment.logit_scale, clip.logit_scale.reshape(()))
    if built.layout == "vicuna":
        assert torch.equal(alignment.text_projection.weight, clip.text_projection.weight)
        assert torch.equal(alignment.visual_projection.weight, clip.visual_projection.weight)
    else:
        head, patch_head = vision.head, alignment.visual_projection
        width = clip.config.vision_config.hidden_size
        assert torch.equal(patch_head.value_proj.weight, head.attention.in_proj_weight[2 * width :])
        assert torch.equal(patch_head.value_proj.bias, head.attention.in_proj_bias[2 * width :])
        assert torch.equal(patch_head.layernorm.weight, head.layernorm.weight)
        assert torch.equal(patch_head.mlp.fc2.weight, head.mlp.fc2.weight)
        assert torch.equal(alignment.text_model.head.weight, clip.text_model.head.weight)
        assert torch.equal(alignment.logit_bias, clip.logit_bias.reshape(()))


# ---------------------------------------------------------------------------------------------------------------------
# The BT-Adapter


@pytest.mark.parametrize("built", ["vicuna"], indirect=True)  # only the CLIP layout has a BT-Adapter
def test_btadapter_spatial_layers_start_as_the_last_vision_layers(built):
    adapter = built.model.model.btadapter
    vision_layers = built.llava.model.vision_tower.encoder.layers
    first = len(vision_layers) - BTADAPTER_DEPTH
    for index, spatial in enumerate(adapter.spatial_layers):
        source = vision_layers[first + index].state_dict()
        for name, tensor in spatial.state_dict().items():
            assert torch.equal(tensor, source[name]), f"spatial_layers.{index}.{name}"
    ours_layer = built.model.model.vision_tower.encoder.layers[first]
    assert adapter.spatial_layers[0].mlp.fc1.weight.data_ptr() != ours_layer.mlp.fc1.weight.data_ptr()


@pytest.mark.parametrize("built", ["vicuna"], indirect=True)
def test_btadapter_temporal_branch_starts_fresh_and_silent(built):
    adapter = built.model.model.btadapter
    for layer in adapter.temporal_layers:
        assert not layer.temporal_fc.weight.any() and not layer.temporal_fc.bias.any()
        assert layer.self_attn.q_proj.weight.std() > 0
    assert not adapter.cls_token.any()
    assert adapter.time_embedding.weight.shape[0] == 64
    assert adapter.time_embedding.weight.std() > 0


# ---------------------------------------------------------------------------------------------------------------------
# Sources, checks, saving


def test_in_memory_backbones_build_the_same_model_and_stay_untouched(built):
    model = build_ppllava_from_backbones(built.llava, built.clip, btadapter_depth=BTADAPTER_DEPTH)
    from_folders = built.model.state_dict()
    for key, tensor in model.state_dict().items():
        if not key.startswith(FRESH_KEY_PREFIXES):
            assert torch.equal(tensor, from_folders[key]), key
    source = built.llava.model.language_model.embed_tokens.weight
    before = source.clone()
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight.add_(1.0)
    assert torch.equal(source, before)


def test_backbones_of_different_families_are_refused():
    llava, _ = tiny_backbones("vicuna")
    _, siglip = tiny_backbones("qwen")
    with pytest.raises(ValueError, match="alignment source must be a 'clip' model"):
        build_ppllava_from_backbones(llava, siglip)


def test_a_clip_model_of_another_width_is_refused():
    llava, clip = tiny_backbones("vicuna")
    with pytest.raises(ValueError, match=r"vision width \(48\) differs from the LLaVA vision tower's \(32\)"):
        build_ppllava_from_backbones(llava, with_vision_changes(clip, hidden_size=48))


def test_weights_left_unfilled_are_listed():
    llava, siglip = tiny_backbones("qwen")
    with pytest.raises(ValueError, match=r"no backbone fills: .*visual_projection\.value_proj\.weight"):
        build_ppllava_from_backbones(llava, with_vision_changes(siglip, vision_use_head=False))


def test_mis_shaped_weights_are_listed_with_both_shapes():
    llava, siglip = tiny_backbones("qwen")
    expected = r"shape mismatches .*visual_projection\.mlp\.fc1\.weight \(48, 32\) vs \(64, 32\)"
    with pytest.raises(ValueError, match=expected):
        build_ppllava_from_backbones(llava, with_vision_changes(siglip, intermediate_size=48))


def test_saved_folder_reloads_with_the_auto_class_and_gives_identical_logits(built, tmp_path):
    built.model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as handle:
        assert set(handle.keys()) == set(built.model.state_dict())
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, PPLLaVAForConditionalGeneration)
    batch = video_batch(built.model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, built.model(**batch).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Processor


def test_processor_comes_from_the_backbone_tokenizers_and_feeds_the_built_model(built, tmp_path):
    llava_image_id = built.llava.config.image_token_id
    tiny_tokenizer(built.layout, llava_image_id, llava_image_id + 1).save_pretrained(tmp_path / "llava")
    tiny_prompt_tokenizer(built.layout, built.clip.config.text_config.vocab_size).save_pretrained(tmp_path / "clip")
    config = copy.deepcopy(built.model.config)
    processor = build_ppllava_processor(tmp_path / "llava", tmp_path / "clip", config, num_frames=4)
    assert (processor.image_token_id, processor.video_token_id) == (config.image_token_id, config.video_token_id)
    video = np.random.default_rng(0).integers(0, 255, (6, 48, 64, 3), dtype=np.uint8)
    inputs = processor(text="what is in the video? <video>", videos=video, do_sample_frames=True)
    assert int((inputs["input_ids"] == config.video_token_id).sum()) == built.model.model.video_pooling_plan(4).num_tokens
    with torch.no_grad():
        assert torch.isfinite(built.model(**inputs).logits).all()


def test_the_example_builds_a_folder_the_auto_classes_load(tmp_path, monkeypatch, capsys):
    script = Path(__file__).parents[1] / "examples" / "build_from_backbones.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--tiny", "vicuna", "--output-dir", str(tmp_path), "--verify"])
    runpy.run_path(str(script), run_name="__main__")
    assert "text logits identical" in capsys.readouterr().out
    processor = AutoProcessor.from_pretrained(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert processor.video_token_id == model.config.video_token_id
