"""PPLLaVA as a Transformers-native model. Importing the package registers it with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .configuration_ppllava import PPLLaVAConfig
from .modeling_ppllava import PPLLaVAForConditionalGeneration, PPLLaVAModel, PPLLaVAPreTrainedModel
from .video_decoding_ppllava import PPLLaVAVideoMetadata, VideoDecodingError, decode_video, sample_frame_indices


AutoConfig.register("ppllava", PPLLaVAConfig, exist_ok=True)
AutoModel.register(PPLLaVAConfig, PPLLaVAModel, exist_ok=True)
AutoModelForImageTextToText.register(PPLLaVAConfig, PPLLaVAForConditionalGeneration, exist_ok=True)
try:
    from transformers import AutoModelForMultimodalLM
except ImportError:  # older transformers without the any-to-any auto class
    AutoModelForMultimodalLM = None
if AutoModelForMultimodalLM is not None:
    AutoModelForMultimodalLM.register(PPLLaVAConfig, PPLLaVAForConditionalGeneration, exist_ok=True)

__all__ = [
    "PPLLaVAConfig",
    "PPLLaVAForConditionalGeneration",
    "PPLLaVAModel",
    "PPLLaVAPreTrainedModel",
    "PPLLaVAVideoMetadata",
    "VideoDecodingError",
    "decode_video",
    "sample_frame_indices",
]
