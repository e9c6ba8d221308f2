"""Composing a fresh PPLLaVA from the two checkpoints the original recipe starts from.

Every PPLLaVA training run starts from a LLaVA-NeXT checkpoint (CLIP ViT-L/14-336 + Vicuna) or a LLaVA-OneVision one
(SigLIP + Qwen2), plus the CLIP (SigLIP) model its vision tower came from, whose text encoder and projections score the
patches against the prompt. This module builds that starting point from Transformers checkpoints:

| PPLLaVA part | filled from |
|---|---|
| vision tower, projector, language model, `lm_head`, `image_newline` | the LLaVA model, unchanged |
| prompt encoder | the CLIP/SigLIP text model, positions stretched (77 -> 248, 64 -> 196) into the base and residual tables |
| alignment heads | CLIP: `text_projection`, vision `post_layernorm`, `visual_projection`, `logit_scale`; SigLIP: vision `post_layernorm`, the pooling head's value rows + layernorm + MLP, `logit_scale`, `logit_bias` |
| BT-Adapter spatial layers | copies of the last `btadapter_depth` layers of the LLaVA vision tower |
| BT-Adapter temporal layers, time embedding, CLS token | fresh (`_init_weights`: zero `temporal_fc`, so the temporal attention starts silent, and zero CLS) |
"""

import os
import re
from collections.abc import Iterator

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
)

from ..models.ppllava.configuration_ppllava import PPLLaVAConfig
from ..models.ppllava.modeling_ppllava import PPLLaVAForConditionalGeneration
from ..models.ppllava.processing_ppllava import PPLLaVAProcessor
from .processor import align_placeholder_tokens
from .prompt_positions import ORIGINAL_PROMPT_KEEP_POSITIONS, stretch_position_embeddings
from .rules import (
    apply_key_rules,
    as_scalar,
    expected_state,
    free_video_token_id,
    siglip_head_rules,
    siglip_value_rows,
    state_problems,
)


LLAVA_MODEL_TYPES = ("llava_next", "llava_onevision")
# The CLIP/SigLIP model type the alignment weights come from, by the LLaVA vision tower's model type.
ALIGNMENT_SOURCE_FOR_VISION = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}

_ALIGNMENT = "model.prompt_alignment."
_SOURCE_POSITIONS = "text_model.embeddings.position_embedding.weight"
_SOURCE_TOKENS = "text_model.embeddings.token_embedding.weight"
_VALUE_ROWS = re.compile(r"^vision_model\.head\.attention\.in_proj_(weight|bias)$")
_VISION_LAYER = re.compile(r"^model\.vision_tower\.encoder\.layers\.(?P<index>\d+)\.(?P<rest>.+)$")

# CLIPModel / SiglipModel key -> our key under `model.prompt_alignment.`; None: PPLLaVA does not use it.
# The first match wins.
ALIGNMENT_KEY_RULES: list[tuple[str, str | None]] = [
    # Text encoder (token embeddings, layers, final norm; SigLIP's text head sits inside its text model).
    (r"^text_model\.(?P<rest>.+)$", r"text_model.\g<rest>"),
    (r"^text_projection\.weight$", "text_projection.weight"),
    (r"^visual_projection\.weight$", "visual_projection.weight"),
    (r"^vision_model\.post_layernorm\.(?P<rest>weight|bias)$", r"visual_layernorm.\g<rest>"),
    *siglip_head_rules(r"vision_model\.head\.", "visual_projection."),
    (r"^logit_(?P<rest>scale|bias)$", r"logit_\g<rest>"),
    # The LLaVA vision tower takes the place of the CLIP/SigLIP vision encoder; SigLIP's probe and attention output
    # projection only serve the pooled probe output, which PPLLaVA never uses.
    (r"^vision_model\..+$", None),
]

# PPLLaVAConfig fields the backbones decide.
BACKBONE_FIELDS = frozenset({"vision_config", "text_config", "prompt_encoder_config", "prompt_keep_positions"})

# Keys no backbone fills: the BT-Adapter's temporal branch starts fresh.
FRESH_KEY_PREFIXES = (
    "model.btadapter.temporal_layers.", "model.btadapter.time_embedding.", "model.btadapter.cls_token"
)


def build_ppllava_from_backbones(
    llava: str | os.PathLike | PreTrainedModel,
    clip: str | os.PathLike | PreTrainedModel,
    *,
    use_btadapter: bool | None = None,
    btadapter_depth: int = 4,
    btadapter_max_frames: int = 64,
    random_prompt_token_embeddings: bool = False,
    dtype: torch.dtype | None = None,
    **config_kwargs,
) -> PPLLaVAForConditionalGeneration:
    r"""
    Compose an untrained PPLLaVA from a LLaVA-NeXT / LLaVA-OneVision checkpoint and a CLIP / SigLIP checkpoint, as
    the original recipe does before its SFT stage.

    The LLaVA weights fill the vision tower, projector, language model, `lm_head` and `image_newline` unchanged. The
    CLIP (SigLIP) text encoder becomes the prompt encoder, its 77 (64) text positions stretched to 248 (196) with
    [`~conversion.prompt_positions.stretch_position_embeddings`] into both the frozen base table and the trainable residual
    table; its text projection (CLIP), vision post-layernorm, visual projection (CLIP) or per-patch head (SigLIP: the
    value rows of the pooling head's attention, its layernorm and MLP), `logit_scale` (and SigLIP's `logit_bias`)
    become the alignment heads. The BT-Adapter's spatial layers start as copies of the last `btadapter_depth` vision
    layers; its temporal layers, time embedding and CLS token are initialised fresh, with a zero `temporal_fc` (the
    temporal attention starts silent, as in the original) and a zero CLS token. Every key of the result is either
    filled from a backbone or one of those fresh keys: anything else (a missing, unknown or mis-shaped weight) raises
    a `ValueError` that lists it.

    Prompt token embeddings: by default the prompt encoder keeps the CLIP/SigLIP pretrained token embeddings. The
    original code replaces the text model's whole embeddings module when it stretches the positions, so its prompt
    encoder (and every released PPLLaVA checkpoint) runs on a fresh random token table;
    `random_prompt_token_embeddings=True` reproduces that, drawing the table from N(0, 1) like the `nn.Embedding` the
    original creates (seed with `torch.manual_seed` for a reproducible table).

    Args:
        llava (`str`, `os.PathLike` or `PreTrainedModel`):
            A `LlavaNextForConditionalGeneration` or `LlavaOnevisionForConditionalGeneration`, or a folder / Hub id
            `AutoModelForImageTextToText` loads one from (e.g. `llava-hf/llava-v1.6-vicuna-7b-hf`).
        clip (`str`, `os.PathLike` or `PreTrainedModel`):
            The `CLIPModel` / `SiglipModel` of the LLaVA vision tower's family, or a folder / Hub id `AutoModel` loads
            one from (e.g. `openai/clip-vit-large-patch14-336`, `google/siglip-so400m-patch14-384`).
        use_btadapter (`bool`, *optional*):
            Add the BT-Adapter. Defaults to `True` for a CLIP vision tower (the released Vicuna recipes) and `False` for
            SigLIP, which has none.
        btadapter_depth (`int`, *optional*, defaults to 4):
            Number of last vision layers the BT-Adapter runs beside (and copies its spatial layers from).
        btadapter_max_frames (`int`, *optional*, defaults to 64):
            Size of the BT-Adapter time-embedding table (the original's `max_T`).
        random_prompt_token_embeddings (`bool`, *optional*, defaults to `False`):
            Give the prompt encoder a fresh N(0, 1) token-embedding table, as the original code does, instead of the
            pretrained one.
        dtype (`torch.dtype`, *optional*):
            dtype of the result (and of the backbones loaded from paths). Defaults to the LLaVA model's dtype.
        config_kwargs:
            Any other [`PPLLaVAConfig`] field (pooling sizes, `max_visual_tokens`, `freeze_prompt_encoder`,
            `video_token_id`, ...). The sub-configs and `prompt_keep_positions` come from the backbones.

    Placeholder ids: `image_token_id` is the LLaVA one. `video_token_id` is LLaVA-OneVision's own; a LLaVA-NeXT
    checkpoint has none, so the first row after the image token that the LLaVA config names for nothing else (pad,
    BOS, EOS) and that the vocabulary holds is used (32002 for `llava-hf/llava-v1.6-vicuna-7b-hf`, whose 32001 is
    `<pad>`). The processor must map the video placeholder to that id; pass `video_token_id=` to choose another row.

    Returns:
        [`PPLLaVAForConditionalGeneration`] in eval mode. Sources passed as models are left untouched and share no
        storage with the result.

    Example:

    ```python
    >>> import torch
    >>> from ppllava_hf.conversion.building import build_ppllava_from_backbones

    >>> model = build_ppllava_from_backbones(
    ...     "llava-hf/llava-v1.6-vicuna-7b-hf", "openai/clip-vit-large-patch14-336", dtype=torch.bfloat16
    ... )
    >>> model.save_pretrained("ppllava-vicuna-7b-untrained")
    ```"""
    fixed = sorted(BACKBONE_FIELDS & config_kwargs.keys())
    if fixed:
        raise TypeError(f"{', '.join(fixed)} come from the backbones; build_ppllava_from_backbones does not take them.")
    llava_config = _source_config(llava)
    clip_config = _source_config(clip)
    _check_backbones(llava_config, clip_config)

    llava_model, llava_loaded_here = _source_model(llava, AutoModelForImageTextToText, dtype)
    clip_model, clip_loaded_here = _source_model(clip, AutoModel, dtype)
    dtype = dtype or llava_model.dtype
    clip_state = clip_model.state_dict()
    positions = stretch_position_embeddings(clip_state[_SOURCE_POSITIONS])
    config = _config_from_backbones(
        llava_config,
        clip_config,
        num_prompt_positions=positions.shape[0],
        use_btadapter=use_btadapter,
        btadapter_depth=btadapter_depth,
        btadapter_max_frames=btadapter_max_frames,
        config_kwargs=config_kwargs,
    )

    llava_state = llava_model.state_dict()
    if config.tie_word_embeddings:
        llava_state.pop("lm_head.weight", None)
    # Sources passed in as models stay the caller's: copy their tensors. Sources loaded here are dropped on return, so
    # their tensors can move into the result as they are.
    state = {key: _owned(tensor, dtype, copy=not llava_loaded_here) for key, tensor in llava_state.items()}
    for key, tensor in _alignment_weights(clip_state, positions, random_prompt_token_embeddings):
        state[key] = _owned(tensor, dtype, copy=not clip_loaded_here)
    if config.use_btadapter:
        for key, tensor in _btadapter_spatial_weights(llava_state, config):
            state[key] = _owned(tensor, dtype, copy=True)
    _check_filled(state, config)

    # Transformers initialises the keys left out (the fresh BT-Adapter parts) with `_init_weights` and lists them in its
    # load report as MISSING, which is what they are meant to be.
    return PPLLaVAForConditionalGeneration.from_pretrained(None, config=config, state_dict=state, dtype=dtype)


def _source_config(source: str | os.PathLike | PreTrainedModel) -> PreTrainedConfig:
    return source.config if isinstance(source, PreTrainedModel) else AutoConfig.from_pretrained(source)


def _source_model(source, auto_class, dtype: torch.dtype | None) -> tuple[PreTrainedModel, bool]:
    """The backbone model, and whether it was loaded here (rather than passed in by the caller)."""
    if isinstance(source, PreTrainedModel):
        return source, False
    return auto_class.from_pretrained(source, dtype=dtype or "auto"), True


def _owned(tensor: torch.Tensor, dtype: torch.dtype, copy: bool) -> torch.Tensor:
    """`tensor` detached, floating point cast to `dtype`, and in storage of its own when `copy`."""
    return tensor.detach().to(dtype=dtype if tensor.is_floating_point() else tensor.dtype, copy=copy)


def _check_backbones(llava_config: PreTrainedConfig, clip_config: PreTrainedConfig) -> None:
    if llava_config.model_type not in LLAVA_MODEL_TYPES:
        raise ValueError(
            f"The LLaVA checkpoint has model_type={llava_config.model_type!r}; PPLLaVA is built from one of "
            f"{LLAVA_MODEL_TYPES} (e.g. llava-hf/llava-v1.6-vicuna-7b-hf or llava-hf/llava-onevision-qwen2-7b-si-hf)."
        )
    vision_type = llava_config.vision_config.model_type
    family = ALIGNMENT_SOURCE_FOR_VISION.get(vision_type)
    if family is None:
        raise ValueError(
            f"The LLaVA vision tower is {vision_type!r}; PPLLaVA supports {tuple(ALIGNMENT_SOURCE_FOR_VISION)}."
        )
    if clip_config.model_type != family:
        raise ValueError(
            f"The LLaVA vision tower is {vision_type!r}, so the alignment source must be a {family!r} model (the one "
            f"the tower came from), got model_type={clip_config.model_type!r}."
        )
    llava_width, clip_width = llava_config.vision_config.hidden_size, clip_config.vision_config.hidden_size
    if llava_width != clip_width:
        raise ValueError(
            f"The {family} vision width ({clip_width}) differs from the LLaVA vision tower's ({llava_width}): its "
            "post-layernorm and projection cannot read the tower's patches. Use the checkpoint the tower came from "
            "(openai/clip-vit-large-patch14-336 for LLaVA-NeXT, google/siglip-so400m-patch14-384 for LLaVA-OneVision)."
        )
    if not isinstance(llava_config.vision_feature_layer, int):
        raise ValueError(
            "The LLaVA checkpoint reads several vision layers "
            f"(vision_feature_layer={llava_config.vision_feature_layer}); PPLLaVA reads one."
        )


def _config_from_backbones(
    llava_config: PreTrainedConfig,
    clip_config: PreTrainedConfig,
    num_prompt_positions: int,
    use_btadapter: bool | None,
    btadapter_depth: int,
    btadapter_max_frames: int,
    config_kwargs: dict,
) -> PPLLaVAConfig:
    is_clip = clip_config.model_type == "clip"
    vision = llava_config.vision_config.to_dict()
    prompt = clip_config.text_config.to_dict()
    prompt["max_position_embeddings"] = num_prompt_positions
    if is_clip:
        vision["projection_dim"] = prompt["projection_dim"] = clip_config.projection_dim
    settings = dict(
        vision_config=vision,
        text_config=llava_config.text_config.to_dict(),
        prompt_encoder_config=prompt,
        prompt_keep_positions=ORIGINAL_PROMPT_KEEP_POSITIONS,
        # The original runs its CLIP text encoder without gradient and its SigLIP one with gradient.
        freeze_prompt_encoder=is_clip,
        use_btadapter=is_clip if use_btadapter is None else use_btadapter,
        btadapter_depth=btadapter_depth,
        btadapter_max_frames=btadapter_max_frames,
        vision_feature_layer=llava_config.vision_feature_layer,
        vision_feature_select_strategy=llava_config.vision_feature_select_strategy,
        projector_hidden_act=llava_config.projector_hidden_act,
        multimodal_projector_bias=llava_config.multimodal_projector_bias,
        image_grid_pinpoints=llava_config.image_grid_pinpoints,
        image_token_id=llava_config.image_token_id,
        tie_word_embeddings=llava_config.tie_word_embeddings,
    )
    if "video_token_id" not in config_kwargs:
        settings["video_token_id"] = getattr(llava_config, "video_token_id", None) or free_video_token_id(
            llava_config.image_token_id, llava_config.text_config.vocab_size, llava_config, llava_config.text_config
        )
    settings.update(config_kwargs)
    return PPLLaVAConfig(**settings)


def _alignment_weights(
    clip_state: dict[str, torch.Tensor], positions: torch.Tensor, random_token_embeddings: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """Our alignment keys and tensors from a CLIPModel / SiglipModel state dict, positions already stretched."""
    unknown = []
    for key, tensor in clip_state.items():
        if key == _SOURCE_POSITIONS:
            continue
        try:
            target = apply_key_rules(key, ALIGNMENT_KEY_RULES)
        except KeyError:
            unknown.append(key)
            continue
        if target is None:
            continue
        if _VALUE_ROWS.match(key):
            tensor = siglip_value_rows(tensor)
        if key.startswith("logit_"):
            tensor = as_scalar(tensor)
        if key == _SOURCE_TOKENS and random_token_embeddings:
            tensor = torch.randn(tensor.shape)
        yield _ALIGNMENT + target, tensor
    if unknown:
        raise ValueError(f"No PPLLaVA place for these CLIP/SigLIP weights: {', '.join(sorted(unknown))}.")
    embeddings = _ALIGNMENT + "text_model.embeddings."
    yield embeddings + "position_embedding_base", positions
    yield embeddings + "position_embedding_residual", positions.clone()


def _btadapter_spatial_weights(
    llava_state: dict[str, torch.Tensor], config: PPLLaVAConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """The last `btadapter_depth` vision layers as the BT-Adapter's spatial layers (the original's `init_weights`)."""
    first = config.vision_config.num_hidden_layers - config.btadapter_depth
    for key, tensor in llava_state.items():
        match = _VISION_LAYER.match(key)
        if match and int(match["index"]) >= first:
            yield f"model.btadapter.spatial_layers.{int(match['index']) - first}.{match['rest']}", tensor


def _check_filled(state: dict[str, torch.Tensor], config: PPLLaVAConfig) -> None:
    """Every key of the model is filled with the right shape or fresh on purpose, and no source weight is left over."""
    shapes = {key: tensor.shape for key, tensor in state.items()}
    problems = state_problems(shapes, expected_state(config), "backbone", FRESH_KEY_PREFIXES)
    if problems:
        raise ValueError("The backbones do not compose into a PPLLaVA:\n- " + "\n- ".join(problems))


def build_ppllava_processor(
    llava: str | os.PathLike, clip: str | os.PathLike, config: PPLLaVAConfig, num_frames: int = 32
) -> PPLLaVAProcessor:
    """The processor of a PPLLaVA built from these backbones: the LLaVA folder's LLM tokenizer (with `<video>` added
    when it has none; `config.video_token_id` follows it) and the CLIP/SigLIP folder's tokenizer as prompt tokenizer,
    with preprocessing, pooling settings and chat template derived from `config`."""
    tokenizer = AutoTokenizer.from_pretrained(llava)
    align_placeholder_tokens(tokenizer, config)
    prompt_tokenizer = AutoTokenizer.from_pretrained(clip)
    return PPLLaVAProcessor.from_config(config, tokenizer, prompt_tokenizer, num_frames=num_frames)


__all__ = ["build_ppllava_from_backbones", "build_ppllava_processor"]
