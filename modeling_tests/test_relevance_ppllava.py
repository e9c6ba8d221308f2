"""Relevance heatmaps and "when" timelines: per-frame shares, moment finding, the model's view of the frames, PNGs."""

import numpy as np
import pytest
import torch
from PIL import Image

from ppllava_hf import sample_frame_indices
from ppllava_hf.relevance import (
    TimeRange,
    VideoRelevance,
    frame_spans,
    frame_weights,
    model_view_frames,
    relevance_grid_size,
    save_relevance_grid,
    save_relevance_timeline,
    top_time_ranges,
    video_relevance,
)
from ppllava_hf.testing.embedded_default import (
    BALL_ENTERS,
    BALL_LEAVES,
    SAMPLE_QUESTION,
    build_embedded_default,
    sample_frame,
    write_sample_video,
)


@pytest.fixture(scope="module")
def embedded():
    return build_embedded_default()


@pytest.fixture(scope="module")
def sample_video(tmp_path_factory):
    return write_sample_video(tmp_path_factory.mktemp("clip") / "sample.mp4")


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


# ----------------------------------------------------------------------------------------------------------------------
# Moments


def test_frame_spans_reach_halfway_to_the_neighbours():
    assert frame_spans([0.5, 1.5, 2.5, 4.5]) == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.5), (3.5, 5.5)]
    assert np.allclose(frame_spans([0.1, 0.3]), [(0.0, 0.2), (0.2, 0.4)])  # never before zero
    assert frame_spans([2.0]) == [(2.0, 2.0)]


def test_top_time_ranges_are_above_average_runs_ranked_by_their_peak():
    weights = torch.tensor([1.0, 3.0, 2.0, 0.5, 0.5, 4.0, 0.5, 2.5])  # average 1.75
    ranges = top_time_ranges(weights, [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5], top_k=5)
    total = float(weights.sum())
    assert ranges == [
        TimeRange(start=5.0, end=6.0, peak=5.5, share=pytest.approx(4.0 / total), frames=(5,)),
        TimeRange(start=1.0, end=3.0, peak=1.5, share=pytest.approx(5.0 / total), frames=(1, 2)),
        TimeRange(start=7.0, end=8.0, peak=7.5, share=pytest.approx(2.5 / total), frames=(7,)),
    ]
    assert top_time_ranges(weights, top_k=1)[0].frames == (5,)  # without timestamps: frame positions
    assert str(ranges[0]) == "5.00-6.00s (peak 5.50s, 29% of the relevance)"


@pytest.mark.parametrize("seed", range(5))
def test_the_top_range_contains_the_frame_with_the_highest_weight(seed):
    weights = torch.rand(32, generator=torch.Generator().manual_seed(seed))
    timestamps = np.cumsum(np.random.default_rng(seed).uniform(0.1, 1.0, 32)).tolist()
    top = top_time_ranges(weights, timestamps, top_k=3)[0]
    best = int(weights.argmax())
    assert best in top.frames and top.peak == timestamps[best]
    assert top.start <= timestamps[best] <= top.end


def test_uniform_relevance_is_one_moment_covering_the_video():
    (moment,) = top_time_ranges(torch.ones(4), [0.5, 1.5, 2.5, 3.5])
    assert (moment.start, moment.end, moment.share, moment.frames) == (0.0, 4.0, pytest.approx(1.0), (0, 1, 2, 3))


def test_top_time_ranges_checks_the_timestamp_count():
    with pytest.raises(ValueError, match="4 frame weights but 3 timestamps"):
        top_time_ranges(torch.ones(4), [0.0, 1.0, 2.0])


# ----------------------------------------------------------------------------------------------------------------------
# The relevance of a video under the model


def test_video_relevance_matches_the_pooling_weights_and_the_measured_timestamps(embedded, sample_video):
    model, processor = embedded
    result = video_relevance(model, processor, str(sample_video), SAMPLE_QUESTION)
    assert result.relevance.shape == (16, 6, 6) and result.relevance.dtype == torch.float32
    assert float(result.relevance.sum()) == pytest.approx(1.0, abs=1e-5)
    assert float(result.frame_weights.sum()) == pytest.approx(1.0, abs=1e-6)
    # The clip is 4 s at 10 fps: 16 segment-middle frames, timestamps measured by the decoder.
    assert result.timestamps == pytest.approx([index / 10 for index in sample_frame_indices(40, 16)])
    # Same relevance as the pooling used inside encode_multimodal for a chat prompt with that question.
    messages = [{"role": "user", "content": [{"type": "video", "path": str(sample_video)},
                                             {"type": "text", "text": SAMPLE_QUESTION}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    with torch.no_grad():
        encoded = model.encode_multimodal(
            input_ids=inputs["input_ids"], pixel_values_videos=inputs["pixel_values_videos"],
            clip_input_ids=inputs["clip_input_ids"], clip_attention_mask=inputs["clip_attention_mask"],
        )
    torch.testing.assert_close(encoded["video"].relevance[0], result.relevance)


def test_relevance_from_a_pooling_pass_is_the_relevance_video_relevance_computes(embedded, sample_video):
    model, processor = embedded
    messages = [{"role": "user", "content": [{"type": "video", "path": str(sample_video)},
                                             {"type": "text", "text": SAMPLE_QUESTION}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           processor_kwargs={"return_metadata": True})
    with torch.no_grad():
        encoded = model.encode_multimodal(
            input_ids=inputs["input_ids"], pixel_values_videos=inputs["pixel_values_videos"],
            clip_input_ids=inputs["clip_input_ids"], clip_attention_mask=inputs["clip_attention_mask"],
        )
    result = VideoRelevance.from_encoding(SAMPLE_QUESTION, encoded["video"].relevance[0],
                                          inputs["pixel_values_videos"][0], processor.video_processor,
                                          inputs["video_metadata"][0])
    expected = video_relevance(model, processor, str(sample_video), SAMPLE_QUESTION)
    torch.testing.assert_close(result.relevance, expected.relevance)
    np.testing.assert_array_equal(result.frames, expected.frames)
    assert result.timestamps == pytest.approx(expected.timestamps)
    assert [moment.frames for moment in result.top_time_ranges()] == [
        moment.frames for moment in expected.top_time_ranges()
    ]


def test_model_view_frames_undo_the_normalisation(embedded, sample_video):
    model, processor = embedded
    result = video_relevance(model, processor, str(sample_video), SAMPLE_QUESTION)
    assert result.frames.shape == (16, 84, 84, 3) and result.frames.dtype == np.uint8
    # A frame where the ball is in view: the squashed frame shows the red ball, the empty ones do not.
    ball_frames = [i for i, t in enumerate(result.timestamps) if BALL_ENTERS + 0.2 < t < BALL_LEAVES - 0.2]
    red = (result.frames[..., 0] > 150) & (result.frames[..., 1] < 90)
    assert all(red[i].any() for i in ball_frames)
    assert not red[0].any() and not red[-1].any()
    pixels = processor.video_processor(videos=[result.frames])["pixel_values_videos"][0]
    vp = processor.video_processor
    assert np.abs(model_view_frames(pixels, vp.image_mean, vp.image_std).astype(int) - result.frames).max() <= 1


def test_frame_arrays_without_fps_have_no_timestamps(embedded):
    model, processor = embedded
    frames = np.stack([sample_frame(t) for t in np.linspace(0, 3.9, 8)])
    result = video_relevance(model, processor, frames, "the ball")
    assert result.timestamps is None and result.relevance.shape[0] == 8
    assert result.top_time_ranges(1)[0].frames[0] in range(8)


# ----------------------------------------------------------------------------------------------------------------------
# PNGs


def test_heatmap_and_timeline_are_pngs_of_the_expected_size(embedded, sample_video, tmp_path):
    model, processor = embedded
    result = video_relevance(model, processor, str(sample_video), SAMPLE_QUESTION)
    assert result.save_heatmap(tmp_path / "heatmap.png") == png_size(tmp_path / "heatmap.png") == (8 * 192, 2 * 192 + 40)
    assert result.save_timeline(tmp_path / "timeline.png") == png_size(tmp_path / "timeline.png") == (960, 320)


@pytest.mark.parametrize("frames, height, width, columns", [(5, 60, 80, None), (7, 84, 84, 3), (1, 90, 160, None)])
def test_grid_size_follows_the_frame_aspect_and_columns(tmp_path, frames, height, width, columns):
    images = np.zeros((frames, height, width, 3), np.uint8)
    relevance = torch.rand(frames, 6, 6)
    size = save_relevance_grid(images, relevance, tmp_path / "grid.png", columns=columns, cell_width=100)
    expected_columns = min(frames, columns or 8)
    rows = -(-frames // expected_columns)
    assert size == png_size(tmp_path / "grid.png") == (expected_columns * 100, rows * round(100 * height / width) + 40)
    assert size == relevance_grid_size(frames, height, width, columns, 100)


def test_timeline_without_timestamps_and_checks(tmp_path):
    weights = frame_weights(torch.rand(4, 3, 3))
    ranges = top_time_ranges(weights)
    assert save_relevance_timeline(weights, None, tmp_path / "t.png", ranges, size=(640, 240)) == (640, 240)
    assert png_size(tmp_path / "t.png") == (640, 240)
    with pytest.raises(ValueError, match="3 frames but relevance for 4"):
        save_relevance_grid(np.zeros((3, 8, 8, 3), np.uint8), torch.rand(4, 2, 2), tmp_path / "g.png")
