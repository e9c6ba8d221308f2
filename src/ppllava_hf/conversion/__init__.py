"""From the original PPLLaVA code's checkpoints (or LLaVA + CLIP/SigLIP backbones) to Transformers-native folders:
`python -m ppllava_hf.conversion --help`."""

from .building import build_ppllava_from_backbones, build_ppllava_processor
from .convert import ConversionResult, convert_checkpoint, push_to_hub
from .rules import ConversionError
from .verification import VerificationError, VerificationReport, verify_converted


__all__ = [
    "ConversionError",
    "ConversionResult",
    "VerificationError",
    "VerificationReport",
    "build_ppllava_from_backbones",
    "build_ppllava_processor",
    "convert_checkpoint",
    "push_to_hub",
    "verify_converted",
]
