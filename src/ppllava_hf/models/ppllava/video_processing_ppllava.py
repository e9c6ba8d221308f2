"""Video processor of PPLLaVA: video files, frame arrays, tensors or PIL frames to normalised `pixel_values_videos`.

Torch-only (no torchvision): transformers' stock video processors need torchvision, which is optional here. Frames are
resized as the original does for each vision tower: squashed to the square input of CLIP (336), or letterboxed into
the square input of SigLIP (384, aspect kept, black bars).
"""

import functools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.processing_utils import Unpack, VideosKwargs
from transformers.video_utils import VideoMetadata

from .transformers_internals_ppllava import VideoProcessorMixin
from .video_decoding_ppllava import (
    MAX_URL_BYTES,
    FrameSampling,
    PPLLaVAVideoMetadata,
    PyAVVideoReader,
    SampledVideoFile,
    decode_video,
    read_frame_image,
    sample_frame_indices,
)


TimeBound = int | float | list[int | float | None] | None


class PPLLaVAVideosKwargs(VideosKwargs, total=False):
    """
    resize_mode (`"squash"` or `"letterbox"`):
        `"squash"` resizes frames to `size` ignoring their aspect ratio (the original CLIP path); `"letterbox"` fits them
        inside `size` and pads with black (the original SigLIP path).
    start_time, end_time (`float`, or a list with one entry per video):
        Clip bounds in seconds; frames are sampled inside them.
    max_visual_tokens (`int`):
        Token budget per video for this call; must match the value given to the model. Read by the processor, which
        expands each placeholder to the video's token count (the video processor itself does not use it).
    add_timestamps (`bool`):
        Read by the processor: write "The video contains N frames sampled at t1, t2, ... seconds." after each video's
        tokens.
    max_num_frames (`int`):
        The most frames one video may be sampled to (`num_frames`, `fps` or every frame): a larger request is refused
        before any frame is decoded.
    max_url_bytes (`int`):
        The most bytes a video given by URL (`data:` base64, or `http(s)://`) may have; a larger one is refused. Defaults
        to `MAX_URL_BYTES` (256 MiB).
    frame_sampling (`"middle"` or `"random"`):
        Which frame of each segment is sampled: the middle one (PPLLaVA's rule at inference, the default) or a random
        one, as the original's training data loading draws them (see `random_segment_indices`); for training only.
    stream_min_frames (`int`):
        A video file sampled to at least this many frames is streamed: its `pixel_values_videos` entry is a
        [`StreamedVideo`] that decodes and preprocesses a slice of frames when the model reads it, so neither its
        decoded frames nor its pixels are ever all in memory. The model encodes a streamed video in two passes (about
        one more vision-tower run) to the same tokens. 0 never streams.
    """

    resize_mode: Literal["squash", "letterbox"]
    start_time: TimeBound
    end_time: TimeBound
    max_visual_tokens: int | None
    add_timestamps: bool
    max_num_frames: int
    max_url_bytes: int
    frame_sampling: FrameSampling
    stream_min_frames: int


class StreamedVideo:
    """`pixel_values_videos` of one video file, decoded and preprocessed only when a slice of it is read.

    `len(video)` is its number of sampled frames; `video[start:stop]` decodes those frames and returns their float32
    pixels `(frames, 3, height, width)`, the same numbers as the in-memory path; `metadata` describes the sampling
    (timestamps are index / fps: no frame is decoded before the model reads it). The model reads each frame twice.
    """

    def __init__(self, file: SampledVideoFile, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.file = file
        self.transform = transform
        self.metadata = file.metadata

    def __len__(self) -> int:
        return len(self.file)

    def __getitem__(self, frames: slice) -> torch.Tensor:
        if not isinstance(frames, slice) or frames.step not in (None, 1):
            raise TypeError(f"A StreamedVideo is read by contiguous slices of frames (video[start:stop]), got {frames!r}.")
        start, stop, _ = frames.indices(len(self))
        return self.transform(to_uint8_rgb_frames(self.file.read(start, stop)))

    def close(self) -> None:
        """Close the file (the object cannot be read afterwards)."""
        self.file.close()


class PPLLaVAVideoProcessor(VideoProcessorMixin):
    r"""
    Turns videos into `pixel_values_videos` for PPLLaVA: decode (PyAV) and sample frames, resize, rescale, normalise.

    Inputs: a path to a video file (mp4, mkv, webm, avi, mov, gif, ...; shown upright as its display rotation says), a
    folder of frame images, an image file (a one-frame video), a uint8 array `(T, H, W, 3)`, a tensor `(T, 3, H, W)` or
    `(T, H, W, 3)`, a list of PIL images or of `(H, W, 3)` frames, or a list of such videos; a file may also be given by
    URL (`data:` base64, `file://`, `http(s)://`, at most `max_url_bytes`; see `decode_video`). Frames are always converted
    to 8-bit RGB (grayscale repeated, alpha dropped, 16-bit scaled); float frames must be finite and lie in [0, 1].

    Sampling: files are always sampled (`num_frames` by PPLLaVA's rule, or `fps`, inside `start_time`/`end_time`), unless
    `do_sample_frames=False`, which keeps every frame of the clip. Frame arrays are used as given unless
    `do_sample_frames=True`.

    Output: `pixel_values_videos`, a float32 tensor `(videos, frames, 3, height, width)`, or a list of
    `(frames, 3, height, width)` tensors when the videos have different frame counts (numpy arrays with
    `return_tensors="np"`); with `return_metadata=True` also `video_metadata` (one [`PPLLaVAVideoMetadata`] per video:
    sampled indices, timestamps, fps, duration).
    """

    valid_kwargs = PPLLaVAVideosKwargs
    model_input_names = ["pixel_values_videos"]

    size = {"height": 336, "width": 336}
    resize_mode = "squash"
    do_resize = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    num_frames = 32
    fps = None
    max_num_frames = 2048
    max_url_bytes = MAX_URL_BYTES
    frame_sampling = "middle"
    # Measured with benchmarks/bench_long_video.py: see the README's "Long videos".
    stream_min_frames = 256
    return_metadata = False
    frames_per_chunk = 8

    def __init__(self, **kwargs: Unpack[PPLLaVAVideosKwargs]):
        super().__init__(**kwargs)  # every setting becomes an attribute, over the class defaults
        height, width = frame_size(self.size)
        self.size = {"height": height, "width": width}
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        if self.num_frames is not None and self.fps is not None:
            raise ValueError("Set either a default `num_frames` or a default `fps` for sampling, not both.")

    @property
    def frame_size(self) -> tuple[int, int]:
        """(height, width) of the frames this processor outputs."""
        return frame_size(self.size)

    def preprocess(self, videos, **kwargs: Unpack[PPLLaVAVideosKwargs]) -> BatchFeature:
        """Batch of `pixel_values_videos` (and `video_metadata` with `return_metadata=True`); see the class docstring."""
        valid_names = list(self.valid_kwargs.__annotations__)
        unknown = sorted(set(kwargs) - set(valid_names))
        if unknown:
            raise ValueError(f"Unknown video processor option(s) {unknown}; the options are {sorted(valid_names)}.")
        num_frames, fps = kwargs.pop("num_frames", None), kwargs.pop("fps", None)
        if num_frames is None and fps is None:
            num_frames, fps = self.num_frames, self.fps
        elif num_frames is not None and fps is not None:
            raise ValueError(f"Sample frames with either `num_frames` or `fps`, not both (got {num_frames=}, {fps=}).")
        options = {
            name: kwargs[name] if kwargs.get(name) is not None else getattr(self, name, None) for name in valid_names
        }
        if options["do_center_crop"] or options["do_pad"]:
            raise ValueError(
                "PPLLaVA frames are squashed or letterboxed to `size` (see `resize_mode`); do_center_crop and do_pad "
                "are not used."
            )

        clips, metadata = self.load_videos(
            videos,
            num_frames=num_frames,
            fps=fps,
            start_time=options["start_time"],
            end_time=options["end_time"],
            do_sample_frames=options["do_sample_frames"],
            video_metadata=options["video_metadata"],
            max_num_frames=options["max_num_frames"],
            frame_sampling=options["frame_sampling"],
            max_url_bytes=options["max_url_bytes"],
            stream_min_frames=options["stream_min_frames"],
        )
        transform = functools.partial(self.transform, **options)
        pixel_values = [
            StreamedVideo(clip, transform) if isinstance(clip, SampledVideoFile) else transform(clip) for clip in clips
        ]
        streamed = any(isinstance(video, StreamedVideo) for video in pixel_values)
        if not streamed and len({tuple(video.shape) for video in pixel_values}) == 1:
            pixel_values = torch.stack(pixel_values)
        if streamed and options["return_tensors"] == "np":
            raise ValueError("Streamed videos are read by the model as torch tensors: use return_tensors='pt'.")
        if options["return_tensors"] == "np":
            pixel_values = pixel_values.numpy() if isinstance(pixel_values, torch.Tensor) else [v.numpy() for v in pixel_values]
        data = {"pixel_values_videos": pixel_values}
        if options["return_metadata"]:
            data["video_metadata"] = metadata
        return BatchFeature(data)

    def load_videos(
        self,
        videos,
        num_frames: int | None = None,
        fps: float | None = None,
        start_time: TimeBound = None,
        end_time: TimeBound = None,
        do_sample_frames: bool | None = None,
        video_metadata: VideoMetadata | dict | list | None = None,
        max_num_frames: int | None = None,
        frame_sampling: FrameSampling | None = None,
        max_url_bytes: int | None = None,
        stream_min_frames: int = 0,
    ) -> tuple[list[torch.Tensor | SampledVideoFile], list[PPLLaVAVideoMetadata]]:
        """uint8 frames `(T, 3, H, W)` and metadata of every video (see `canonical_videos` for the accepted nestings):
        files decoded and sampled, frame arrays converted (and sampled when `do_sample_frames=True`); a sampling
        request for more than `max_num_frames` frames (default: the processor's) is refused before decoding, and
        `frame_sampling` (default: the processor's) picks the frame of each segment. A video given by URL (`data:`,
        `file://`, `http(s)://`) may have at most `max_url_bytes` (default: the processor's). A video file sampled to
        at least `stream_min_frames` frames (0: never) is returned opened, not decoded (a [`SampledVideoFile`])."""
        max_num_frames = max_num_frames or self.max_num_frames
        frame_sampling = frame_sampling or self.frame_sampling
        videos = canonical_videos(videos)
        if not videos:
            raise ValueError("No videos given.")
        starts = one_per_item(start_time, len(videos), "start_time")
        ends = one_per_item(end_time, len(videos), "end_time")
        given_metadata = one_per_item(video_metadata, len(videos), "video_metadata")
        clips, metadata = [], []
        for video, start, end, meta in zip(videos, starts, ends, given_metadata):
            is_file = isinstance(video, (str, os.PathLike))
            sample = do_sample_frames is not False if is_file else do_sample_frames is True
            count, rate = (num_frames, fps) if sample else (None, None)
            streamable = is_file and sample and bool(stream_min_frames) and not os.path.isdir(video)
            opened = _open_long_video(
                video, stream_min_frames, count, rate, start, end, max_num_frames, frame_sampling
            ) if streamable else None
            if opened is not None:
                clip, meta = opened, opened.metadata
            elif is_file:
                frames, meta = decode_video(
                    video, count, rate, start, end, max_frames=max_num_frames, frame_sampling=frame_sampling,
                    max_url_bytes=max_url_bytes or self.max_url_bytes,
                )
                clip = to_uint8_rgb_frames(frames)
            else:
                clip = to_uint8_rgb_frames(video)
                meta = _array_metadata(len(clip), clip.shape[-2:], meta)
                indices = sample_frame_indices(
                    len(clip), count, rate, meta.fps, start, end, max_num_frames, frame_sampling
                )
                clip = clip[indices]
                meta.frames_indices = indices
            clips.append(clip)
            metadata.append(meta)
        return clips, metadata

    def transform(
        self,
        frames: torch.Tensor,
        do_resize: bool = True,
        size: dict[str, int] | None = None,
        resize_mode: str = "squash",
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        **kwargs,
    ) -> torch.Tensor:
        """uint8 frames `(T, 3, H, W)` to float32 model input, a few frames at a time to bound the float copies."""
        mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)
        outputs = []
        for chunk in frames.split(self.frames_per_chunk):
            chunk = chunk.float()
            if do_resize:
                chunk = resize_frames(chunk, frame_size(size), resize_mode)
            if do_rescale:
                chunk = chunk * rescale_factor
            if do_normalize:
                chunk = (chunk - mean) / std
            outputs.append(chunk)
        return torch.cat(outputs)


def _open_long_video(
    path: str, min_frames: int, num_frames: int | None, fps: float | None, *sampling
) -> SampledVideoFile | None:
    """The file opened for streaming when it is sampled to at least `min_frames` frames, else None (decode it whole)."""
    if num_frames is not None and num_frames < min_frames:
        return None  # known without opening the file
    with PyAVVideoReader(path) as reader:
        if reader.is_image:
            return None
    file = SampledVideoFile(path, num_frames, fps, *sampling)
    if len(file) >= min_frames:
        return file
    file.close()
    return None


def frame_size(size) -> tuple[int, int]:
    """(height, width) from a `{"height": h, "width": w}` size (as configs store it) or a square side."""
    if isinstance(size, int):
        return size, size
    try:
        return int(size["height"]), int(size["width"])
    except (KeyError, TypeError):
        raise ValueError(
            f"PPLLaVA frames are resized to an exact size: give size={{'height': h, 'width': w}} (or one int), got {size!r}."
        ) from None


def resize_frames(frames: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Bicubic (antialiased) resize of float frames `(T, 3, H, W)` in [0, 255] to `size`, rounded to integer levels as
    an 8-bit image library would. `"squash"` ignores the aspect ratio; `"letterbox"` keeps it and pads with black."""
    height, width = frames.shape[-2:]
    target_height, target_width = size
    if mode == "squash":
        return _bicubic(frames, size)
    if mode != "letterbox":
        raise ValueError(f"resize_mode must be 'squash' or 'letterbox', got {mode!r}.")
    scale = min(target_width / width, target_height / height)
    new_height = min(math.ceil(height * scale), target_height)
    new_width = min(math.ceil(width * scale), target_width)
    resized = _bicubic(frames, (new_height, new_width))
    top, left = (target_height - new_height) // 2, (target_width - new_width) // 2
    padding = (left, target_width - new_width - left, top, target_height - new_height - top)
    return F.pad(resized, padding, value=0.0)


def _bicubic(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    resized = F.interpolate(frames, size=size, mode="bicubic", antialias=True, align_corners=False)
    return resized.clamp_(0, 255).round_()


def canonical_videos(videos) -> list[str | np.ndarray | torch.Tensor]:
    """One entry per video, each a file path or a `(T, ...)` array/tensor, from any accepted input.

    The nesting is read as transformers' `make_batched_videos` reads it, so the count always agrees with the
    placeholder check of `ProcessorMixin`: a path, an array or tensor (4-D: one video, 5-D: several), a list of frames
    (PIL images or `(H, W[, C])` arrays: one video), or lists of those (a batch, or a batch of per-sample lists). Strings
    one list deep are video files; a list of strings inside a sample's list is one video given as frame image files,
    as chat templates pass it (`{"type": "video", "path": ["f1.jpg", "f2.jpg"]}`). Frame lists are read into arrays.
    """
    if videos is None:
        raise ValueError("No videos given.")
    return list(_canonical_videos(videos, depth=0))


def _canonical_videos(videos, depth: int) -> Iterator[str | np.ndarray | torch.Tensor]:
    if isinstance(videos, (str, os.PathLike)):
        yield os.fspath(videos)
    elif isinstance(videos, (np.ndarray, torch.Tensor)):
        if videos.ndim == 4:
            yield videos
        elif videos.ndim == 5:
            yield from videos
        else:
            raise ValueError(
                f"A video array must be (frames, height, width, channels) or (frames, channels, height, width), got "
                f"shape {tuple(videos.shape)}. A grayscale video is (frames, height, width, 1); a single image goes in "
                "`images`."
            )
    elif isinstance(videos, (list, tuple)):
        if videos and all(_is_frame(item) for item in videos):
            yield to_uint8_rgb_frames(videos)
        elif depth == 2 and videos and all(isinstance(item, (str, os.PathLike)) for item in videos):
            yield to_uint8_rgb_frames([read_frame_image(path) for path in videos])
        else:
            for item in videos:
                yield from _canonical_videos(item, depth + 1)
    else:
        raise ValueError(
            f"Unsupported video input of type {type(videos).__name__}: pass a file path, a (T, H, W, 3) uint8 array, a "
            "(T, 3, H, W) tensor, a list of PIL images or frame image paths, or a list of those."
        )


def _is_frame(item) -> bool:
    return isinstance(item, Image.Image) or (isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim in (2, 3))


def to_uint8_rgb_frames(video) -> torch.Tensor:
    """uint8 RGB frames `(T, 3, H, W)` from a `(T, H, W, C)` / `(T, C, H, W)` array or tensor, or a list of frames.

    One channel (grayscale) is repeated, a fourth (alpha) dropped; uint16 (16-bit) is scaled to 8 bits, other integer
    types must hold 0..255, floats finite values in 0..1. Anything else raises a `ValueError` saying what to pass instead.
    """
    if isinstance(video, (list, tuple)):
        frames = [_frame_array(frame) for frame in video]
        if len({frame.shape for frame in frames}) > 1:
            raise ValueError(f"All frames of a video must have the same size, got {sorted({f.shape for f in frames})}.")
        video = np.stack(frames)
    array = video.numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    if array.ndim != 4 or array.shape[0] == 0:
        raise ValueError(f"A video needs at least one frame of shape (H, W, C) or (C, H, W), got {array.shape}.")
    if array.shape[-1] in (1, 3, 4):
        array = array.transpose(0, 3, 1, 2)
    elif array.shape[1] not in (1, 3, 4):
        raise ValueError(f"Cannot find the channel axis of frames shaped {array.shape[1:]}: use (H, W, 3) or (3, H, W).")
    array = _to_uint8(array)
    if array.shape[1] == 1:
        array = array.repeat(3, axis=1)
    return torch.from_numpy(np.ascontiguousarray(array[:, :3]))


def _frame_array(frame) -> np.ndarray:
    """One frame as an (H, W, C) array; PIL modes other than 16/32-bit integer or float are converted to RGB."""
    if isinstance(frame, Image.Image):
        if frame.mode.startswith("I") or frame.mode == "F":
            frame = np.array(frame)
        else:
            return np.asarray(frame.convert("RGB"))
    array = frame.numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    return array


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        return np.round(array / 257.0).astype(np.uint8)
    if array.dtype == np.bool_:
        raise ValueError("Boolean frames are not images; pass uint8 (0..255) or float (0..1) frames.")
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise ValueError(
                f"Integer frames of type {array.dtype} must hold 0..255 (got {array.min()}..{array.max()}); convert them "
                "to uint8, or pass uint16 for 16-bit frames."
            )
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            frames = sorted(set(np.nonzero(~finite)[0].tolist()))
            raise ValueError(
                f"Float frames hold {int((~finite).sum())} NaN or infinite values (in frame(s) {frames[:8]}"
                f"{', ...' if len(frames) > 8 else ''}); fix or drop those frames: frames must be finite values in "
                "[0, 1]."
            )
        if array.min() < 0 or array.max() > 1:
            raise ValueError(
                f"Float frames must lie in [0, 1] (got {array.min():.3g}..{array.max():.3g}); divide by 255 or pass uint8."
            )
        return np.round(array * 255.0).astype(np.uint8)
    raise ValueError(f"Unsupported frame dtype {array.dtype}; pass uint8 (0..255) or float (0..1) frames.")


def one_per_item(value, count: int, name: str, item: str = "video") -> list:
    """One value per item (video, text sample): a list or tuple gives each item its entry, anything else is shared."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries for {count} {item}s; give one per {item}, or a single value.")
        return list(value)
    return [value] * count


def _array_metadata(num_frames: int, frame_size: tuple[int, int], metadata) -> PPLLaVAVideoMetadata:
    """Metadata of frames given as an array or images: what the caller gave (e.g. its `fps`), completed from them."""
    given = dict(metadata) if isinstance(metadata, (dict, VideoMetadata)) else {}
    known = {key: value for key, value in given.items() if key in PPLLaVAVideoMetadata.__dataclass_fields__}
    known.setdefault("fps", None)
    known.update(total_num_frames=num_frames, height=int(frame_size[0]), width=int(frame_size[1]))
    if known["fps"]:
        known.setdefault("duration", num_frames / known["fps"])
    return PPLLaVAVideoMetadata(**{**known, "frames_indices": None, "frame_timestamps": None})


__all__ = ["PPLLaVAVideoProcessor", "StreamedVideo"]
