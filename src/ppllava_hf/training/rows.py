"""Training rows for PPLLaVA's trl trainers: where each row's videos and images are, how long the row is once its
visual placeholders are expanded, and what happens to rows that cannot be trained on.

Both `PPLLaVADPOTrainer` and `PPLLaVASFTTrainer` check every row before training, so that a bad row is reported by its
position (and `id`, if the dataset has one) instead of stopping a run hours in:

- a video or image file that is missing or unreadable (`video_check="open"`: the header is read, cheap), or whose
  frames cannot be decoded (`video_check="decode"`: the sampled frames are decoded, as costly as one epoch of video
  loading; a file that passes "open" but fails to decode later stops the run with a `BadRowError` naming the row);
- a row longer than `max_length` tokens once each `<video>` / `<image>` is expanded to the model's visual tokens. Rows
  are never truncated: cutting through a visual span would misalign the visual tokens, and cutting a completion would
  change what is being preferred or learned;
- a row with nothing to learn from (a preference pair whose chosen and rejected answers are the same, a conversation
  without an assistant turn).

`on_bad_row="skip"` (the default) drops such rows and logs how many were dropped for each reason with the first ones
named; the trainer keeps the full list in `trainer.skipped_rows`. `on_bad_row="raise"` stops with a `BadRowError`
listing them. Checks run eagerly on map-style `datasets.Dataset`s.
"""

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image
from transformers.utils import logging

from ..models.ppllava.processing_ppllava import PPLLaVAProcessor
from ..models.ppllava.video_decoding_ppllava import (
    FrameSampling,
    PyAVVideoReader,
    VideoDecodingError,
    sample_frame_indices,
)


if TYPE_CHECKING:
    from datasets import Dataset


logger = logging.get_logger(__name__)

BadRowPolicy = Literal["skip", "raise"]
VideoCheck = Literal["open", "decode"]
BAD_ROW_POLICIES = ("skip", "raise")
VIDEO_CHECKS = ("open", "decode")
# Column holding each row's position in the dataset given to the trainer, so later errors can name the row.
ROW_INDEX = "row_index"
_PROBLEM, _KIND = "_ppllava_problem", "_ppllava_problem_kind"
_NAMED_IN_LOG = 10


class BadRowError(ValueError):
    """A training row that cannot be used: missing or corrupt media, too long, or nothing to learn from. `kind` is a
    short category ("too long", "chosen equals rejected", ...) for the count of skipped rows."""

    def __init__(self, message: str, kind: str = "bad row"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class SkippedRow:
    """A row left out of training: which dataset, its position, its `id` (when the dataset has one) and why."""

    dataset: str
    index: int
    row_id: str | None
    kind: str
    reason: str

    def __str__(self) -> str:
        return f"{self.dataset} {describe_row(self.index, self.row_id)}: {self.reason}"


def describe_row(index: int, row_id: Any = None) -> str:
    """`row 12`, or `row 12 (id 'v_abc')` when the row has an id."""
    return f"row {index}" + (f" (id {row_id!r})" if row_id is not None else "")


def check_options(on_bad_row: str, video_check: str) -> None:
    """Fail early on a misspelled policy."""
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}.")
    if video_check not in VIDEO_CHECKS:
        raise ValueError(f"video_check must be one of {VIDEO_CHECKS}, got {video_check!r}.")


# ----------------------------------------------------------------------------------------------------------------------
# A row: its messages, media and length


def chat_messages(messages: Any, what: str = "messages") -> list[dict]:
    """A row's conversation as fresh `{"role", "content"}` messages with content blocks (see `content_blocks`), or
    `BadRowError` naming what is malformed (ShareGPT's `from`/`value` turns included)."""
    if not isinstance(messages, list) or not messages:
        raise BadRowError(f"its {what} must be a non-empty list of turns, got {messages!r}", kind="malformed")
    turns = []
    for index, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") is None and message.get("from") is not None:
            raise BadRowError(
                f"its {what} are in ShareGPT form ({{'from', 'value'}}); give each turn as {{'role': 'user' | "
                "'assistant' | 'system', 'content': ...}} (e.g. from 'human' -> role 'user', from 'gpt' -> role "
                "'assistant', value -> content)",
                kind="malformed",
            )
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise BadRowError(
                f"turn {index} of its {what} needs a 'role' of 'system', 'user' or 'assistant', got {message!r}",
                kind="malformed",
            )
        turns.append({"role": message["role"], "content": content_blocks(message.get("content"))})
    return turns


def content_blocks(content: Any) -> list[dict]:
    """Chat message content as a fresh list of blocks (a string becomes one text block); `None` fields, which a
    `datasets` struct column adds for the keys other blocks have, are dropped. A block without a known `type` raises
    `BadRowError`."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if content is not None and not isinstance(content, list):
        raise BadRowError(f"message content must be a string or a list of blocks, got {content!r}", kind="malformed")
    blocks = []
    for block in content or []:
        if not isinstance(block, dict) or block.get("type") not in ("text", "video", "image"):
            raise BadRowError(
                f"each content block needs a 'type' of 'text', 'video' or 'image', got {block!r}", kind="malformed"
            )
        if block["type"] == "text" and not isinstance(block.get("text"), str):
            raise BadRowError(f"a text block needs its 'text', got {block!r}", kind="malformed")
        blocks.append({key: value for key, value in block.items() if value is not None})
    return blocks


def resolve_video(video: Any, folder: str | None) -> str | np.ndarray | torch.Tensor:
    """A row's video as the processor takes it: a file path (joined to `folder` when relative), or frames.

    Frames are an array or tensor, uint8 in 0..255 or float in [0, 1], that the processor converts (the nested lists
    a `datasets.Dataset` returns them as become an array again, keeping their values).
    """
    if isinstance(video, (str, os.PathLike)):
        return _join(folder, video)
    if isinstance(video, (np.ndarray, torch.Tensor)):
        return video
    if isinstance(video, (list, tuple)):
        return np.asarray(video)
    raise BadRowError(
        f"A video must be a file path or (T, H, W, 3) frames (uint8, or float in [0, 1]), got {type(video).__name__}.",
        kind="malformed",
    )


def resolve_image(image: Any, folder: str | None) -> Any:
    """A row's image as the processor takes it: a file path (joined to `folder` when relative), a PIL image or an
    `(H, W, 3)` array."""
    if isinstance(image, (str, os.PathLike)):
        return _join(folder, image)
    if isinstance(image, (list, tuple)):
        return np.asarray(image)
    return image


def _join(folder: str | None, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return path if folder is None or os.path.isabs(path) or "://" in path else os.path.join(folder, path)


def load_video_frames(
    processor: PPLLaVAProcessor, videos: Sequence[Any], frame_sampling: FrameSampling | None = None
) -> list[torch.Tensor]:
    """uint8 frames `(T, 3, H, W)` of each video, decoded and sampled as `processor` does (`frame_sampling`, default the
    processor's, picks the frame of each segment); decode once, then hand the frames to the processor as often as
    needed (a preference pair uses them twice)."""
    video_processor = processor.video_processor
    frames, _ = video_processor.load_videos(
        list(videos),
        num_frames=video_processor.num_frames,
        fps=video_processor.fps,
        do_sample_frames=getattr(video_processor, "do_sample_frames", None),
        frame_sampling=frame_sampling,
    )
    return frames


def load_row_video(
    processor: PPLLaVAProcessor, video: Any, row: dict[str, Any], frame_sampling: FrameSampling | None = None
) -> torch.Tensor:
    """uint8 frames of one resolved video of a training row (see `load_video_frames`); a file that fails to decode
    raises `BadRowError` naming the row (the trainer's `video_check="open"` only reads headers)."""
    try:
        return load_video_frames(processor, [video], frame_sampling)[0]
    except VideoDecodingError as error:
        raise BadRowError(
            f"{describe_row(row.get(ROW_INDEX, '?'), row.get('id'))}: {error} (video_check='decode' finds such files "
            "before training)"
        ) from error


def count_video_frames(processor: PPLLaVAProcessor, video: Any, video_check: VideoCheck) -> int:
    """How many frames `processor` turns `video` into. Files are opened (`"open"`: header only) or decoded
    (`"decode"`); frame folders are read (their sampled images) under both; a bad file raises `VideoDecodingError`
    saying what is wrong with it."""
    video_processor = processor.video_processor
    if isinstance(video, str) and video_check == "open" and not os.path.isdir(video):  # a frame folder is read below
        sample = getattr(video_processor, "do_sample_frames", None) is not False
        num_frames, fps = (video_processor.num_frames, video_processor.fps) if sample else (None, None)
        with PyAVVideoReader(video) as reader:
            return len(
                sample_frame_indices(
                    reader.total_num_frames, num_frames, fps, reader.fps, max_frames=video_processor.max_num_frames
                )
            )
    return len(load_video_frames(processor, [video])[0])


def image_size(image: Any) -> tuple[int, int]:
    """(height, width) of an image file (header only), PIL image or `(H, W, C)` array."""
    if isinstance(image, str):
        if not os.path.isfile(image):
            raise BadRowError(f"Image file not found: {image!r}.", kind="unreadable image")
        try:
            with Image.open(image) as opened:
                width, height = opened.size
        except OSError as error:
            raise BadRowError(f"Cannot read {image!r} as an image ({error}).", kind="unreadable image") from error
        return height, width
    if isinstance(image, Image.Image):
        return image.height, image.width
    shape = np.shape(image)
    if len(shape) != 3:
        raise BadRowError(f"An image array must be (H, W, C), got shape {tuple(shape)}.", kind="malformed")
    return (shape[0], shape[1]) if shape[-1] in (1, 3, 4) else (shape[1], shape[2])


def visual_tokens_added(
    processor: PPLLaVAProcessor,
    videos: Sequence[Any],
    images: Sequence[Any],
    video_check: VideoCheck,
    multi_image: bool = False,
) -> int:
    """Tokens the expansion of the `<video>` / `<image>` placeholders adds to a tokenized text (each placeholder is
    one token before expansion); with `multi_image` the images are one multi-image group (a fixed count per image)."""
    added = sum(processor.num_video_tokens(count_video_frames(processor, video, video_check)) - 1 for video in videos)
    sizes = [image_size(image) for image in images]  # also finds missing or unreadable image files
    if multi_image:
        return added + len(sizes) * (processor.num_multi_image_tokens() - 1)
    return added + sum(processor.num_image_tokens(size) - 1 for size in sizes)


def adds_special_tokens(processor: PPLLaVAProcessor, text: str) -> bool:
    """Whether the tokenizer should add its special tokens (BOS) to a rendered chat `text`: yes unless the template
    already wrote the BOS, the rule `processor.apply_chat_template(tokenize=True)` follows at inference."""
    bos = processor.tokenizer.bos_token
    return not (bos is not None and text.startswith(bos))


def token_count(processor: PPLLaVAProcessor, text: str) -> int:
    """Tokens of a rendered chat `text` with its placeholders not yet expanded."""
    return len(processor.tokenizer(text, add_special_tokens=adds_special_tokens(processor, text))["input_ids"])


def check_length(length: int, max_length: int | None) -> None:
    """Refuse a row of `length` tokens (visual tokens included) longer than `max_length`."""
    if max_length is not None and length > max_length:
        raise BadRowError(
            f"it needs {length} tokens with its visual tokens, more than max_length={max_length} (rows are not "
            "truncated: raise max_length, or use fewer frames)",
            kind="too long",
        )


def check_batch_lengths(lengths: Sequence[int], rows: Sequence[dict[str, Any]], max_length: int | None) -> None:
    """Refuse a batch whose rows (`lengths[i]` tokens for `rows[i]`) exceed `max_length`; the trainers drop such rows
    before training, so this only fires for a collator used on its own."""
    if max_length is None:
        return
    too_long = [
        f"{describe_row(row.get(ROW_INDEX, index), row.get('id'))} ({int(length)} tokens)"
        for index, (row, length) in enumerate(zip(rows, lengths))
        if length > max_length
    ]
    if too_long:
        raise BadRowError(f"Longer than max_length={max_length}, and rows are not truncated: {', '.join(too_long)}.")


# ----------------------------------------------------------------------------------------------------------------------
# Checking a dataset


def check_rows(
    dataset: "Dataset",
    check_row: Callable[[dict], None],
    on_bad_row: BadRowPolicy,
    dataset_name: str,
    num_proc: int | None = None,
) -> tuple["Dataset", list[SkippedRow]]:
    """Run `check_row(row)` on every row (it raises `BadRowError` or `VideoDecodingError` for a bad one) and drop or
    refuse the bad rows.

    Returns the dataset of good rows, with a `row_index` column holding each row's position in `dataset`, and the
    list of `SkippedRow`s. With `on_bad_row="raise"` a bad row raises `BadRowError` listing every bad row instead.
    """
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"PPLLaVA trainers check every row before training and need a map-style datasets.Dataset, got "
            f"{type(dataset).__name__} (load the dataset without streaming)."
        )

    def check(row: dict, index: int) -> dict:
        try:
            check_row(row)
        except BadRowError as error:
            return {_KIND: error.kind, _PROBLEM: str(error), ROW_INDEX: index}
        except VideoDecodingError as error:
            return {_KIND: "unreadable video", _PROBLEM: str(error), ROW_INDEX: index}
        except (KeyError, TypeError, ValueError, IndexError) as error:
            # A shape no check above names (e.g. frames the processor refuses): still this row's problem, not the run's.
            return {_KIND: "malformed", _PROBLEM: f"{type(error).__name__}: {error}", ROW_INDEX: index}
        return {_KIND: "", _PROBLEM: "", ROW_INDEX: index}

    checked = dataset.map(
        check, with_indices=True, num_proc=num_proc, load_from_cache_file=False, desc=f"Checking {dataset_name} rows"
    )
    reasons, kinds = checked[_PROBLEM], checked[_KIND]
    row_ids = checked["id"] if "id" in checked.column_names else [None] * len(checked)
    skipped = [
        SkippedRow(dataset_name, index, None if row_ids[index] is None else str(row_ids[index]), kinds[index], reason)
        for index, reason in enumerate(reasons)
        if reason
    ]
    if skipped:
        listed = "\n  ".join(map(str, skipped[:_NAMED_IN_LOG]))
        more = f"\n  ... and {len(skipped) - _NAMED_IN_LOG} more" if len(skipped) > _NAMED_IN_LOG else ""
        if on_bad_row == "raise":
            raise BadRowError(
                f"{len(skipped)} of {len(reasons)} {dataset_name} rows cannot be trained on:\n  {listed}{more}\n"
                "Fix them, or pass on_bad_row='skip' to leave them out."
            )
        counts = Counter(row.kind for row in skipped)
        summary = ", ".join(f"{count} {kind}" for kind, count in counts.most_common())
        logger.warning(f"Skipped {len(skipped)} of {len(reasons)} {dataset_name} rows ({summary}):\n  {listed}{more}")
    kept = [index for index, reason in enumerate(reasons) if not reason]
    if not kept:
        raise BadRowError(f"No {dataset_name} row can be trained on; the first problem: {skipped[0]}.")
    return checked.select(kept).remove_columns([_PROBLEM, _KIND]), skipped


@dataclass
class RowChecker:
    """The row checks a PPLLaVA trainer runs on each of its datasets before training, and the rows they left out.

    `check_row(row, processor=, media_folder=, max_length=, video_check=)` raises for a bad row
    (`check_preference_row`, `check_conversation_row`); `max_length` comes from the trainer's config.
    """

    check_row: Callable[..., None]
    processor: PPLLaVAProcessor
    media_folder: str | None = None
    on_bad_row: BadRowPolicy = "skip"
    video_check: VideoCheck = "open"
    skipped: list[SkippedRow] = field(default_factory=list)

    def __post_init__(self):
        check_options(self.on_bad_row, self.video_check)

    def __call__(self, dataset: "Dataset", dataset_name: str, max_length: int | None, num_proc: int | None = None):
        """The good rows of `dataset` (see `check_rows`); the skipped ones are added to `self.skipped`."""
        check_row = partial(
            self.check_row,
            processor=self.processor,
            media_folder=self.media_folder,
            max_length=max_length,
            video_check=self.video_check,
        )
        dataset, skipped = check_rows(dataset, check_row, self.on_bad_row, dataset_name, num_proc)
        self.skipped.extend(skipped)
        return dataset


__all__ = [
    "BAD_ROW_POLICIES",
    "VIDEO_CHECKS",
    "BadRowError",
    "BadRowPolicy",
    "RowChecker",
    "SkippedRow",
    "VideoCheck",
    "check_options",
    "check_rows",
]
