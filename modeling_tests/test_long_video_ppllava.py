"""Long videos: chunked encoding gives the unchunked numbers, the BT-Adapter runs per chunk of its time table, and no
stage sees more frames at once than configured."""

import pytest
import torch
from model_tester import record_calls

from ppllava_hf import PPLLaVAForConditionalGeneration
from ppllava_hf.models.ppllava.modeling_ppllava import btadapter_chunk_sizes
from ppllava_hf.testing.tiny import tiny_config


PROMPT = torch.tensor([[5, 6, 7, 8]])


def tiny_model(layout="vicuna", **overrides):
    """Tiny random model; the BT-Adapter gets random weights too (it starts as an identity on the patches)."""
    torch.manual_seed(0)
    model = PPLLaVAForConditionalGeneration(tiny_config(layout, **overrides)).eval().model
    if model.btadapter is not None:
        with torch.no_grad():
            for parameter in model.btadapter.parameters():
                parameter.normal_(0.0, 0.1)
    return model


def random_video(num_frames, seed=0):
    return torch.randn(num_frames, 3, 84, 84, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# BT-Adapter beyond its time table


@pytest.mark.parametrize(
    "num_frames, expected", [(64, [64]), (65, [33, 32]), (130, [44, 43, 43]), (512, [64] * 8), (1, [1])]
)
def test_btadapter_chunk_sizes_examples(num_frames, expected):
    assert btadapter_chunk_sizes(num_frames, 64) == expected


def test_btadapter_chunks_are_balanced_and_fit_the_time_table():
    for max_frames in (1, 4, 64):
        for num_frames in range(1, 300):
            sizes = btadapter_chunk_sizes(num_frames, max_frames)
            assert sum(sizes) == num_frames
            assert max(sizes) <= max_frames
            assert max(sizes) - min(sizes) <= 1
            assert len(sizes) == -(-num_frames // max_frames)


def test_btadapter_refuses_clips_longer_than_its_time_table():
    model = tiny_model(btadapter_max_frames=4)
    states = [torch.randn(1, 5, 37, 32) for _ in range(model.btadapter.depth)]

    with pytest.raises(ValueError, match="time embeddings for 4 frames"):
        model.btadapter(states, model.vision_tower.embeddings.position_embedding.weight)


@pytest.mark.parametrize("chunk_frames", [1, 2, 5])
def test_btadapter_in_chunks_equals_the_whole_clip(chunk_frames):
    """Attention and MLP of the branch run over bounded groups of tokens with the same numbers."""
    model = tiny_model(btadapter_max_frames=8)
    generator = torch.Generator().manual_seed(3)
    layer_states = [torch.randn(2, 7, 37, 32, generator=generator) for _ in range(model.btadapter.depth)]
    position_embedding = model.vision_tower.embeddings.position_embedding.weight
    attended_tokens, hook = record_calls(
        model.btadapter.spatial_layers[0].self_attn, lambda tokens: tokens.shape[:2].numel()
    )

    with torch.no_grad():
        whole = model.btadapter(layer_states, position_embedding)
        attended_tokens.clear()
        chunked = model.btadapter(layer_states, position_embedding, chunk_frames=chunk_frames)
    hook.remove()

    torch.testing.assert_close(chunked, whole)
    # Two clips of 7 frames of 37 tokens: a group holds at least one frame of each clip.
    assert max(attended_tokens) <= max(chunk_frames, 2) * 37 and sum(attended_tokens) == 2 * 7 * 37


@pytest.mark.parametrize("vision_chunk_frames", [None, 3])
def test_long_clip_equals_its_btadapter_chunks_encoded_alone(vision_chunk_frames):
    model = tiny_model(btadapter_max_frames=4, vision_chunk_frames=vision_chunk_frames)
    video = random_video(11)

    with torch.no_grad():
        whole = model.encode_frames(video, [11]).last_hidden_state
        pieces = [
            model.encode_frames(video[start : start + size], [size]).last_hidden_state
            for start, size in ((0, 4), (4, 4), (8, 3))
        ]

    torch.testing.assert_close(whole, torch.cat(pieces))


def test_btadapter_sees_at_most_its_table_of_frames():
    model = tiny_model(btadapter_max_frames=4)
    seen, hook = record_calls(model.btadapter, lambda layer_states: layer_states[0].shape[1])

    with torch.no_grad():
        model.encode_frames(random_video(11), [11])
    hook.remove()

    assert sorted(seen) == [3, 4] and max(seen) <= model.btadapter.max_frames


def test_clip_of_exactly_the_table_length_runs_the_adapter_once_over_all_frames():
    """64 frames with the published 64-row table: one adapter pass over the whole clip, as in the original."""
    model = tiny_model()
    assert model.btadapter.max_frames == 64
    video = random_video(64)

    with torch.no_grad():
        encoded = model.encode_frames(video, [64]).last_hidden_state
        hidden_states = model.vision_tower(video, output_hidden_states=True).hidden_states
        first = model.config.vision_config.num_hidden_layers - model.btadapter.depth + 1
        layers = [hidden_states[index][None] for index in range(first, model._feature_state_index() + 1)]
        expected = model.btadapter(layers, model.vision_tower.embeddings.position_embedding.weight)[0, :, 1:]

    torch.testing.assert_close(encoded, expected)


# ---------------------------------------------------------------------------------------------------------------------
# Chunked encoding equals unchunked


@pytest.mark.parametrize("layout", ["vicuna", "qwen"])
@pytest.mark.parametrize("vision_chunk_frames", [1, 3, 7])
def test_chunked_vision_encoding_equals_unchunked(layout, vision_chunk_frames):
    model = tiny_model(layout, btadapter_max_frames=8)
    video = random_video(13)

    with torch.no_grad():
        unchunked = model.encode_frames(video, [13]).last_hidden_state
        model.config.vision_chunk_frames = vision_chunk_frames
        chunked = model.encode_frames(video, [13]).last_hidden_state

    torch.testing.assert_close(chunked, unchunked)


@pytest.mark.parametrize("layout", ["vicuna", "qwen"])
def test_chunked_video_features_equal_unchunked(layout):
    """Relevance (a softmax over all patches) and pooled tokens do not depend on the chunk size."""
    model = tiny_model(layout, btadapter_max_frames=8, max_visual_tokens=12)
    videos = [random_video(13, seed=1), random_video(4, seed=2)]
    prompts = PROMPT.repeat(2, 1)

    with torch.no_grad():
        unchunked = model.get_video_features(videos, clip_input_ids=prompts)
        model.config.vision_chunk_frames = 3
        chunked = model.get_video_features(videos, clip_input_ids=prompts)

    for name in ("pooler_output", "relevance"):
        for actual, expected in zip(getattr(chunked, name), getattr(unchunked, name)):
            torch.testing.assert_close(actual, expected)
    for relevance in chunked.relevance:
        assert relevance.dtype == torch.float32
        torch.testing.assert_close(relevance.sum(), torch.tensor(1.0))  # one softmax over every patch of the clip


def test_chunked_image_features_equal_unchunked():
    model = tiny_model("vicuna")
    tiles = torch.randn(2, 5, 3, 84, 84)
    sizes = torch.tensor([[84, 168], [168, 168]])

    with torch.no_grad():
        unchunked = model.get_image_features(tiles, sizes, clip_input_ids=PROMPT.repeat(2, 1))
        model.config.vision_chunk_frames = 2
        chunked = model.get_image_features(tiles, sizes, clip_input_ids=PROMPT.repeat(2, 1))

    for actual, expected in zip(chunked.pooler_output, unchunked.pooler_output):
        torch.testing.assert_close(actual, expected)


# ---------------------------------------------------------------------------------------------------------------------
# Bounded working set


@pytest.mark.parametrize("layout", ["vicuna", "qwen"])
@pytest.mark.parametrize("max_visual_tokens", [None, 16])
def test_no_stage_sees_more_frames_than_the_chunk(layout, max_visual_tokens):
    """Vision tower, BT-Adapter and prompt alignment handle at most `vision_chunk_frames` frames per call; the projector
    at most that many or one temporal window, whichever is longer (a budget binding on 23 frames makes windows of 8)."""
    model = tiny_model(layout, btadapter_max_frames=2, vision_chunk_frames=4, max_visual_tokens=max_visual_tokens)
    patches_per_frame = model.config.patch_grid[0] * model.config.patch_grid[1]
    tower, tower_hook = record_calls(model.vision_tower.embeddings, lambda pixels: pixels.shape[0])
    alignment, alignment_hook = record_calls(model.prompt_alignment.visual_layernorm, lambda patches: patches.shape[1])
    projector, projector_hook = record_calls(
        model.multi_modal_projector.linear_1, lambda patches: patches[0, ..., 0].numel() // patches_per_frame
    )
    hooks = [tower_hook, alignment_hook, projector_hook]
    if model.btadapter is not None:
        adapter, adapter_hook = record_calls(model.btadapter, lambda layer_states: layer_states[0].shape[:2].numel())
        hooks.append(adapter_hook)

    with torch.no_grad():
        model.get_video_features([random_video(23)], clip_input_ids=PROMPT)
    for hook in hooks:
        hook.remove()

    window_frames = model.video_pooling_plan(23).kernel[0]
    assert sum(tower) == 23 and max(tower) <= 4
    assert sum(alignment) == 23 and max(alignment) <= 4
    if model.btadapter is not None:
        assert sum(adapter) == 23 and max(adapter) <= 4
    assert max(projector) <= max(4, window_frames) and len(projector) > 1


def test_vision_chunk_frames_must_be_positive():
    with pytest.raises(ValueError, match="vision_chunk_frames must be positive"):
        tiny_config("vicuna", vision_chunk_frames=0)


@pytest.mark.parametrize("layout", ["vicuna", "qwen"])
@pytest.mark.parametrize("vision_chunk_frames", [None, 2])
def test_encoded_frames_carry_the_towers_own_hidden_states(layout, vision_chunk_frames):
    """The vision tower runs through its public forward: chunked or not, the returned hidden states are the ones its
    own `output_hidden_states` gives, and the selected features are the state at `vision_feature_layer` (blended with
    the BT-Adapter where there is one)."""
    model = tiny_model(layout, vision_chunk_frames=vision_chunk_frames)
    pixels = random_video(3)
    first_token = 1 if model.config.vision_feature_select_strategy == "default" else 0

    with torch.no_grad():
        expected = model.vision_tower(pixels, output_hidden_states=True).hidden_states
        encoded = model.encode_frames(pixels, [3], output_hidden_states=True)

    assert len(encoded.hidden_states) == model.config.vision_config.num_hidden_layers + 1
    for state, expected_state in zip(encoded.hidden_states, expected):
        torch.testing.assert_close(state, expected_state)
    selected = expected[model.config.vision_feature_layer][:, first_token:]
    if model.btadapter is None:
        torch.testing.assert_close(encoded.last_hidden_state, selected)
    else:
        assert encoded.last_hidden_state.shape == selected.shape
