"""Video files to frames for PPLLaVA: the original frame sampler, PyAV decoding that seeks instead of reading a whole
file when few frames are wanted, and folders of frame images (MVBench's Episodic Reasoning videos are stored so).

PyAV (`av`) is imported inside the functions that decode, so this module loads where it is not installed.
"""

import base64
import binascii
import contextlib
import math
import mimetypes
import os
import random
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.utils import logging
from transformers.video_utils import VideoMetadata


logger = logging.get_logger(__name__)

# Which frame of each segment is sampled: its middle (PPLLaVA's inference rule) or a random one (its training rule).
FrameSampling = Literal["middle", "random"]
FRAME_SAMPLINGS = ("middle", "random")


class VideoDecodingError(ValueError):
    """A video file that cannot be turned into frames: missing, not a video, corrupt or truncated, or without frames."""


# The most bytes a video given by URL may have (a `data:` URL's decoded bytes, or an http(s) download): a request cannot
# fill the memory or the disk. `decode_video(max_url_bytes=...)` and the video processor's `max_url_bytes` change it.
MAX_URL_BYTES = 256 * 1024 * 1024
# Seconds an http(s) server may stay silent (to connect, or between two reads) before the download is given up.
URL_TIMEOUT_SECONDS = 30
_URL = re.compile(r"^(?:data:|[A-Za-z][A-Za-z0-9+.-]*://)", re.IGNORECASE)
_DOWNLOAD_CHUNK = 1024 * 1024


@dataclass
class PPLLaVAVideoMetadata(VideoMetadata):
    """`VideoMetadata` plus the measured presentation time (seconds from the first frame) of each sampled frame."""

    frame_timestamps: list[float] | None = None

    @property
    def timestamps(self) -> list[float]:
        """When each sampled frame is shown: measured from the decoded frames when known, else index / fps."""
        if self.frame_timestamps is not None:
            return list(self.frame_timestamps)
        return super().timestamps


def sample_frame_indices(
    total_num_frames: int,
    num_frames: int | None = 32,
    fps: float | None = None,
    video_fps: float | None = None,
    start_time: float | None = None,
    end_time: float | None = None,
    max_frames: int | None = None,
    frame_sampling: FrameSampling = "middle",
) -> list[int]:
    """Indices of the frames PPLLaVA looks at: the middle of each of `num_frames` equal segments of the clip.

    The same rule as the original sampler (`get_index` in PPLLaVA's `demo.py` and evaluation datasets): the clip runs
    from frame `max(0, round(start_time * video_fps))` to frame `min(round(end_time * video_fps), total_num_frames - 1)`,
    and segment `i` contributes frame `int(first + seg / 2 + round(seg * i))` with `seg = (last - first) / num_frames`.

    A clip with fewer frames than `num_frames` yields `num_frames` indices anyway, repeating frames (each source frame
    once per segment it spans), as the original does: the model then sees the same number of frames, and tokens, as
    for a long clip.

    Args:
        total_num_frames: frames in the video.
        num_frames: frames to sample; exclusive with `fps`. With neither, every frame of the clip is returned.
        fps: sample `int(clip_seconds * fps)` frames (at least one) with the same rule instead; needs `video_fps`.
            An `fps` above the video's own rate is capped at it (every frame once, with a warning): a video holds no
            frames between its frames.
        video_fps: frame rate of the video; needed by `fps`, `start_time` and `end_time`.
        start_time, end_time: bounds of the clip in seconds. Both must be finite, with `0 <= start_time < end_time`,
            `end_time > 0` and `start_time` inside the video; an `end_time` beyond the video is clamped to its last
            frame (as the original does).
        max_frames: refuse (before any frame is read) to sample more frames than this.
        frame_sampling: `"middle"` (the rule above, PPLLaVA's at inference) or `"random"`, the sampler of the
            original's SFT and DPO data (`get_frame_indices(sample="rand")`), for training: see
            `random_segment_indices`.
    """
    if frame_sampling not in FRAME_SAMPLINGS:
        raise ValueError(f"frame_sampling must be one of {FRAME_SAMPLINGS}, got {frame_sampling!r}.")
    if total_num_frames < 1:
        raise VideoDecodingError("The video has no frames to sample from.")
    if num_frames is not None and fps is not None:
        raise ValueError(f"Sample frames with either `num_frames` or `fps`, not both (got {num_frames=}, {fps=}).")
    if num_frames is not None and not _is_positive_whole_number(num_frames):
        raise ValueError(f"num_frames must be a positive whole number of frames, got {num_frames!r}.")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number of frames per second, got {fps}.")
    needs_rate = fps is not None or start_time is not None or end_time is not None
    if needs_rate and not video_fps:
        raise ValueError(
            "Sampling by `fps` or with `start_time`/`end_time` needs the video's frame rate: pass `video_metadata` "
            "with `fps` for frame arrays, or a video file."
        )
    first, last = _clip_bounds(total_num_frames, video_fps, start_time, end_time)
    if fps is not None and fps > video_fps:
        logger.warning(
            f"fps={fps:g} is above the video's {video_fps:g} frames per second; sampling at {video_fps:g} (every frame "
            "once) instead of repeating frames."
        )
        fps = video_fps
    clip_frames = last - first + 1
    if num_frames is not None:
        count, requested = num_frames, f"num_frames={num_frames}"
    elif fps is not None:
        count = max(1, int(clip_frames / video_fps * fps))
        requested = f"fps={fps:g} over the {clip_frames / video_fps:.1f} s clip"
    else:
        count, requested = clip_frames, "every frame of the clip"
    if max_frames is not None and count > max_frames:
        raise ValueError(
            f"Sampling {requested} takes {count} frames, above the limit of {max_frames} per video (each frame is "
            "decoded, resized and run through the vision tower). Ask for fewer frames (num_frames=... or a lower "
            "fps), or raise the video processor's `max_num_frames` if you mean it."
        )
    if num_frames is None and fps is None:
        return list(range(first, last + 1))
    if frame_sampling == "random":
        return [first + index for index in random_segment_indices(clip_frames, count)]
    segment = float(last - first) / count
    return [int(first + segment / 2 + np.round(segment * i)) for i in range(count)]


def random_segment_indices(total_num_frames: int, num_frames: int) -> list[int]:
    """`num_frames` sorted frame indices below `total_num_frames`, drawn as the original trains (`get_frame_indices` with
    `sample="rand"` in its datasets' `utils.py`).

    The clip is split into `min(num_frames, total_num_frames)` segments at `int(linspace(0, total, n + 1))` and each gives
    a frame drawn uniformly from its start up to two before its end (the original's range never reaches a segment's last
    frame). When a segment has fewer than two frames, a sorted random choice of `n` distinct frames is taken instead. A
    clip shorter than `num_frames` ends with its last drawn frame repeated up to `num_frames`. The draws come from
    Python's `random`, which `transformers.set_seed` seeds and PyTorch re-seeds in each DataLoader worker.
    """
    count = min(num_frames, total_num_frames)
    bounds = np.linspace(0, total_num_frames, count + 1).astype(int).tolist()
    segments = list(zip(bounds[:-1], bounds[1:]))
    if all(stop - start >= 2 for start, stop in segments):
        indices = [random.randrange(start, stop - 1) for start, stop in segments]
    else:
        indices = sorted(random.sample(range(total_num_frames), count))
    return indices + [indices[-1]] * (num_frames - count)


def _is_positive_whole_number(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def _clip_bounds(
    total_num_frames: int, video_fps: float | None, start_time: float | None, end_time: float | None
) -> tuple[int, int]:
    """First and last frame index of the [start_time, end_time] clip, validated against the video's length."""
    last_frame = total_num_frames - 1
    duration = total_num_frames / video_fps if video_fps else None
    for name, bound in (("start_time", start_time), ("end_time", end_time)):
        if bound is not None and not math.isfinite(bound):
            raise ValueError(f"{name} must be a finite number of seconds, got {bound}.")
    if start_time is not None and start_time < 0:
        raise ValueError(f"start_time must be >= 0 seconds, got {start_time}.")
    if end_time is not None and end_time <= 0:
        raise ValueError(f"end_time must be > 0 seconds (the clip ends after the video starts), got {end_time}.")
    if start_time is not None and end_time is not None and start_time >= end_time:
        raise ValueError(f"start_time ({start_time} s) must come before end_time ({end_time} s).")
    if start_time is not None and start_time >= duration:
        raise ValueError(
            f"start_time ({start_time} s) is at or beyond the end of the video ({duration:.3f} s long); pick a start "
            "inside the video."
        )
    first = max(0, round(start_time * video_fps)) if start_time is not None else 0
    last = min(round(end_time * video_fps), last_frame) if end_time is not None else last_frame
    return first, max(first, last)


class PyAVVideoReader:
    """Frames of one video file by index, decoded with PyAV.

    Far frames are reached by seeking to the keyframe before them and decoding forward; the frame it lands on is
    checked by its presentation time (pts), and a seek that overshoots falls back to decoding from the start. Near
    frames are decoded in sequence. Only the requested frames are kept, so memory grows with them, not with the file.

    Frames come out as players show them: the display matrix the container declares (a phone video recorded in
    portrait is stored sideways with a 90-degree rotation; some cameras also mirror) is applied to each frame.

    `num_decoded_frames` counts every frame the decoder produced, for diagnostics and tests. `is_image` says that
    FFmpeg reads the file as a still image (JPEG, PNG, BMP, WebP, TIFF, ...), which `decode_video` reads with Pillow.
    """

    def __init__(self, path: str | os.PathLike):
        av = _import_av()
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise VideoDecodingError(
                f"Video file not found: {path!r}; check the path (relative paths start at {os.getcwd()!r})."
            )
        try:
            self._container = av.open(path)
        except av.error.FFmpegError as error:
            raise VideoDecodingError(
                f"Cannot open {path!r} as a video ({error}); the file is corrupt, truncated or not a video. Re-encode "
                "it (e.g. `ffmpeg -i in -c:v libx264 out.mp4`) or pass decoded frames."
            ) from error
        if not self._container.streams.video:
            self._container.close()
            raise VideoDecodingError(
                f"{path!r} has no video stream (audio-only or data file); pass a file with video, or decoded frames."
            )
        self.path = path
        self.is_image = any(name.endswith("_pipe") or name == "image2" for name in self._container.format.name.split(","))
        self._stream = self._container.streams.video[0]
        self._av_error = av.error.FFmpegError
        # One converter to RGB for every frame of the file: `frame.to_ndarray(format=...)` builds a new one per frame, and
        # setting up its scaler costs ~30x the conversion itself at the small sizes of sampled clips.
        self._to_rgb = av.video.reformatter.VideoReformatter()
        rate = self._stream.average_rate or self._stream.guessed_rate or self._stream.base_rate
        if not rate:
            self.close()
            raise VideoDecodingError(f"{path!r} does not declare a frame rate; re-encode it with a constant frame rate.")
        self.fps = float(rate)
        self.height, self.width = self._stream.height, self._stream.width
        self._time_base = float(self._stream.time_base)
        self._start_pts = self._stream.start_time or 0
        self._frame_pts = 1.0 / (self.fps * self._time_base)
        self.num_decoded_frames = 0
        self.frame_count_is_exact = bool(self._stream.frames)
        self.declared_duration = self._declared_stream_duration()
        self.packets_end: float | None = None  # set by count_packets
        self.total_num_frames = self._stream.frames or self._estimated_frame_count() or self.count_packets()
        if self.total_num_frames < 1:
            self.close()
            raise VideoDecodingError(f"{path!r} has a video stream without any frames; it is empty or truncated.")

    @property
    def duration(self) -> float:
        return self.total_num_frames / self.fps

    def _declared_stream_duration(self) -> float | None:
        """Seconds the video stream itself says it lasts (its duration field, or the `DURATION` tag Matroska files
        carry per stream); None when only the container's duration, which covers every stream, is known."""
        if self._stream.duration:
            return self._stream.duration * self._time_base
        tag = self._stream.metadata.get("DURATION") or self._stream.metadata.get("duration")
        if tag:
            try:
                hours, minutes, seconds = tag.split(":")
                return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
            except ValueError:
                return None
        return None

    def _estimated_frame_count(self) -> int:
        """Frames implied by the stream (else container) duration, for containers that do not store a count (mkv, webm)."""
        if self.declared_duration:
            seconds = self.declared_duration
        elif self._container.duration:
            seconds = self._container.duration / 1_000_000
        else:
            return 0
        return round(seconds * self.fps)

    def count_packets(self) -> int:
        """Exact frame count by demuxing (not decoding) every packet of the video stream, in a separate pass; also sets
        `packets_end`, the second (from the first frame) at which the last of them ends."""
        count, end = 0, 0
        try:
            with _import_av().open(self.path) as container:
                for packet in container.demux(container.streams.video[0]):
                    if packet.size:
                        count += 1
                        if packet.pts is not None:
                            end = max(end, packet.pts - self._start_pts + max(packet.duration or 0, self._frame_pts))
        except self._av_error as error:
            raise VideoDecodingError(f"{self.path!r} is corrupt or truncated: reading it failed with {error}.") from error
        self.frame_count_is_exact = True
        self.packets_end = end * self._time_base
        return count

    def truncation(self) -> str | None:
        """Why the file counts as truncated, or None: its frames (counted by `count_packets`) end more than two frames
        before the end its video stream declares. A length known only from the container (which also covers audio)
        or estimated (MPEG-TS) is no declaration: such a file is read as what it holds."""
        if self.declared_duration is None or self.packets_end is None:
            return None
        if self.declared_duration - self.packets_end <= 2 / self.fps:
            return None
        return (
            f"{self.path!r} is truncated: its video stream declares {self.declared_duration:.2f} s but its frames end at "
            f"{self.packets_end:.2f} s ({self.total_num_frames} frames). Download or copy it again, or repair it (e.g. "
            "`ffmpeg -i in -c copy out.mkv` keeps the frames it has)."
        )

    def read(self, indices: Sequence[int]) -> tuple[np.ndarray, list[float]]:
        """RGB frames `(len(indices), height, width, 3)` uint8 at `indices` (any order, repeats allowed), and the
        presentation time in seconds (from the first frame) of each."""
        wanted = sorted(set(int(index) for index in indices))
        if not wanted or wanted[0] < 0 or wanted[-1] >= self.total_num_frames:
            raise ValueError(f"Give at least one frame index in [0, {self.total_num_frames}), got {list(indices)}.")
        try:
            decoded = self._decode(wanted)
        except self._av_error as error:
            raise VideoDecodingError(f"{self.path!r} is corrupt or truncated: decoding failed with {error}.") from error
        frames = np.stack([decoded[index][0] for index in indices])
        return frames, [decoded[index][1] for index in indices]

    def _decode(self, wanted: list[int]) -> dict[int, tuple[np.ndarray, float]]:
        """Decode the sorted frame indices `wanted`: seek when the next one is further than a seek costs, else go on."""
        found = {}
        frames, last_pts = None, None
        seek_cost = 16  # frames decoded after a seek to reach its target; re-measured at every seek
        can_seek = True
        for index in wanted:
            target = self._start_pts + index * self._frame_pts
            if frames is not None and not (can_seek and (target - last_pts) / self._frame_pts > seek_cost):
                frame, _, _ = self._advance(frames, target)
            else:
                frames = self._frames_from(target if can_seek else self._start_pts)
                frame, steps, first_pts = self._advance(frames, target)
                if first_pts is not None and first_pts > target + self._frame_pts / 2:
                    # The seek overshot (wrong or missing index): decode this and the later frames from the start.
                    can_seek = False
                    frames = self._frames_from(self._start_pts)
                    frame, steps, _ = self._advance(frames, target)
                seek_cost = max(1, steps)
            if frame is None:
                raise _EndOfStream(
                    f"{self.path!r} is truncated: it declares {self.total_num_frames} frames but frame {index} cannot "
                    "be decoded. Re-encode or repair the file."
                )
            last_pts = frame.pts
            seconds = (frame.pts - self._start_pts) * self._time_base
            found[index] = (self._as_displayed(frame), round(seconds, 6))
        return found

    def _as_displayed(self, frame) -> np.ndarray:
        """RGB array of `frame` as players show it: mirrored, then rotated counterclockwise by `frame.rotation`, as its
        display matrix says (a mirrored matrix reads as a rotation after a vertical flip)."""
        array = self._to_rgb.reformat(frame, format="rgb24").to_ndarray()
        matrix = frame.side_data.get(_import_av().sidedata.sidedata.Type.DISPLAYMATRIX)
        if matrix is None:
            return array
        if frame.rotation % 90:
            raise VideoDecodingError(
                f"{self.path!r} declares a display rotation of {frame.rotation} degrees, not a multiple of 90; re-encode "
                "it with the rotation applied (`ffmpeg -i in.mp4 out.mp4` applies it)."
            )
        a, b, _, c, d = np.frombuffer(bytes(matrix), np.int32)[:5].astype(np.int64)
        if a * d - b * c < 0:
            array = array[::-1]
        return np.ascontiguousarray(np.rot90(array, round(frame.rotation / 90)))

    def _frames_from(self, pts: float) -> Iterator:
        """Decoded frames from the keyframe at or before `pts` on, counted in `num_decoded_frames`."""
        self._container.seek(int(pts), stream=self._stream, backward=True, any_frame=False)
        for frame in self._container.decode(self._stream):
            if frame.pts is None:
                raise VideoDecodingError(f"{self.path!r} has frames without timestamps; re-encode it (e.g. to mp4).")
            self.num_decoded_frames += 1
            yield frame

    def _advance(self, frames: Iterator, target: float):
        """The first frame whose pts reaches `target` (within half a frame), how many frames that took, and the pts of
        the first of them (to check where a seek landed). The frame is None when the stream ends first."""
        first_pts = None
        for steps, frame in enumerate(frames, start=1):
            first_pts = frame.pts if first_pts is None else first_pts
            if frame.pts >= target - self._frame_pts / 2:
                return frame, steps, first_pts
        return None, 0, first_pts

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> "PyAVVideoReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class _EndOfStream(VideoDecodingError):
    """The stream ended before a frame its declared (or estimated) length promised."""


def decode_video(
    path: str | os.PathLike,
    num_frames: int | None = 32,
    fps: float | None = None,
    start_time: float | None = None,
    end_time: float | None = None,
    folder_fps: float | None = None,
    max_frames: int | None = None,
    frame_sampling: FrameSampling = "middle",
    max_url_bytes: int | None = None,
) -> tuple[np.ndarray, PPLLaVAVideoMetadata]:
    """Decode the frames PPLLaVA samples from a video file, or read them from a folder of frame images (see
    `sample_frame_indices` and `read_frame_folder`; `folder_fps` is the frame rate of a folder, files carry their own;
    `max_frames` refuses, before decoding, a request for more frames; `frame_sampling="random"` draws the frames as the
    original's training data loading does).

    Returns RGB frames `(num_frames, height, width, 3)` uint8 (any pixel format, bit depth or alpha is converted, the
    container's display rotation applied) and their metadata, whose `timestamps` are the measured presentation times of
    the sampled frames. An image file (whatever FFmpeg reads as a still image: JPEG, PNG, BMP, WebP, TIFF, ...) is a
    one-frame video without a frame rate, read with Pillow as the images of a frame folder are.

    `path` may also be a URL: `data:` (base64, as OpenAI-style clients send a video), `file://` or `http(s)://`; the
    bytes of a `data:` or http(s) URL go to a temporary file, at most `max_url_bytes` of them.

    Raises:
        VideoDecodingError (a `ValueError`): missing, unreadable, audio-only, empty, corrupt or truncated files (a file
        whose frames end before the duration its video stream declares, in any container); URLs that cannot be fetched
        or decoded, of another scheme, or larger than `max_url_bytes`.
    """
    with local_video_path(path, max_url_bytes) as path:
        if os.path.isdir(path):
            return read_frame_folder(path, num_frames, fps, start_time, end_time, folder_fps, max_frames, frame_sampling)
        sampling = _Sampling(num_frames, fps, start_time, end_time, max_frames, frame_sampling)
        with PyAVVideoReader(path) as reader:
            if not reader.is_image:
                return _decode_file(reader, sampling)
        path = os.fspath(path)
        return _read_frame_files([path], f"the image file {path!r}", None, "sample it by `num_frames`", sampling)


@contextlib.contextmanager
def local_video_path(source: str | os.PathLike, max_url_bytes: int | None = None) -> Iterator[str | os.PathLike]:
    """A local path to read the video `source` from: `source` itself when it is a path, the file a `file://` URL names,
    or a temporary file (removed on exit) holding the bytes of a `data:` or `http(s)://` URL, at most `max_url_bytes`
    (default `MAX_URL_BYTES`)."""
    if not (isinstance(source, str) and _URL.match(source)):
        yield source
        return
    scheme = source.split(":", 1)[0].lower()
    if scheme == "file":
        yield _file_url_path(source)
        return
    if scheme not in ("data", "http", "https"):
        raise VideoDecodingError(
            f"Unsupported video URL scheme {scheme!r} ({_shown(source)}): pass a path, or a data:, file:// or http(s):// "
            "URL; download other URLs first."
        )
    max_url_bytes = MAX_URL_BYTES if max_url_bytes is None else max_url_bytes
    with tempfile.TemporaryDirectory(prefix="ppllava-video-") as folder:
        if scheme == "data":
            media_type, payload = _data_url_bytes(source, max_url_bytes)
            target = os.path.join(folder, "video" + _suffix(media_type, ""))
            with open(target, "wb") as file:
                file.write(payload)
        else:
            target = _download(source, folder, max_url_bytes)
        yield target


def _shown(url: str) -> str:
    """A URL as error messages show it: a data: URL's header only, others cut to 200 characters."""
    if url[:5].lower() == "data:":
        return url.split(",", 1)[0] + ",..."
    return url if len(url) <= 200 else url[:200] + "..."


def _too_large(url: str, size: str, max_url_bytes: int) -> VideoDecodingError:
    return VideoDecodingError(
        f"The video at {_shown(url)} has {size} bytes, more than max_url_bytes={max_url_bytes}: send a shorter or "
        "smaller video, or raise max_url_bytes (the video processor's, or decode_video's)."
    )


def _file_url_path(url: str) -> str:
    """The local path a `file://` URL names (its host empty or `localhost`)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise VideoDecodingError(
            f"The file URL {_shown(url)} names the host {parsed.netloc!r}: only local files (file:///path) are read."
        )
    return urllib.request.url2pathname(parsed.path)


def _data_url_bytes(url: str, max_url_bytes: int) -> tuple[str, bytes]:
    """The media type and the bytes of a `data:[<media type>][;base64],<data>` URL."""
    header, separator, data = url[5:].partition(",")
    if not separator:
        raise VideoDecodingError(
            f"The data URL {_shown(url)} has no ',' before its data: write data:video/mp4;base64,<data>."
        )
    parameters = header.split(";")
    is_base64 = parameters[-1].strip().lower() == "base64"
    estimated = len(data) * 3 // 4 if is_base64 else len(data)
    if estimated > max_url_bytes:
        raise _too_large(url, f"about {estimated}", max_url_bytes)
    if is_base64:
        try:
            payload = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as error:
            raise VideoDecodingError(
                f"The data URL {_shown(url)} is not valid base64 ({error}): encode the file with base64.b64encode."
            ) from error
    else:
        payload = urllib.parse.unquote_to_bytes(data)
    if not payload:
        raise VideoDecodingError(f"The data URL {_shown(url)} holds no bytes: put the video's base64 after the comma.")
    if len(payload) > max_url_bytes:
        raise _too_large(url, str(len(payload)), max_url_bytes)
    return parameters[0].strip().lower(), payload


def _download(url: str, folder: str, max_url_bytes: int) -> str:
    """Download `url` into `folder` (refused beyond `max_url_bytes`); returns the file's path."""
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_SECONDS) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_url_bytes:
                raise _too_large(url, declared, max_url_bytes)
            media_type = response.headers.get_content_type()
            name = os.path.basename(urllib.parse.urlparse(response.geturl()).path)
            target = os.path.join(folder, "video" + _suffix(media_type, os.path.splitext(name)[1]))
            received = 0
            with open(target, "wb") as file:
                while chunk := response.read(_DOWNLOAD_CHUNK):
                    received += len(chunk)
                    if received > max_url_bytes:
                        raise _too_large(url, f"more than {max_url_bytes}", max_url_bytes)
                    file.write(chunk)
    except urllib.error.HTTPError as error:
        raise VideoDecodingError(f"Cannot fetch the video at {_shown(url)}: HTTP {error.code} {error.reason}.") from error
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise VideoDecodingError(
            f"Cannot fetch the video at {_shown(url)} ({reason}): check the address and that the server answers, or "
            "download the file and pass its path."
        ) from error
    if received == 0:
        raise VideoDecodingError(f"The server sent no bytes for {_shown(url)}: it is not a video.")
    return target


def _suffix(media_type: str, fallback: str) -> str:
    """A file suffix for a media type (`video/mp4` -> `.mp4`), or `fallback` for an unknown or generic one: FFmpeg picks
    some demuxers (still images) by it."""
    if media_type and media_type != "application/octet-stream":
        guessed = mimetypes.guess_extension(media_type)
        if guessed:
            return guessed
    return fallback if re.fullmatch(r"\.[A-Za-z0-9]{1,5}", fallback or "") else ""


@dataclass(frozen=True)
class _Sampling:
    """Which frames of a clip to take: the arguments of `sample_frame_indices` that do not depend on the video."""

    num_frames: int | None
    fps: float | None
    start_time: float | None
    end_time: float | None
    max_frames: int | None
    frame_sampling: FrameSampling = "middle"

    @property
    def needs_rate(self) -> bool:
        return self.fps is not None or self.start_time is not None or self.end_time is not None

    def indices(self, total_num_frames: int, video_fps: float | None) -> list[int]:
        return sample_frame_indices(
            total_num_frames, self.num_frames, self.fps, video_fps, self.start_time, self.end_time, self.max_frames,
            self.frame_sampling,
        )


def _decode_file(reader: PyAVVideoReader, sampling: _Sampling) -> tuple[np.ndarray, PPLLaVAVideoMetadata]:
    try:
        indices, frames, timestamps = _read_sampled(reader, sampling)
    except _EndOfStream:
        # The stream ended before a frame its header promised: a truncated file when its video stream declares a
        # longer duration, else a length estimated from the container; then sample the frames it holds.
        reader.total_num_frames = reader.count_packets()
        problem = reader.truncation()
        if problem:
            raise VideoDecodingError(problem) from None
        indices, frames, timestamps = _read_sampled(reader, sampling)
    metadata = PPLLaVAVideoMetadata(
        total_num_frames=reader.total_num_frames,
        fps=reader.fps,
        width=frames.shape[2],
        height=frames.shape[1],
        duration=reader.duration,
        video_backend="pyav",
        frames_indices=indices,
        frame_timestamps=timestamps,
    )
    return frames, metadata


class SampledVideoFile:
    """The frames PPLLaVA samples from a video file, read on demand a slice at a time (`read(start, stop)`), for a
    video too long to hold decoded at once.

    The sampled indices, and the recovery from a frame count its header overstates, are `decode_video`'s: the last
    sampled frame is decoded on opening, and a file that ends before it is counted packet by packet, refused when
    truncated and sampled again otherwise. The file stays open until `close()`. Only files with video frames; folders
    of frame images and image files go through `decode_video`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        num_frames: int | None = 32,
        fps: float | None = None,
        start_time: float | None = None,
        end_time: float | None = None,
        max_frames: int | None = None,
        frame_sampling: FrameSampling = "middle",
    ):
        if os.path.isdir(path):
            raise VideoDecodingError(f"{os.fspath(path)!r} is a folder of frame images: read it with decode_video.")
        sampling = _Sampling(num_frames, fps, start_time, end_time, max_frames, frame_sampling)
        self._reader = PyAVVideoReader(path)
        if self._reader.is_image:
            self.close()
            raise VideoDecodingError(f"{os.fspath(path)!r} is an image file: read it with decode_video.")
        self.indices = sampling.indices(self._reader.total_num_frames, self._reader.fps)
        try:
            last, _ = self._reader.read(self.indices[-1:])
        except _EndOfStream:
            self._reader.total_num_frames = self._reader.count_packets()
            problem = self._reader.truncation()
            if problem:
                self.close()
                raise VideoDecodingError(problem) from None
            self.indices = sampling.indices(self._reader.total_num_frames, self._reader.fps)
            last, _ = self._reader.read(self.indices[-1:])
        reader = self._reader
        self.metadata = PPLLaVAVideoMetadata(
            total_num_frames=reader.total_num_frames, fps=reader.fps, width=last.shape[2], height=last.shape[1],
            duration=reader.duration, video_backend="pyav", frames_indices=self.indices,
        )

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, start: int, stop: int) -> np.ndarray:
        """RGB frames `(frames, height, width, 3)` uint8 of the sampled frames `start` to `stop - 1`."""
        return self._reader.read(self.indices[start:stop])[0]

    def close(self) -> None:
        self._reader.close()


def _read_sampled(reader: PyAVVideoReader, sampling: _Sampling) -> tuple[list[int], np.ndarray, list[float]]:
    indices = sampling.indices(reader.total_num_frames, reader.fps)
    frames, timestamps = reader.read(indices)
    return indices, frames, timestamps


FRAME_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_FILE_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".gif")


def frame_folder_files(folder: str | os.PathLike) -> list[str]:
    """The frame images of a folder in frame order: names compared with their digit runs as numbers, so that
    `2.jpg` comes before `10.jpg` as `00002.jpg` comes before `00010.jpg`."""

    def frame_order(name: str) -> list:
        return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]

    names = [name for name in _folder_names(folder) if name.lower().endswith(FRAME_IMAGE_SUFFIXES)]
    return [os.path.join(folder, name) for name in sorted(names, key=frame_order)]


def _folder_names(folder: str | os.PathLike) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError as error:
        raise VideoDecodingError(
            f"Cannot list the frame folder {os.fspath(folder)!r} ({error.strerror or error}); check that it exists and "
            "that you may read it."
        ) from error


def read_frame_folder(
    folder: str | os.PathLike,
    num_frames: int | None = 32,
    fps: float | None = None,
    start_time: float | None = None,
    end_time: float | None = None,
    folder_fps: float | None = None,
    max_frames: int | None = None,
    frame_sampling: FrameSampling = "middle",
) -> tuple[np.ndarray, PPLLaVAVideoMetadata]:
    """The frames PPLLaVA samples from a folder of frame images (one file per frame, see `frame_folder_files`), by the
    same rule as a video file (`frame_sampling` included); only the sampled images are read.

    `folder_fps`, the rate the frames were extracted at (MVBench's Episodic Reasoning frames: 3), places frame `i` at
    `i / folder_fps` seconds; `fps=`, `start_time` and `end_time` need it. Without bounds the sampled files are the
    original's (`read_frame` in PPLLaVA's evaluation datasets); with bounds the original numbers its files from 1 and
    takes file `k` to be at `k / folder_fps` seconds, one frame later than here.
    """
    folder = os.fspath(folder)
    files = frame_folder_files(folder)
    if not files:
        raise VideoDecodingError(
            f"The folder {folder!r} holds no frame images ({', '.join(FRAME_IMAGE_SUFFIXES)}), so it is no frame "
            f"folder. {_what_to_pass_instead(folder)}"
        )
    rate_hint = "pass the rate its frames were extracted at, `folder_fps=...` (MVBench's frame folders: 3)"
    sampling = _Sampling(num_frames, fps, start_time, end_time, max_frames, frame_sampling)
    return _read_frame_files(files, f"the frame folder {folder!r}", folder_fps, rate_hint, sampling)


def _what_to_pass_instead(folder: str) -> str:
    videos = sorted(name for name in _folder_names(folder) if name.lower().endswith(VIDEO_FILE_SUFFIXES))
    if not videos:
        return "Pass a folder of one image per frame, or a video file."
    listed = ", ".join(videos[:3]) + (", ..." if len(videos) > 3 else "")
    return f"It holds video files ({listed}): pass each file as a video of its own (videos=[path, ...])."


def _read_frame_files(
    files: list[str], source: str, frame_rate: float | None, rate_hint: str, sampling: _Sampling
) -> tuple[np.ndarray, PPLLaVAVideoMetadata]:
    """The sampled frames of a video given as one image file per frame (`source` names it in errors, `rate_hint` says
    how to give it a frame rate)."""
    if not frame_rate and sampling.needs_rate:
        raise ValueError(
            f"Sampling {source} by `fps` or inside `start_time`/`end_time` needs a frame rate, which it does not "
            f"carry: {rate_hint}."
        )
    indices = sampling.indices(len(files), frame_rate)
    read = {index: read_frame_image(files[index]) for index in sorted(set(indices))}
    sizes = {frame.shape for frame in read.values()}
    if len(sizes) > 1:
        raise VideoDecodingError(f"The frames of {source} differ in size ({sorted(sizes)}); resize them to one size.")
    frames = np.stack([read[index] for index in indices])
    metadata = PPLLaVAVideoMetadata(
        total_num_frames=len(files),
        fps=frame_rate,
        width=frames.shape[2],
        height=frames.shape[1],
        duration=len(files) / frame_rate if frame_rate else None,
        video_backend="pil",
        frames_indices=indices,
        frame_timestamps=[round(index / frame_rate, 6) for index in indices] if frame_rate else None,
    )
    return frames, metadata


def read_frame_image(path: str | os.PathLike) -> np.ndarray:
    """One frame image as an RGB array `(H, W, 3)` uint8, upright (its EXIF orientation applied, as viewers do);
    16-bit grayscale is scaled to 8 bits."""
    try:
        with Image.open(path) as image:
            if getattr(image, "n_frames", 1) > 1:
                raise VideoDecodingError(
                    f"{os.fspath(path)!r} is an animated {image.format} image; convert it to a video file (e.g. "
                    "`ffmpeg -i in.webp out.mp4`) or pass its frames."
                )
            image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I"):  # 16-bit grayscale (PNG, TIFF): Pillow's RGB conversion would clip it
                levels = np.round(np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257).astype(np.uint8)
                return np.repeat(levels[..., None], 3, axis=-1)
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as error:
        raise VideoDecodingError(
            f"Cannot read the frame image {os.fspath(path)!r} ({error}); replace or re-export it."
        ) from error


def _import_av():
    try:
        import av
    except ImportError as error:
        raise ImportError("Decoding video files needs PyAV: `pip install av` (or pass decoded frames).") from error
    return av
