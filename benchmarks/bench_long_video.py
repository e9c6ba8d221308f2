"""Long videos at one token budget: PPLLaVA on 32, 128 and 512 frames -> 32 new tokens, greedy.

    python benchmarks/bench_long_video.py [--quick] [--device cuda] [--chunk 32] [--budget 1024]

PPLLaVA-7B scaled down (see `scaled_models.py`; by default shallower than in bench_end_to_end so that 512 frames of
336 x 336 pixels fit the time limit on a CPU), with `max_visual_tokens` as the budget and `vision_chunk_frames` as the
chunk. Every run pools to the same number of tokens; what grows with the frames is the vision work and the selected
vision features, which the prompt-relevance softmax over all patches needs before any window can be pooled.
The decoded frames are inputs, resident before each run: their size is reported on its own and left out of the peaks.
"""

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


NEW_TOKENS = 32
FRAME_COUNTS = (32, 128, 512)


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

    base, longest = FRAME_COUNTS[0], FRAME_COUNTS[-1]
    results = {}
    for frames in FRAME_COUNTS:  # one video at a time, so that only its own frames are resident
        inputs = on_device(ppllava_inputs(model, random_video(frames)), device, dtype)
        video = inputs["pixel_values_videos"]
        timings = []
        with torch.no_grad():
            if frames == base:  # warm up once, on the shortest video
                timed_generate(model, inputs, NEW_TOKENS, device)
            # A 512-frame run takes long on a CPU: the peak is read during the first timed run instead of a run of its own.
            peak = peak_memory(lambda: timings.append(timed_generate(model, inputs, NEW_TOKENS, device)), device)
            timings += [timed_generate(model, inputs, NEW_TOKENS, device) for _ in range(args.repeats - 1)]
        results[frames] = dict(
            tokens=count_video_tokens(inputs, model.config.video_token_id), frame_bytes=tensor_bytes(video),
            timing=median_generation(timings), peak_extra=peak.extra, peak_without_frames=peak.total - tensor_bytes(video),
        )
        del video, inputs

    rows = []
    for frames, result in results.items():
        prefill, _, total = result["timing"]
        rows.append([
            frames, result["tokens"], mib(result["frame_bytes"]), prefill.formatted("s"), total.formatted("s"),
            mib(result["peak_extra"]), ratio(result["peak_extra"], results[base]["peak_extra"]),
            mib(result["peak_without_frames"]),
            ratio(result["peak_without_frames"], results[base]["peak_without_frames"]),
        ])
    where = "process resident set" if device.type == "cpu" else "allocated device memory"
    print_table(
        ["frames", "visual tokens", "decoded frames MiB", "prefill s (min-max)", "total s (min-max)",
         "peak extra MiB", f"vs {base}", "peak - frames MiB", f"vs {base}"],
        rows,
    )
    print(
        f"\npeak extra: what a run adds on top of the loaded model and its inputs. peak - frames: the whole {where} at "
        "its peak (runtime, weights, inputs and run), minus the decoded frames.\nTargets:"
    )
    for key, description in (("peak_without_frames", "peak without the decoded frames"), ("peak_extra", "peak extra")):
        measured = results[longest][key] / results[base][key]
        report_target(f"{longest}-frame / {base}-frame {description}", measured, 1.5)


if __name__ == "__main__":
    main()
