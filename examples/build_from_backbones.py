"""Build an untrained PPLLaVA from a LLaVA-NeXT / LLaVA-OneVision checkpoint and a CLIP / SigLIP checkpoint.

    # The released recipes' starting points (Vicuna + CLIP with a BT-Adapter; Qwen2 + SigLIP):
    python examples/build_from_backbones.py --llava llava-hf/llava-v1.6-vicuna-7b-hf \
        --clip openai/clip-vit-large-patch14-336 --output-dir ppllava-vicuna-7b-untrained --dtype bfloat16
    python examples/build_from_backbones.py --llava llava-hf/llava-onevision-qwen2-7b-si-hf \
        --clip google/siglip-so400m-patch14-384 --output-dir ppllava-qwen-7b-untrained --dtype bfloat16

    # Tiny random backbones, no download (a smoke test):
    python examples/build_from_backbones.py --tiny vicuna --output-dir /tmp/ppllava-tiny

The folder holds the model and its processor (the LLaVA folder's tokenizer, the CLIP/SigLIP folder's tokenizer) and
loads with `AutoModelForImageTextToText` / `AutoProcessor.from_pretrained(folder)` after `import ppllava_hf`.
"""

import argparse
import tempfile

import torch
from transformers import AutoModelForImageTextToText

import ppllava_hf  # noqa: F401  (registers PPLLaVA with the Auto classes)
from ppllava_hf.conversion.building import build_ppllava_from_backbones, build_ppllava_processor
from ppllava_hf.testing.tiny import tiny_backbones, tiny_prompt_tokenizer, tiny_tokenizer
from ppllava_hf.training.freezing import FREEZING_PRESETS, apply_freezing_preset


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--llava", help="LLaVA-NeXT or LLaVA-OneVision folder or Hub id (transformers layout).")
    source.add_argument("--tiny", choices=["vicuna", "qwen"], help="Build from tiny random backbones instead.")
    parser.add_argument("--clip", help="CLIP (for LLaVA-NeXT) or SigLIP (for LLaVA-OneVision) folder or Hub id.")
    parser.add_argument("--output-dir", required=True, help="Where to save the PPLLaVA folder.")
    parser.add_argument(
        "--btadapter", action=argparse.BooleanOptionalAction, default=None,
        help="Add the BT-Adapter (default: with a CLIP tower, as the Vicuna recipes do).",
    )
    parser.add_argument("--btadapter-depth", type=int, default=4)
    parser.add_argument("--btadapter-max-frames", type=int, default=64)
    parser.add_argument(
        "--random-prompt-token-embeddings", action="store_true",
        help="Give the prompt encoder a fresh random token table, as the original code does (default: pretrained).",
    )
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument(
        "--preset", choices=sorted(FREEZING_PRESETS), default="sft",
        help="Freezing preset whose trainable parameters the summary shows (requires_grad is not saved).",
    )
    parser.add_argument("--verify", action="store_true", help="Reload the saved folder and compare logits on text.")
    args = parser.parse_args()
    if args.llava and not args.clip:
        parser.error("--llava needs --clip.")
    return args


def save_tiny_backbones(layout: str, folder: str) -> tuple[str, str]:
    """Tiny random backbones saved like real ones: the LLaVA folder with its LLM tokenizer, the CLIP/SigLIP folder with
    its tokenizer."""
    llava, clip = tiny_backbones(layout)
    llava.save_pretrained(f"{folder}/llava")
    tiny_tokenizer(layout, llava.config.image_token_id, llava.config.image_token_id + 1).save_pretrained(f"{folder}/llava")
    clip.save_pretrained(f"{folder}/clip")
    tiny_prompt_tokenizer(layout, clip.config.text_config.vocab_size).save_pretrained(f"{folder}/clip")
    return f"{folder}/llava", f"{folder}/clip"


def main() -> None:
    args = parse_args()
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    options = dict(
        use_btadapter=args.btadapter,
        btadapter_depth=args.btadapter_depth,
        btadapter_max_frames=args.btadapter_max_frames,
        random_prompt_token_embeddings=args.random_prompt_token_embeddings,
        dtype=dtype,
    )
    if args.tiny:
        with tempfile.TemporaryDirectory() as folder:
            llava, clip = save_tiny_backbones(args.tiny, folder)
            model = build_ppllava_from_backbones(llava, clip, **options)
            processor = build_ppllava_processor(llava, clip, model.config)
    else:
        model = build_ppllava_from_backbones(args.llava, args.clip, **options)
        processor = build_ppllava_processor(args.llava, args.clip, model.config)

    print(f"\nTrainable parameters under the {args.preset!r} preset ({FREEZING_PRESETS[args.preset]}):")
    print(apply_freezing_preset(model, args.preset))
    if model.config.use_btadapter:
        print(
            "\nThe BT-Adapter's temporal layers, time embedding and CLS token are new (the load report lists them as "
            "MISSING): they start with a zero output projection and CLS, and learn in the SFT stage."
        )
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    print(
        f"\nSaved PPLLaVA and its processor to {args.output_dir} (placeholders: <image>={model.config.image_token_id}, "
        f"<video>={model.config.video_token_id})."
    )

    if args.verify:
        reloaded = AutoModelForImageTextToText.from_pretrained(args.output_dir, dtype=model.dtype).eval()
        input_ids = torch.randint(3, min(1000, model.config.text_config.vocab_size), (1, 16))
        with torch.no_grad():
            same = torch.equal(reloaded(input_ids=input_ids).logits, model.eval()(input_ids=input_ids).logits)
        print(f"Reloaded with AutoModelForImageTextToText: text logits {'identical' if same else 'DIFFER'}.")
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
