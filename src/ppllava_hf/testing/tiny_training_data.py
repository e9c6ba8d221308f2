"""Tiny synthetic video training sets, for tests and the training examples: nothing is downloaded.

Each video is a small clip of one background colour with a white square crossing it, written with PyAV. The question
is always "What color is the video?", so only the video tells the right answer: a preference pair prefers the true
colour over another one, and a supervised conversation answers with the true colour.
"""

import json
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np


COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
QUESTION = "What color is the video?"


def color_frames(color: str, num_frames: int = 16, size: int = 32) -> np.ndarray:
    """`(num_frames, size, size, 3)` uint8 frames: the colour's background with a white square moving left to right."""
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    frames[:] = COLORS[color]
    side = size // 4
    for index, frame in enumerate(frames):
        left = (size - side) * index // max(1, num_frames - 1)
        frame[side : 2 * side, left : left + side] = 255
    return frames


def write_color_videos(folder: str | Path, num_frames: int = 16, size: int = 32) -> dict[str, str]:
    """Write `<colour>.mp4` (MPEG-4 part 2, 8 fps) for every colour of `COLORS` into `folder`; returns the file names
    (relative to `folder`) by colour."""
    import av

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for color in COLORS:
        names[color] = f"{color}.mp4"
        with av.open(str(folder / names[color]), "w") as container:
            stream = container.add_stream("mpeg4", rate=Fraction(8))
            stream.height = stream.width = size
            stream.pix_fmt = "yuv420p"
            for array in color_frames(color, num_frames, size):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
            container.mux(stream.encode(None))
    return names


def tiny_preference_rows(videos: dict[str, str], num_rows: int = 8) -> list[dict]:
    """Preference rows in `PPLLaVADPOTrainer`'s format: the true colour is chosen, the next colour rejected."""
    colors = list(videos)
    rows = []
    for index in range(num_rows):
        color, other = colors[index % len(colors)], colors[(index + 1) % len(colors)]
        rows.append({
            "id": f"pair-{index}",
            "prompt": QUESTION,
            "chosen": f"The video is {color}.",
            "rejected": f"The video is {other}.",
            "video": videos[color],
        })
    return rows


def tiny_sft_rows(videos: dict[str, str], num_rows: int = 8) -> list[dict]:
    """Conversations in `PPLLaVASFTTrainer`'s format: the question about the video and the true colour as answer."""
    colors = list(videos)
    rows = []
    for index in range(num_rows):
        color = colors[index % len(colors)]
        rows.append({
            "id": f"chat-{index}",
            "messages": [
                {"role": "user", "content": QUESTION},
                {"role": "assistant", "content": f"The video is {color}."},
            ],
            "video": videos[color],
        })
    return rows


def write_tiny_jsonl(folder: str | Path, kind: Literal["preference", "sft"], num_rows: int = 8) -> str:
    """Write the colour videos and `num_rows` preference or SFT rows as `<folder>/<kind>.jsonl` (video paths relative
    to `folder`, the trainers' `media_folder`); returns the JSONL path."""
    if kind not in ("preference", "sft"):
        raise ValueError(f"kind must be 'preference' or 'sft', got {kind!r}.")
    videos = write_color_videos(folder)
    rows = tiny_preference_rows(videos, num_rows) if kind == "preference" else tiny_sft_rows(videos, num_rows)
    path = tiny_jsonl_path(folder, kind)
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tiny_jsonl_path(folder: str | Path, kind: Literal["preference", "sft"]) -> str:
    """Where `write_tiny_jsonl(folder, kind)` writes the rows."""
    return str(Path(folder) / f"{kind}.jsonl")


__all__ = [
    "COLORS",
    "QUESTION",
    "color_frames",
    "tiny_jsonl_path",
    "tiny_preference_rows",
    "tiny_sft_rows",
    "write_color_videos",
    "write_tiny_jsonl",
]
