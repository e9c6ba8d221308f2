"""Long videos at one token budget: PPLLaVA on 32 to 2,048 frames -> 32 new tokens, greedy, in memory and streamed.

    python benchmarks/bench_long_video.py [--quick] [--device cuda] [--chunk 32] [--budget 1024]

PPLLaVA-7B scaled down (see `scaled_models.py`; by default shallower than in bench_end_to_end so that 512 frames of
336 x 336 pixels fit the time limit on a CPU), with `max_visual_tokens` as the budget and `vision_chunk_frames` as the
chunk. Every run pools to the same number of tokens.

- In memory (32, 128, 512 frames): the processor's output for a short video, float32 pixels of every frame resident
  before the run; what grows with the frames is the vision work and the selected vision features, which the
  prompt-relevance softmax over all patches needs before any window can be pooled. "peak - frames" leaves the pixels
  out.
- Streamed (32 to 2,048 frames): the video processor's `StreamedVideo` of a video file (written here, 112 x 112 pixels
  upscaled to 336 as any file is), decoded and preprocessed a chunk at a time, scored, then encoded again and pooled
  block by block. Its peak is the whole process's, decoding included; nothing about the video is resident before.

`--quick` measures 32 and 128 frames on both paths (2,048 streamed frames take minutes on a CPU).
"""

import importlib.util
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from measure import (
    benchmark_arguments,
    describe_machine,
    median_generation,
    mib,
    peak_memory,
    print_table,
    ratio,
    report_target,
    setup,
    tensor_bytes,
    timed_generate,
)
from scaled_models import (
    Scale,
    add_model_arguments,
    build_ppllava,
    count_video_tokens,
    model_dtype,
    on_device,
    ppllava_inputs,
    random_video,
)

from ppllava_hf import PPLLaVAVideoProcessor


NEW_TOKENS = 32
IN_MEMORY_FRAMES = (32, 128, 512)
STREAMED_FRAMES = (32, 128, 512, 2048)
QUICK_FRAMES = (32, 128)
FILE_FRAMES, FILE_SIZE = 2048, 112


def write_long_video(path: Path) -> Path:
    """A `FILE_FRAMES`-frame mpeg4 file of moving gradients, 25 fps, a keyframe every 32 frames."""
    import av
    ramp = np.add.outer(np.arange(FILE_SIZE), np.arange(FILE_SIZE))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(25))
        stream.width = stream.height = FILE_SIZE
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = 32
        for index in range(FILE_FRAMES):
            image = np.stack([(ramp + index) % 256, (2 * ramp - index) % 256, np.full_like(ramp, index % 256)], -1)
            frame = av.VideoFrame.from_ndarray(image.astype(np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def measure(model, inputs: dict, device: torch.device, repeats: int) -> dict:
    """Timings of `repeats` generations; the peak is read during the first (a long run takes long on a CPU)."""
    timings = []
    with torch.no_grad():
        peak = peak_memory(lambda: timings.append(timed_generate(model, inputs, NEW_TOKENS, device)), device)
        timings += [timed_generate(model, inputs, NEW_TOKENS, device) for _ in range(repeats - 1)]
    return dict(timing=median_generation(timings), peak=peak, tokens=count_video_tokens(inputs, model.config.video_token_id))


def streamed_inputs(model, video_file: Path, frames: int, device: torch.device) -> dict:
    """Generation inputs whose video is the file's `StreamedVideo` of `frames` sampled frames."""
    processor = PPLLaVAVideoProcessor()
    video = processor(videos=[str(video_file)], num_frames=frames, stream_min_frames=1)["pixel_values_videos"]
    inputs = ppllava_inputs(model, torch.empty(1, frames, 0))  # the placeholders of `frames` frames, no pixels
    inputs = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}
    return inputs | {"pixel_values_videos": video}


def main() -> None:
    parser = benchmark_arguments(__doc__.splitlines()[0], default_repeats=2)
    parser.add_argument("--budget", type=int, default=1024, help="max_visual_tokens")
    parser.add_argument("--chunk", type=int, default=32, help="vision_chunk_frames")
    add_model_arguments(parser, default_depth=8)
    args = parser.parse_args()
    device = setup(args)
    dtype = model_dtype(args, device)
    scale = Scale(args.width, args.depth)
    model = build_ppllava(scale, max_visual_tokens=args.budget, vision_chunk_frames=args.chunk).to(device, dtype)
    print(
        f"PPLLaVA, budget {args.budget} tokens, chunk {args.chunk} frames, {dtype}, 7B sizes / (width {scale.width}, "
        f"depth {scale.depth}), {describe_machine(device)}, {args.repeats} repeats\n"
    )
    in_memory_frames = QUICK_FRAMES if args.quick else IN_MEMORY_FRAMES
    streamed_frames = QUICK_FRAMES if args.quick else STREAMED_FRAMES
    if importlib.util.find_spec("av") is None:
        print("PyAV (av) is not installed: the streamed path, which decodes a file, is not measured.\n")
        streamed_frames = ()
    base = in_memory_frames[0]

    in_memory = {}
    for frames in in_memory_frames:  # one video at a time, so that only its own frames are resident
        inputs = on_device(ppllava_inputs(model, random_video(frames)), device, dtype)
        if frames == base:  # warm up once, on the shortest video
            with torch.no_grad():
                timed_generate(model, inputs, NEW_TOKENS, device)
        in_memory[frames] = measure(model, inputs, device, args.repeats)
        in_memory[frames]["frame_bytes"] = tensor_bytes(inputs["pixel_values_videos"])
        del inputs

    streamed = {}
    with tempfile.TemporaryDirectory() as folder:
        video_file = write_long_video(Path(folder) / "long.mp4")
        for frames in streamed_frames:
            inputs = streamed_inputs(model, video_file, frames, device)
            streamed[frames] = measure(model, inputs, device, args.repeats)
            inputs["pixel_values_videos"][0].close()
            del inputs

    rows = []
    for frames in sorted(set(in_memory) | set(streamed)):
        row = [frames, (in_memory.get(frames) or streamed[frames])["tokens"]]
        if frames in in_memory:
            result = in_memory[frames]
            total, peak = result["timing"][2], result["peak"]
            row += [
                mib(result["frame_bytes"]), total.formatted("s"), mib(peak.extra),
                ratio(peak.extra, in_memory[base]["peak"].extra), mib(peak.total),
                mib(peak.total - result["frame_bytes"]),
                ratio(peak.total - result["frame_bytes"], in_memory[base]["peak"].total - in_memory[base]["frame_bytes"]),
            ]
        else:
            row += ["-"] * 7
        result = streamed.get(frames)
        row += ["-"] * 4 if result is None else [
            result["timing"][2].formatted("s"), mib(result["peak"].total),
            ratio(result["peak"].total, streamed[base]["peak"].total),
            ratio(result["peak"].total, in_memory[base]["peak"].total),
        ]
        rows.append(row)
    where = "process resident set" if device.type == "cpu" else "allocated device memory"
    print_table(
        ["frames", "visual tokens", "in memory: pixels MiB", "total s (min-max)", "peak extra MiB", f"vs {base}",
         "peak MiB", "peak - pixels MiB", f"vs {base}", "streamed: total s (min-max)", "peak MiB", f"vs streamed {base}",
         f"vs in memory {base}"],
        rows,
    )
    print(
        f"\npeak: the whole {where} at its peak (runtime, weights, inputs and run); streamed, decoding included. peak "
        "extra: what an in-memory run adds on top of the loaded model and its inputs.\nTargets:"
    )
    longest_in_memory, longest_streamed = in_memory_frames[-1], (streamed_frames or [None])[-1]
    without_pixels = {frames: result["peak"].total - result["frame_bytes"] for frames, result in in_memory.items()}
    report_target(
        f"in memory, {longest_in_memory}-frame / {base}-frame peak without the pixels",
        without_pixels[longest_in_memory] / without_pixels[base], 1.5,
    )
    if streamed:
        report_target(
            f"streamed, {longest_streamed}-frame / {base}-frame peak, decoding included",
            streamed[longest_streamed]["peak"].total / streamed[base]["peak"].total, 1.2,
        )


if __name__ == "__main__":
    main()
