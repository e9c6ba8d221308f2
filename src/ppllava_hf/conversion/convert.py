"""End-to-end conversion of an original PPLLaVA checkpoint folder into a PPLLaVA-HF folder, and its upload.

The steps, each in its own module of this package: find the checkpoint and its prompt encoder (`original_checkpoint`),
translate the config and the weights (`rules`), write the processor (`processor`), the generation config, the remote
code (`remote_code`) and the model card (`model_card`), verify the result (`verification`), push it to the Hub. A
conversion leaves a complete folder or nothing (`staging`).
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
from .processor import build_processor, find_processor_sources
from .remote_code import check_self_contained, payload_files, save_remote_code
from .rules import ConversionError, WeightPlan, convert_config, plan_weights, write_weights
from .staging import check_free_space, check_output_folder, staged_folder
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

    Everything that can be checked is checked before the first file is written, and `output_folder` (new, or empty)
    appears complete or not at all: any failure, verification included, leaves nothing behind. Raises
    `ConversionError` (a `ValueError`) saying what is wrong, `VerificationError` when the result fails verification.

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
    check_output_folder(output_folder)
    checkpoint = OriginalCheckpoint.resolve(source, allow_pickle=allow_pickle)
    prompt_source = resolve_prompt_encoder(checkpoint, prompt_encoder)
    config = convert_config(checkpoint.config, load_prompt_encoder_config(prompt_source))

    # Everything that can be checked is checked before the first file is written: the processor (its tokenizers and
    # placeholders), every weight key and shape, the generation config, the remote code and the free space.
    sources = find_processor_sources(checkpoint, prompt_source, tokenizer, prompt_tokenizer, base_processor)
    processor = build_processor(sources, config)
    weights = plan_weights(checkpoint.folder, config, allow_pickle=allow_pickle)
    generation_config = original_generation_config(checkpoint, config)
    if remote_code:
        check_self_contained(payload_files())
    check_free_space(output_folder, output_size(weights, checkpoint.config, dtype))
    if dtype is not None:
        config.dtype = dtype
    card = build_model_card(
        config,
        origin=checkpoint.source if checkpoint.repo_id else checkpoint.name,
        model_id=model_id or output_folder,
        base_model=checkpoint.repo_id or PUBLISHED_WEIGHTS_REPO,
        has_processor=processor is not None,
        remote_code=remote_code,
    )

    # Written into a staging folder that becomes `output_folder` only when every step, verification included, passed.
    with staged_folder(output_folder) as staging:
        if processor is not None:
            processor.save_pretrained(staging)
        weight_map = write_weights(weights, staging, dtype=dtype)
        remote_code_files = save_remote_code(staging, config, with_processor=processor is not None) if remote_code else []
        config.save_pretrained(staging)
        generation_config.save_pretrained(staging)
        card.save(os.path.join(staging, "README.md"))
        result = ConversionResult(output_folder, config, weight_map, processor is not None, remote_code_files)
        if verify or reference_outputs is not None:
            result.verification = verify_converted(staging, reference_outputs)
            result.verification.raise_for_failures()
    return result


def original_generation_config(checkpoint: OriginalCheckpoint, config: PPLLaVAConfig) -> GenerationConfig:
    """The original's `generation_config.json` (special token ids, decoding defaults), or one derived from the config."""
    path = os.path.join(checkpoint.folder, "generation_config.json")
    if not os.path.isfile(path):
        return GenerationConfig.from_model_config(config.get_text_config())
    try:
        return GenerationConfig.from_pretrained(checkpoint.folder)
    except (OSError, ValueError) as error:
        raise ConversionError(f"Cannot read {path} ({error}); restore or remove it.") from None


def output_size(weights: WeightPlan, original_config: dict, dtype: torch.dtype | None) -> int:
    """About how many bytes the converted weights take: the original files' size, scaled when a cast changes the
    width of the checkpoint's floating-point dtype."""
    source = getattr(torch, str(original_config.get("torch_dtype") or original_config.get("dtype")), None)
    if dtype is None or not isinstance(source, torch.dtype):
        return weights.num_bytes
    return weights.num_bytes * dtype.itemsize // source.itemsize


def push_to_hub(folder: str, repo_id: str, private: bool | None = None) -> str:
    """Create `repo_id` if needed and upload the converted `folder` to it; returns the commit URL."""
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=folder, commit_message="Upload PPLLaVA converted to the PPLLaVA-HF format"
    )
    return commit.commit_url
