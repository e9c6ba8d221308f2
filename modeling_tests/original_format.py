"""Tiny checkpoints in the on-disk format of the original PPLLaVA code, for conversion tests.

The key names, shapes and config fields follow what the original `LlavaInterleaveForConditionalGeneration` saves (see the
shared fixture's KEYS.txt and README, and the original code): a `vision_tower.vision_model.*` CLIP or SigLIP tower (the
BT-Adapter branch inside it), `multi_modal_projector.*` holding the extended CLIP/SigLIP text tower and the pieces of the
CLIP/SigLIP model kept for alignment, `language_model.model.*` / `language_model.lm_head.*`, and `image_newline`. Nothing
here is derived from ppllava_hf's own key mapping, so the conversion is tested against an independent description.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


# The shared fixture: a tiny checkpoint saved by the original code, with reference outputs computed by it.
FIXTURE = Path(__file__).parent / "fixtures" / "original_tiny_vicuna"

Shapes = dict[str, tuple[int, ...]]


def _linear(prefix: str, out_features: int, in_features: int, bias: bool = True) -> Shapes:
    shapes = {f"{prefix}.weight": (out_features, in_features)}
    if bias:
        shapes[f"{prefix}.bias"] = (out_features,)
    return shapes


def _layer_norm(prefix: str, dim: int) -> Shapes:
    return {f"{prefix}.weight": (dim,), f"{prefix}.bias": (dim,)}


def _attention(prefix: str, dim: int) -> Shapes:
    shapes = {}
    for projection in ("k_proj", "v_proj", "q_proj", "out_proj"):
        shapes.update(_linear(f"{prefix}.{projection}", dim, dim))
    return shapes


def _mlp(prefix: str, dim: int, intermediate: int) -> Shapes:
    return {**_linear(f"{prefix}.fc1", intermediate, dim), **_linear(f"{prefix}.fc2", dim, intermediate)}


def _encoder_layer(prefix: str, dim: int, intermediate: int) -> Shapes:
    """A CLIP or SigLIP encoder layer (4.46 names): self_attn, layer_norm1, mlp, layer_norm2."""
    return {
        **_attention(f"{prefix}.self_attn", dim),
        **_layer_norm(f"{prefix}.layer_norm1", dim),
        **_mlp(f"{prefix}.mlp", dim, intermediate),
        **_layer_norm(f"{prefix}.layer_norm2", dim),
    }


def _encoder_layers(prefix: str, dim: int, intermediate: int, layers: int) -> Shapes:
    shapes = {}
    for index in range(layers):
        shapes.update(_encoder_layer(f"{prefix}.layers.{index}", dim, intermediate))
    return shapes


def clip_vision_tower(prefix: str, dim: int, intermediate: int, layers: int, image_size: int, patch: int) -> Shapes:
    positions = (image_size // patch) ** 2 + 1
    return {
        f"{prefix}.embeddings.class_embedding": (dim,),
        f"{prefix}.embeddings.patch_embedding.weight": (dim, 3, patch, patch),
        f"{prefix}.embeddings.position_embedding.weight": (positions, dim),
        **_layer_norm(f"{prefix}.pre_layrnorm", dim),
        **_encoder_layers(f"{prefix}.encoder", dim, intermediate, layers),
        **_layer_norm(f"{prefix}.post_layernorm", dim),
    }


def siglip_vision_tower(prefix: str, dim: int, intermediate: int, layers: int, image_size: int, patch: int) -> Shapes:
    # LLaVA-OneVision's tower: no CLS, a biased patch embedding, and no pooling head (`vision_use_head: false`).
    return {
        f"{prefix}.embeddings.patch_embedding.weight": (dim, 3, patch, patch),
        f"{prefix}.embeddings.patch_embedding.bias": (dim,),
        f"{prefix}.embeddings.position_embedding.weight": ((image_size // patch) ** 2, dim),
        **_encoder_layers(f"{prefix}.encoder", dim, intermediate, layers),
        **_layer_norm(f"{prefix}.post_layernorm", dim),
    }


def btadapter(prefix: str, dim: int, intermediate: int, depth: int, max_frames: int) -> Shapes:
    """`CLIPVisionTransformer_BTAdapter`'s branch: spatial layers (CLIP layers), temporal layers (attention, pre-LN,
    `temporal_fc`), a time-embedding table and a CLS token."""
    shapes = {}
    for index in range(depth):
        shapes.update(_encoder_layer(f"{prefix}.btadapter_S_layers.{index}", dim, intermediate))
        temporal = f"{prefix}.btadapter_T_layers.{index}"
        shapes.update(_attention(f"{temporal}.self_attn", dim))
        shapes.update(_layer_norm(f"{temporal}.layer_norm1", dim))
        shapes.update(_linear(f"{temporal}.temporal_fc", dim, dim))
    shapes[f"{prefix}.btadapter_time_embed.weight"] = (max_frames, dim)
    shapes[f"{prefix}.btadapter_cls_token"] = (1, 1, dim)
    return shapes


def extended_text_tower(prefix: str, vocab: int, dim: int, intermediate: int, layers: int, positions: int) -> Shapes:
    """The CLIP/SigLIP text transformer after `convert_text_position`: `ExtendTextEmbeddings` holds two plain position
    parameters (no `.weight`), the stretched table and its trainable residual."""
    return {
        f"{prefix}.embeddings.token_embedding.weight": (vocab, dim),
        f"{prefix}.embeddings.position_embedding": (positions, dim),
        f"{prefix}.embeddings.position_embedding_res": (positions, dim),
        **_encoder_layers(f"{prefix}.encoder", dim, intermediate, layers),
        **_layer_norm(f"{prefix}.final_layer_norm", dim),
    }


def stock_text_tower(prefix: str, vocab: int, dim: int, intermediate: int, layers: int, positions: int) -> Shapes:
    """The stock CLIP text transformer the original keeps with `extend_clip: false`: one `nn.Embedding` position table
    (`position_embedding.weight`) of CLIP's own length."""
    return {
        f"{prefix}.embeddings.token_embedding.weight": (vocab, dim),
        f"{prefix}.embeddings.position_embedding.weight": (positions, dim),
        **_encoder_layers(f"{prefix}.encoder", dim, intermediate, layers),
        **_layer_norm(f"{prefix}.final_layer_norm", dim),
    }


def causal_lm(vocab: int, dim: int, intermediate: int, layers: int, heads: int, kv_heads: int, qkv_bias: bool) -> Shapes:
    """Llama (Vicuna) or Qwen2 (`qkv_bias`) under the original's `language_model.` prefix."""
    head_dim = dim // heads
    shapes = {"language_model.model.embed_tokens.weight": (vocab, dim)}
    for index in range(layers):
        layer = f"language_model.model.layers.{index}"
        shapes.update(_linear(f"{layer}.self_attn.q_proj", heads * head_dim, dim, qkv_bias))
        shapes.update(_linear(f"{layer}.self_attn.k_proj", kv_heads * head_dim, dim, qkv_bias))
        shapes.update(_linear(f"{layer}.self_attn.v_proj", kv_heads * head_dim, dim, qkv_bias))
        shapes.update(_linear(f"{layer}.self_attn.o_proj", dim, heads * head_dim, bias=False))
        shapes.update(_linear(f"{layer}.mlp.gate_proj", intermediate, dim, bias=False))
        shapes.update(_linear(f"{layer}.mlp.up_proj", intermediate, dim, bias=False))
        shapes.update(_linear(f"{layer}.mlp.down_proj", dim, intermediate, bias=False))
        shapes[f"{layer}.input_layernorm.weight"] = (dim,)
        shapes[f"{layer}.post_attention_layernorm.weight"] = (dim,)
    shapes["language_model.model.norm.weight"] = (dim,)
    shapes["language_model.lm_head.weight"] = (vocab, dim)
    return shapes


@dataclass
class OriginalLayout:
    """An original checkpoint: its `config.json`, the `config.json` of the CLIP/SigLIP model `clip_weight` names, and
    every state-dict key with its shape."""

    config: dict
    prompt_config: dict
    shapes: Shapes


_PPLLAVA_FIELDS = dict(
    pooling="ppllava",
    pooling_kernel=[2, 3, 3],
    pooling_stride=[2, 3, 3],
    image_pooling_kernel=[1, 3, 3],
    image_pooling_stride=[1, 3, 3],
    frame_shape=[6, 6],
    extend_clip=True,
    clip_weight="clip",
    clip_post_pretrain=None,
    pooling_temp=0.01,
    max_T=64,
    valuew_plus=False,
    architectures=["LlavaInterleaveForConditionalGeneration"],
    ignore_index=-100,
    projector_hidden_act="gelu",
    image_grid_pinpoints=[[84, 168], [168, 84], [168, 168], [252, 84], [84, 252]],
    tie_word_embeddings=False,
    torch_dtype="float32",
    transformers_version="4.46.3",
)


def vicuna_layout(
    btadapter_depth: int | None = 2,
    vocab: int = 1064,
    image_token_index: int = 1000,
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 2,
    extend_clip: bool = True,
) -> OriginalLayout:
    """`llava_next` layout: CLIP vision tower (+ BT-Adapter unless `btadapter_depth` is None), CLIP text tower (extended
    to 248 positions, or CLIP's stock 77 without `extend_clip`) with CLIP's projections, Llama. The defaults are the
    shared fixture's sizes."""
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=84, patch_size=14, projection_dim=40)
    text = dict(hidden_size=48, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, vocab_size=512)
    vision_config = dict(model_type="clip_vision_model", **vision)
    if btadapter_depth is not None:
        vision_config.update(depth=btadapter_depth, max_T=64)
    config = dict(
        _PPLLAVA_FIELDS,
        model_type="llava_next",
        qwen=False,
        extend_clip=extend_clip,
        btadapter=btadapter_depth is not None,
        btadapter_depth=btadapter_depth or 4,
        image_token_index=image_token_index,
        pad_token_id=0,
        hidden_size=hidden,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        vision_config=vision_config,
        text_config=dict(
            model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4, head_dim=hidden // 4,
            max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0,
        ),
    )
    prompt_config = dict(
        model_type="clip",
        architectures=["CLIPModel"],
        projection_dim=40,
        text_config=dict(model_type="clip_text_model", bos_token_id=0, eos_token_id=2, projection_dim=40, **text),
        vision_config=dict(model_type="clip_vision_model", num_hidden_layers=1, **{k: v for k, v in vision.items() if k != "num_hidden_layers"}),
    )
    tower = "vision_tower.vision_model"
    shapes = clip_vision_tower(tower, 32, 128, 4, 84, 14)
    if btadapter_depth is not None:
        shapes.update(btadapter(tower, 32, 128, btadapter_depth, 64))
    projector = "multi_modal_projector"
    text_tower = extended_text_tower if extend_clip else stock_text_tower
    shapes.update(text_tower(f"{projector}.clip_text_model", 512, 48, 192, 2, 248 if extend_clip else 77))
    shapes.update({
        f"{projector}.clip_text_projection.weight": (40, 48),
        f"{projector}.clip_visual_projection.weight": (40, 32),
        **_layer_norm(f"{projector}.clip_visual_ln", 32),
        f"{projector}.logit_scale": (),
        **_linear(f"{projector}.linear_1", hidden, 32),
        **_linear(f"{projector}.linear_2", hidden, hidden),
        "image_newline": (hidden,),
    })
    shapes.update(causal_lm(vocab, hidden, intermediate, layers, 4, 4, qkv_bias=False))
    return OriginalLayout(config, prompt_config, shapes)


def qwen_layout() -> OriginalLayout:
    """`llava_onevision` layout: SigLIP vision tower, extended SigLIP text tower (64 -> 196 positions) with SigLIP's
    pooling head applied per patch (`SiglipPoolingHead_PatchCLS`) and `logit_bias`, Qwen2 (q/k/v biases, grouped KV)."""
    dim, vocab, hidden = 32, 1100, 64
    vision = dict(hidden_size=dim, intermediate_size=64, num_attention_heads=4, image_size=84, patch_size=14)
    config = dict(
        _PPLLAVA_FIELDS,
        model_type="llava_onevision",
        qwen=True,
        btadapter=False,
        btadapter_depth=4,
        image_token_index=1000,
        video_token_index=1002,
        pad_token_id=1099,
        hidden_size=hidden,
        vision_aspect_ratio="anyres_max_9",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_config=dict(model_type="siglip_vision_model", num_hidden_layers=3, vision_use_head=False, **vision),
        text_config=dict(
            model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1000000.0,
            rms_norm_eps=1e-6, tie_word_embeddings=False,
        ),
    )
    # The original SigLIP text head maps hidden -> hidden, so text and vision widths agree (1152 in so400m).
    prompt_config = dict(
        model_type="siglip",
        architectures=["SiglipModel"],
        text_config=dict(
            model_type="siglip_text_model", vocab_size=256, hidden_size=dim, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
        ),
        vision_config=dict(model_type="siglip_vision_model", num_hidden_layers=1, **vision),
    )
    shapes = siglip_vision_tower("vision_tower.vision_model", dim, 64, 3, 84, 14)
    projector = "multi_modal_projector"
    head = f"{projector}.clip_visual_head"
    shapes.update(extended_text_tower(f"{projector}.clip_text_model", 256, dim, 64, 2, 196))
    shapes.update({
        **_linear(f"{projector}.clip_text_model.head", dim, dim),
        f"{head}.probe": (1, 1, dim),
        f"{head}.attention.in_proj_weight": (3 * dim, dim),
        f"{head}.attention.in_proj_bias": (3 * dim,),
        **_linear(f"{head}.attention.out_proj", dim, dim),
        **_layer_norm(f"{head}.layernorm", dim),
        **_mlp(f"{head}.mlp", dim, 64),
        **_layer_norm(f"{projector}.clip_visual_ln", dim),
        # SiglipModel keeps its temperature and bias as shape (1,) parameters, which the original projector reuses.
        f"{projector}.logit_scale": (1,),
        f"{projector}.logit_bias": (1,),
        **_linear(f"{projector}.linear_1", hidden, dim),
        **_linear(f"{projector}.linear_2", hidden, hidden),
        "image_newline": (hidden,),
    })
    shapes.update(causal_lm(vocab, hidden, 128, 2, 4, 2, qkv_bias=True))
    return OriginalLayout(config, prompt_config, shapes)


def random_state(shapes: Shapes, seed: int = 0) -> dict[str, torch.Tensor]:
    """Values like the shared fixture's: norm weights 1 + N(0, 0.05), everything else N(0, 0.05), CLIP's logit scale."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        tensor = torch.randn(shape, generator=generator) * 0.05
        if key.endswith(("norm.weight", "layer_norm1.weight", "layer_norm2.weight", "_ln.weight", "layernorm.weight")):
            tensor += 1
        state[key] = tensor
    state["multi_modal_projector.logit_scale"] = torch.full(shapes["multi_modal_projector.logit_scale"], 2.6592)
    if "multi_modal_projector.logit_bias" in state:
        state["multi_modal_projector.logit_bias"] = torch.full(shapes["multi_modal_projector.logit_bias"], -10.0)
    return state


def write_original_checkpoint(folder: str, layout: OriginalLayout, num_shards: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write `layout` as the original's `save_pretrained` does: config.json, generation_config.json, and the weights in
    `num_shards` safetensors files (with `model.safetensors.index.json` when more than one); the CLIP/SigLIP config goes
    to `clip/config.json`, which the config's `clip_weight` names. Returns the state dict written."""
    os.makedirs(os.path.join(folder, "clip"), exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(layout.config, handle, indent=2)
    with open(os.path.join(folder, "clip", "config.json"), "w") as handle:
        json.dump(layout.prompt_config, handle, indent=2)
    with open(os.path.join(folder, "generation_config.json"), "w") as handle:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": layout.config["pad_token_id"]}, handle)
    state = random_state(layout.shapes, seed)
    write_shards(folder, state, num_shards)
    return state


def write_shards(folder: str, state: dict[str, torch.Tensor], num_shards: int) -> list[str]:
    """Split `state` in key order into `num_shards` files of about equal size, named and indexed as HF does."""
    if num_shards == 1:
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    total = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    shards, current, size = [], {}, 0
    for key, tensor in state.items():
        current[key] = tensor
        size += tensor.numel() * tensor.element_size()
        if size >= total * (len(shards) + 1) / num_shards and len(shards) < num_shards - 1:
            shards.append(current)
            current = {}
    shards.append(current)
    names = [f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors" for index in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=2)
    return names
