"""Frame sampling and PyAV decoding: PPLLaVA's sampler, real files in several containers, seeking, and bad files."""

import logging
import os
import random
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image
from video_test_files import (
    index_frame,
    read_index,
    write_audio_only,
    write_empty_video,
    write_frame_folder,
    write_video,
)

from ppllava_hf import VideoDecodingError, decode_video, sample_frame_indices
from ppllava_hf.models.ppllava.video_decoding_ppllava import PyAVVideoReader


NTSC = Fraction(30000, 1001)


def original_get_index(bound, fps, max_frame, num_segments):
    """The original sampler (`get_index` in PPLLaVA's demo.py and test/video_utils.py), transcribed by hand."""
    start, end = bound if bound else (-100000, 100000)
    start_idx = max(0, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)]


# ----------------------------------------------------------------------------------------------------------------------
# Sampling rule


@pytest.mark.parametrize("total", [1, 5, 31, 32, 33, 100, 1000, 7919])
@pytest.mark.parametrize("num_frames", [1, 8, 16, 32, 64])
def test_indices_equal_the_original_sampler(total, num_frames):
    assert sample_frame_indices(total, num_frames) == original_get_index(None, 25.0, total - 1, num_frames)


@pytest.mark.parametrize("bound", [(0.0, 4.0), (1.3, 2.9), (2.5, 100.0), (0.4, 0.5)])
@pytest.mark.parametrize("fps", [25.0, float(NTSC)])
def test_indices_with_start_and_end_equal_the_original_sampler(bound, fps):
    total = 120
    expected = original_get_index(bound, fps, total - 1, 16)
    assert sample_frame_indices(total, 16, video_fps=fps, start_time=bound[0], end_time=bound[1]) == expected


def test_a_clip_shorter_than_num_frames_repeats_frames_to_keep_the_count():
    indices = sample_frame_indices(5, 12)
    assert len(indices) == 12
    assert sorted(set(indices)) == [0, 1, 2, 3, 4]
    assert indices == sorted(indices)


def test_fps_sampling_takes_one_frame_per_period_with_the_same_rule():
    # 10 s at 25 fps sampled at 2 fps: 20 segments, middle frame of each.
    indices = sample_frame_indices(250, num_frames=None, fps=2.0, video_fps=25.0)
    assert indices == original_get_index(None, 25.0, 249, 20)
    assert sample_frame_indices(250, num_frames=None, fps=2.0, video_fps=25.0, start_time=2.0, end_time=4.0) == (
        original_get_index((2.0, 4.0), 25.0, 249, 4)
    )


def test_no_count_and_no_fps_keeps_every_frame_of_the_clip():
    assert sample_frame_indices(50, num_frames=None) == list(range(50))
    assert sample_frame_indices(50, num_frames=None, video_fps=10.0, start_time=1.0, end_time=2.0) == list(range(10, 21))


def original_training_ranges(total, num_frames):
    """Where the original's training sampler (`get_frame_indices(..., sample="rand")` in its datasets' utils.py) may put
    each frame, transcribed by hand: segments split at `int(linspace(0, total, n + 1))`, frame `i` drawn from
    `range(start_i, end_i - 1)`; None when a segment is too short for that, which makes it draw distinct frames instead."""
    count = min(num_frames, total)
    bounds = np.linspace(0, total, count + 1).astype(int)
    ranges = [range(start, stop - 1) for start, stop in zip(bounds[:-1], bounds[1:])]
    return ranges if all(ranges) else None


@pytest.mark.parametrize("total, num_frames", [(100, 32), (300, 32), (65, 32), (90, 8), (64, 32)])
def test_random_sampling_draws_each_frame_from_its_segment_as_the_original_trains(total, num_frames):
    ranges = original_training_ranges(total, num_frames)
    random.seed(0)
    draws = [sample_frame_indices(total, num_frames, frame_sampling="random") for _ in range(300)]
    for slot, allowed in enumerate(ranges):
        assert {draw[slot] for draw in draws} == set(allowed)  # every allowed frame and only those, over the draws


def test_random_sampling_of_short_segments_draws_distinct_sorted_frames():
    assert original_training_ranges(40, 32) is None  # some 1-frame segments: the original's fallback
    random.seed(1)
    draws = [sample_frame_indices(40, 32, frame_sampling="random") for _ in range(50)]
    assert all(len(set(draw)) == 32 and draw == sorted(draw) for draw in draws)
    assert len({tuple(draw) for draw in draws}) > 1


def test_random_sampling_of_a_clip_shorter_than_num_frames_repeats_its_last_frame():
    assert sample_frame_indices(5, 8, frame_sampling="random") == [0, 1, 2, 3, 4, 4, 4, 4]


def test_random_sampling_stays_inside_the_clip_bounds_and_follows_the_seed():
    random.seed(2)
    first = sample_frame_indices(250, 8, video_fps=25.0, start_time=2.0, end_time=6.0, frame_sampling="random")
    random.seed(2)
    again = sample_frame_indices(250, 8, video_fps=25.0, start_time=2.0, end_time=6.0, frame_sampling="random")
    assert first == again and all(50 <= index <= 150 for index in first)
    ranges = original_training_ranges(101, 8)
    assert all(index - 50 in allowed for index, allowed in zip(first, ranges))


def test_a_file_and_a_frame_folder_are_decoded_at_the_random_frames(tmp_path):
    video = write_video(tmp_path / "clip.mp4", "libx264", 120, rate=25)
    folder = write_frame_folder(tmp_path / "frames", 120)
    for source in (video, folder):
        random.seed(3)
        frames, metadata = decode_video(source, num_frames=8, frame_sampling="random")
        random.seed(3)
        assert metadata.frames_indices == sample_frame_indices(120, 8, frame_sampling="random")
        assert [read_index(frame) for frame in frames] == metadata.frames_indices
        assert metadata.frames_indices != sample_frame_indices(120, 8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_frames": 8, "fps": 1.0, "video_fps": 25.0}, "either `num_frames` or `fps`"),
        ({"num_frames": 0}, "positive"),
        ({"num_frames": 2.5}, "positive whole number"),
        ({"num_frames": 8, "start_time": 1.0}, "frame rate"),
        ({"num_frames": 8, "video_fps": 25.0, "start_time": 3.0, "end_time": 2.0}, "must come before"),
        ({"num_frames": 8, "video_fps": 25.0, "start_time": 4.0}, "beyond the end"),
        ({"num_frames": 8, "video_fps": 25.0, "start_time": -1.0}, ">= 0"),
        ({"num_frames": 8, "frame_sampling": "rand"}, "frame_sampling must be one of"),
    ],
)
def test_bad_sampling_arguments_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_frame_indices(100, **kwargs)


def test_an_end_beyond_the_video_is_clamped_as_in_the_original():
    assert sample_frame_indices(100, 8, video_fps=25.0, start_time=1.0, end_time=60.0) == original_get_index(
        (1.0, 60.0), 25.0, 99, 8
    )


@pytest.mark.parametrize(
    "bounds, message",
    [
        ({"end_time": -1.0}, "end_time must be > 0"),
        ({"end_time": 0.0}, "end_time must be > 0"),
        ({"start_time": -0.5, "end_time": 2.0}, "start_time must be >= 0"),
        ({"end_time": float("nan")}, "end_time must be a finite"),
        ({"start_time": float("inf")}, "start_time must be a finite"),
    ],
)
def test_end_time_is_bounded_as_evenly_as_start_time(bounds, message):
    with pytest.raises(ValueError, match=message):
        sample_frame_indices(100, 8, video_fps=25.0, **bounds)


def test_fps_above_the_video_rate_samples_every_frame_once_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        indices = sample_frame_indices(40, None, fps=1000.0, video_fps=25.0)
    assert indices == sample_frame_indices(40, None, fps=25.0, video_fps=25.0)
    assert len(indices) == 40
    assert "fps=1000 is above the video's 25 frames per second" in caplog.text


@pytest.mark.parametrize(
    "request_, message",
    [
        ({"num_frames": 10_000_000}, "num_frames=10000000 takes 10000000 frames"),
        ({"num_frames": None, "fps": 20.0, "video_fps": 25.0}, r"fps=20 over the 4000.0 s clip takes 80000 frames"),
        ({"num_frames": None}, "every frame of the clip takes 100000 frames"),
    ],
    ids=["num_frames", "fps", "every frame"],
)
def test_more_frames_than_max_frames_are_refused_with_the_numbers(request_, message):
    with pytest.raises(ValueError, match=f"{message}, above the limit of 2048 per video"):
        sample_frame_indices(100_000, **request_, max_frames=2048)


# ----------------------------------------------------------------------------------------------------------------------
# Decoding real files


CONTAINERS = [
    ("clip.mp4", "libx264", NTSC, "yuv420p"),
    ("clip.mkv", "libvpx", 25, "yuv420p"),
    ("clip.webm", "libvpx-vp9", 25, "yuv420p"),
    ("clip.avi", "mjpeg", 24, "yuvj420p"),
    ("clip.mov", "mpeg4", 30, "yuv420p"),
    ("clip.gif", "gif", 10, "rgb8"),
]


@pytest.mark.parametrize("name, codec, rate, pix_fmt", CONTAINERS, ids=[c[0] for c in CONTAINERS])
def test_decoded_frames_are_the_sampled_ones_with_their_timestamps(tmp_path, name, codec, rate, pix_fmt):
    path = write_video(tmp_path / name, codec, 60, rate=rate, pix_fmt=pix_fmt, gop_size=10)
    frames, metadata = decode_video(path, num_frames=8)
    expected = sample_frame_indices(60, 8)
    assert frames.shape == (8, 16, 96, 3) and frames.dtype == np.uint8
    assert [read_index(frame) for frame in frames] == expected
    assert metadata.frames_indices == expected
    assert metadata.total_num_frames == 60
    assert metadata.fps == pytest.approx(float(rate))
    assert metadata.timestamps == pytest.approx([index / float(rate) for index in expected], abs=1e-3)


def test_non_integer_frame_rate_timestamps_come_from_the_frames(tmp_path):
    path = write_video(tmp_path / "ntsc.mp4", "libx264", 90, rate=NTSC)
    _, metadata = decode_video(path, num_frames=3)
    assert metadata.frames_indices == [14, 44, 73]
    assert metadata.timestamps == pytest.approx([14 * 1001 / 30000, 44 * 1001 / 30000, 73 * 1001 / 30000])
    assert metadata.duration == pytest.approx(90 * 1001 / 30000)


def test_start_and_end_seconds_select_the_clip(tmp_path):
    path = write_video(tmp_path / "clip.mp4", "libx264", 100, rate=25)
    frames, metadata = decode_video(path, num_frames=4, start_time=1.0, end_time=2.0)
    expected = original_get_index((1.0, 2.0), 25.0, 99, 4)
    assert [read_index(frame) for frame in frames] == expected == metadata.frames_indices
    assert all(1.0 <= t <= 2.0 for t in metadata.timestamps)


def test_fps_sampling_of_a_file(tmp_path):
    path = write_video(tmp_path / "clip.mkv", "libvpx", 100, rate=25)
    frames, metadata = decode_video(path, num_frames=None, fps=1.0)
    assert len(frames) == 4
    assert [read_index(frame) for frame in frames] == original_get_index(None, 25.0, 99, 4)


def test_a_short_video_gives_num_frames_frames_with_repeats(tmp_path):
    path = write_video(tmp_path / "short.mp4", "libx264", 5, rate=25)
    frames, metadata = decode_video(path, num_frames=12)
    assert len(frames) == 12
    assert [read_index(frame) for frame in frames] == sample_frame_indices(5, 12) == metadata.frames_indices


@pytest.mark.parametrize(
    "name, codec, rate, frames_reported",
    [("long.mp4", "libx264", NTSC, True), ("long.mkv", "libvpx", 25, False)],
)
def test_a_long_file_is_not_decoded_whole_when_few_frames_are_wanted(tmp_path, name, codec, rate, frames_reported):
    path = write_video(tmp_path / name, codec, 1200, rate=rate, gop_size=12)
    with PyAVVideoReader(path) as reader:
        assert reader.frame_count_is_exact is frames_reported
        indices = sample_frame_indices(reader.total_num_frames, 8)
        frames, _ = reader.read(indices)
        assert [read_index(frame) for frame in frames] == indices
        # Each far frame costs a seek plus at most one group of pictures: 8 * 12, not 1200.
        assert reader.num_decoded_frames <= 8 * 12
    assert reader.total_num_frames == 1200


class _OvershootingContainer:
    """A container whose seeks land two seconds after the requested time, as with a broken index."""

    def __init__(self, container, stream):
        self._container, self._stream = container, stream

    def seek(self, offset, **kwargs):
        return self._container.seek(int(offset + 2 / self._stream.time_base), **kwargs)

    def __getattr__(self, name):
        return getattr(self._container, name)


def test_a_seek_that_overshoots_is_detected_by_pts_and_decoding_restarts(tmp_path):
    path = write_video(tmp_path / "clip.mp4", "libx264", 400, rate=25, gop_size=10)
    with PyAVVideoReader(path) as reader:
        reader._container = _OvershootingContainer(reader._container, reader._stream)
        indices = [50, 200, 380]
        frames, timestamps = reader.read(indices)
    assert [read_index(frame) for frame in frames] == indices
    assert timestamps == pytest.approx([2.0, 8.0, 15.2])


@pytest.mark.parametrize(
    "name, codec, estimate",
    [("clip.webm", "libvpx-vp9", 0), ("clip.mkv", "libvpx", 60)],
    ids=["no duration: packet scan", "estimate too high: packet scan after the end"],
)
def test_frame_counts_not_in_the_header_fall_back_to_a_packet_scan(tmp_path, monkeypatch, name, codec, estimate):
    path = write_video(tmp_path / name, codec, 40, rate=25)
    monkeypatch.setattr(PyAVVideoReader, "_estimated_frame_count", lambda self: estimate)
    frames, metadata = decode_video(path, num_frames=4)
    assert metadata.total_num_frames == 40
    assert [read_index(frame) for frame in frames] == sample_frame_indices(40, 4)


def test_memory_holds_the_sampled_frames_only(tmp_path):
    path = write_video(tmp_path / "clip.mp4", "libx264", 300, rate=25)
    frames, _ = decode_video(path, num_frames=4)
    assert frames.nbytes == 4 * 16 * 96 * 3


@pytest.mark.parametrize(
    "name, codec, pix_fmt, frame",
    [
        ("gray.mkv", "ffv1", "gray", np.full((16, 96, 3), 77, np.uint8)),
        ("gray16.mkv", "ffv1", "gray16le", np.full((16, 96, 3), 200, np.uint8)),
        ("rgba.mov", "png", "rgba", np.full((16, 96, 3), (10, 120, 250), np.uint8)),
    ],
)
def test_grayscale_16_bit_and_alpha_files_become_8_bit_rgb(tmp_path, name, codec, pix_fmt, frame):
    path = write_video(tmp_path / name, codec, 3, pix_fmt=pix_fmt, frames=[frame] * 3)
    frames, _ = decode_video(path, num_frames=2)
    assert frames.shape == (2, 16, 96, 3) and frames.dtype == np.uint8
    np.testing.assert_allclose(frames.astype(int), np.broadcast_to(frame, frames.shape).astype(int), atol=2)


@pytest.mark.parametrize(
    "rotation, mirrored, upright",
    [
        (-90, False, lambda frame: np.rot90(frame, -1)),  # a phone held upright: stored sideways, shown turned right
        (90, False, lambda frame: np.rot90(frame, 1)),
        (180, False, lambda frame: frame[::-1, ::-1]),
        (0, True, lambda frame: frame[:, ::-1]),
        (90, True, lambda frame: np.rot90(frame, 1)[:, ::-1]),
    ],
    ids=["rotate -90", "rotate 90", "rotate 180", "mirrored", "rotate 90 mirrored"],
)
@pytest.mark.parametrize("name, codec, pix_fmt", [("phone.mp4", "libx264", "yuv420p"), ("phone.mkv", "ffv1", "bgr0")])
def test_a_rotated_video_is_decoded_as_players_show_it(tmp_path, name, codec, pix_fmt, rotation, mirrored, upright):
    path = write_video(tmp_path / name, codec, 30, pix_fmt=pix_fmt, rotation=rotation, mirrored=mirrored)
    frames, metadata = decode_video(path, num_frames=3)
    expected = np.stack([upright(index_frame(index)) for index in sample_frame_indices(30, 3)])
    assert frames.shape == expected.shape
    assert np.abs(frames.astype(int) - expected).mean() < 4  # lossy codecs blur the bar edges a little
    assert (metadata.height, metadata.width) == expected.shape[1:3]


# ----------------------------------------------------------------------------------------------------------------------
# Bad files


def test_a_missing_file_names_the_path(tmp_path):
    with pytest.raises(VideoDecodingError, match="not found.*nope.mp4'; check the path"):
        decode_video(tmp_path / "nope.mp4")


def test_a_corrupt_file_is_a_value_error(tmp_path):
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="corrupt, truncated or not a video"):
        decode_video(path)


def test_a_truncated_mp4_without_its_index_cannot_be_opened(tmp_path):
    path = write_video(tmp_path / "clip.mp4", "libx264", 60)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(VideoDecodingError, match="corrupt, truncated"):
        decode_video(path)


@pytest.mark.parametrize(
    "name, codec, options",
    [
        ("clip.mp4", "mpeg4", {"movflags": "faststart"}),
        ("clip.mov", "mpeg4", {"movflags": "faststart"}),
        ("clip.mkv", "libx264", None),
        ("clip.webm", "libvpx-vp9", None),
    ],
    ids=["mp4", "mov", "mkv", "webm"],
)
def test_a_truncated_file_is_refused_in_every_container(tmp_path, name, codec, options):
    path = write_video(tmp_path / name, codec, 60, options=options)
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.6)])
    with pytest.raises(VideoDecodingError, match=r"is truncated: its video stream declares 2.40 s but its frames end at"):
        decode_video(path, num_frames=8)


def test_an_audio_only_file_is_refused(tmp_path):
    with pytest.raises(VideoDecodingError, match="no video stream"):
        decode_video(write_audio_only(tmp_path / "speech.m4a"))


def test_a_video_stream_without_frames_is_refused(tmp_path):
    with pytest.raises(VideoDecodingError, match="without any frames"):
        decode_video(write_empty_video(tmp_path / "empty.avi"))


def test_start_beyond_the_duration_is_refused(tmp_path):
    path = write_video(tmp_path / "clip.mp4", "libx264", 50, rate=25)
    with pytest.raises(ValueError, match=r"beyond the end of the video \(2.000 s long\)"):
        decode_video(path, start_time=5.0)


# ----------------------------------------------------------------------------------------------------------------------
# Folders of frame images (MVBench's Episodic Reasoning)


def original_read_frame_files(num_files, num_segments):
    """The file numbers the original's `read_frame` reads from a folder of `num_files` frames numbered from 1, without
    bounds (`get_index` with `first_idx=1` and `max_frame` = the number of files), transcribed by hand."""
    start_idx, end_idx = max(1, round(-100000 * 3)), min(round(100000 * 3), num_files)
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)]


@pytest.mark.parametrize("num_files, num_frames", [(40, 8), (90, 32), (5, 8)])
def test_a_frame_folder_is_sampled_as_the_original_reads_it(tmp_path, num_files, num_frames):
    folder = write_frame_folder(tmp_path / "frames", num_files)
    frames, metadata = decode_video(folder, num_frames)
    assert frames.shape == (num_frames, 16, 96, 3)
    # Frame index i is file number i + 1.
    assert [read_index(frame) + 1 for frame in frames] == original_read_frame_files(num_files, num_frames)
    assert metadata.frames_indices == [read_index(frame) for frame in frames]
    assert metadata.total_num_frames == num_files and metadata.fps is None


def test_frame_folder_files_are_ordered_by_their_numbers_not_as_text(tmp_path):
    folder = write_frame_folder(tmp_path / "frames", 12, name="frame_{}.jpg".format)
    (folder / "notes.txt").write_text("not a frame")
    frames, _ = decode_video(folder, None)
    # Every frame, in order (JPEG is lossy but the bars stay readable): frame_2.jpg comes before frame_10.jpg.
    assert [read_index(frame) for frame in frames] == list(range(12))


def test_a_frame_folder_is_clipped_at_its_frame_rate(tmp_path):
    folder = write_frame_folder(tmp_path / "frames", 30)
    frames, metadata = decode_video(folder, 4, start_time=2.0, end_time=6.0, folder_fps=3)
    expected = sample_frame_indices(30, 4, video_fps=3, start_time=2.0, end_time=6.0)
    assert [read_index(frame) for frame in frames] == expected == metadata.frames_indices
    assert metadata.timestamps == pytest.approx([index / 3 for index in expected])
    with pytest.raises(ValueError, match="folder_fps"):
        decode_video(folder, 4, start_time=2.0)


def test_a_folder_without_frame_images_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoDecodingError, match="holds no frame images"):
        decode_video(tmp_path / "empty", 8)


def test_a_folder_of_video_files_is_no_frame_folder_and_the_error_says_to_pass_each_file(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    write_video(folder / "a.mp4", "libx264", 5)
    write_video(folder / "b.mkv", "libvpx", 5)
    with pytest.raises(VideoDecodingError, match=r"holds no frame images.*It holds video files \(a.mp4, b.mkv\): pass each"):
        decode_video(folder, 8)


def test_an_unreadable_folder_is_named_with_the_reason(tmp_path, monkeypatch):
    (tmp_path / "frames").mkdir()

    def refuse(path):
        raise PermissionError(13, "Permission denied", os.fspath(path))

    monkeypatch.setattr(os, "listdir", refuse)
    with pytest.raises(VideoDecodingError, match=r"Cannot list the frame folder .*frames' \(Permission denied\)"):
        decode_video(tmp_path / "frames", 8)


def test_frame_images_are_read_upright_and_16_bit_ones_scaled_not_clipped(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation 6: the camera was turned; viewers rotate the image 90 degrees clockwise
    Image.fromarray(index_frame(1)).save(folder / "1.png", exif=exif)
    Image.fromarray(np.full((96, 16), 51400, np.uint16)).save(folder / "2.png")  # 16-bit grayscale: 51400 / 257 = 200
    frames, _ = decode_video(folder, None)
    np.testing.assert_array_equal(frames[0], np.rot90(index_frame(1), -1))
    assert (frames[1] == 200).all()


IMAGE_FORMATS = [("photo.jpg", {"quality": 95}), ("photo.png", {}), ("photo.bmp", {}), ("photo.webp", {"lossless": True}),
                 ("photo.tiff", {})]


@pytest.mark.parametrize("name, options", IMAGE_FORMATS, ids=[name for name, _ in IMAGE_FORMATS])
def test_an_image_file_is_a_one_frame_video_in_every_format(tmp_path, name, options):
    rows, columns = np.mgrid[0:480, 0:640]  # a photo-sized picture: two gradients
    image = np.stack([rows * 255 // 479, columns * 255 // 639, np.full_like(rows, 128)], axis=-1).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / name, **options)
    frames, metadata = decode_video(tmp_path / name, num_frames=4)
    assert frames.shape == (4, 480, 640, 3)
    assert metadata.total_num_frames == 1 and metadata.frames_indices == [0, 0, 0, 0] and metadata.fps is None
    assert np.abs(frames[0].astype(int) - image).mean() < 2  # JPEG is lossy
    with pytest.raises(ValueError, match="needs a frame rate, which it does not carry: sample it by `num_frames`"):
        decode_video(tmp_path / name, num_frames=None, fps=1.0)


def test_a_jpeg_with_exif_orientation_is_a_one_frame_video_shown_upright(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8  # viewers rotate the image 90 degrees counterclockwise
    Image.fromarray(index_frame(3)).save(tmp_path / "photo.jpg", exif=exif, quality=100)
    frames, _ = decode_video(tmp_path / "photo.jpg", num_frames=1)
    assert frames.shape == (1, 96, 16, 3)
    assert np.abs(frames[0].astype(int) - np.rot90(index_frame(3), 1)).mean() < 8
