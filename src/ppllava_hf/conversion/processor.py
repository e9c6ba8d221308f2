"""The processor step of checkpoint conversion, kept apart from the config and weight steps.

A converted folder's processor joins the LLM tokenizer (which must know the image/video placeholders), the prompt
tokenizer of the CLIP/SigLIP prompt encoder (for `clip_input_ids`) and the image/video preprocessing and chat template
that `PPLLaVAProcessor.from_config` derives from the converted config. A checkpoint with no tokenizer anywhere (like the
tiny test fixture) still converts: config, weights and model card, with a warning that no processor was written.
"""

import logging
import os
from dataclasses import dataclass

from transformers import AutoTokenizer

from ..models.ppllava.configuration_ppllava import PPLLaVAConfig
from ..models.ppllava.processing_ppllava import PPLLaVAProcessor, align_placeholder_tokens
from .original_checkpoint import OriginalCheckpoint, folder_has_tokenizer
from .rules import ConversionError


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessorSources:
    """Folders or Hub ids the processor is built from; `None` where there is none."""

    tokenizer: str | None = None
    prompt_tokenizer: str | None = None
    base_processor: str | None = None


def find_processor_sources(
    checkpoint: OriginalCheckpoint,
    prompt_encoder: str,
    tokenizer: str | None = None,
    prompt_tokenizer: str | None = None,
    base_processor: str | None = None,
) -> ProcessorSources:
    """Where each part of the processor comes from: what the caller names first, else the checkpoint folder's own LLM
    tokenizer (or the base processor's), and the prompt encoder's tokenizer (a Hub id, or a folder that has one)."""
    if tokenizer is None:
        tokenizer = checkpoint.folder if checkpoint.has_tokenizer() else base_processor
    if prompt_tokenizer is None and (not os.path.isdir(prompt_encoder) or folder_has_tokenizer(prompt_encoder)):
        prompt_tokenizer = prompt_encoder
    return ProcessorSources(tokenizer=tokenizer, prompt_tokenizer=prompt_tokenizer, base_processor=base_processor)


def save_processor(sources: ProcessorSources, output_folder: str, config: PPLLaVAConfig) -> bool:
    """Write the processor of a converted checkpoint into `output_folder`; returns whether one was written.

    Without an LLM tokenizer there is nothing to build a processor from: the folder gets config, weights and model card
    only, with a warning. Otherwise `config.video_token_id` follows the tokenizer's `<video>` (added when missing), so
    that the two agree; the config must be saved after this step.
    """
    if sources.tokenizer is None:
        logger.warning(
            "No processor was written to %s: the checkpoint carries no tokenizer and no tokenizer or base processor was "
            "given (--tokenizer / --base-processor). The model loads and runs; build its inputs by hand (see the model "
            "card) or convert again with a tokenizer.",
            output_folder,
        )
        return False
    if sources.prompt_tokenizer is None:
        raise ConversionError(
            "The LLM tokenizer was found but not the prompt encoder's: pass --prompt-tokenizer (the CLIP/SigLIP model "
            "named by the checkpoint's clip_weight, e.g. openai/clip-vit-large-patch14-336)."
        )
    tokenizer = AutoTokenizer.from_pretrained(sources.tokenizer)
    try:
        align_placeholder_tokens(tokenizer, config)
    except ValueError as error:
        raise ConversionError(str(error)) from None
    prompt_tokenizer = AutoTokenizer.from_pretrained(sources.prompt_tokenizer)
    PPLLaVAProcessor.from_config(config, tokenizer, prompt_tokenizer).save_pretrained(output_folder)
    return True
