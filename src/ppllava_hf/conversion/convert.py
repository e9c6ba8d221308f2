"""End-to-end conversion of an original PPLLaVA checkpoint folder into a PPLLaVA-HF folder, and its upload.

The steps, each in its own module of this package: find the checkpoint and its prompt encoder (`original_checkpoint`),
translate the config and the weights (`rules`), write the processor (`processor`), the generation config, the remote
code (`remote_code`) and the model card (`model_card`), verify the result (`verification`), push it to the Hub.
"""

import os
from dataclasses import dataclass

import torch
from huggingface_hub import HfApi
from transformers import GenerationConfig

from ..models.ppllava.configuration_ppllava import PPLLaVAConfig
from .model_card import build_model_card
from .original_checkpoint import (
    PUBLISHED_WEIGHTS_REPO,
    OriginalCheckpoint,
    load_prompt_encoder_config,
    resolve_prompt_encoder,
)
from .processor import find_processor_sources, save_processor
from .remote_code import save_remote_code
from .rules import ConversionError, convert_config, convert_weights
from .verification import VerificationReport, verify_converted


@dataclass
class ConversionResult:
    """What a conversion wrote, and what it checked."""

    output_folder: str
    config: PPLLaVAConfig
    weight_map: dict[str, str]
    processor_saved: bool
    remote_code_files: list[str]
    verification: VerificationReport | None = None


def convert_checkpoint(
    source: str,
    output_folder: str,
    prompt_encoder: str | None = None,
    tokenizer: str | None = None,
    prompt_tokenizer: str | None = None,
    base_processor: str | None = None,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    remote_code: bool = False,
    verify: bool = False,
    reference_outputs: str | None = None,
    model_id: str | None = None,
) -> ConversionResult:
    """Convert the original checkpoint `source` (a folder, or `owner/repo/folder` on the Hub) into `output_folder`.

    Args:
        prompt_encoder: CLIP/SigLIP model (folder or Hub id) in place of the checkpoint's `clip_weight`.
        tokenizer, prompt_tokenizer, base_processor: processor sources where the checkpoint lacks them (the LLM tokenizer,
            the CLIP/SigLIP tokenizer, the LLaVA-NeXT/OneVision processor).
        dtype: cast floating-point weights to this dtype; by default they keep the checkpoint's.
        allow_pickle: convert pickle `.bin` weights (loaded with `weights_only=True`) when there are no safetensors.
        remote_code: also write the modeling code and `auto_map`, for `trust_remote_code=True` without ppllava_hf.
        verify: load the result and check it for self-consistency; raises `VerificationError` on failure.
        reference_outputs: verify against this folder of outputs recorded with the original code instead (implies
            `verify`).
        model_id: the Hub id the model card's usage snippet loads from (defaults to `output_folder`).
    """
    if os.path.isdir(output_folder) and os.listdir(output_folder):
        # Shards or code of an earlier conversion would mix with this one's.
        raise ConversionError(f"The output folder {output_folder} is not empty.")
    checkpoint = OriginalCheckpoint.resolve(source, allow_pickle=allow_pickle)
    prompt_source = resolve_prompt_encoder(checkpoint, prompt_encoder)
    config = convert_config(checkpoint.config, load_prompt_encoder_config(prompt_source))
    if dtype is not None:
        config.dtype = dtype

    # The processor step comes first: it is cheap, and refuses before the weights what it cannot write.
    sources = find_processor_sources(checkpoint, prompt_source, tokenizer, prompt_tokenizer, base_processor)
    processor_saved = save_processor(sources, output_folder, config)
    weight_map = convert_weights(checkpoint.folder, output_folder, config, dtype=dtype, allow_pickle=allow_pickle)
    remote_code_files = save_remote_code(output_folder, config, with_processor=processor_saved) if remote_code else []
    config.save_pretrained(output_folder)
    save_generation_config(checkpoint, output_folder, config)
    card = build_model_card(
        config,
        origin=checkpoint.source if checkpoint.repo_id else checkpoint.name,
        model_id=model_id or output_folder,
        base_model=checkpoint.repo_id or PUBLISHED_WEIGHTS_REPO,
        has_processor=processor_saved,
        remote_code=remote_code,
    )
    card.save(os.path.join(output_folder, "README.md"))

    result = ConversionResult(output_folder, config, weight_map, processor_saved, remote_code_files)
    if verify or reference_outputs is not None:
        result.verification = verify_converted(output_folder, reference_outputs)
        result.verification.raise_for_failures()
    return result


def save_generation_config(checkpoint: OriginalCheckpoint, output_folder: str, config: PPLLaVAConfig) -> None:
    """The original's `generation_config.json` (special token ids, decoding defaults), or one derived from the config."""
    if os.path.isfile(os.path.join(checkpoint.folder, "generation_config.json")):
        generation_config = GenerationConfig.from_pretrained(checkpoint.folder)
    else:
        generation_config = GenerationConfig.from_model_config(config.get_text_config())
    generation_config.save_pretrained(output_folder)


def push_to_hub(folder: str, repo_id: str, private: bool | None = None) -> str:
    """Create `repo_id` if needed and upload the converted `folder` to it; returns the commit URL."""
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=folder, commit_message="Upload PPLLaVA converted to the PPLLaVA-HF format"
    )
    return commit.commit_url
