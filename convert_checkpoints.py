"""Convert an original PPLLaVA checkpoint (Hub repo farewellthree/ppllava_weight) to the Transformers-native PPLLaVA-HF format.

    python convert_checkpoints.py --input farewellthree/ppllava_weight/ppllava_vicuna7b_image_video \\
        --output ppllava-vicuna7b-image-video-hf --verify --remote-code

The same as `python -m ppllava_hf.conversion` (`ppllava_hf.conversion.cli`); see
`ppllava_hf.conversion.convert.convert_checkpoint` for what each step does.
"""

from ppllava_hf.conversion.cli import main, run


__all__ = ["main"]

if __name__ == "__main__":
    run()
