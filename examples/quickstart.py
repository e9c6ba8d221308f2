"""PPLLaVA end to end on one video: processor -> prompt-guided pooling -> generate, plus where and when the video
matches the question (relevance heatmap and timeline).

    python examples/quickstart.py --output-dir quickstart-output

With no --model it runs the embedded default: a tiny PPLLaVA trained on synthetic clips of coloured balls (shipped with
the package, no download), on a 4-second sample clip of that world, a red ball crossing a meadow, written with PyAV.
It answers where the ball goes, finds when and where it is in view, and says how close both come to the truth.
It leaves in --output-dir:
  model/         the embedded default as an ordinary model folder (AutoModelForImageTextToText / AutoProcessor after
                 `import ppllava_hf`), for the other examples (--model DIR/model) and your own code
  sample.mp4     the sample clip
  heatmap.png    the sampled frames under the question's relevance
  timeline.png   relevance over time, with the top moments shaded

    python examples/quickstart.py --output-dir out --model path/to/converted/ppllava --video clip.mp4 --question "..."
"""

import argparse
import time
from pathlib import Path

import torch
from ppllava_cli import (
    EMBEDDED_DEFAULT_NOTE,
    add_debug_argument,
    add_model_arguments,
    check_below_folders,
    errors_as_one_line,
    load_model,
    write_new_or_same,
)

from ppllava_hf.relevance import VideoRelevance, known_timestamps, model_view_frames
from ppllava_hf.testing.embedded_default import SAMPLE_CLIP, SAMPLE_QUESTION, write_sample_video
from ppllava_hf.testing.world_evaluation import ball_patch_shares, interval_iou


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--video", help="Video file (default: the sample clip, written to OUTPUT_DIR/sample.mp4).")
    parser.add_argument("--question", default=SAMPLE_QUESTION, help="Question; it also guides the pooling.")
    parser.add_argument("--top-k", type=int, default=3, help="Moments to list on the timeline.")
    add_model_arguments(parser)
    add_debug_argument(parser)
    parser.set_defaults(max_new_tokens=32)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the quickstart; a mistake (a --video that cannot be read, an --output-dir below a file or holding another
    model, a full disk) ends it with one line on stderr and exit status 1 (`--debug`: the traceback)."""
    args = parse_args(argv)
    with errors_as_one_line(args.debug):
        run(args)


def run(args: argparse.Namespace) -> None:
    """The quickstart itself; files it would write over something else the user made are refused, never replaced."""
    if args.video is not None and not Path(args.video).exists():
        raise FileNotFoundError(f"--video {args.video} does not exist; pass a video file or frame folder.")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise NotADirectoryError(f"--output-dir {args.output_dir} is a file, not a folder; choose a folder.")
    check_below_folders(args.output_dir, "--output-dir")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args)
    model, processor = loaded.model, loaded.processor
    parameters = sum(parameter.numel() for parameter in model.parameters())
    source = "embedded default (tiny PPLLaVA trained on synthetic ball clips, Vicuna layout)" if loaded.is_embedded_default else args.model
    print(f"model      {source}: {parameters / 1e6:.2f}M parameters, {model.dtype}, {model.device} "
          f"(ready in {loaded.load_seconds:.2f} s)")
    if loaded.is_embedded_default:
        write_new_or_same(args.output_dir / "model", lambda folder: (model.save_pretrained(folder),
                                                                     processor.save_pretrained(folder)))

    video = args.video
    (ball,) = SAMPLE_CLIP.balls
    in_view = SAMPLE_CLIP.visible_interval(ball)
    if video is None:
        video = args.output_dir / "sample.mp4"
        write_new_or_same(video, write_sample_video)
        print(f"video      {video} (a red ball rolls {ball.direction} across a meadow, in view {in_view[0]:.1f}-"
              f"{in_view[1]:.1f} s)")
    else:
        print(f"video      {video}")
    print(f"question   {args.question}")

    processor_kwargs = loaded.processor_kwargs(args)
    start = time.perf_counter()
    messages = [{"role": "user", "content": [{"type": "video", "path": str(video)}, {"type": "text", "text": args.question}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True,
        processor_kwargs={**processor_kwargs, "return_metadata": True},
    )
    metadata = inputs.pop("video_metadata")[0]
    inputs = inputs.to(model.device, dtype=model.dtype)
    process_seconds = time.perf_counter() - start

    # Encode the video once: the same pass gives the pooled tokens for generate and the relevance for the heatmap.
    start = time.perf_counter()
    with torch.no_grad():
        encoded = model.encode_multimodal(
            input_ids=inputs["input_ids"], pixel_values_videos=inputs["pixel_values_videos"],
            clip_input_ids=inputs["clip_input_ids"], clip_attention_mask=inputs["clip_attention_mask"],
            max_visual_tokens=args.max_visual_tokens,
        )
    encode_seconds = time.perf_counter() - start
    relevance = encoded["video"].relevance[0].float().cpu()
    frames, rows, columns = relevance.shape
    pooled = encoded["video"].pooler_output[0].shape[0]
    timestamps = known_timestamps(metadata)
    print(f"processor  {frames} frames sampled at {', '.join(f'{t:.1f}' for t in timestamps)} s; "
          f"{inputs['input_ids'].shape[1]} prompt tokens ({process_seconds:.2f} s)")
    print(f"visual     {frames} frames x {rows}x{columns} patches = {frames * rows * columns} patch features -> "
          f"{pooled} pooled tokens ({frames * rows * columns / pooled:.0f}x fewer; encoded in {encode_seconds:.2f} s)")

    start = time.perf_counter()
    output = model.generate(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], mm_encoder_outputs=encoded,
        max_new_tokens=args.max_new_tokens, do_sample=False,
    )
    generate_seconds = time.perf_counter() - start
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    answer = processor.decode(new_tokens, skip_special_tokens=True)
    print(f"answer     {answer!r}")
    print(f"           {len(new_tokens)} tokens in {generate_seconds:.2f} s ({len(new_tokens) / generate_seconds:.0f} tokens/s)")
    if loaded.is_embedded_default:
        print(f"note       {EMBEDDED_DEFAULT_NOTE}")

    start = time.perf_counter()
    video_processor = processor.video_processor
    result = VideoRelevance(
        query=args.question,
        relevance=relevance,
        frames=model_view_frames(inputs["pixel_values_videos"][0], video_processor.image_mean, video_processor.image_std),
        timestamps=timestamps,
    )
    heatmap_size = result.save_heatmap(args.output_dir / "heatmap.png")
    result.save_timeline(args.output_dir / "timeline.png", top_k=args.top_k)
    print("when       the moments most relevant to the question (PPLLaVA's own vision-prompt alignment):")
    moments = result.top_time_ranges(args.top_k)
    for number, moment in enumerate(moments, 1):
        print(f"           #{number} {moment}")
    if args.video is None:
        iou = interval_iou((moments[0].start, moments[0].end), in_view)
        print(f"           (the ball is in view {in_view[0]:.1f}-{in_view[1]:.1f} s: IoU {iou:.2f} with #1)")
        on_ball, area = ball_patch_shares(SAMPLE_CLIP, [ball], relevance, timestamps)
        print(f"where      {on_ball:.0%} of the relevance lies on the ball's patches, {area:.0%} of all patches")
    print(f"wrote      {args.output_dir / 'heatmap.png'} ({heatmap_size[0]}x{heatmap_size[1]}), "
          f"{args.output_dir / 'timeline.png'} ({time.perf_counter() - start:.2f} s)")
    if loaded.is_embedded_default:
        print(f"           {args.output_dir / 'model'}: reuse it with --model {args.output_dir / 'model'} in the other "
              "examples, or AutoModelForImageTextToText / AutoProcessor after `import ppllava_hf`")


if __name__ == "__main__":
    main()
