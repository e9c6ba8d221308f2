"""What the example scripts share: the model flags, loading a model (the embedded default or a folder / Hub id), and
answering a batch of video questions in one `generate` call."""

import argparse
import os
import time
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
