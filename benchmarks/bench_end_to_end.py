"""Video -> 32 new tokens, greedy: PPLLaVA vs transformers' LLaVA-NeXT-Video, same vision tower and LLM sizes.

    python benchmarks/bench_end_to_end.py [--quick] [--device cuda] [--width 8 --depth 4]

Both models are the 7B models scaled down by the same factors (see `scaled_models.py`), with random weights and fixed
seeds; 32 frames of 336 x 336 pixels, inputs built directly with each model's own placeholder count. Prefill is the
time to the first token (vision tower, PPLLaVA's prompt encoder and pooling, LLM prefill); decode is the rate of
the other 31 tokens; peak memory is what generation adds on top of the loaded model and inputs. PPLLaVA runs its
vision tower 8 frames at a time (`vision_chunk_frames`, same numbers); LLaVA-NeXT-Video encodes all frames at once.
"""

import torch
from measure import (
    benchmark_arguments,
    describe_machine,
    interleave,
    median_generation,
    mib,
    module_bytes,
    peak_memory,
    print_table,
    ratio,
    report_target,
    setup,
    timed_generate,
)
from scaled_models import (
    Scale,
    add_model_arguments,
    build_llava_next_video,
    build_ppllava,
    count_video_tokens,
    llava_next_video_inputs,
    model_dtype,
    on_device,
    ppllava_inputs,
    random_video,
)


NEW_TOKENS = 32


def main() -> None:
    parser = benchmark_arguments(__doc__.splitlines()[0], default_repeats=3)
    parser.add_argument("--frames", type=int, default=32)
    add_model_arguments(parser, default_depth=4)
    parser.add_argument("--chunk", type=int, default=8, help="PPLLaVA's vision_chunk_frames (0: all frames at once)")
    args = parser.parse_args()
    device = setup(args)
    dtype = model_dtype(args, device)
    scale = Scale(args.width, args.depth)

    video = random_video(args.frames)
    models = {
        "PPLLaVA": build_ppllava(scale, vision_chunk_frames=args.chunk or None),
        "LLaVA-NeXT-Video": build_llava_next_video(scale),
    }
    inputs = {
        "PPLLaVA": on_device(ppllava_inputs(models["PPLLaVA"], video), device, dtype),
        "LLaVA-NeXT-Video": on_device(llava_next_video_inputs(models["LLaVA-NeXT-Video"], video), device, dtype),
    }
    for model in models.values():
        model.to(device, dtype)
    print(
        f"{args.frames} frames -> {NEW_TOKENS} new tokens, {dtype}, 7B sizes / (width {scale.width}, depth {scale.depth}), "
        f"{describe_machine(device)}, {args.repeats} repeats\n"
    )

    cases = {name: (lambda name=name: timed_generate(models[name], inputs[name], NEW_TOKENS, device)) for name in models}
    with torch.no_grad():
        timings = {name: median_generation(runs) for name, runs in interleave(cases, args.repeats).items()}
        memory = {name: peak_memory(run, device).extra for name, run in cases.items()}

    figures = {}
    for name, model in models.items():
        prefill, decode_rate, total = timings[name]
        figures[name] = dict(
            visual_tokens=count_video_tokens(inputs[name], model.config.video_token_id),
            sequence=inputs[name]["input_ids"].shape[1], prefill=prefill, decode=decode_rate, total=total,
            memory=memory[name], weights=module_bytes(model),
        )
    rows = [
        [name, f["visual_tokens"], f["sequence"], f["prefill"].formatted("s"), f"{f['decode']:.1f}",
         f["total"].formatted("s"), mib(f["memory"]), mib(f["weights"])]
        for name, f in figures.items()
    ]
    ours, theirs = figures["PPLLaVA"], figures["LLaVA-NeXT-Video"]
    latency_ratio = ours["total"].median / theirs["total"].median
    rows.append([
        "PPLLaVA / LLaVA-NeXT-Video", ratio(ours["visual_tokens"], theirs["visual_tokens"]),
        ratio(ours["sequence"], theirs["sequence"]), ratio(ours["prefill"].median, theirs["prefill"].median),
        ratio(ours["decode"], theirs["decode"]), f"{latency_ratio:.2f}x", ratio(ours["memory"], theirs["memory"]),
        ratio(ours["weights"], theirs["weights"]),
    ])
    print_table(
        ["model", "visual tokens", "sequence", "prefill s (min-max)", "decode tok/s", "total s (min-max)",
         "peak extra MiB", "weights MiB"],
        rows,
    )
    print("\nTargets:")
    report_target("total latency PPLLaVA / LLaVA-NeXT-Video", latency_ratio, 0.35)


if __name__ == "__main__":
    main()
