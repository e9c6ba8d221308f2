"""Frame sampling and PyAV decoding: PPLLaVA's sampler, real files in several containers, seeking, and bad files."""

from fractions import Fraction

import numpy as np
import pytest
from video_test_files import read_index, write_audio_only, write_empty_video, write_frame_folder, write_video

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


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_frames": 8, "fps": 1.0, "video_fps": 25.0}, "either `num_frames` or `fps`"),
        ({"num_frames": 0}, "positive"),
        ({"num_frames": 8, "start_time": 1.0}, "frame rate"),
        ({"num_frames": 8, "video_fps": 25.0, "start_time": 3.0, "end_time": 2.0}, "must come before"),
        ({"num_frames": 8, "video_fps": 25.0, "start_time": 4.0}, "beyond the end"),
        ({"num_frames": 8, "video_fps": 25.0, "start_time": -1.0}, ">= 0"),
    ],
)
def test_bad_sampling_arguments_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_frame_indices(100, **kwargs)


def test_an_end_beyond_the_video_is_clamped_as_in_the_original():
    assert sample_frame_indices(100, 8, video_fps=25.0, start_time=1.0, end_time=60.0) == original_get_index(
        (1.0, 60.0), 25.0, 99, 8
    )


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


# ----------------------------------------------------------------------------------------------------------------------
# Bad files


def test_a_missing_file_names_the_path(tmp_path):
    with pytest.raises(VideoDecodingError, match="not found.*nope.mp4'; check the path"):
        decode_video(tmp_path / "nope.mp4")
    with pytest.raises(VideoDecodingError, match="URLs are not fetched"):
        decode_video("https://example.com/clip.mp4")


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


def test_a_truncated_mp4_whose_frames_are_missing_is_refused(tmp_path):
    path = write_video(tmp_path / "clip.mp4", "mpeg4", 60, options={"movflags": "faststart"})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(VideoDecodingError, match="truncated"):
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
