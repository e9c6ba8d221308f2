"""The processor step of checkpoint conversion, kept apart from the config and weight steps.

A converted folder's processor joins the LLM tokenizer (which must know the image/video placeholders), the prompt
tokenizer of the CLIP/SigLIP prompt encoder (for `clip_input_ids`) and the image/video preprocessing and chat template
that `PPLLaVAProcessor.from_config` derives from the converted config. A checkpoint with no tokenizer anywhere (like the
tiny test fixture) still converts: config, weights and model card, with a warning that no processor was written.
"""

import logging
import os
from dataclasses import dataclass

from tokenizers import AddedToken
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..models.ppllava.configuration_ppllava import PPLLaVAConfig
from ..models.ppllava.processing_ppllava import PPLLaVAProcessor
from .original_checkpoint import OriginalCheckpoint, check_local_source, folder_has_tokenizer
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
    """Where each part of the processor comes from: what the caller names first (a local path must exist), else the
    checkpoint folder's own LLM tokenizer (or the base processor's), and the prompt encoder's tokenizer (a Hub id, or a
    folder that has one)."""
    for source, option in ((tokenizer, "--tokenizer"), (prompt_tokenizer, "--prompt-tokenizer"),
                           (base_processor, "--base-processor")):
        if source is not None:
            check_local_source(source, f"{option} folder")
    if tokenizer is None:
        tokenizer = checkpoint.folder if checkpoint.has_tokenizer() else base_processor
    if prompt_tokenizer is None and (not os.path.isdir(prompt_encoder) or folder_has_tokenizer(prompt_encoder)):
        prompt_tokenizer = prompt_encoder
    return ProcessorSources(tokenizer=tokenizer, prompt_tokenizer=prompt_tokenizer, base_processor=base_processor)


def build_processor(sources: ProcessorSources, config: PPLLaVAConfig) -> PPLLaVAProcessor | None:
    """The processor of a converted checkpoint, or None when there is no LLM tokenizer to build it from.

    Without an LLM tokenizer the folder gets config, weights and model card only, with a warning. Otherwise
    `config.video_token_id` follows the tokenizer's `<video>` (added when missing), so that the two agree; build the
    processor before saving the config. Nothing is written.
    """
    if sources.tokenizer is None:
        logger.warning(
            "No processor is written: the checkpoint carries no tokenizer and no tokenizer or base processor was "
            "given (--tokenizer / --base-processor). The model loads and runs; build its inputs by hand (see the model "
            "card) or convert again with a tokenizer."
        )
        return None
    if sources.prompt_tokenizer is None:
        raise ConversionError(
            "The LLM tokenizer was found but not the prompt encoder's: pass --prompt-tokenizer (the CLIP/SigLIP model "
            "named by the checkpoint's clip_weight, e.g. openai/clip-vit-large-patch14-336)."
        )
    tokenizer = _load_tokenizer(sources.tokenizer, "LLM tokenizer")
    try:
        align_placeholder_tokens(tokenizer, config)
    except ValueError as error:
        raise ConversionError(str(error)) from None
    prompt_tokenizer = _load_tokenizer(sources.prompt_tokenizer, "prompt tokenizer")
    try:
        return PPLLaVAProcessor.from_config(config, tokenizer, prompt_tokenizer)
    except ValueError as error:
        raise ConversionError(str(error)) from None


def _load_tokenizer(source: str, what: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        reason = next(iter(str(error).strip().splitlines()), type(error).__name__)
        raise ConversionError(f"Cannot load the {what} from {source!r}: {reason}") from error


def align_placeholder_tokens(tokenizer: PreTrainedTokenizerBase, config: PPLLaVAConfig) -> None:
    """Make an LLM tokenizer and a config agree on the placeholders: `<image>` must already be the config's image id;
    `<video>` is added as a special token when missing (LLaVA-NeXT tokenizers have none) and the config takes its id,
    which must be a row of the LLM's embeddings. Raises `ValueError` otherwise."""
    vocab = tokenizer.get_vocab()
    if vocab.get("<image>") != config.image_token_id:
        raise ValueError(
            f"The LLM tokenizer's <image> is {vocab.get('<image>')}, the checkpoint's image placeholder "
            f"{config.image_token_id}: use the tokenizer the model was trained with."
        )
    if "<video>" not in vocab:
        tokenizer.add_tokens([AddedToken("<video>", special=True, normalized=False)], special_tokens=True)
    video_token_id = tokenizer.convert_tokens_to_ids("<video>")
    if video_token_id >= config.text_config.vocab_size:
        raise ValueError(
            f"The tokenizer puts <video> at id {video_token_id}, past the LLM's {config.text_config.vocab_size} "
            "embedding rows; the model has no row for a video placeholder (grow its embeddings first)."
        )
    config.video_token_id = video_token_id
