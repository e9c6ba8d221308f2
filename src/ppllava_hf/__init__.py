"""PPLLaVA as a Transformers-native model. Importing the package registers it with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoModelForMultimodalLM, AutoProcessor

from .models.ppllava.configuration_ppllava import PPLLaVAConfig
from .models.ppllava.modeling_ppllava import PPLLaVAForConditionalGeneration, PPLLaVAModel, PPLLaVAPreTrainedModel
from .models.ppllava.processing_ppllava import PPLLaVAProcessor
from .models.ppllava.transformers_internals_ppllava import AutoVideoProcessor
from .models.ppllava.video_decoding_ppllava import (
    PPLLaVAVideoMetadata,
    VideoDecodingError,
    decode_video,
    sample_frame_indices,
)
from .models.ppllava.video_processing_ppllava import PPLLaVAVideoProcessor, StreamedVideo
from .tested_releases import warn_if_untested_transformers


AutoConfig.register("ppllava", PPLLaVAConfig, exist_ok=True)
AutoModel.register(PPLLaVAConfig, PPLLaVAModel, exist_ok=True)
AutoModelForImageTextToText.register(PPLLaVAConfig, PPLLaVAForConditionalGeneration, exist_ok=True)
AutoModelForMultimodalLM.register(PPLLaVAConfig, PPLLaVAForConditionalGeneration, exist_ok=True)
AutoProcessor.register(PPLLaVAConfig, PPLLaVAProcessor, exist_ok=True)
# The torch-only video processor serves every backend; transformers looks video processors up under "torchvision".
AutoVideoProcessor.register(
    PPLLaVAConfig, video_processor_classes={"torchvision": PPLLaVAVideoProcessor}, exist_ok=True
)
warn_if_untested_transformers()

__all__ = [
    "PPLLaVAConfig",
    "PPLLaVAForConditionalGeneration",
    "PPLLaVAModel",
    "PPLLaVAPreTrainedModel",
    "PPLLaVAProcessor",
    "PPLLaVAVideoMetadata",
    "PPLLaVAVideoProcessor",
    "StreamedVideo",
    "VideoDecodingError",
    "decode_video",
    "sample_frame_indices",
]
