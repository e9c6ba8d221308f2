"""PPLLaVA-7B and LLaVA-NeXT-Video-7B at their real proportions, scaled down to run on a CPU, with random weights.

Both share the vision tower (CLIP ViT-L/14 at 336 pixels: 24 x 24 patches per frame) and the LLM (Vicuna-7B, a Llama).
`Scale(width, depth)` divides every hidden, intermediate and projection size (and the vocabularies) by `width` and every
layer count by `depth`, keeping head sizes, so the two models keep the 7B models' size ratios. PPLLaVA adds its prompt
encoder (a CLIP text model with 248 positions) and a BT-Adapter; LLaVA-NeXT-Video pools each frame 2 x 2.
"""

import argparse
from dataclasses import dataclass

import torch
from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

from ppllava_hf import PPLLaVAConfig, PPLLaVAForConditionalGeneration


# The 7B models' sizes: CLIP ViT-L/14-336, Vicuna-7B, CLIP ViT-L/14 text encoder, PPLLaVA's 4-layer BT-Adapter.
VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, head_dim=64, projection_dim=768)
LLM = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, head_dim=128, vocab_size=32000)
PROMPT_ENCODER = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, head_dim=64, vocab_size=49408)
BTADAPTER_DEPTH = 4
IMAGE_SIZE, PATCH_SIZE = 336, 14
TEXT_TOKENS_BEFORE, TEXT_TOKENS_AFTER, PROMPT_TOKENS = 8, 32, 32


@dataclass(frozen=True)
class Scale:
    width: int = 8
    depth: int = 4

    def shrink(self, sizes: dict) -> dict:
        """Scaled sizes for a transformers config: widths / width, layers / depth, heads = hidden / head_dim."""
        hidden = sizes["hidden_size"] // self.width
        scaled = dict(
            hidden_size=hidden,
            intermediate_size=sizes["intermediate_size"] // self.width,
            num_hidden_layers=max(1, round(sizes["num_hidden_layers"] / self.depth)),
            num_attention_heads=max(1, hidden // sizes["head_dim"]),
        )
        if "vocab_size" in sizes:
            scaled["vocab_size"] = sizes["vocab_size"] // self.width
        if "projection_dim" in sizes:
            scaled["projection_dim"] = sizes["projection_dim"] // self.width
        return scaled

    @property
    def btadapter_depth(self) -> int:
        # With vision_feature_layer=-2 the adapter must span at least two layers to reach the selected state.
        return max(2, round(BTADAPTER_DEPTH / self.depth))


def vision_config(scale: Scale) -> dict:
    return dict(model_type="clip_vision_model", image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **scale.shrink(VISION))


def text_config(scale: Scale) -> dict:
    llm = scale.shrink(LLM)
    return dict(
        model_type="llama", num_key_value_heads=llm["num_attention_heads"], head_dim=LLM["head_dim"],
        max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=0, **llm,
    )


def build_ppllava(scale: Scale, **overrides) -> PPLLaVAForConditionalGeneration:
    """PPLLaVA (Vicuna layout: CLIP + BT-Adapter + CLIP text prompt encoder + Llama), random weights, eval mode."""
    llm = text_config(scale)
    prompt = scale.shrink(PROMPT_ENCODER)
    vision = vision_config(scale)
    config = PPLLaVAConfig(
        vision_config=vision,
        text_config=llm,
        prompt_encoder_config=dict(
            model_type="clip_text_model", max_position_embeddings=248, projection_dim=vision["projection_dim"],
            bos_token_id=prompt["vocab_size"] - 2, eos_token_id=2, pad_token_id=prompt["vocab_size"] - 1, **prompt,
        ),
        use_btadapter=True,
        btadapter_depth=scale.btadapter_depth,
        image_token_id=llm["vocab_size"] - 2,
        video_token_id=llm["vocab_size"] - 1,
        **overrides,
    )
    torch.manual_seed(0)
    return PPLLaVAForConditionalGeneration(config).eval()


def build_llava_next_video(scale: Scale) -> LlavaNextVideoForConditionalGeneration:
    """transformers' LLaVA-NeXT-Video with the same vision tower and LLM sizes, random weights, eval mode."""
    llm = text_config(scale)
    config = LlavaNextVideoConfig(
        vision_config=vision_config(scale),
        text_config=llm,
        image_token_index=llm["vocab_size"] - 2,
        video_token_index=llm["vocab_size"] - 1,
    )
    torch.manual_seed(0)
    return LlavaNextVideoForConditionalGeneration(config).eval()


def random_video(num_frames: int, seed: int = 0) -> torch.Tensor:
    """`(1, num_frames, 3, 336, 336)` float32 pixels, as a processor would return them."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, num_frames, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


def prompt_ids(num_video_tokens: int, video_token_id: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """`(1, length)` ids: BOS, some text, the expanded video placeholder, the question."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(3, vocab_size - 2, (TEXT_TOKENS_BEFORE + TEXT_TOKENS_AFTER,), generator=generator)
    video = torch.full((num_video_tokens,), video_token_id)
    return torch.cat([torch.tensor([1]), text[:TEXT_TOKENS_BEFORE], video, text[TEXT_TOKENS_BEFORE:]])[None]


def ppllava_inputs(model: PPLLaVAForConditionalGeneration, video: torch.Tensor, **plan_kwargs) -> dict:
    """Generation inputs; the placeholder count is the model's own pooling plan."""
    config = model.config
    num_tokens = model.model.video_pooling_plan(video.shape[1], **plan_kwargs).num_tokens
    input_ids = prompt_ids(num_tokens, config.video_token_id, config.text_config.vocab_size)
    prompt_vocab = config.prompt_encoder_config.vocab_size
    clip_input_ids = torch.randint(3, prompt_vocab - 2, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
    return dict(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values_videos=video,
        clip_input_ids=clip_input_ids, **plan_kwargs,
    )


def llava_next_video_inputs(model: LlavaNextVideoForConditionalGeneration, video: torch.Tensor) -> dict:
    """Generation inputs; the placeholder count follows `LlavaNextVideoProcessor.replace_video_token`: a 2 x 2 average
    pool of every frame's patch grid."""
    config = model.config
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    num_tokens = patches // config.spatial_pool_stride**2 * video.shape[1]
    input_ids = prompt_ids(num_tokens, config.video_token_index, config.text_config.vocab_size)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values_videos=video)


def count_video_tokens(inputs: dict, video_token_id: int) -> int:
    return int((inputs["input_ids"] == video_token_id).sum())


def on_device(inputs: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Inputs moved to `device`, pixels cast to the model's `dtype`."""
    moved = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}
    moved["pixel_values_videos"] = moved["pixel_values_videos"].to(dtype)
    return moved


def add_model_arguments(parser: argparse.ArgumentParser, default_depth: int) -> None:
    parser.add_argument("--width", type=int, default=8, help="divide the 7B models' hidden sizes by this")
    parser.add_argument("--depth", type=int, default=default_depth, help="divide the 7B models' layer counts by this")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")


def model_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    return getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
