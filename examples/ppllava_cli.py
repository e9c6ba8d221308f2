"""What the example scripts share: the model flags, loading a model (the embedded default or a folder / Hub id), and
answering a batch of video questions in one `generate` call."""

import argparse
import filecmp
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

# Importing ppllava_hf registers PPLLaVA with the Auto classes.
from ppllava_hf import PPLLaVAForConditionalGeneration, PPLLaVAProcessor, decode_video
from ppllava_hf.models.ppllava.video_decoding_ppllava import PyAVVideoReader, SampledVideoFile
from ppllava_hf.testing.embedded_default import build_embedded_default


EMBEDDED_DEFAULT_NOTE = (
    "The embedded default is a tiny PPLLaVA trained on synthetic clips of coloured balls crossing the frame "
    "(ppllava_hf.testing.synthetic_world): it answers questions about such clips (colour, direction, is there a ball, "
    "how many) and knows nothing else. Pass --model with converted PPLLaVA weights for real questions."
)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --dtype, --device, --num-frames, --max-visual-tokens, --stream-min-frames, --max-new-tokens."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", default=None,
        help="PPLLaVA folder or Hub id (e.g. a converted checkpoint). Default: the embedded default, a tiny PPLLaVA "
             "trained on synthetic ball clips, shipped with the package (no download).",
    )
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="Weights dtype (auto: the checkpoint's).")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps, ... (auto: cuda when available).")
    group.add_argument("--num-frames", type=int, default=None,
                       help="Frames sampled per video (default: the processor's, 32 for the released models).")
    group.add_argument("--max-visual-tokens", type=int, default=None,
                       help="Visual-token budget per video (default: the model config's).")
    group.add_argument("--stream-min-frames", type=int, default=None,
                       help="Stream a video file sampled to at least this many frames: decoded, preprocessed and "
                            "encoded a chunk at a time, in bounded memory, for about one more vision-tower run "
                            "(default: the processor's, 256; 0: never).")
    group.add_argument("--max-new-tokens", type=int, default=128)


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    """--debug: show the traceback of an error instead of its one line."""
    parser.add_argument("--debug", action="store_true", help="On an error, show its Python traceback too.")


@contextmanager
def errors_as_one_line(debug: bool) -> Iterator[None]:
    """Ordinary mistakes (a missing or unreadable file, a path below a file, a full disk: `OSError` / `ValueError`)
    end the script with one line on stderr and exit status 1; with `debug` the traceback is shown instead."""
    try:
        yield
    except (OSError, ValueError) as error:
        if debug:
            raise
        raise SystemExit(f"error: {error}") from None


def check_below_folders(path: Path, flag: str) -> None:
    """Raise `NotADirectoryError` when `path` would lie below a file (the nearest existing parent is not a folder)."""
    parent = next(folder for folder in Path(path).parents if folder.exists())
    if not parent.is_dir():
        raise NotADirectoryError(f"{flag} {path} is below {parent}, which is a file, not a folder; choose a folder.")


def write_new_or_same(target: Path, write: Callable[[Path], object]) -> None:
    """`write(path)` a file or folder for `target` beside it, then put it in place if `target` is new (or an empty
    folder); an existing `target` with the same content is kept, one with other content (a file or model the user
    made) is never written over: `FileExistsError` names it."""
    target = Path(target)
    staged = target.with_name(f".{target.stem}.partial-{uuid.uuid4().hex[:8]}{target.suffix}")
    try:
        write(staged)
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        if not target.exists():
            staged.replace(target)
        elif not _same_content(staged, target):
            raise FileExistsError(
                f"{target} already exists and holds something else than what this script writes there; it was left "
                "as it is: choose another --output-dir, or move it away."
            )
    finally:
        if staged.is_dir():
            shutil.rmtree(staged)
        elif staged.exists():
            staged.unlink()


def _same_content(new: Path, old: Path) -> bool:
    """Whether `old` holds what `new` does: the same files with the same bytes (JSON files: the same values, whichever
    transformers release wrote them)."""
    if new.is_dir() != old.is_dir():
        return False
    if not new.is_dir():
        return _same_file(new, old)
    names = sorted(path.relative_to(new) for path in new.rglob("*") if path.is_file())
    existing = sorted(path.relative_to(old) for path in old.rglob("*") if path.is_file())
    return names == existing and all(_same_file(new / name, old / name) for name in names)


def _same_file(new: Path, old: Path) -> bool:
    if new.suffix != ".json":
        return filecmp.cmp(new, old, shallow=False)
    try:
        values = [json.loads(path.read_text()) for path in (new, old)]
    except (ValueError, UnicodeDecodeError):
        return False
    for value in values:
        if isinstance(value, dict):
            value.pop("transformers_version", None)
    return values[0] == values[1]


@dataclass
class LoadedModel:
    model: PPLLaVAForConditionalGeneration
    processor: PPLLaVAProcessor
    is_embedded_default: bool
    load_seconds: float

    def processor_kwargs(self, args: argparse.Namespace) -> dict:
        """The per-call processor options the flags ask for (the same `max_visual_tokens` goes to the model)."""
        kwargs = {}
        if args.num_frames is not None:
            kwargs["num_frames"] = args.num_frames
        if args.max_visual_tokens is not None:
            kwargs["max_visual_tokens"] = args.max_visual_tokens
        if args.stream_min_frames is not None:
            kwargs["stream_min_frames"] = args.stream_min_frames
        return kwargs

    def streams(self, args: argparse.Namespace, num_frames: int) -> bool:
        """Whether a video file sampled to `num_frames` frames is streamed under the flags (see --stream-min-frames)."""
        threshold = self.processor_kwargs(args).get("stream_min_frames", self.processor.video_processor.stream_min_frames)
        return bool(threshold) and num_frames >= threshold


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(args: argparse.Namespace) -> LoadedModel:
    """The model and processor the flags name, on the requested device and dtype, in eval mode."""
    start = time.perf_counter()
    device = resolve_device(args.device)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.model is None:
        model, processor = build_embedded_default()
        model.to(device, None if dtype == "auto" else dtype)
    else:
        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype).to(device).eval()
        processor = AutoProcessor.from_pretrained(args.model)
    return LoadedModel(model, processor, args.model is None, time.perf_counter() - start)


def video_question_prompt(processor, question: str) -> str:
    """The chat-template text of one user turn holding a video and `question`, ready for the assistant's answer."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def answer_batch(
    loaded: LoadedModel,
    prompts: list[str],
    videos: list,
    pooling_prompts: list[str],
    max_new_tokens: int,
    **processor_kwargs,
) -> list[str]:
    """Greedy answers to a batch of prompts (one `<video>` each), padded on the left and generated together; each
    video is pooled under its own pooling prompt."""
    model, processor = loaded.model, loaded.processor
    inputs = processor(
        text=prompts, videos=videos, pooling_prompt=pooling_prompts, padding_side="left", **processor_kwargs
    ).to(model.device, dtype=model.dtype)
    output = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False,
        max_visual_tokens=processor_kwargs.get("max_visual_tokens"),
    )
    return processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def streamed_video_or_error(
    path: str | os.PathLike, num_frames: int, start_time: float | None = None, end_time: float | None = None
) -> Path | np.ndarray | str:
    """A video file to stream, checked (opened, its sampled frames counted, its last one decoded) and given back as a
    `Path` for the processor to open again; a frame folder or an image file decoded; or the reason it cannot be read."""
    try:
        if os.path.isdir(path) or PyAVVideoReader(path).is_image:
            return decode_or_error(path, num_frames, start_time, end_time)
        SampledVideoFile(path, num_frames, start_time=start_time, end_time=end_time).close()
    except (ValueError, OSError) as error:
        return f"{type(error).__name__}: {error}"
    return Path(path)


def decode_or_error(
    path: str | os.PathLike,
    num_frames: int,
    start_time: float | None = None,
    end_time: float | None = None,
    folder_fps: float | None = None,
) -> np.ndarray | str:
    """The sampled frames of a video file or frame folder (extracted at `folder_fps`), or the reason it cannot be read
    (for a per-row error record)."""
    try:
        frames, _ = decode_video(path, num_frames, start_time=start_time, end_time=end_time, folder_fps=folder_fps)
    except (ValueError, OSError) as error:
        return f"{type(error).__name__}: {error}"
    return frames
