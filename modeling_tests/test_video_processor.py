"""The torch-only video processor: accepted inputs, frame conversion, resizing as the original, sampling, outputs."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from video_test_files import read_index, write_frame_folder, write_video

from ppllava_hf import PPLLaVAVideoProcessor, sample_frame_indices


@pytest.fixture
def processor():
    return PPLLaVAVideoProcessor(size={"height": 28, "width": 28}, num_frames=4, do_normalize=False, do_rescale=False)


def test_a_file_is_sampled_to_num_frames(tmp_path, processor):
    path = write_video(tmp_path / "clip.mp4", "libx264", 40)
    out = processor(str(path), return_metadata=True)
    assert out["pixel_values_videos"].shape == (1, 4, 3, 28, 28)
    assert out["video_metadata"][0].frames_indices == sample_frame_indices(40, 4)
    assert out["pixel_values_videos"].dtype == torch.float32


def test_random_frame_sampling_is_a_call_option_for_training_and_middle_stays_the_default(tmp_path, processor):
    path = str(write_video(tmp_path / "clip.mp4", "libx264", 40))
    random.seed(0)
    out = processor(path, frame_sampling="random", return_metadata=True)
    random.seed(0)
    assert out["video_metadata"][0].frames_indices == sample_frame_indices(40, 4, frame_sampling="random")
    assert processor(path, return_metadata=True)["video_metadata"][0].frames_indices == sample_frame_indices(40, 4)


@pytest.mark.parametrize(
    "video",
    [
        np.zeros((5, 20, 30, 3), np.uint8),
        torch.zeros(5, 3, 20, 30, dtype=torch.uint8),
        torch.zeros(5, 20, 30, 3, dtype=torch.uint8),
        [Image.new("RGB", (30, 20))] * 5,
        [np.zeros((20, 30, 3), np.uint8)] * 5,
    ],
    ids=["array THWC", "tensor TCHW", "tensor THWC", "PIL frames", "list of arrays"],
)
def test_frame_inputs_are_used_as_given(processor, video):
    assert processor(video)["pixel_values_videos"].shape == (1, 5, 3, 28, 28)


def test_frame_arrays_are_sampled_only_on_request(processor):
    video = np.stack([np.full((8, 8, 3), i, np.uint8) for i in range(20)])
    out = processor(video, do_sample_frames=True, return_metadata=True)
    indices = sample_frame_indices(20, 4)
    assert out["video_metadata"][0].frames_indices == indices
    assert out["pixel_values_videos"][0, :, 0, 0, 0].tolist() == indices


def test_fps_sampling_of_arrays_needs_their_frame_rate(processor):
    video = np.zeros((50, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="frame rate"):
        processor(video, do_sample_frames=True, fps=1.0)
    out = processor(video, do_sample_frames=True, fps=1.0, video_metadata={"fps": 10.0}, return_metadata=True)
    assert out["pixel_values_videos"].shape[1] == 5
    assert out["video_metadata"][0].timestamps == [i / 10.0 for i in sample_frame_indices(50, 5)]


def test_videos_of_different_lengths_come_back_as_a_list(processor, tmp_path):
    path = write_video(tmp_path / "clip.mkv", "libvpx", 30)
    out = processor([str(path), np.zeros((3, 8, 8, 3), np.uint8)])
    assert isinstance(out["pixel_values_videos"], list)
    assert [tuple(v.shape) for v in out["pixel_values_videos"]] == [(4, 3, 28, 28), (3, 3, 28, 28)]


def test_nested_lists_from_chat_templates_are_flattened(processor):
    video = np.zeros((2, 8, 8, 3), np.uint8)
    assert processor([[video, video], [], [video]])["pixel_values_videos"].shape == (3, 2, 3, 28, 28)


def test_per_video_clip_bounds(processor, tmp_path):
    path = str(write_video(tmp_path / "clip.mp4", "libx264", 100, rate=25))
    out = processor([path, path], start_time=[0.0, 2.0], end_time=[1.0, None], return_metadata=True)
    first, second = (meta.frames_indices for meta in out["video_metadata"])
    assert max(first) <= 25 and min(second) >= 50
    with pytest.raises(ValueError, match="one per video"):
        processor([path, path], start_time=[0.0])


@pytest.mark.parametrize(
    "frames, expected",
    [
        (np.full((2, 6, 6, 1), 90, np.uint8), (90, 90, 90)),
        (np.dstack([np.full((6, 6, 3), 40, np.uint8), np.zeros((6, 6, 1), np.uint8)])[None].repeat(2, 0), (40, 40, 40)),
        (np.full((2, 6, 6, 3), 257 * 200, np.uint16), (200, 200, 200)),
        (np.full((2, 6, 6, 3), 0.5, np.float32), (128, 128, 128)),
        ([Image.new("L", (6, 6), 70)] * 2, (70, 70, 70)),
        ([Image.new("RGBA", (6, 6), (1, 2, 3, 0))] * 2, (1, 2, 3)),
        ([Image.fromarray(np.full((6, 6), 257 * 30, np.uint16))] * 2, (30, 30, 30)),
    ],
    ids=["grayscale", "RGBA", "16-bit", "float 0..1", "PIL L", "PIL RGBA", "PIL 16-bit"],
)
def test_grayscale_alpha_and_deep_frames_become_8_bit_rgb(frames, expected):
    processor = PPLLaVAVideoProcessor(size={"height": 6, "width": 6}, do_normalize=False, do_rescale=False)
    pixels = processor(frames)["pixel_values_videos"][0]
    assert pixels[:, :, 3, 3].tolist() == [list(map(float, expected))] * 2


@pytest.mark.parametrize(
    "frames, message",
    [
        (np.full((2, 6, 6, 3), 2.0, np.float32), r"must lie in \[0, 1\]"),
        (np.full((2, 6, 6, 3), 300, np.int32), "must hold 0..255"),
        (np.zeros((2, 6, 6, 3), bool), "Boolean"),
        (np.zeros((2, 6, 6, 5), np.uint8), "channel axis"),
        (np.zeros((6, 6, 3), np.uint8), "single image goes in `images`"),
        ("", "not found"),
        (42, "Unsupported video input"),
        ([], "No videos"),
    ],
)
def test_unusable_frames_are_refused_with_the_fix(processor, frames, message):
    with pytest.raises(ValueError, match=message):
        processor(frames)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_float_frames_are_refused_naming_the_frames(processor, bad):
    frames = np.full((4, 6, 6, 3), 0.5, np.float32)
    frames[2, 1, 1, 0] = bad
    with pytest.raises(ValueError, match=r"Float frames hold 1 NaN or infinite values \(in frame\(s\) \[2\]\)"):
        processor(frames)


@pytest.mark.parametrize(
    "video_kind, options, message",
    [
        ("file", {"num_frames": 10_000_000}, "num_frames=10000000 takes 10000000 frames, above the limit of 2048"),
        ("file", {"do_sample_frames": False, "max_num_frames": 30}, "every frame of the clip takes 40 frames, above the limit of 30"),
        ("array", {"do_sample_frames": True, "num_frames": 5000}, "num_frames=5000 takes 5000 frames, above the limit of 2048"),
    ],
    ids=["absurd num_frames", "every frame of a file", "array resampled"],
)
def test_more_frames_than_max_num_frames_are_refused_before_decoding(tmp_path, processor, video_kind, options, message):
    video = str(write_video(tmp_path / "clip.mp4", "libx264", 40)) if video_kind == "file" else np.zeros((6, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=message):
        processor(video, **options)


def test_clip_frames_are_squashed_like_the_original_pil_resize():
    """The original resizes each frame to the square input with PIL bicubic, ignoring the aspect ratio."""
    rng = np.random.default_rng(0)
    frame = (rng.random((45, 80, 3)) * 255).astype(np.uint8)
    processor = PPLLaVAVideoProcessor(size={"height": 28, "width": 28})
    ours = processor(frame[None])["pixel_values_videos"][0, 0]
    reference = np.asarray(Image.fromarray(frame).resize((28, 28), Image.BICUBIC), np.float32) / 255
    reference = (reference - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)
    difference = (ours.permute(1, 2, 0).numpy() - reference) * np.array(OPENAI_CLIP_STD) * 255
    assert np.abs(difference).mean() < 1.0  # under one intensity level on average
    assert np.abs(difference).max() <= 12


def test_siglip_frames_are_letterboxed_with_black_bars():
    frame = np.full((1, 20, 40, 3), 255, np.uint8)
    processor = PPLLaVAVideoProcessor(size={"height": 40, "width": 40}, resize_mode="letterbox", do_normalize=False, do_rescale=False)
    pixels = processor(frame)["pixel_values_videos"][0, 0, 0]
    assert pixels[:10].eq(0).all() and pixels[30:].eq(0).all()
    assert pixels[10:30].eq(255).all()


def test_normalisation_uses_the_configured_mean_and_std():
    processor = PPLLaVAVideoProcessor(size={"height": 4, "width": 4}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    pixels = processor(np.full((1, 4, 4, 3), 255, np.uint8))["pixel_values_videos"]
    assert torch.allclose(pixels, torch.ones_like(pixels))


def test_default_num_frames_and_fps_are_exclusive():
    with pytest.raises(ValueError, match="not both"):
        PPLLaVAVideoProcessor(num_frames=8, fps=1.0)
    processor = PPLLaVAVideoProcessor(num_frames=8)
    with pytest.raises(ValueError, match="not both"):
        processor(np.zeros((3, 4, 4, 3), np.uint8), num_frames=4, fps=1.0)


def test_save_and_load(tmp_path):
    processor = PPLLaVAVideoProcessor(size={"height": 28, "width": 28}, resize_mode="letterbox", num_frames=6)
    processor.save_pretrained(tmp_path)
    loaded = PPLLaVAVideoProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()


def test_decoded_frames_match_the_file(tmp_path):
    path = write_video(tmp_path / "clip.avi", "mjpeg", 12, rate=24, pix_fmt="yuvj420p")
    processor = PPLLaVAVideoProcessor(size={"height": 16, "width": 96}, num_frames=3, do_normalize=False, do_rescale=False)
    frames = processor(str(path))["pixel_values_videos"][0].permute(0, 2, 3, 1).numpy()
    assert [read_index(frame) for frame in frames] == sample_frame_indices(12, 3)


def test_a_folder_of_frame_images_is_a_video(tmp_path, processor):
    folder = write_frame_folder(tmp_path / "frames", 20)
    out = processor([str(folder)], return_metadata=True)
    assert out["pixel_values_videos"].shape == (1, 4, 3, 28, 28)
    assert out["video_metadata"][0].frames_indices == sample_frame_indices(20, 4)
