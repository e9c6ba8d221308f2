"""Command line of the conversion: `python -m ppllava_hf.conversion` or `python convert_checkpoints.py`.

    python -m ppllava_hf.conversion --input farewellthree/ppllava_weight/ppllava_vicuna7b_image_video \\
        --output ppllava-vicuna7b-image-video-hf --verify --remote-code

See `ppllava_hf.conversion.convert.convert_checkpoint` for what each step does.
"""


import argparse
import logging
import sys

import torch

from .convert import convert_checkpoint, push_to_hub
from .rules import ConversionError
from .verification import VerificationError


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convert an original PPLLaVA checkpoint (Hub repo farewellthree/ppllava_weight) to the "
        "Transformers-native PPLLaVA-HF format."
    )
    parser.add_argument("--input", required=True, help="Original checkpoint: a folder, or owner/repo/folder on the Hub.")
    parser.add_argument("--output", required=True, help="Folder to write the converted checkpoint to (new or empty).")
    parser.add_argument(
        "--prompt-encoder",
        help="CLIP/SigLIP model (folder or Hub id) of the prompt encoder, when the checkpoint's `clip_weight` does not "
        "resolve (e.g. openai/clip-vit-large-patch14-336, google/siglip-so400m-patch14-384).",
    )
    parser.add_argument("--tokenizer", help="LLM tokenizer (folder or Hub id) when the checkpoint carries none.")
    parser.add_argument("--prompt-tokenizer", help="CLIP/SigLIP tokenizer; defaults to the prompt encoder's.")
    parser.add_argument(
        "--base-processor",
        help="LLaVA-NeXT/OneVision processor (folder or Hub id) whose LLM tokenizer is used when the checkpoint has none, "
        "e.g. llava-hf/llava-v1.6-vicuna-7b-hf or llava-hf/llava-onevision-qwen2-7b-si-hf. Image/video preprocessing and "
        "the chat template follow the converted config (PPLLaVA's own templates).",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="Cast the weights (default: keep the checkpoint's).")
    parser.add_argument("--verify", action="store_true", help="Load the result and check it (self-consistency).")
    parser.add_argument(
        "--reference-outputs", help="Folder of outputs recorded with the original code (cases.json) to verify against."
    )
    parser.add_argument("--remote-code", action="store_true", help="Also write the modeling code and auto_map.")
    parser.add_argument("--push-to-hub", metavar="REPO", help="Upload the converted folder to this Hub repo.")
    parser.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="Convert pickle .bin weights (only from a trusted source; loaded with torch.load(weights_only=True)).",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; returns the exit code: 0 on success, 1 when the conversion is refused or fails (the reason
    on stderr, in a line, without a traceback; nothing is left in the output folder)."""
    args = parse_args(argv)
    try:
        result = convert_checkpoint(
            args.input,
            args.output,
            prompt_encoder=args.prompt_encoder,
            tokenizer=args.tokenizer,
            prompt_tokenizer=args.prompt_tokenizer,
            base_processor=args.base_processor,
            dtype=DTYPES.get(args.dtype),
            allow_pickle=args.allow_pickle,
            remote_code=args.remote_code,
            verify=args.verify,
            reference_outputs=args.reference_outputs,
            model_id=args.push_to_hub,
        )
    except (ConversionError, VerificationError, OSError) as error:
        # Our own refusals, and the file system's (permissions, disk full): a message, not a traceback.
        print(f"error: {error} Nothing was written to {args.output}.", file=sys.stderr)
        return 1
    if result.verification is not None:
        print(result.verification)
    if args.push_to_hub:
        print(f"Pushed to {push_to_hub(args.output, args.push_to_hub, private=args.private or None)}")
    print(f"Converted {args.input} into {args.output}.")
    return 0


def run() -> None:
    """Entry point: logs go to stderr, the exit code is `main`'s."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
