"""The processor step of checkpoint conversion, kept apart from the config and weight steps.

A converted folder's processor joins the LLM tokenizer (which must know the image/video placeholders), the prompt
tokenizer of the CLIP/SigLIP prompt encoder (for `clip_input_ids`), the image/video preprocessing settings and the chat
template of the LLaVA-NeXT/OneVision base. This version of ppllava_hf has no `PPLLaVAProcessor` yet, so the step only
handles a checkpoint with no tokenizer anywhere (like the tiny test fixture): it writes nothing and says so. Given a
tokenizer it refuses, before any weight is converted, rather than leave out a processor it could have written.
"""

import logging
import os
from dataclasses import dataclass

from .configuration_ppllava import PPLLaVAConfig
from .original_checkpoint_ppllava import OriginalCheckpoint, folder_has_tokenizer


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
    only, with a warning. `config` is what the processor must agree with (placeholder ids, pooling sizes).
    """
    if sources.tokenizer is None:
        logger.warning(
            "No processor was written to %s: the checkpoint carries no tokenizer and no tokenizer or base processor was "
            "given (--tokenizer / --base-processor). The model loads and runs; build its inputs by hand (see the model "
            "card) or convert again with a tokenizer.",
            output_folder,
        )
        return False
    raise NotImplementedError(
        f"Writing the processor (LLM tokenizer {sources.tokenizer}, prompt tokenizer {sources.prompt_tokenizer}) needs "
        "PPLLaVAProcessor, which this version of ppllava_hf does not have yet."
    )
