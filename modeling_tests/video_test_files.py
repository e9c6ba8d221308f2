"""Small real video files for the tests, written with PyAV: every frame shows its own index as a row of black/white
bars, so a test can read back which frame a decoder returned, through lossy codecs too."""

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image


INDEX_BITS = 12
BAR_WIDTH = 8
HEIGHT, WIDTH = 16, INDEX_BITS * BAR_WIDTH


def index_frame(index: int) -> np.ndarray:
    """An RGB frame `(HEIGHT, WIDTH, 3)` whose bar `b` is white when bit `b` of `index` is set."""
    frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    for bit in range(INDEX_BITS):
        if (index >> bit) & 1:
            frame[:, bit * BAR_WIDTH : (bit + 1) * BAR_WIDTH] = 255
    return frame


def read_index(frame: np.ndarray) -> int:
    """The index an `index_frame` shows (the centre of each bar decides its bit)."""
    bars = frame[..., 0] if frame.ndim == 3 and frame.shape[-1] in (1, 3, 4) else frame
    return sum(1 << bit for bit in range(INDEX_BITS) if bars[:, bit * BAR_WIDTH + 2 : (bit + 1) * BAR_WIDTH - 2].mean() > 128)


def write_video(
    path: Path,
    codec: str,
    num_frames: int,
    rate: int | Fraction = 25,
    pix_fmt: str = "yuv420p",
    gop_size: int | None = None,
    options: dict | None = None,
    frames=None,
    rotation: int | None = None,
    mirrored: bool = False,
) -> Path:
    """Encode `num_frames` index frames (or the given RGB `frames`) into `path`; the container follows the suffix.
    `rotation` (degrees counterclockwise) and `mirrored` (then flipped left-right) go into the display matrix, as a
    phone writes it for a video recorded in portrait."""
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = HEIGHT, WIDTH
        stream.pix_fmt = pix_fmt
        if rotation is not None or mirrored:
            stream.set_display_rotation(rotation or 0, hflip=mirrored)
        if gop_size:
            stream.codec_context.gop_size = gop_size
        arrays = (index_frame(index) if frames is None else frames[index] for index in range(num_frames))
        _encode(container, stream, (av.VideoFrame.from_ndarray(array, format="rgb24") for array in arrays))
    return path


def write_frame_folder(folder: Path, num_frames: int, name=lambda number: f"{number:05d}.png") -> Path:
    """A folder of `num_frames` index frames, one image per frame named `name(k)` for k from 1 (MVBench numbers its
    frame files from 1); PNG keeps the frames exact."""
    folder.mkdir()
    for index in range(num_frames):
        Image.fromarray(index_frame(index)).save(folder / name(index + 1))
    return folder


def write_audio_only(path: Path) -> Path:
    """A file with one second of silence and no video stream."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        _encode(container, stream, (_silence(start) for start in range(0, 16000, 1024)))
    return path


def _silence(pts: int):
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
    frame.sample_rate, frame.pts = 16000, pts
    return frame


def _encode(container, stream, frames) -> None:
    """Encode and mux every frame, then flush the encoder."""
    for frame in [*frames, None]:
        for packet in stream.encode(frame):
            container.mux(packet)


def write_empty_video(path: Path) -> Path:
    """A container (use .avi: it keeps a stream without packets) with a video stream that holds no frame."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.height, stream.width = HEIGHT, WIDTH
        container.start_encoding()
    return path
