"""Tiny random PPLLaVA configurations in both original layouts, for tests, examples and benchmarks (no downloads)."""

from typing import Literal

from transformers import (
    CLIPConfig,
    CLIPModel,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedModel,
    SiglipConfig,
    SiglipModel,
)

from .configuration_ppllava import PPLLaVAConfig


Layout = Literal["vicuna", "qwen"]


def tiny_config(
    layout: Layout = "vicuna",
    vocab_size: int = 320,
    image_token_id: int = 300,
    video_token_id: int = 301,
    prompt_vocab_size: int = 128,
    **overrides,
) -> PPLLaVAConfig:
    """A PPLLaVA config small enough for a CPU test: 84-pixel frames (6x6 patches of 14), hidden sizes of 32-64.

    `vicuna`: CLIP vision + CLIP text prompt encoder (248 positions) + Llama, with a 2-layer BT-Adapter.
    `qwen`: SigLIP vision + SigLIP text prompt encoder (196 positions) + Qwen2, no BT-Adapter, all tokens kept.
    Keyword overrides go to `PPLLaVAConfig`.
    """
    tile = 84
    shared_vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=tile, patch_size=14)
    shared_text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    shared_prompt = dict(vocab_size=prompt_vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile], [tile, 3 * tile]]
    if layout == "vicuna":
        settings = dict(
            vision_config=dict(model_type="clip_vision_model", projection_dim=40, **shared_vision),
            text_config=dict(model_type="llama", **shared_text),
            prompt_encoder_config=dict(
                model_type="clip_text_model", max_position_embeddings=248, projection_dim=40,
                bos_token_id=prompt_vocab_size - 2, eos_token_id=2, pad_token_id=prompt_vocab_size - 1, **shared_prompt,
            ),
            use_btadapter=True,
            btadapter_depth=2,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    elif layout == "qwen":
        settings = dict(
            vision_config=dict(model_type="siglip_vision_model", vision_use_head=False, **shared_vision),
            text_config=dict(model_type="qwen2", **shared_text),
            prompt_encoder_config=dict(
                model_type="siglip_text_model", max_position_embeddings=196, projection_size=32,
                pad_token_id=prompt_vocab_size - 1, eos_token_id=prompt_vocab_size - 1, **shared_prompt,
            ),
            freeze_prompt_encoder=False,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
    else:
        raise ValueError(f"layout must be 'vicuna' or 'qwen', got {layout!r}.")
    settings.update(image_grid_pinpoints=pinpoints, image_token_id=image_token_id, video_token_id=video_token_id)
    settings.update(overrides)
    return PPLLaVAConfig(**settings)


def tiny_backbones(layout: Layout = "vicuna", **llava_overrides) -> tuple[PreTrainedModel, PreTrainedModel]:
    """Tiny random (LLaVA model, CLIP/SigLIP model) to build a PPLLaVA of `tiny_config(layout)`'s shapes from.

    `vicuna`: `LlavaNextForConditionalGeneration` (CLIP + Llama) and a `CLIPModel` with the stock 77 text positions.
    `qwen`: `LlavaOnevisionForConditionalGeneration` (SigLIP + Qwen2) and a `SiglipModel` with 64 text positions and the
    vision pooling head. Keyword overrides go to the LLaVA config.
    """
    config = tiny_config(layout)
    vision = config.vision_config.to_dict()
    prompt = config.prompt_encoder_config.to_dict()
    llava_settings = dict(
        vision_config=vision,
        text_config=config.text_config.to_dict(),
        image_token_index=config.image_token_id,
        image_grid_pinpoints=config.image_grid_pinpoints,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    )
    if layout == "qwen":
        llava_settings["video_token_index"] = config.video_token_id
    llava_settings.update(llava_overrides)
    if layout == "vicuna":
        llava = LlavaNextForConditionalGeneration(LlavaNextConfig(**llava_settings))
        prompt["max_position_embeddings"] = 77
        clip = CLIPModel(CLIPConfig(text_config=prompt, vision_config=vision, projection_dim=prompt["projection_dim"]))
    else:
        llava = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(**llava_settings))
        prompt["max_position_embeddings"] = 64
        clip = SiglipModel(SiglipConfig(text_config=prompt, vision_config={**vision, "vision_use_head": True}))
    return llava.eval(), clip.eval()
