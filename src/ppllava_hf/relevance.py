"""Where and when a video matches a prompt, read from PPLLaVA's own vision-prompt alignment.

PPLLaVA scores every patch of every frame against the prompt (a softmax over all patches of the video) and pools the
visual tokens with those scores. The same scores, summed per frame and laid on the sampled frames' timestamps, say
*when* the video shows what the prompt asks about: zero-shot moment finding with no extra model or training.

- `video_relevance(model, processor, video, query)`: the relevance of a video to a query, with the frames the model
  saw and their timestamps ([`VideoRelevance`]).
- `frame_weights`, `top_time_ranges`: per-frame shares and the most relevant moments ([`TimeRange`]).
- `save_relevance_grid`, `save_relevance_timeline`: PNG heatmap grid and "when" timeline (matplotlib, imported only
  when drawing; it is a `dev` extra).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class TimeRange:
    """A moment of the video: a run of consecutive sampled frames whose relevance is above the video's average.

    Attributes:
        start, end: bounds in seconds (or in frame positions when the video has no timestamps); each frame covers the
            time from halfway to the previous sampled frame to halfway to the next.
        peak: timestamp of the run's most relevant frame.
        share: fraction of the whole video's relevance that falls in the run (0 to 1).
        frames: positions of the run's frames among the sampled frames.
    """

    start: float
    end: float
    peak: float
    share: float
    frames: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.start:.2f}-{self.end:.2f}s (peak {self.peak:.2f}s, {self.share:.0%} of the relevance)"


@dataclass
class VideoRelevance:
    """The prompt relevance of one video, with what is needed to show it.

    Attributes:
        query: the text that guided the pooling.
        relevance: `(frames, rows, columns)` float32 patch relevance summing to one (`get_video_relevance`).
        frames: `(frames, height, width, 3)` uint8, the frames as the vision tower saw them (resized, de-normalised), so
            that each patch of `relevance` lies over the pixels it scored.
        timestamps: seconds of each sampled frame, or `None` when unknown (frame arrays without an fps).
    """

    query: str
    relevance: torch.Tensor
    frames: np.ndarray
    timestamps: list[float] | None

    @classmethod
    def from_encoding(cls, query: str, relevance: torch.Tensor, pixel_values_video: torch.Tensor, video_processor,
                      metadata=None) -> "VideoRelevance":
        """The relevance a pooling pass already computed for one video (`encode_multimodal(...)["video"].relevance[i]`)
        with that video's processor outputs (`pixel_values_videos[i]`, `video_metadata[i]` or `None`), so that showing
        it needs no second encoding."""
        return cls(
            query=query,
            relevance=relevance.detach().float().cpu(),
            frames=model_view_frames(pixel_values_video, video_processor.image_mean, video_processor.image_std),
            timestamps=None if metadata is None else known_timestamps(metadata),
        )

    @property
    def frame_weights(self) -> torch.Tensor:
        """Share of the relevance in each frame, `(frames,)` summing to one."""
        return frame_weights(self.relevance)

    def top_time_ranges(self, top_k: int = 3) -> list[TimeRange]:
        """The `top_k` most relevant moments, best first (see `top_time_ranges`)."""
        return top_time_ranges(self.frame_weights, self.timestamps, top_k)

    def save_heatmap(self, path: str | Path, **kwargs) -> tuple[int, int]:
        """Write the frame grid with the relevance overlay (see `save_relevance_grid`); returns its (width, height)."""
        return save_relevance_grid(self.frames, self.relevance, path, self.timestamps, title=self.query, **kwargs)

    def save_timeline(self, path: str | Path, top_k: int = 3, **kwargs) -> tuple[int, int]:
        """Write the "when" timeline with the `top_k` moments shaded (see `save_relevance_timeline`)."""
        return save_relevance_timeline(
            self.frame_weights, self.timestamps, path, self.top_time_ranges(top_k), title=self.query, **kwargs
        )


def frame_weights(relevance: torch.Tensor) -> torch.Tensor:
    """Per-frame share `(frames,)` of a `(frames, rows, columns)` relevance map, normalised to sum to one."""
    weights = relevance.detach().float().flatten(1).sum(-1)
    return weights / weights.sum()


def frame_spans(timestamps: Sequence[float]) -> list[tuple[float, float]]:
    """The time each sampled frame stands for: from halfway to its predecessor to halfway to its successor (the first
    and last frames extend as far on their outer side, never before zero)."""
    times = [float(t) for t in timestamps]
    if len(times) == 1:
        return [(times[0], times[0])]
    bounds = [(a + b) / 2 for a, b in zip(times, times[1:])]
    first = max(0.0, times[0] - (bounds[0] - times[0]))
    last = times[-1] + (times[-1] - bounds[-1])
    starts, ends = [first, *bounds], [*bounds, last]
    return list(zip(starts, ends))


def top_time_ranges(
    weights: torch.Tensor | Sequence[float], timestamps: Sequence[float] | None = None, top_k: int = 3
) -> list[TimeRange]:
    """The `top_k` most relevant moments of a video from its per-frame relevance shares.

    A moment is a maximal run of consecutive frames weighted above the average (`1 / frames`); moments are ranked by
    their most relevant frame, so the first always holds the frame with the highest weight. Bounds come from
    `frame_spans(timestamps)` (frame positions when `timestamps` is `None`).
    """
    weights = torch.as_tensor(weights, dtype=torch.float64)
    weights = weights / weights.sum()
    count = weights.numel()
    times = list(range(count)) if timestamps is None else [float(t) for t in timestamps]
    if len(times) != count:
        raise ValueError(f"Got {count} frame weights but {len(times)} timestamps.")
    spans = frame_spans(times)
    above = (weights >= 1 / count).tolist()
    peak_frame = int(weights.argmax())
    above[peak_frame] = True  # uniform weights land exactly on the average; the peak always opens a moment
    runs, start = [], None
    for index, is_above in enumerate([*above, False]):
        if is_above and start is None:
            start = index
        elif not is_above and start is not None:
            runs.append(range(start, index))
            start = None
    peaks = [max(run, key=lambda index: float(weights[index])) for run in runs]
    ranked = sorted(zip(runs, peaks), key=lambda run_peak: -float(weights[run_peak[1]]))
    return [
        TimeRange(
            start=spans[run[0]][0],
            end=spans[run[-1]][1],
            peak=times[peak],
            share=float(weights[run[0] : run[-1] + 1].sum()),
            frames=tuple(run),
        )
        for run, peak in ranked[:top_k]
    ]


def model_view_frames(pixel_values_video: torch.Tensor, image_mean, image_std) -> np.ndarray:
    """Undo the processor's normalisation: `(frames, 3, H, W)` model inputs → `(frames, H, W, 3)` uint8 frames, exactly
    the (resized, squashed or letterboxed) pixels the vision tower's patches cover."""
    mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = pixel_values_video.detach().float().cpu() * std + mean
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def video_relevance(model, processor, video, query: str, **processor_kwargs) -> VideoRelevance:
    """The relevance of `video` to `query` under a PPLLaVA model.

    Args:
        model: a `PPLLaVAForConditionalGeneration`.
        processor: its `PPLLaVAProcessor`.
        video: anything the processor takes as one video (a file path, frames array, ...).
        query: the pooling prompt, e.g. the question you would ask ("When does the dog jump?").
        processor_kwargs: e.g. `num_frames=`, `start_time=` / `end_time=`.
    """
    inputs = processor(
        text=f"{processor.video_token}\n{query}", videos=[video], pooling_prompt=query, return_metadata=True,
        **processor_kwargs,
    )
    metadata = inputs["video_metadata"][0]
    pixels = inputs["pixel_values_videos"][0]
    relevance = model.get_video_relevance(
        pixels[None].to(model.device, model.dtype),
        inputs["clip_input_ids"].to(model.device),
        inputs["clip_attention_mask"].to(model.device),
    )[0].float().cpu()
    video_processor = processor.video_processor
    return VideoRelevance(
        query=query,
        relevance=relevance,
        frames=model_view_frames(pixels, video_processor.image_mean, video_processor.image_std),
        timestamps=known_timestamps(metadata),
    )


def known_timestamps(metadata) -> list[float] | None:
    """The sampled frames' timestamps from processor metadata, or `None` for frames without a known frame rate."""
    try:
        return [float(t) for t in metadata.timestamps]
    except (ValueError, TypeError, ZeroDivisionError):
        return None


# ----------------------------------------------------------------------------------------------------------------------
# Drawing (matplotlib)

_TITLE_PIXELS = 40
_DPI = 100


def relevance_grid_size(num_frames: int, frame_height: int, frame_width: int, columns: int | None = None,
                        cell_width: int = 192) -> tuple[int, int]:
    """(width, height) in pixels of the PNG `save_relevance_grid` writes: `columns` cells `cell_width` wide (default:
    up to 8 per row), each as tall as the frame's aspect ratio makes it, under a 40-pixel title strip."""
    columns = min(num_frames, columns or 8)
    rows = math.ceil(num_frames / columns)
    cell_height = round(cell_width * frame_height / frame_width)
    return columns * cell_width, rows * cell_height + _TITLE_PIXELS


def save_relevance_grid(
    frames: np.ndarray,
    relevance: torch.Tensor,
    path: str | Path,
    timestamps: Sequence[float] | None = None,
    title: str | None = None,
    columns: int | None = None,
    cell_width: int = 192,
    alpha: float = 0.55,
) -> tuple[int, int]:
    """Write a PNG grid of the sampled frames, each overlaid with its patches' relevance, and return its size.

    The overlay's colour scale is shared by all frames (zero to the video's most relevant patch), so brighter means
    more relevant across the whole video, not just within a frame. Each cell is labelled with its time (or frame
    position) and its share of the relevance.

    Args:
        frames: `(frames, height, width, 3)` uint8, aligned with the patch grid (see `model_view_frames`).
        relevance: `(frames, rows, columns)` patch relevance.
        path: where to write the PNG.
        timestamps: seconds of each frame, for the labels.
        title: written above the grid (e.g. the query).
        columns, cell_width: layout; the size is `relevance_grid_size(...)`.
        alpha: opacity of the overlay.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    num_frames, height, width = frames.shape[:3]
    if relevance.shape[0] != num_frames:
        raise ValueError(f"Got {num_frames} frames but relevance for {relevance.shape[0]}.")
    columns = min(num_frames, columns or 8)
    size = relevance_grid_size(num_frames, height, width, columns, cell_width)
    cell_height = round(cell_width * height / width)
    heat = relevance.detach().float().cpu().numpy()
    shares = frame_weights(relevance).tolist()
    figure = plt.figure(figsize=(size[0] / _DPI, size[1] / _DPI), dpi=_DPI)
    try:
        if title:
            figure.text(0.5, 1 - _TITLE_PIXELS / 2 / size[1], title, ha="center", va="center", fontsize=12)
        for index in range(num_frames):
            row, column = divmod(index, columns)
            axes = figure.add_axes(
                [column * cell_width / size[0], 1 - (_TITLE_PIXELS + (row + 1) * cell_height) / size[1],
                 cell_width / size[0], cell_height / size[1]]
            )
            axes.imshow(frames[index], extent=(0, width, height, 0))
            axes.imshow(heat[index], cmap="inferno", alpha=alpha, vmin=0, vmax=float(heat.max()),
                        interpolation="bilinear", extent=(0, width, height, 0))
            when = f"{timestamps[index]:.1f}s" if timestamps is not None else f"frame {index}"
            axes.text(3, 3, f"{when}  {shares[index]:.0%}", color="white", fontsize=8, va="top",
                      bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "linewidth": 0})
            axes.set_axis_off()
        figure.savefig(path, dpi=_DPI)
    finally:
        plt.close(figure)
    return size


def save_relevance_timeline(
    weights: torch.Tensor | Sequence[float],
    timestamps: Sequence[float] | None,
    path: str | Path,
    ranges: Sequence[TimeRange] = (),
    title: str | None = None,
    size: tuple[int, int] = (960, 320),
) -> tuple[int, int]:
    """Write the "when" timeline as a PNG of `size` pixels: each sampled frame's share of the relevance as a bar over
    the time it stands for, the average level as a dashed line, and `ranges` shaded and numbered."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    weights = torch.as_tensor(weights, dtype=torch.float64)
    weights = (weights / weights.sum()).tolist()
    times = list(range(len(weights))) if timestamps is None else [float(t) for t in timestamps]
    spans = frame_spans(times)
    figure, axes = plt.subplots(figsize=(size[0] / _DPI, size[1] / _DPI), dpi=_DPI)
    try:
        for number, moment in enumerate(ranges, 1):
            axes.axvspan(moment.start, moment.end, color="tab:orange", alpha=0.25, linewidth=0)
            axes.text((moment.start + moment.end) / 2, max(weights) * 1.02, f"#{number}", ha="center", va="bottom")
        axes.bar([(a + b) / 2 for a, b in spans], weights, width=[(b - a) * 0.9 for a, b in spans], color="tab:blue")
        average = 1 / len(weights)
        axes.axhline(average, color="gray", linestyle="--", linewidth=1)
        axes.text(spans[-1][1], average, " average", color="gray", va="center", ha="left", fontsize=8)
        axes.set_xlim(spans[0][0], spans[-1][1])
        axes.set_ylim(0, max(weights) * 1.15)
        axes.set_xlabel("time (s)" if timestamps is not None else "sampled frame")
        axes.set_ylabel("share of relevance")
        if title:
            axes.set_title(title)
        figure.tight_layout()
        figure.savefig(path, dpi=_DPI)
    finally:
        plt.close(figure)
    return size


__all__ = [
    "TimeRange",
    "VideoRelevance",
    "frame_spans",
    "frame_weights",
    "known_timestamps",
    "model_view_frames",
    "relevance_grid_size",
    "save_relevance_grid",
    "save_relevance_timeline",
    "top_time_ranges",
    "video_relevance",
]
