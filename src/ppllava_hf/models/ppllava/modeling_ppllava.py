"""PPLLaVA models: vision tower (+ BT-Adapter), vision-prompt alignment, prompt-guided pooling, projector and a causal LM."""

import inspect
import itertools
import math
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoModel,
    CLIPTextModel,
    GenerationMixin,
    GradientCheckpointingLayer,
    PreTrainedModel,
    SiglipTextModel,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPast,
    BaseModelOutputWithPooling,
    CausalLMOutputWithPast,
    ModelOutput,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging

from .configuration_ppllava import PPLLaVAConfig
from .input_checks_ppllava import (
    check_attended_rows,
    check_labels,
    check_pixel_batch,
    check_pixel_values,
    check_quantization_config,
    check_token_ids,
    check_weight_files,
)
from .token_counts_ppllava import (
    PoolingPlan,
    Triple,
    anyres_grid_shape,
    num_anyres_tiles,
    num_image_tokens,
    num_multi_image_tokens,
    plan_image_pooling,
    plan_pooling,
    plan_video_pooling,
    unpadded_size,
)
from .transformers_internals_ppllava import (
    CLIPMLP,
    CLIPAttention,
    SiglipMLP,
    replace_text_embeddings,
    slice_logits_to_keep,
    vision_position_embeddings,
)


logger = logging.get_logger(__name__)


# =====================================================================================================================
# Vision-prompt alignment: how relevant every visual patch is to the user's prompt, scored CLIP-style.
#
# The prompt goes through a CLIP (or SigLIP) text encoder whose context is stretched beyond its pretrained length; every
# patch goes through the vision tower's post-layernorm and visual projection; the scaled cosine similarities, softmaxed
# over all patches of one sample, are the relevance weights that drive prompt-guided pooling.


# SigLIP's text tower is not in AutoModel's mapping, so the two supported prompt encoders are named here.
PROMPT_ENCODER_CLASSES = {"clip_text_model": CLIPTextModel, "siglip_text_model": SiglipTextModel}
# CLIP's and SigLIP's own initial temperature (log scale) and SigLIP's bias: what a fresh alignment starts from.
INITIAL_LOGIT_SCALE = {"clip_text_model": math.log(1 / 0.07), "siglip_text_model": math.log(10.0)}
INITIAL_SIGLIP_LOGIT_BIAS = -10.0
# Frames read and encoded at a time for a streamed video when the config sets no `vision_chunk_frames`.
STREAM_CHUNK_FRAMES = 32


class PPLLaVAExtendedTextEmbeddings(nn.Module):
    """Token embeddings plus the extended position table: a frozen base table for the first `keep_positions` positions
    and a trainable residual table for the others (both of the extended length)."""

    def __init__(self, vocab_size: int, hidden_size: int, num_positions: int, keep_positions: int):
        super().__init__()
        self.keep_positions = keep_positions
        self.token_embedding = nn.Embedding(vocab_size, hidden_size)
        self.register_buffer("position_embedding_base", torch.zeros(num_positions, hidden_size))
        self.position_embedding_residual = nn.Parameter(torch.zeros(num_positions, hidden_size))

    @property
    def num_positions(self) -> int:
        return self.position_embedding_base.shape[0]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.token_embedding(input_ids)
        seq_length = inputs_embeds.shape[-2]
        if seq_length > self.num_positions:
            raise ValueError(
                f"The prompt has {seq_length} tokens but the prompt encoder has {self.num_positions} positions; truncate "
                "the pooling prompt (the processor does so with a warning)."
            )
        if position_ids is None:
            position_ids = torch.arange(seq_length, device=inputs_embeds.device)[None]
        from_base = (position_ids < self.keep_positions)[..., None]
        positions = torch.where(
            from_base, self.position_embedding_base[position_ids], self.position_embedding_residual[position_ids]
        )
        return inputs_embeds + positions.to(inputs_embeds.dtype)


class PPLLaVASiglipPatchHead(nn.Module):
    """SigLIP's attention-pooling head applied to every patch on its own, as PPLLaVA's SigLIP path does: the head's
    value projection of the patch, then the head's residual layernorm + MLP (no probe query, no output projection)."""

    def __init__(self, vision_config):
        super().__init__()
        hidden_size = vision_config.hidden_size
        self.value_proj = nn.Linear(hidden_size, hidden_size)
        self.layernorm = nn.LayerNorm(hidden_size, eps=vision_config.layer_norm_eps)
        self.mlp = SiglipMLP(vision_config)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        values = self.value_proj(patches)
        return values + self.mlp(self.layernorm(values))


class PPLLaVAVisionPromptAlignment(nn.Module):
    """Scores every visual patch against the prompt: softmax over all patches of a sample of
    cos(prompt, patch) * exp(logit_scale) (+ logit_bias for SigLIP)."""

    def __init__(self, config: PPLLaVAConfig):
        super().__init__()
        prompt_config, vision_config = config.prompt_encoder_config, config.vision_config
        self.is_siglip = prompt_config.model_type == "siglip_text_model"
        self.freeze_prompt_encoder = config.freeze_prompt_encoder
        # Stock CLIP/SigLIP text encoder, with PPLLaVA's extended position tables in place of its embeddings (unless the
        # checkpoint keeps the stock ones, the original's `extend_clip: false`).
        self.text_model = PROMPT_ENCODER_CLASSES[prompt_config.model_type](prompt_config)
        if config.extended_prompt_positions:
            replace_text_embeddings(
                self.text_model,
                PPLLaVAExtendedTextEmbeddings(
                    prompt_config.vocab_size,
                    prompt_config.hidden_size,
                    prompt_config.max_position_embeddings,
                    config.prompt_keep_positions,
                ),
            )
        self.visual_layernorm = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)
        if self.is_siglip:
            self.text_projection = None
            self.visual_projection = PPLLaVASiglipPatchHead(vision_config)
            self.register_buffer("logit_bias", torch.tensor(INITIAL_SIGLIP_LOGIT_BIAS))
        else:
            projection_dim = prompt_config.projection_dim
            self.text_projection = nn.Linear(prompt_config.hidden_size, projection_dim, bias=False)
            self.visual_projection = nn.Linear(vision_config.hidden_size, projection_dim, bias=False)
            self.logit_bias = None
        # Created at their initial values (which `_init_weights` restores), so a load that skips initialisation and
        # misses them still scores with the CLIP/SigLIP temperature.
        self.initial_logit_scale = INITIAL_LOGIT_SCALE[prompt_config.model_type]
        self.register_buffer("logit_scale", torch.tensor(self.initial_logit_scale))

    def encode_prompt(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt embedding `(batch, dim)` before L2 normalisation."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_prompt_encoder):
            pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return pooled if self.text_projection is None else self.text_projection(pooled)

    def embed_patches(self, patch_features: torch.Tensor) -> torch.Tensor:
        """Patch embeddings in the prompt's space (vision post-layernorm, then visual projection)."""
        return self.visual_projection(self.visual_layernorm(patch_features))

    def cosine_similarity(self, patch_features: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """Cosine of each patch `(batch, ..., vision_dim)` with its sample's prompt `(batch, dim)`, in float32.

        Computed as `(patch . unit_prompt) / |patch|`: no normalised copy of the patch embeddings is made.
        """
        patches = self.embed_patches(patch_features)
        flat = patches.reshape(patches.shape[0], -1, patches.shape[-1]).float()
        prompts = prompt_embeds.float()
        prompts = prompts / prompts.norm(p=2, dim=-1, keepdim=True)
        cosine = torch.einsum("bnd,bd->bn", flat, prompts) / flat.norm(p=2, dim=-1)
        return cosine.reshape(patches.shape[:-1])

    def logits(self, patch_features: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """Relevance logits (float32): the cosine scaled by `exp(logit_scale)`, plus SigLIP's `logit_bias`."""
        logits = self.cosine_similarity(patch_features, prompt_embeds) * self.logit_scale.float().exp()
        if self.logit_bias is not None:
            logits = logits + self.logit_bias.float()
        return logits

    def forward(
        self, patch_features: torch.Tensor, prompt_embeds: torch.Tensor, chunk_frames: int | None = None
    ) -> torch.Tensor:
        """Relevance weights, shaped like `patch_features` without its last dim, summing to one per sample (float32).

        `chunk_frames` scores at most that many entries of dim 1 (frames or tiles) at a time, so the projected patch
        embeddings of a long clip never exist all at once; only the float32 logits of all patches are kept for the softmax.
        """
        frames = patch_features.shape[1]
        chunk = chunk_frames or frames
        logits = torch.cat(
            [self.logits(patch_features[:, start : start + chunk], prompt_embeds) for start in range(0, frames, chunk)],
            dim=1,
        )
        return torch.softmax(logits.flatten(1), dim=-1).view_as(logits)


# =====================================================================================================================
# BT-Adapter: a temporal branch beside the last layers of a CLIP vision tower.
#
# The branch reads the CLIP layer outputs of a clip of frames, adds time embeddings, and alternates temporal attention
# (each patch across frames) with spatial attention (each frame across patches). The hidden state the projector reads is
# then the CLIP CLS of each frame followed by the average of the CLIP and branch patch tokens.
#
# Token layout inside the branch: one shared CLS, then patches in (patch, frame) order, i.e. `(batch, 1 + P * T, dim)`.


def btadapter_chunk_sizes(num_frames: int, max_frames: int) -> list[int]:
    """Frame counts of the consecutive chunks a clip is split into before the BT-Adapter runs over each on its own.

    The time-embedding table has `max_frames` rows (64 in the published checkpoints), so a clip of up to `max_frames`
    frames runs whole, exactly as in the original. A longer clip is split into the fewest chunks of at most `max_frames`
    frames, as equal as possible (the first `num_frames % chunks` one frame longer): every chunk sees time embeddings
    `0 .. len - 1`, never past the table, and all chunks cover similar spans of time. E.g. 64 -> [64]; 65 -> [33, 32];
    512 -> 8 x [64]; 130 -> [44, 43, 43].
    """
    num_chunks = math.ceil(num_frames / max_frames)
    return [num_frames // num_chunks + (index < num_frames % num_chunks) for index in range(num_chunks)]


class PPLLaVADropPath(nn.Module):
    """Stochastic depth: zero a residual branch for a random subset of the leading dim in training."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return hidden_states
        keep = 1.0 - self.rate
        mask_shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        mask = torch.empty(mask_shape, dtype=hidden_states.dtype, device=hidden_states.device).bernoulli_(keep)
        return hidden_states * mask / keep


class PPLLaVABTTemporalLayer(GradientCheckpointingLayer):
    """Pre-LN attention of each patch over the frames, through `temporal_fc`, added to the patch tokens (CLS untouched)."""

    def __init__(self, vision_config, drop_path_rate: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(vision_config.hidden_size)
        self.self_attn = CLIPAttention(vision_config)
        self.temporal_fc = nn.Linear(vision_config.hidden_size, vision_config.hidden_size)
        self.drop_path = PPLLaVADropPath(drop_path_rate)

    def forward(self, hidden_states: torch.Tensor, num_frames: int, chunk_tokens: int | None = None) -> torch.Tensor:
        """`chunk_tokens` bounds the tokens attended at once: patches are independent here, so they go in groups."""
        batch, length, dim = hidden_states.shape
        num_patches = (length - 1) // num_frames
        step = _chunk(num_patches, chunk_tokens, batch * num_frames)
        per_patch = hidden_states[:, 1:].unflatten(1, (num_patches, num_frames))
        output = hidden_states.clone()
        output_per_patch = output[:, 1:].unflatten(1, (num_patches, num_frames))
        for start in range(0, num_patches, step):
            attended, _ = self.self_attn(self.layer_norm1(per_patch[:, start : start + step].flatten(0, 1)))
            update = self.temporal_fc(self.drop_path(attended))
            output_per_patch[:, start : start + step] += update.unflatten(0, (batch, -1))
        return output


class PPLLaVABTSpatialLayer(GradientCheckpointingLayer):
    """Pre-LN attention of each frame over its patches (the shared CLS joins every frame and is averaged back), then an MLP."""

    def __init__(self, vision_config, drop_path_rate: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(vision_config.hidden_size)
        self.self_attn = CLIPAttention(vision_config)
        self.layer_norm2 = nn.LayerNorm(vision_config.hidden_size)
        self.mlp = CLIPMLP(vision_config)
        self.drop_path = PPLLaVADropPath(drop_path_rate)

    def forward(self, hidden_states: torch.Tensor, num_frames: int, chunk_tokens: int | None = None) -> torch.Tensor:
        """`chunk_tokens` bounds the tokens processed at once: attention goes in groups of frames, the MLP in groups of
        tokens (the shared CLS update is the mean over all frames, accumulated across groups)."""
        batch, length, dim = hidden_states.shape
        num_patches = (length - 1) // num_frames
        per_frame = hidden_states[:, 1:].unflatten(1, (num_patches, num_frames)).transpose(1, 2)
        attended_state = hidden_states.clone()
        attended_per_frame = attended_state[:, 1:].unflatten(1, (num_patches, num_frames)).transpose(1, 2)
        cls_updates = []
        step = _chunk(num_frames, chunk_tokens, batch * (num_patches + 1))
        for start in range(0, num_frames, step):
            frames = per_frame[:, start : start + step]
            cls_per_frame = hidden_states[:, None, :1].expand(batch, frames.shape[1], 1, dim)
            tokens = torch.cat([cls_per_frame, frames], dim=2).flatten(0, 1)
            attended, _ = self.self_attn(self.layer_norm1(tokens))
            attended = self.drop_path(attended).unflatten(0, (batch, -1))
            cls_updates.append(attended[:, :, 0].sum(dim=1))
            attended_per_frame[:, start : start + step] += attended[:, :, 1:]
        attended_state[:, 0] += sum(cls_updates) / num_frames
        output = torch.empty_like(attended_state)
        step = _chunk(length, chunk_tokens, batch)
        for start in range(0, length, step):
            block = attended_state[:, start : start + step]
            output[:, start : start + step] = block + self.mlp(self.layer_norm2(block))
        return output


def _chunk(size: int, chunk_tokens: int | None, tokens_per_item: int) -> int:
    """Items of `tokens_per_item` tokens to process at once within `chunk_tokens` (all of them without a bound)."""
    return size if chunk_tokens is None else max(1, chunk_tokens // tokens_per_item)


class PPLLaVABTAdapter(nn.Module):
    """The BT-Adapter branch of the last `depth` CLIP layers, with its time embeddings and its own CLS token."""

    def __init__(self, vision_config, depth: int, max_frames: int, drop_path_rate: float):
        super().__init__()
        self.depth = depth
        spatial_rates = np.linspace(0.0, drop_path_rate, depth)
        self.spatial_layers = nn.ModuleList(
            PPLLaVABTSpatialLayer(vision_config, float(rate)) for rate in spatial_rates
        )
        # The original hands its layer index to the wrong constructor argument, so every temporal layer uses the full rate.
        self.temporal_layers = nn.ModuleList(
            PPLLaVABTTemporalLayer(vision_config, drop_path_rate) for _ in range(depth)
        )
        self.time_embedding = nn.Embedding(max_frames, vision_config.hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, vision_config.hidden_size))

    @property
    def max_frames(self) -> int:
        return self.time_embedding.num_embeddings

    def _branch_input(self, clip_states: torch.Tensor, position_embedding: torch.Tensor) -> torch.Tensor:
        """First branch layer input from CLIP output `(batch, frames, 1 + P, dim)`: patches + CLIP positions + time
        embeddings, CLS = mean of (frame-averaged CLIP CLS) and (own CLS + CLIP position 0)."""
        batch, num_frames, length, dim = clip_states.shape
        if num_frames > self.max_frames:
            raise ValueError(
                f"The BT-Adapter has time embeddings for {self.max_frames} frames but got a clip of {num_frames}; split it "
                "with `btadapter_chunk_sizes` first."
            )
        patches = clip_states[:, :, 1:] + position_embedding[1:length]
        times = self.time_embedding(torch.arange(num_frames, device=clip_states.device))
        patches = (patches + times[None, :, None]).transpose(1, 2).reshape(batch, (length - 1) * num_frames, dim)
        own_cls = (self.cls_token + position_embedding[0]).expand(batch, 1, dim)
        cls_token = (clip_states[:, :, :1].mean(dim=1) + own_cls) / 2
        return torch.cat([cls_token, patches], dim=1)

    @staticmethod
    def _clip_in_branch_layout(clip_states: torch.Tensor) -> torch.Tensor:
        """CLIP output `(batch, frames, 1 + P, dim)` as branch tokens: frame-averaged CLS, then (patch, frame) order."""
        batch, num_frames, length, dim = clip_states.shape
        patches = clip_states[:, :, 1:].transpose(1, 2).reshape(batch, (length - 1) * num_frames, dim)
        return torch.cat([clip_states[:, :, :1].mean(dim=1), patches], dim=1)

    def forward(
        self, clip_states: list[torch.Tensor], position_embedding: torch.Tensor, chunk_frames: int | None = None
    ) -> torch.Tensor:
        """Combine the branch with the CLIP hidden state at the last entry of `clip_states`.

        Args:
            clip_states: outputs of consecutive CLIP layers, starting with the first layer the branch sits beside, each
                `(batch, frames, 1 + P, dim)`; one branch layer runs per entry.
            position_embedding: the CLIP vision position table `(1 + P, dim)`.
            chunk_frames: attend and run the MLP over at most this many frames' worth of tokens at a time (the same
                numbers, less memory for long clips); `None` processes the clip at once.

        Returns:
            `(batch, frames, 1 + P, dim)`: each frame's CLIP CLS, then (CLIP patches + branch patches) / 2.
        """
        num_frames, tokens_per_frame = clip_states[0].shape[1:3]
        chunk_tokens = None if chunk_frames is None else chunk_frames * tokens_per_frame
        branch = None
        for index, states in enumerate(clip_states):
            if branch is None:
                branch = self._branch_input(states, position_embedding)
            else:
                branch = branch + self._clip_in_branch_layout(states)
            branch = self.temporal_layers[index](branch, num_frames, chunk_tokens)
            branch = self.spatial_layers[index](branch, num_frames, chunk_tokens)
        last = clip_states[-1]
        batch, _, length, dim = last.shape
        branch_patches = branch[:, 1:].reshape(batch, length - 1, num_frames, dim).transpose(1, 2)
        return torch.cat([last[:, :, :1], (last[:, :, 1:] + branch_patches) / 2], dim=2)


# =====================================================================================================================
# Prompt-guided pooling
#
# The pooling op: 3-D windows over (frames, rows, columns) averaged with weights from the prompt relevance.


def prompt_guided_pool(
    features: torch.Tensor, relevance: torch.Tensor, plan: PoolingPlan, temperature: float
) -> torch.Tensor:
    """Weighted average over each window, weights = softmax(relevance / temperature) inside the window.

    Args:
        features: `(batch, frames, rows, columns, dim)`, any float dtype.
        relevance: `(batch, frames, rows, columns)`, the prompt relevance of every patch.
        plan: windows and output grid; windows may overlap (stride < kernel).
        temperature: softmax temperature (0.01 in PPLLaVA).

    Returns:
        `(batch, out_frames, out_rows, out_columns, dim)` in the dtype of `features`.

    No unfolded copy of the features is made: each window offset is a strided view of the features, and the weights
    are computed in float32 on the small `(window, batch, *output)` tensor. The products accumulate in float32 (or the
    features' dtype if wider).
    """
    offsets = list(itertools.product(*(range(k) for k in plan.kernel)))
    window_logits = torch.stack([_window_slice(relevance, offset, plan) for offset in offsets]).float() / temperature
    window_weights = torch.softmax(window_logits, dim=0)[..., None]
    if torch.is_grad_enabled() and (features.requires_grad or relevance.requires_grad):
        # Autograd keeps the inputs of every product: views of `features` here, never upcast copies.
        products = (_window_slice(features, offset, plan) * weights for offset, weights in zip(offsets, window_weights))
        return sum(products).to(features.dtype)
    return _accumulate_windows(features, window_weights, offsets, plan)


def _accumulate_windows(
    features: torch.Tensor, window_weights: torch.Tensor, offsets: list[Triple], plan: PoolingPlan
) -> torch.Tensor:
    """Inference path of `prompt_guided_pool`: in-place accumulation, one window offset at a time.

    On CPU the output is built in blocks of output frames small enough for the accumulator to stay in cache, and
    half-precision windows are first upcast into a reused block buffer, several times faster than mixing dtypes in
    `addcmul_`.
    """
    batch, dim = features.shape[0], features.shape[-1]
    pooled = features.new_empty((batch, *plan.output_size, dim))
    accumulator_dtype = torch.promote_types(features.dtype, torch.float32)
    accumulate_in_place = accumulator_dtype == features.dtype
    block_frames = _output_frames_per_block(plan, batch * dim, features.device)
    block_shape = (batch, min(block_frames, plan.output_size[0]), *plan.output_size[1:], dim)
    accumulator = None if accumulate_in_place else features.new_empty(block_shape, dtype=accumulator_dtype)
    upcast = None if accumulate_in_place else features.new_empty(block_shape, dtype=accumulator_dtype)
    for output_frames, input_frames, block in plan.temporal_blocks(block_frames):
        target = pooled[:, output_frames] if accumulate_in_place else accumulator[:, : block.output_size[0]]
        for index, offset in enumerate(offsets):
            window = _window_slice(features[:, input_frames], offset, block)
            if upcast is not None:
                window = upcast[:, : block.output_size[0]].copy_(window)
            weights = window_weights[index, :, output_frames]
            if index == 0:
                torch.mul(window, weights, out=target)
            else:
                target.addcmul_(window, weights)
        if not accumulate_in_place:
            pooled[:, output_frames] = target
    return pooled


# Output elements accumulated per block on CPU: 4 MiB of float32, inside the L3 cache (measured best between 1 and 16 MiB).
_CPU_BLOCK_ELEMENTS = 1 << 20


def _output_frames_per_block(plan: PoolingPlan, elements_per_position: int, device: torch.device) -> int:
    """Output frames accumulated together: all of them on accelerators (fewest launches), a cache-sized block on CPU."""
    if device.type != "cpu":
        return plan.output_size[0]
    per_frame = plan.output_size[1] * plan.output_size[2] * elements_per_position
    return max(1, _CPU_BLOCK_ELEMENTS // per_frame)


def _output_frames_per_chunk(plan: PoolingPlan, chunk_frames: int | None) -> int:
    """Output frames pooled together so that their windows read at most `chunk_frames` input frames (all without)."""
    if chunk_frames is None:
        return plan.output_size[0]
    return max(1, (chunk_frames - plan.kernel[0]) // plan.stride[0] + 1)


def _window_slice(tensor: torch.Tensor, offset: Triple, plan: PoolingPlan) -> torch.Tensor:
    """View of the element at `offset` inside every window: dims 1..3 of `tensor` strided by the plan."""
    slices = tuple(
        slice(o, o + (n - 1) * s + 1, s) for o, n, s in zip(offset, plan.output_size, plan.stride)
    )
    return tensor[(slice(None), *slices)]


class PPLLaVAPromptGuidedPooling(nn.Module):
    """PPLLaVA's pooling: 3-D windows whose weights are the prompt relevance, re-softmaxed per window with a temperature."""

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(
        self, features: torch.Tensor, relevance: torch.Tensor, kernel: Triple, stride: Triple
    ) -> torch.Tensor:
        """Pool `features` `(batch, frames, rows, columns, dim)` with `(frames, rows, columns)` windows of `kernel`
        every `stride`, weighted by `relevance` `(batch, frames, rows, columns)`. Trailing frames or patches that no window reaches are left
        out, as in the original."""
        plan = plan_pooling(tuple(features.shape[1:4]), kernel=kernel, stride=stride)
        return prompt_guided_pool(features, relevance, plan, self.temperature)


# =====================================================================================================================
# Anyres image layout
#
# Pooled image tiles laid out as LLaVA-NeXT does: base tile, then the unpadded grid rows, each ended by `image_newline`.


def pack_image_tokens(
    pooled_tiles: torch.Tensor,
    image_size: tuple[int, int],
    grid_pinpoints: list[list[int]],
    tile_size: int,
    image_newline: torch.Tensor,
) -> torch.Tensor:
    """Lay pooled tiles `(tiles, rows, columns, dim)` out as LLaVA-NeXT does: base tile, then the unpadded grid row by row
    with an `image_newline` after every row. A single-tile input gets one `image_newline` at the end."""
    dim = pooled_tiles.shape[-1]
    newline = image_newline.to(pooled_tiles.dtype)
    base = pooled_tiles[0].reshape(-1, dim)
    if pooled_tiles.shape[0] == 1:
        return torch.cat([base, newline[None]], dim=0)
    rows, cols = anyres_grid_shape(image_size, grid_pinpoints, tile_size)
    tile_rows, tile_cols = pooled_tiles.shape[1:3]
    grid = pooled_tiles[1:].reshape(rows, cols, tile_rows, tile_cols, dim).permute(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * tile_rows, cols * tile_cols, dim)
    top, bottom, left, right = unpadded_size(grid.shape[0], grid.shape[1], image_size)
    grid = grid[top:bottom, left:right]
    grid = torch.cat([grid, newline.expand(grid.shape[0], 1, dim)], dim=1)
    return torch.cat([base, grid.reshape(-1, dim)], dim=0)


# =====================================================================================================================
# Models


@dataclass
class PPLLaVAVisualOutput(BaseModelOutputWithPooling):
    r"""
    last_hidden_state (`torch.Tensor` of shape `(frames_or_tiles, patches, vision_hidden_size)`):
        The selected vision features PPLLaVA scores and pools (the vision tower's state at `vision_feature_layer`,
        blended with the BT-Adapter when there is one, CLS dropped with the "default" strategy), of every frame or tile
        of the inputs in order.
    pooler_output (`list[torch.Tensor]`):
        One `(num_tokens, text_hidden_size)` tensor per video or image: the visual tokens that replace its placeholders.
    hidden_states, attentions (`tuple[torch.Tensor]`, *optional*):
        The vision tower's own, over the same frames or tiles, when `output_hidden_states` / `output_attentions`.
    relevance (`list[torch.Tensor]`):
        One `(frames_or_tiles, rows, columns)` float32 tensor per video or image: the prompt relevance of every patch
        (a softmax over all of them), which weighted the pooling.
    """

    relevance: list[torch.Tensor] | None = None


@dataclass
class PPLLaVAModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    The language model's outputs (whatever the installed transformers names its cache field), and:

    image_hidden_states (`torch.Tensor`, *optional*):
        `(num_image_tokens, hidden_size)`: the visual tokens scattered into the image placeholders.
    video_hidden_states (`torch.Tensor`, *optional*):
        `(num_video_tokens, hidden_size)`: the visual tokens scattered into the video placeholders.
    image_outputs, video_outputs ([`PPLLaVAVisualOutput`], *optional*):
        The encoder output whose tokens were scattered in (`pooler_output`, `relevance`, and the vision tower's
        `hidden_states` / `attentions` when requested), as transformers' multimodal outputs carry it.
    """

    image_hidden_states: torch.Tensor | None = None
    video_hidden_states: torch.Tensor | None = None
    image_outputs: PPLLaVAVisualOutput | None = None
    video_outputs: PPLLaVAVisualOutput | None = None


@dataclass
class PPLLaVACausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    transformers' causal-LM output (loss, logits, cache, hidden states, attentions), and:

    image_hidden_states, video_hidden_states (`torch.Tensor`, *optional*): the visual tokens that were scattered in.
    image_outputs, video_outputs ([`PPLLaVAVisualOutput`], *optional*): the encoder outputs they came from.
    """

    image_hidden_states: torch.Tensor | None = None
    video_hidden_states: torch.Tensor | None = None
    image_outputs: PPLLaVAVisualOutput | None = None
    video_outputs: PPLLaVAVisualOutput | None = None


class PPLLaVAMultiModalProjector(nn.Module):
    """Two-layer projector from vision to LLM hidden size, with PPLLaVA's prompt-guided pooling before the second layer.

    Pooling before `linear_2` gives the same tokens as pooling after it (the window weights sum to one and `linear_2` is
    affine) while running the widest matmul on the pooled tokens only.
    """

    def __init__(self, config: PPLLaVAConfig):
        super().__init__()
        text_hidden = config.text_config.hidden_size
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, text_hidden, bias=config.multimodal_projector_bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.pooling = PPLLaVAPromptGuidedPooling(config.pooling_temperature)
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=config.multimodal_projector_bias)

    def forward(
        self,
        features: torch.Tensor,
        relevance: torch.Tensor | None = None,
        pooling_kernel: tuple[int, int, int] | None = None,
        pooling_stride: tuple[int, int, int] | None = None,
    ) -> torch.Tensor:
        """Project `features` `(..., vision_hidden)`; with `relevance`, pool `(batch, frames, rows, columns, dim)`
        features in `pooling_kernel` windows every `pooling_stride` (see [`PPLLaVAPromptGuidedPooling`]) on the way."""
        hidden = self.act(self.linear_1(features))
        if relevance is not None:
            hidden = self.pooling(hidden, relevance, pooling_kernel, pooling_stride)
        return self.linear_2(hidden)


class PPLLaVAPreTrainedModel(PreTrainedModel):
    config: PPLLaVAConfig
    base_model_prefix = "model"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["PPLLaVABTAdapter", "PPLLaVAVisionPromptAlignment"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # A decoding step (no placeholders, no pixels) is the language model alone: it compiles as one graph.
    _can_compile_fullgraph = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """[`PreTrainedModel.from_pretrained`], with errors that name what is wrong rather than point at the logged load
        report: a local weight file that is truncated or damaged is named, and weights whose shape differs from the
        config's are listed by key (`ignore_mismatched_sizes=True` re-initialises them, as transformers does)."""
        folder = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        check_weight_files(os.path.normpath(folder))
        if kwargs.get("ignore_mismatched_sizes"):
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        with_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, ignore_mismatched_sizes=True, output_loading_info=True, **kwargs
        )
        if info["mismatched_keys"]:
            shapes = "; ".join(
                f"{key} {tuple(saved)} (the config's: {tuple(expected)})"
                for key, saved, expected in info["mismatched_keys"]
            )
            raise ValueError(
                f"Weights of {pretrained_model_name_or_path} have other shapes than its config gives them: {shapes}. "
                "The weights or the config.json were changed; restore them (ignore_mismatched_sizes=True would load "
                "those weights freshly initialised)."
            )
        return (model, info) if with_info else model

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, PPLLaVAModel):
            init.normal_(module.image_newline, mean=0.0, std=1 / math.sqrt(self.config.text_config.hidden_size))
        elif isinstance(module, PPLLaVAVisionPromptAlignment):
            embeddings = module.text_model.embeddings
            if isinstance(embeddings, PPLLaVAExtendedTextEmbeddings):
                init.normal_(embeddings.position_embedding_base, mean=0.0, std=std)
                init.copy_(embeddings.position_embedding_residual, embeddings.position_embedding_base)
            init.constant_(module.logit_scale, module.initial_logit_scale)
            if module.logit_bias is not None:
                init.constant_(module.logit_bias, INITIAL_SIGLIP_LOGIT_BIAS)
        elif isinstance(module, PPLLaVABTAdapter):
            init.zeros_(module.cls_token)
            # Zero temporal projections make the fresh branch an identity on the patch tokens, as in the original.
            for layer in module.temporal_layers:
                init.zeros_(layer.temporal_fc.weight)
                init.zeros_(layer.temporal_fc.bias)


class PPLLaVAModel(PPLLaVAPreTrainedModel):
    """PPLLaVA without its LM head: visual tokens pooled under the guidance of the prompt, scattered into the text."""

    # What transformers' quantizers (bitsandbytes 4/8-bit, ...) leave unquantized: everything but the language model.
    # The list's other effect is transformers' own: a float16 (not bfloat16) load keeps these parts in float32.
    _keep_in_fp32_modules = ["vision_tower", "btadapter", "prompt_alignment", "multi_modal_projector"]

    def __init__(self, config: PPLLaVAConfig):
        super().__init__(config)
        check_quantization_config(getattr(config, "quantization_config", None))  # from_pretrained sets it before this
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.btadapter = (
            PPLLaVABTAdapter(
                config.vision_config, config.btadapter_depth, config.btadapter_max_frames, config.btadapter_drop_path_rate
            )
            if config.use_btadapter
            else None
        )
        self.prompt_alignment = PPLLaVAVisionPromptAlignment(config)
        self.multi_modal_projector = PPLLaVAMultiModalProjector(config)
        self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size))
        self.language_model = AutoModel.from_config(config.text_config)
        # Only the parts this layout has (the SigLIP/Qwen layout has no BT-Adapter): transformers checks every name.
        self._keep_in_fp32_modules = [name for name in self._keep_in_fp32_modules if getattr(self, name) is not None]
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    # ----------------------------------------------------------------------------------------------------------------
    # Token counts (the same arithmetic as the processor's placeholder expansion)

    def video_pooling_plan(self, num_frames: int, max_visual_tokens: int | None = None) -> PoolingPlan:
        """Pooling windows for a `num_frames`-frame video under the config (and an optional per-call token budget)."""
        config = self.config
        return plan_video_pooling(
            num_frames,
            config.patch_grid,
            config.video_pooling_kernel,
            config.video_pooling_stride,
            config.video_pooling_output_size,
            max_visual_tokens if max_visual_tokens is not None else config.max_visual_tokens,
        )

    def image_pooling_plan(self, num_tiles: int) -> PoolingPlan:
        """Pooling windows for an anyres image of `num_tiles` tiles."""
        config = self.config
        return plan_image_pooling(
            num_tiles, config.patch_grid, config.image_pooling_kernel, config.image_pooling_stride,
            config.image_pooling_output_size,
        )

    def num_image_tokens(self, image_size: tuple[int, int]) -> int:
        """Visual tokens of an image of `image_size` (height, width)."""
        config = self.config
        return num_image_tokens(
            image_size, config.image_grid_pinpoints, config.vision_config.image_size, config.patch_grid,
            config.image_pooling_kernel, config.image_pooling_stride, config.image_pooling_output_size,
        )

    def num_multi_image_tokens(self) -> int:
        """Visual tokens of each image of a multi-image group."""
        config = self.config
        return num_multi_image_tokens(
            config.patch_grid, config.image_pooling_kernel, config.image_pooling_stride, config.image_pooling_output_size
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Vision tower (+ BT-Adapter)

    def _feature_state_index(self) -> int:
        return self.config.vision_feature_layer % (self.config.vision_config.num_hidden_layers + 1)

    def _btadapter_state_indices(self) -> list[int]:
        """Indices of the CLIP hidden states the BT-Adapter reads to build the selected state (empty: it does not reach it)."""
        if self.btadapter is None:
            return []
        first = self.config.vision_config.num_hidden_layers - self.btadapter.depth + 1
        return list(range(first, self._feature_state_index() + 1))

    def _run_vision_tower(
        self, frames: torch.Tensor, state_indices: list[int], output_hidden_states: bool, output_attentions: bool
    ) -> tuple[dict[int, torch.Tensor], list[BaseModelOutputWithPooling]]:
        """Hidden states `state_indices` of the vision tower for `frames` `(num_frames, 3, H, W)` (0: the embeddings,
        i: the output of layer i, as `output_hidden_states` numbers them), running at most `vision_chunk_frames` frames
        at a time; with `output_hidden_states` / `output_attentions` also the tower's own output of each chunk."""
        chunk = self.config.vision_chunk_frames or len(frames)
        collected = {index: [] for index in state_indices}
        tower_outputs = []
        dtype = self.vision_tower.dtype
        for start in range(0, len(frames), chunk):
            outputs = self.vision_tower(
                pixel_values=frames[start : start + chunk].to(dtype),
                output_hidden_states=True,
                output_attentions=output_attentions,
            )
            for index in state_indices:
                collected[index].append(outputs.hidden_states[index])
            if output_hidden_states or output_attentions:
                tower_outputs.append(outputs)
        states = {index: _concatenate(chunks) for index, chunks in collected.items()}
        return states, tower_outputs

    def _encoding_groups(
        self, clip_lengths: list[int], with_btadapter: bool, limit: int | None = None
    ) -> list[tuple[int, int, int]]:
        """`(first_frame, num_segments, segment_frames)` of each group of consecutive frames encoded together.

        With the BT-Adapter, a segment is one of the chunks `btadapter_chunk_sizes` splits a clip into (its temporal
        branch runs per segment) and a group stacks consecutive segments of equal length, up to `vision_chunk_frames`
        frames, into one adapter batch. Without it, a group is a single segment of at most `vision_chunk_frames` frames.
        Only one group's hidden states exist at a time. `limit` overrides `vision_chunk_frames` (a streamed video).
        """
        total = sum(clip_lengths)
        limit = limit or self.config.vision_chunk_frames or total
        if not with_btadapter:
            return [(start, 1, min(limit, total - start)) for start in range(0, total, limit)]
        max_frames = self.btadapter.max_frames
        groups, start = [], 0
        for size in (size for length in clip_lengths for size in btadapter_chunk_sizes(length, max_frames)):
            if groups and groups[-1][2] == size and (groups[-1][1] + 1) * size <= limit:
                groups[-1] = (groups[-1][0], groups[-1][1] + 1, size)
            else:
                groups.append((start, 1, size))
            start += size
        return groups

    def encode_frames(
        self,
        frames: torch.Tensor,
        clip_lengths: list[int],
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutput:
        """Selected vision features (`last_hidden_state`, `(num_frames, patches, vision_hidden)`) of frames grouped into
        clips, and on request the vision tower's own hidden states and attentions over the same frames.

        Videos are clips of their frames; image tiles are one-frame clips. The BT-Adapter (when present and reaching the
        selected layer) runs across the frames of each clip, per chunk of at most `btadapter_max_frames` frames (see
        `btadapter_chunk_sizes`); CLS is dropped with the "default" strategy. Frames go through the vision tower in
        groups of at most `vision_chunk_frames` (or one adapter chunk), so memory beyond the selected features is bounded.
        """
        feature_index = self._feature_state_index()
        adapter_indices = self._btadapter_state_indices()
        state_indices = sorted(set(adapter_indices) | {feature_index})
        first_token = 1 if self.config.vision_feature_select_strategy == "default" else 0
        groups = self._encoding_groups(clip_lengths, bool(adapter_indices))
        selected, tower_outputs = None, []
        for start, num_segments, segment_frames in groups:
            stop = start + num_segments * segment_frames
            # The whole of `frames` is passed as it is: a streamed video's frames are read only chunk by chunk.
            group_frames = frames if stop - start == len(frames) else frames[start:stop]
            states, outputs = self._run_vision_tower(group_frames, state_indices, output_hidden_states, output_attentions)
            tower_outputs.extend(outputs)
            if adapter_indices:
                segments = [states[index].unflatten(0, (num_segments, segment_frames)) for index in adapter_indices]
                position_embedding = vision_position_embeddings(self.vision_tower)
                group = self.btadapter(segments, position_embedding, self.config.vision_chunk_frames).flatten(0, 1)
            else:
                group = states[feature_index]
            group = group[:, first_token:]
            if len(groups) == 1:
                selected = group
                continue
            # Filled in place: a list of groups joined at the end would hold the features of every frame twice.
            if selected is None:
                selected = group.new_empty((len(frames), *group.shape[1:]))
            selected[start:stop] = group
        return BaseModelOutput(
            last_hidden_state=selected,
            hidden_states=_concatenate_layers(tower_outputs, "hidden_states") if output_hidden_states else None,
            attentions=_concatenate_layers(tower_outputs, "attentions") if output_attentions else None,
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Prompt, relevance, pooling

    def get_prompt_embeds(self, clip_input_ids: torch.LongTensor, clip_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One prompt embedding per row of `clip_input_ids` `(rows, prompt_dim)`, before normalisation."""
        check_token_ids(
            clip_input_ids, "clip_input_ids", self.config.prompt_encoder_config.vocab_size,
            "prompt encoder's tokenizer (the processor's prompt_tokenizer)",
        )
        return self.prompt_alignment.encode_prompt(clip_input_ids, clip_attention_mask)

    def _prompts_for_items(
        self,
        num_items: int,
        modality: str,
        clip_input_ids: torch.LongTensor | None,
        clip_attention_mask: torch.Tensor | None,
        prompt_embeds: torch.Tensor | None,
    ) -> torch.Tensor:
        if prompt_embeds is None:
            if clip_input_ids is None:
                raise ValueError(
                    f"PPLLaVA pools each {modality} under the guidance of a prompt: pass `clip_input_ids` (and "
                    "`clip_attention_mask`), which the PPLLaVA processor returns, or precomputed `prompt_embeds`."
                )
            prompt_embeds = self.get_prompt_embeds(clip_input_ids, clip_attention_mask)
        if prompt_embeds.shape[0] != num_items:
            raise ValueError(
                f"Got {num_items} {modality}(s) but {prompt_embeds.shape[0]} pooling prompts. Pass one prompt row per "
                f"{modality}, or call forward()/generate(), which match prompts to {modality}s through the placeholders."
            )
        return prompt_embeds

    def _relevance(self, features: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """Relevance `(1, frames, rows, cols)` of every patch of one clip `(frames, patches, dim)` to its prompt `(dim,)`,
        scored `vision_chunk_frames` frames at a time."""
        rows, cols = self.config.patch_grid
        patches = features.unflatten(1, (rows, cols))[None]
        return self.prompt_alignment(patches, prompt[None], chunk_frames=self.config.vision_chunk_frames)

    def _pool_clip(self, features: torch.Tensor, prompt: torch.Tensor, plan: PoolingPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Relevance and pooled tokens `(out_frames, out_rows, out_cols, text_hidden)` of one clip `(frames, patches, dim)`.

        The relevance is a softmax over all patches of the clip, so it comes first. The projector and the pooling then
        run over blocks of output frames whose windows read at most `vision_chunk_frames` frames: the text-width
        activations of a long clip never exist all at once.
        """
        rows, cols = self.config.patch_grid
        patches = features.unflatten(1, (rows, cols))[None]
        relevance = self._relevance(features, prompt)
        blocks = []
        output_frames_per_block = _output_frames_per_chunk(plan, self.config.vision_chunk_frames)
        for _, input_frames, block_plan in plan.temporal_blocks(output_frames_per_block):
            blocks.append(self._pool_block(patches[:, input_frames], relevance[:, input_frames], block_plan))
        return relevance[0], torch.cat(blocks, dim=1)[0]

    def _pool_block(self, patches: torch.Tensor, relevance: torch.Tensor, plan: PoolingPlan) -> torch.Tensor:
        """Projected and pooled tokens of one temporal block of a clip (`patches` `(1, frames, rows, cols, dim)`)."""
        return self.multi_modal_projector(patches, relevance, plan.kernel, plan.stride)

    # ----------------------------------------------------------------------------------------------------------------
    # Streamed videos: frames read a chunk at a time, in two passes

    def _stream_clip(self, video, prompt: torch.Tensor, plan: PoolingPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """`_pool_clip` for a video given as a frame source (`len(video)` frames, `video[start:stop]` their pixels
        `(frames, 3, H, W)`, e.g. a `StreamedVideo`), with only a few chunks of frames in memory at a time.

        The relevance is one softmax over all patches of the clip, so the first pass encodes the frames chunk by chunk
        and keeps only their float32 logits, `frames x rows x columns` numbers. The second pass encodes the chunks
        again and pools each temporal block as soon as the frames its windows read are there: the same groups of
        frames, adapter segments and blocks as `_pool_clip`, so the same numbers, for about one more vision-tower run.
        """
        relevance = self._stream_relevance(video, prompt)
        chunk = self.config.vision_chunk_frames or STREAM_CHUNK_FRAMES
        features = _StreamedFeatures(self, video)
        if plan.kernel[0] <= chunk:
            blocks = [
                self._pool_block(features.frames(frames.start, frames.stop), relevance[:, frames], block_plan)
                for _, frames, block_plan in plan.temporal_blocks(_output_frames_per_chunk(plan, chunk))
            ]
        else:
            blocks = [self._pool_long_window(features, relevance, plan, index, chunk) for index in range(plan.output_size[0])]
        return relevance[0], torch.cat(blocks, dim=1)[0]

    def _pool_long_window(
        self, features: "_StreamedFeatures", relevance: torch.Tensor, plan: PoolingPlan, index: int, chunk: int
    ) -> torch.Tensor:
        """Tokens `(1, 1, rows, cols, text_hidden)` of the `index`-th output frame of a window longer than `chunk`
        frames, pooled `chunk` frames at a time: each part is pooled with its own softmax, then the parts are averaged
        with the share of the window's softmax normaliser each holds (`exp(logsumexp(part) - logsumexp(window))`),
        which is the window's softmax exactly. `linear_2` (affine) runs once, on the combined tokens."""
        projector = self.multi_modal_projector
        temperature = projector.pooling.temperature
        first = index * plan.stride[0]
        stop = first + plan.kernel[0]
        normalisers, parts = [], []
        for start in range(first, stop, chunk):
            end = min(start + chunk, stop)
            part_plan = replace(plan, kernel=(end - start, *plan.kernel[1:]), output_size=(1, *plan.output_size[1:]))
            hidden = projector.act(projector.linear_1(features.frames(start, end)))
            part_relevance = relevance[:, start:end]
            normalisers.append(_window_log_normalisers(part_relevance, part_plan, temperature))
            parts.append(prompt_guided_pool(hidden, part_relevance, part_plan, temperature).float())
        shares = torch.softmax(torch.stack(normalisers), dim=0)[..., None]
        pooled = sum(share * part for share, part in zip(shares, parts))
        return projector.linear_2(pooled.to(projector.linear_2.weight.dtype))

    def _stream_groups(self, video) -> list[tuple[int, int, int]]:
        """The groups of frames `encode_frames` would encode together for the whole video, at most a chunk each."""
        if torch.is_grad_enabled():
            raise ValueError(
                "Streamed videos are encoded twice without keeping their features, so gradients cannot flow through "
                "them: run under torch.no_grad() (generate does), or pass decoded pixels (stream_min_frames=0) to train."
            )
        chunk = self.config.vision_chunk_frames or STREAM_CHUNK_FRAMES
        return self._encoding_groups([len(video)], bool(self._btadapter_state_indices()), chunk)

    def _encode_streamed_group(self, video, group: tuple[int, int, int]) -> tuple[int, torch.Tensor]:
        """First frame and selected features `(1, frames, rows, cols, dim)` of one group of a streamed video."""
        start, num_segments, segment_frames = group
        frames = _FrameRange(video, start, start + num_segments * segment_frames, self)
        features = self.encode_frames(frames, [segment_frames] * num_segments).last_hidden_state
        return start, features.unflatten(1, self.config.patch_grid)[None]

    def _stream_relevance(self, video, prompt: torch.Tensor) -> torch.Tensor:
        """`_relevance` of a streamed video: its frames scored a group at a time, keeping only the float32 logits."""
        logits = [
            self.prompt_alignment.logits(self._encode_streamed_group(video, group)[1], prompt[None])
            for group in self._stream_groups(video)
        ]
        logits = torch.cat(logits, dim=1)
        return torch.softmax(logits.flatten(1), dim=-1).view_as(logits)

    def _clip_list(self, pixel_values: torch.Tensor | list[torch.Tensor], name: str) -> list[torch.Tensor]:
        """Clips `(frames, 3, H, W)`, checked, from a 5-D tensor or a list: the videos of `pixel_values_videos`, or the
        image groups of `pixel_values_multi_image`."""
        if isinstance(pixel_values, torch.Tensor) and pixel_values.ndim != 5:
            items = "videos, frames" if name == "pixel_values_videos" else "groups, images"
            raise ValueError(f"{name} must be ({items}, 3, height, width), got shape {tuple(pixel_values.shape)}.")
        if isinstance(pixel_values, torch.Tensor) or not any(map(is_streamed_video, pixel_values)):
            check_pixel_batch(pixel_values, name, self.config.vision_config.image_size)
            return list(pixel_values)
        if name != "pixel_values_videos":
            raise ValueError(f"Only videos can be streamed; pass {name} as tensors.")
        for index, item in enumerate(pixel_values):
            if not is_streamed_video(item):
                check_pixel_values(item, f"{name}[{index}]", self.config.vision_config.image_size)
        return list(pixel_values)

    def _encode_clips(
        self,
        clips: list[torch.Tensor],
        prompts: torch.Tensor,
        plans: list[PoolingPlan],
        output_hidden_states: bool,
        output_attentions: bool,
    ) -> PPLLaVAVisualOutput:
        """Each clip through the vision tower (+ BT-Adapter, across its frames), scored by one softmax over all of its
        patches and pooled with its plan: a video, or the images of a multi-image group."""
        encoded, tokens, relevance = [], [], []
        for clip, prompt, plan in zip(clips, prompts, plans):
            vision = self.encode_frames(clip, [clip.shape[0]], output_hidden_states, output_attentions)
            clip_relevance, pooled = self._pool_clip(vision.last_hidden_state, prompt, plan)
            encoded.append(vision)
            tokens.append(pooled.flatten(0, 2))
            relevance.append(clip_relevance)
        return PPLLaVAVisualOutput(**_join_vision_outputs(encoded), pooler_output=tokens, relevance=relevance)

    @can_return_tuple
    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor | list[torch.Tensor],
        clip_input_ids: torch.LongTensor | None = None,
        clip_attention_mask: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        max_visual_tokens: int | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> PPLLaVAVisualOutput | tuple:
        r"""
        Pooled visual tokens of each video: vision tower (+ BT-Adapter), relevance to its prompt, prompt-guided pooling.

        pixel_values_videos (`torch.Tensor` of shape `(videos, frames, 3, height, width)`, or a list of `(frames, 3, H, W)`):
            The videos. A list may also hold streamed videos (`StreamedVideo`, the video processor's output for a long
            file): read a chunk of frames at a time and encoded in two passes to the same tokens, in bounded memory;
            a call with one returns no `last_hidden_state` (see `_stream_clip`).
        clip_input_ids, clip_attention_mask (`torch.Tensor` of shape `(videos, prompt_length)`):
            One pooling prompt per video (tokenised by the prompt tokenizer).
        prompt_embeds (`torch.Tensor` of shape `(videos, prompt_dim)`, *optional*):
            Precomputed prompt embeddings instead of `clip_input_ids`.
        max_visual_tokens (`int`, *optional*):
            Token budget per video for this call (defaults to `config.max_visual_tokens`).
        output_hidden_states, output_attentions (`bool`, *optional*):
            Also return the vision tower's hidden states / attentions over all frames (defaults: the config's).

        Returns a [`PPLLaVAVisualOutput`]: the tokens of each video in `pooler_output`, the selected vision features of
        every frame in `last_hidden_state`, the relevance of each video in `relevance`.
        """
        videos = self._clip_list(pixel_values_videos, "pixel_values_videos")
        prompts = self._prompts_for_items(len(videos), "video", clip_input_ids, clip_attention_mask, prompt_embeds)
        plans = [self.video_pooling_plan(len(video), max_visual_tokens) for video in videos]
        if any(map(is_streamed_video, videos)):
            output = self._encode_streamed_clips(videos, prompts, plans, *self._vision_output_flags(kwargs))
        else:
            output = self._encode_clips(videos, prompts, plans, *self._vision_output_flags(kwargs))
        return output

    def _encode_streamed_clips(
        self,
        videos: list,
        prompts: torch.Tensor,
        plans: list[PoolingPlan],
        output_hidden_states: bool,
        output_attentions: bool,
    ) -> PPLLaVAVisualOutput:
        """`_encode_clips` for videos of which some are streamed: tokens and relevance only, since a streamed video's
        features never exist all at once (`last_hidden_state` is None)."""
        if output_hidden_states or output_attentions:
            raise ValueError(
                "A streamed video keeps no vision features, so output_hidden_states / output_attentions cannot return "
                "them: pass decoded pixels (the video processor's stream_min_frames=0) to get them."
            )
        tokens, relevance = [], []
        for video, prompt, plan in zip(videos, prompts, plans):
            if is_streamed_video(video):
                clip_relevance, pooled = self._stream_clip(video, prompt, plan)
            else:
                clip_relevance, pooled = self._pool_clip(self.encode_frames(video, [len(video)]).last_hidden_state, prompt, plan)
            tokens.append(pooled.flatten(0, 2))
            relevance.append(clip_relevance)
        return PPLLaVAVisualOutput(pooler_output=tokens, relevance=relevance)

    @can_return_tuple
    def get_multi_image_features(
        self,
        pixel_values_multi_image: torch.Tensor | list[torch.Tensor],
        clip_input_ids: torch.LongTensor | None = None,
        clip_attention_mask: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> PPLLaVAVisualOutput | tuple:
        r"""
        Visual tokens of multi-image groups, as the original's multi-image mode computes them: the images of a group are
        one clip (the BT-Adapter attends across them, in order), scored by one softmax over all of their patches, and
        each image is pooled on its own with the image windows. No anyres tiling, no `image_newline`.

        pixel_values_multi_image (`torch.Tensor` of shape `(groups, images, 3, height, width)`, or a list of `(images, 3, H, W)`):
            The images of each group, each squashed to the vision tower's square input.
        clip_input_ids, clip_attention_mask, prompt_embeds:
            One pooling prompt per group, as for `get_video_features`.
        output_hidden_states, output_attentions (`bool`, *optional*):
            Also return the vision tower's hidden states / attentions over all images (defaults: the config's).

        Returns a [`PPLLaVAVisualOutput`]: per group, `(images * num_multi_image_tokens(), text_hidden_size)` tokens in
        `pooler_output` (image by image: the tokens of its k-th image fill its k-th placeholder) and the relevance
        `(images, rows, columns)`.
        """
        groups = self._clip_list(pixel_values_multi_image, "pixel_values_multi_image")
        prompts = self._prompts_for_items(len(groups), "multi-image group", clip_input_ids, clip_attention_mask, prompt_embeds)
        plans = [self.image_pooling_plan(group.shape[0]) for group in groups]
        output = self._encode_clips(groups, prompts, plans, *self._vision_output_flags(kwargs))
        return output

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor | list[torch.Tensor],
        image_sizes: torch.Tensor,
        clip_input_ids: torch.LongTensor | None = None,
        clip_attention_mask: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> PPLLaVAVisualOutput | tuple:
        r"""
        Visual tokens of each anyres image: its tiles are scored jointly against its prompt, pooled per tile, and laid out
        as LLaVA-NeXT does (base tile, unpadded grid rows each ended by `image_newline`).

        pixel_values (`torch.Tensor` of shape `(images, max_tiles, 3, height, width)`, or a list of `(tiles, 3, H, W)`):
            The anyres tiles of each image (padded tiles beyond the image's count are ignored).
        image_sizes (`torch.Tensor` of shape `(images, 2)`):
            Original (height, width) of each image.
        clip_input_ids, clip_attention_mask, prompt_embeds:
            One pooling prompt per image, as for `get_video_features`.
        output_hidden_states, output_attentions (`bool`, *optional*):
            Also return the vision tower's hidden states / attentions over all tiles (defaults: the config's).
        """
        config = self.config
        tile_size = config.vision_config.image_size
        check_pixel_batch(pixel_values, "pixel_values", tile_size)
        sizes = [tuple(int(v) for v in size) for size in image_sizes]
        tile_counts = [num_anyres_tiles(size, config.image_grid_pinpoints, tile_size) for size in sizes]
        tiles = [image[:count] for image, count in zip(pixel_values, tile_counts)]
        prompts = self._prompts_for_items(len(tiles), "image", clip_input_ids, clip_attention_mask, prompt_embeds)
        output_hidden_states, output_attentions = self._vision_output_flags(kwargs)
        vision = self.encode_frames(torch.cat(tiles), [1] * sum(tile_counts), output_hidden_states, output_attentions)
        tokens, relevance = [], []
        for image_features, size, prompt in zip(vision.last_hidden_state.split(tile_counts), sizes, prompts):
            plan = self.image_pooling_plan(image_features.shape[0])
            image_relevance, pooled = self._pool_clip(image_features, prompt, plan)
            newline = self.image_newline.to(pooled.device)
            tokens.append(pack_image_tokens(pooled, size, config.image_grid_pinpoints, tile_size, newline))
            relevance.append(image_relevance)
        output = PPLLaVAVisualOutput(**vision, pooler_output=tokens, relevance=relevance)
        return output

    def _vision_output_flags(self, kwargs: dict) -> tuple[bool, bool]:
        """The requested vision outputs (`output_hidden_states` / `output_attentions` in the keyword arguments),
        defaulting to the config's settings as transformers models do. They stay keyword arguments, not named
        parameters: `generate` removes from its model kwargs every named parameter of `get_*_features`, which would take
        them away from the language model's forward. transformers' `merge_with_config_defaults` (5.19 to 5.25) fills
        `use_cache` and the vision feature settings from the config, not these two, hence this helper."""
        output_hidden_states = kwargs.get("output_hidden_states")
        output_attentions = kwargs.get("output_attentions")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        return bool(output_hidden_states), bool(output_attentions)

    @torch.no_grad()
    def get_video_relevance(
        self,
        pixel_values_videos: torch.Tensor | list[torch.Tensor],
        clip_input_ids: torch.LongTensor,
        clip_attention_mask: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Prompt relevance of every patch of each video, `(frames, rows, columns)` float32 summing to one: where in space
        and time the model looks for the prompt (the weights of its pooling)."""
        videos = self._clip_list(pixel_values_videos, "pixel_values_videos")
        prompts = self._prompts_for_items(len(videos), "video", clip_input_ids, clip_attention_mask, None)
        return [
            self._stream_relevance(video, prompt)[0]
            if is_streamed_video(video)
            else self._relevance(self.encode_frames(video, [video.shape[0]]).last_hidden_state, prompt)[0]
            for video, prompt in zip(videos, prompts)
        ]

    # ----------------------------------------------------------------------------------------------------------------
    # Placeholders

    def _placeholder_mask(
        self, token_id: int, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor
    ) -> torch.Tensor:
        if input_ids is not None:
            return input_ids == token_id
        token_embedding = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
        return (inputs_embeds == token_embedding).all(-1)

    @staticmethod
    def _owner_rows(mask: torch.Tensor, item_token_counts: list[int], modality: str) -> torch.Tensor:
        """Batch row of each visual item, from how many placeholders each row holds (items appear in text order)."""
        per_row = mask.sum(-1)
        total = int(per_row.sum())
        expected = sum(item_token_counts)
        if total != expected:
            raise ValueError(
                f"{modality.capitalize()} placeholders and {modality} features do not match: the text has {total} "
                f"{modality} tokens but the {len(item_token_counts)} {modality}(s) give {expected} ({item_token_counts}). "
                "Build the inputs with the PPLLaVA processor using the same frame count, pooling sizes and "
                "max_visual_tokens as the model."
            )
        row_ends = per_row.cumsum(0)
        starts = torch.tensor([0] + item_token_counts[:-1], device=mask.device).cumsum(0)
        rows = torch.searchsorted(row_ends, starts, right=True)
        ends = starts + torch.tensor(item_token_counts, device=mask.device)
        if bool((ends > row_ends[rows]).any()):
            raise ValueError(f"A {modality}'s placeholder tokens are split across two samples of the batch.")
        return rows

    def encode_multimodal(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | list[torch.Tensor] | None = None,
        image_sizes: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | list[torch.Tensor] | None = None,
        clip_input_ids: torch.LongTensor | None = None,
        clip_attention_mask: torch.Tensor | None = None,
        max_visual_tokens: int | None = None,
        pixel_values_multi_image: torch.Tensor | list[torch.Tensor] | None = None,
        multi_image: torch.Tensor | list[bool] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> dict[str, PPLLaVAVisualOutput]:
        """Visual tokens of every image, multi-image group and video of a batch, each pooled by the prompt of the sample
        it belongs to.

        The owner of each item is read from the placeholders in `input_ids` (or `inputs_embeds`); `multi_image` (one
        bool per sample) says which samples' image placeholders belong to a multi-image group rather than to anyres
        images (without it, all of them belong to `pixel_values_multi_image` when only that is given). The prompt
        encoder runs once per sample, and identical items with identical prompts (a preference pair's chosen and
        rejected rows, say) are encoded once, unless `output_hidden_states` / `output_attentions` ask for the vision
        tower's outputs, which then cover every item in order. The result is what `forward(mm_encoder_outputs=...)`
        takes: its `"image"` entry holds the anyres images and multi-image groups in the order of their placeholders.
        """
        if input_ids is None and inputs_embeds is None:
            raise ValueError("encode_multimodal needs input_ids or inputs_embeds to find the placeholders.")
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        if clip_input_ids is None:
            raise ValueError(
                "PPLLaVA pools visual tokens under the guidance of the prompt: pass `clip_input_ids` and "
                "`clip_attention_mask` (the PPLLaVA processor returns them)."
            )
        if clip_input_ids.shape[0] != batch_size:
            raise ValueError(
                f"clip_input_ids has {clip_input_ids.shape[0]} rows for a batch of {batch_size}: give one "
                "pooling prompt per sample."
            )
        prompt_embeds = self.get_prompt_embeds(clip_input_ids, clip_attention_mask)
        tower_outputs = {key: True for key in ("output_hidden_states", "output_attentions") if kwargs.get(key)}
        deduplicate = not tower_outputs
        prompt_keys = clip_input_ids if clip_attention_mask is None else torch.cat([clip_input_ids, clip_attention_mask], -1)
        outputs = {}
        image_parts = []
        if pixel_values_multi_image is not None and len(pixel_values_multi_image) == 0:
            pixel_values_multi_image = None  # multi-image samples without images: text-only samples
        if pixel_values is not None or pixel_values_multi_image is not None:
            image_mask = self._placeholder_mask(self.config.image_token_id, input_ids, inputs_embeds)
            group_rows = _multi_image_rows(
                multi_image, batch_size, pixel_values is not None, pixel_values_multi_image is not None, image_mask.device
            )[:, None]
        if pixel_values is not None:
            if image_sizes is None:
                raise ValueError("Images need `image_sizes` (their original height and width); the processor returns them.")
            counts = [self.num_image_tokens(tuple(int(v) for v in size)) for size in image_sizes]
            rows = self._owner_rows(image_mask & ~group_rows, counts, "image")
            keys = torch.cat([prompt_keys[rows], image_sizes.to(prompt_keys.device, prompt_keys.dtype)], -1)
            image_parts.append((rows, _encode_once_each(
                list(pixel_values),
                keys,
                lambda unique: self.get_image_features(
                    [pixel_values[i] for i in unique],
                    image_sizes[unique],
                    prompt_embeds=prompt_embeds[rows[unique]],
                    return_dict=True,
                    **tower_outputs,
                ),
                deduplicate,
            )))
        if pixel_values_multi_image is not None:
            groups = self._clip_list(pixel_values_multi_image, "pixel_values_multi_image")
            counts = [group.shape[0] * self.num_multi_image_tokens() for group in groups]
            group_owners = self._owner_rows(image_mask & group_rows, counts, "multi-image group")
            image_parts.append((group_owners, _encode_once_each(
                groups,
                prompt_keys[group_owners],
                lambda unique: self.get_multi_image_features(
                    [groups[i] for i in unique],
                    prompt_embeds=prompt_embeds[group_owners[unique]],
                    return_dict=True,
                    **tower_outputs,
                ),
                deduplicate,
            )))
        if image_parts:
            outputs["image"] = _in_placeholder_order(image_parts)
        if pixel_values_videos is not None:
            videos = self._clip_list(pixel_values_videos, "pixel_values_videos")
            counts = [self.video_pooling_plan(len(video), max_visual_tokens).num_tokens for video in videos]
            mask = self._placeholder_mask(self.config.video_token_id, input_ids, inputs_embeds)
            rows = self._owner_rows(mask, counts, "video")
            outputs["video"] = _encode_once_each(
                videos,
                prompt_keys[rows],
                lambda unique: self.get_video_features(
                    [videos[i] for i in unique],
                    prompt_embeds=prompt_embeds[rows[unique]],
                    max_visual_tokens=max_visual_tokens,
                    return_dict=True,
                    **tower_outputs,
                ),
                deduplicate,
            )
        return outputs

    def _scatter(
        self, inputs_embeds: torch.Tensor, mask: torch.Tensor, features: list[torch.Tensor], modality: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.cat(list(features)).to(inputs_embeds.device, inputs_embeds.dtype)
        num_placeholders = int(mask.sum())
        if num_placeholders != features.shape[0]:
            raise ValueError(
                f"{modality.capitalize()} features and {modality} tokens do not match: {num_placeholders} placeholder "
                f"tokens, {features.shape[0]} feature vectors. The processor expands each placeholder to the model's "
                "token count; use the same pooling settings in both."
            )
        return inputs_embeds.masked_scatter(mask[..., None], features), features

    # ----------------------------------------------------------------------------------------------------------------

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | list[torch.Tensor] | None = None,
        pixel_values_videos: torch.Tensor | list[torch.Tensor] | None = None,
        image_sizes: torch.LongTensor | None = None,
        clip_input_ids: torch.LongTensor | None = None,
        clip_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        max_visual_tokens: int | None = None,
        pixel_values_multi_image: torch.Tensor | list[torch.Tensor] | None = None,
        multi_image: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> PPLLaVAModelOutputWithPast | tuple:
        r"""
        clip_input_ids, clip_attention_mask (`torch.Tensor` of shape `(batch, prompt_length)`):
            One pooling prompt per sample; every image and video of a sample is pooled under its guidance.
        mm_encoder_outputs (`dict[str, BaseModelOutputWithPooling]`, *optional*):
            Precomputed visual tokens (`{"image": ..., "video": ...}`, e.g. from `encode_multimodal`) instead of pixels.
            A step without placeholders (a decoding step) has nothing to scatter them into and ignores them.
        max_visual_tokens (`int`, *optional*):
            Token budget per video for this call (defaults to `config.max_visual_tokens`).
        pixel_values_multi_image (`list[torch.Tensor]`, *optional*):
            The images of each multi-image sample, `(images, 3, height, width)` squashed to the vision tower's input:
            encoded together as one clip (see `get_multi_image_features`); the k-th fills the sample's k-th `<image>`.
        multi_image (`torch.BoolTensor` of shape `(batch,)`, *optional*):
            Which samples are multi-image samples (needed when a batch mixes them with anyres images).
        kwargs:
            Passed to the language model, the KV cache included under the name the installed transformers gives it
            (`past_key_values` up to 5.23, `cache` from 5.24). PPLLaVA reads only whether the cache is empty: the
            placeholders of a prompt must be filled, the tokens of later steps are text.

        The output's `last_hidden_state` is exactly as long as `input_ids`: the processor expanded every placeholder.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        has_pixels = any(pixels is not None for pixels in (pixel_values, pixel_values_videos, pixel_values_multi_image))
        if has_pixels and mm_encoder_outputs is not None:
            raise ValueError("Pass either pixel inputs or mm_encoder_outputs, not both.")
        if (input_ids if input_ids is not None else inputs_embeds).shape[1] > 1:  # a prompt, not a decoding step
            if input_ids is not None:
                vocab_size = self.config.text_config.vocab_size
                check_token_ids(input_ids, "input_ids", vocab_size, "LLM tokenizer (the processor's tokenizer)")
            check_attended_rows(attention_mask)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if has_pixels:
            tower_outputs = {key: kwargs[key] for key in ("output_hidden_states", "output_attentions") if key in kwargs}
            mm_encoder_outputs = self.encode_multimodal(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                pixel_values=pixel_values,
                image_sizes=image_sizes,
                pixel_values_videos=pixel_values_videos,
                clip_input_ids=clip_input_ids,
                clip_attention_mask=clip_attention_mask,
                max_visual_tokens=max_visual_tokens,
                pixel_values_multi_image=pixel_values_multi_image,
                multi_image=multi_image,
                **tower_outputs,
            )
        hidden, used = {}, {}
        for modality, token_id in (("image", self.config.image_token_id), ("video", self.config.video_token_id)):
            encoded = (mm_encoder_outputs or {}).get(modality)
            if encoded is not None:
                mask = self._placeholder_mask(token_id, input_ids, inputs_embeds)
                if bool(mask.any()):
                    inputs_embeds, hidden[modality] = self._scatter(inputs_embeds, mask, encoded.pooler_output, modality)
                    used[modality] = encoded
            elif not torch.compiler.is_compiling() and _reads_the_prompt(kwargs):
                # A prompt's placeholders with nothing to fill them would make the model answer from the placeholder
                # embeddings. Later steps (one token, or several: assisted decoding's candidates) are text, even where
                # a generated token equals a placeholder id.
                self._check_no_placeholders(token_id, input_ids, inputs_embeds, modality)

        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2:
            # Positions count only attended tokens, so a padded sample sees the same positions as alone.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1] :]

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        output = PPLLaVAModelOutputWithPast(
            **outputs,
            image_hidden_states=hidden.get("image"),
            video_hidden_states=hidden.get("video"),
            image_outputs=used.get("image"),
            video_outputs=used.get("video"),
        )
        return output

    def _check_no_placeholders(
        self, token_id: int, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, modality: str
    ) -> None:
        count = int(self._placeholder_mask(token_id, input_ids, inputs_embeds).sum())
        if count:
            pixels = (
                "pixel_values_videos" if modality == "video"
                else "pixel_values (and image_sizes), or pixel_values_multi_image"
            )
            raise ValueError(
                f"The input has {count} {modality} placeholder tokens but no {modality} to fill them: pass {pixels} and "
                "clip_input_ids (the PPLLaVA processor returns them), or precomputed mm_encoder_outputs."
            )


def _encode_once_each(
    items: list[torch.Tensor], keys: torch.Tensor, encode, deduplicate: bool = True
) -> PPLLaVAVisualOutput:
    """Encode each distinct (pixels, key) item once and hand its tokens to every duplicate, in the original order
    (with `deduplicate=False`, encode every item: the output then keeps every field of `encode`'s)."""
    if not deduplicate:
        return encode(list(range(len(items))))
    representative = []
    for index, (item, key) in enumerate(zip(items, keys)):
        match = next(
            (
                earlier
                for earlier in dict.fromkeys(representative)
                if _same_pixels(items[earlier], item) and torch.equal(keys[earlier], key)
            ),
            index,
        )
        representative.append(match)
    unique = list(dict.fromkeys(representative))
    encoded = encode(unique)
    slot = [unique.index(item) for item in representative]
    return PPLLaVAVisualOutput(
        pooler_output=[encoded.pooler_output[i] for i in slot],
        relevance=[encoded.relevance[i] for i in slot],
    )


class _StreamedFeatures:
    """The selected features of a streamed video, encoded group by group on demand and dropped once behind: `frames`
    must be asked for in increasing order, and only the groups covering the last request stay in memory."""

    def __init__(self, model: "PPLLaVAModel", video):
        self.model, self.video = model, video
        self.pending = iter(model._stream_groups(video))
        self.held: list[tuple[int, torch.Tensor]] = []

    def frames(self, start: int, stop: int) -> torch.Tensor:
        """Features `(1, stop - start, rows, cols, dim)` of frames `start` to `stop - 1`."""
        self.held = [(first, features) for first, features in self.held if first + features.shape[1] > start]
        while not self.held or self.held[-1][0] + self.held[-1][1].shape[1] < stop:
            self.held.append(self.model._encode_streamed_group(self.video, next(self.pending)))
        first = self.held[0][0]
        window = self.held[0][1] if len(self.held) == 1 else torch.cat([features for _, features in self.held], dim=1)
        return window[:, start - first : stop - first]


def _window_log_normalisers(relevance: torch.Tensor, plan: PoolingPlan, temperature: float) -> torch.Tensor:
    """`logsumexp(relevance / temperature)` over each window of `plan`, `(batch, *output_size)` float32: the log of the
    softmax normaliser `prompt_guided_pool` divides each window by."""
    offsets = itertools.product(*(range(k) for k in plan.kernel))
    logits = torch.stack([_window_slice(relevance, offset, plan) for offset in offsets]).float() / temperature
    return torch.logsumexp(logits, dim=0)


class _FrameRange:
    """Frames `start` to `stop - 1` of a streamed video, read (and checked, and moved to the model's device) only when
    `encode_frames` slices them: the vision tower then holds the pixels of one `vision_chunk_frames` chunk at a time,
    even in a BT-Adapter segment longer than that."""

    def __init__(self, video, start: int, stop: int, model: "PPLLaVAModel"):
        self.video, self.start, self.stop, self.model = video, start, stop, model

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, frames: slice) -> torch.Tensor:
        first, last, _ = frames.indices(len(self))
        pixels = self.video[self.start + first : self.start + last]
        where = f"frames {self.start + first} to {self.start + last - 1} of a streamed video"
        check_pixel_values(pixels, where, self.model.config.vision_config.image_size)
        return pixels.to(self.model.vision_tower.device)


def is_streamed_video(item) -> bool:
    """Whether a video is a frame source read chunk by chunk (a `StreamedVideo`: it has a length and gives the pixels
    `(frames, 3, H, W)` of a slice of its frames) rather than a pixel tensor."""
    return not isinstance(item, (torch.Tensor, np.ndarray)) and hasattr(item, "__len__") and hasattr(item, "__getitem__")


def _same_pixels(first, second) -> bool:
    """Two pixel tensors holding the same values, or one streamed video twice."""
    if is_streamed_video(first) or is_streamed_video(second):
        return first is second
    return first.shape == second.shape and torch.equal(first, second)


def _multi_image_rows(
    multi_image: torch.Tensor | list[bool] | None, batch_size: int, has_images: bool, has_groups: bool, device: torch.device
) -> torch.Tensor:
    """`(batch,)` bools: which samples' image placeholders belong to a multi-image group (the others: anyres images)."""
    if multi_image is None:
        if has_images and has_groups:
            raise ValueError(
                "Both anyres images (pixel_values) and multi-image groups (pixel_values_multi_image) were given: pass "
                "multi_image (one bool per sample, which the PPLLaVA processor returns) to say which samples hold groups."
            )
        return torch.full((batch_size,), has_groups, dtype=torch.bool, device=device)
    rows = torch.as_tensor(multi_image, device=device).bool().flatten()
    if rows.shape[0] != batch_size:
        raise ValueError(f"multi_image has {rows.shape[0]} entries for a batch of {batch_size}: give one bool per sample.")
    return rows


def _in_placeholder_order(parts: list[tuple[torch.Tensor, PPLLaVAVisualOutput]]) -> PPLLaVAVisualOutput:
    """Visual items of one or more kinds (anyres images, multi-image groups), each kind with the batch row of every
    item, as one output whose tokens and relevance are in placeholder order: by row (a row holds one kind), then in the
    order given. One kind is returned as it is; of several, the vision tower's outputs (when asked for) are those of
    each kind in turn, anyres images first."""
    if len(parts) == 1:
        return parts[0][1]
    order = sorted(
        (row, kind, index) for kind, (rows, _) in enumerate(parts) for index, row in enumerate(rows.tolist())
    )
    encoded = [output for _, output in parts]
    tower = _join_vision_outputs(encoded) if all(output.last_hidden_state is not None for output in encoded) else {}
    return PPLLaVAVisualOutput(
        **tower,
        pooler_output=[encoded[kind].pooler_output[index] for _, kind, index in order],
        relevance=[encoded[kind].relevance[index] for _, kind, index in order],
    )


def _concatenate(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors joined along dim 0 (the tensor itself, not a copy, when there is one)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _concatenate_layers(outputs: list[ModelOutput], field: str) -> tuple[torch.Tensor, ...] | None:
    """The per-layer `field` (hidden states or attentions) of outputs over consecutive frames, joined frame-wise."""
    per_output = [getattr(output, field) for output in outputs]
    if not per_output or per_output[0] is None:
        return None
    return tuple(_concatenate(list(layer)) for layer in zip(*per_output))


def _join_vision_outputs(outputs: list[BaseModelOutput]) -> dict[str, torch.Tensor | tuple | None]:
    """Vision outputs of consecutive inputs as one: every field joined frame-wise."""
    return {
        "last_hidden_state": _concatenate([output.last_hidden_state for output in outputs]),
        "hidden_states": _concatenate_layers(outputs, "hidden_states"),
        "attentions": _concatenate_layers(outputs, "attentions"),
    }


class PPLLaVAForConditionalGeneration(PPLLaVAPreTrainedModel, GenerationMixin):
    """PPLLaVA with its LM head: video/image + text in, text out."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: PPLLaVAConfig):
        super().__init__(config)
        self.model = PPLLaVAModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        # Quantizers match these as paths from the root (`post_init` adds the child's names unprefixed, which match
        # nothing here): `model.` + the parts this layout has.
        self._keep_in_fp32_modules = [f"model.{name}" for name in self.model._keep_in_fp32_modules]
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    def get_video_features(self, pixel_values_videos, **kwargs) -> PPLLaVAVisualOutput | tuple:
        """See [`PPLLaVAModel.get_video_features`]."""
        return self.model.get_video_features(pixel_values_videos, **kwargs)

    def get_image_features(self, pixel_values, image_sizes, **kwargs) -> PPLLaVAVisualOutput | tuple:
        """See [`PPLLaVAModel.get_image_features`]."""
        return self.model.get_image_features(pixel_values, image_sizes, **kwargs)

    def get_multi_image_features(self, pixel_values_multi_image, **kwargs) -> PPLLaVAVisualOutput | tuple:
        """See [`PPLLaVAModel.get_multi_image_features`]."""
        return self.model.get_multi_image_features(pixel_values_multi_image, **kwargs)

    def get_video_relevance(self, pixel_values_videos, clip_input_ids, clip_attention_mask=None) -> list[torch.Tensor]:
        """See [`PPLLaVAModel.get_video_relevance`]."""
        return self.model.get_video_relevance(pixel_values_videos, clip_input_ids, clip_attention_mask)

    def encode_multimodal(self, **kwargs) -> dict[str, PPLLaVAVisualOutput]:
        """See [`PPLLaVAModel.encode_multimodal`]."""
        return self.model.encode_multimodal(**kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | list[torch.Tensor] | None = None,
        pixel_values_videos: torch.Tensor | list[torch.Tensor] | None = None,
        image_sizes: torch.LongTensor | None = None,
        clip_input_ids: torch.LongTensor | None = None,
        clip_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        max_visual_tokens: int | None = None,
        pixel_values_multi_image: torch.Tensor | list[torch.Tensor] | None = None,
        multi_image: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> PPLLaVACausalLMOutputWithPast | tuple:
        r"""
        clip_input_ids, clip_attention_mask (`torch.Tensor` of shape `(batch, prompt_length)`):
            One pooling prompt per sample (the processor returns them).
        labels (`torch.LongTensor` of shape `(batch, sequence)`, *optional*):
            Next-token targets; `-100` is ignored.
        mm_encoder_outputs (`dict`, *optional*):
            Precomputed visual tokens instead of pixels (see `encode_multimodal`).
        max_visual_tokens (`int`, *optional*):
            Token budget per video for this call.
        pixel_values_multi_image, multi_image (*optional*):
            Multi-image samples (the processor's `multi_image=True`); see [`PPLLaVAModel.forward`].
        kwargs:
            Passed to the language model (the KV cache included, under the installed transformers' name for it).

        Example:

        ```python
        >>> from transformers import AutoModelForImageTextToText, AutoProcessor
        >>> import ppllava_hf  # registers the PPLLaVA classes

        >>> model = AutoModelForImageTextToText.from_pretrained("path/to/ppllava")
        >>> processor = AutoProcessor.from_pretrained("path/to/ppllava")
        >>> messages = [{"role": "user", "content": [{"type": "video", "path": "clip.mp4"}, {"type": "text", "text": "What happens?"}]}]
        >>> inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        >>> output = model.generate(**inputs, max_new_tokens=64)
        >>> processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        ```"""
        if labels is not None:
            check_labels(labels, (input_ids if input_ids is not None else inputs_embeds).shape)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            image_sizes=image_sizes,
            clip_input_ids=clip_input_ids,
            clip_attention_mask=clip_attention_mask,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            mm_encoder_outputs=mm_encoder_outputs,
            max_visual_tokens=max_visual_tokens,
            pixel_values_multi_image=pixel_values_multi_image,
            multi_image=multi_image,
            return_dict=True,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        language_model_outputs = {key: value for key, value in outputs.items() if key != "last_hidden_state"}
        output = PPLLaVACausalLMOutputWithPast(loss=loss, logits=logits, **language_model_outputs)
        return output

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, **kwargs):
        """[`GenerationMixin.generate`], with every image and video encoded once, before decoding starts, and pooled by
        the prompt of the sample it belongs to (the placeholders in the input ids say which). Beams and
        `num_return_sequences` reuse those tokens instead of re-encoding the pixels."""
        visual_keys = (
            "pixel_values", "image_sizes", "pixel_values_videos", "pixel_values_multi_image", "multi_image",
            "clip_input_ids", "clip_attention_mask",
        )
        visual = {key: kwargs.pop(key, None) for key in visual_keys}
        max_visual_tokens = kwargs.pop("max_visual_tokens", None)
        if inputs is None and "input_ids" in kwargs:
            inputs = kwargs.pop("input_ids")
        check_attended_rows(kwargs.get("attention_mask"))
        inputs, kwargs = _move_right_padding_left(inputs, kwargs)
        if any(visual[key] is not None for key in ("pixel_values", "pixel_values_videos", "pixel_values_multi_image")):
            if kwargs.get("mm_encoder_outputs") is not None:
                raise ValueError("Pass either pixel inputs or mm_encoder_outputs to generate, not both.")
            kwargs["mm_encoder_outputs"] = self.model.encode_multimodal(
                input_ids=inputs, inputs_embeds=kwargs.get("inputs_embeds"), max_visual_tokens=max_visual_tokens,
                **visual,
            )
        return super().generate(inputs, **kwargs)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs) -> dict:
        """[`GenerationMixin.prepare_inputs_for_generation`], with the visual tokens handed to every forward that reads
        the whole prompt. transformers passes them only on the first iteration, but an assistant model's first call
        (assisted decoding) is not one, although it starts without a cache. A decoding step reads only new tokens,
        which carry no placeholders (a generated token that equals a placeholder id is text)."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        visual = kwargs.get("mm_encoder_outputs")
        window = model_inputs.get("input_ids")
        if visual and "mm_encoder_outputs" not in model_inputs and window is not None and window.shape == input_ids.shape:
            model_inputs["mm_encoder_outputs"] = visual
        return model_inputs

    # generate checks its keyword arguments against this method's signature: declare the inherited one, so the cache
    # keeps whichever name the installed transformers gives it (`past_key_values` up to 5.23, `cache` from 5.24).
    prepare_inputs_for_generation.__signature__ = inspect.signature(GenerationMixin.prepare_inputs_for_generation)


def _reads_the_prompt(language_model_kwargs: dict) -> bool:
    """Whether a forward starts the sequence: no KV cache, or an empty one, under either of its names."""
    cache = language_model_kwargs.get("cache", language_model_kwargs.get("past_key_values"))
    return cache is None or cache.get_seq_length() == 0


def _move_right_padding_left(input_ids: torch.Tensor | None, kwargs: dict) -> tuple[torch.Tensor | None, dict]:
    """Rotate each right-padded row so its padding comes first: decoding then continues from the last real token,
    and a right-padded batch generates what the same batch padded on the left does."""
    attention_mask = kwargs.get("attention_mask")
    if input_ids is None or attention_mask is None or attention_mask.ndim != 2 or not bool((attention_mask[:, -1] == 0).any()):
        return input_ids, kwargs
    if kwargs.get("position_ids") is not None or kwargs.get("inputs_embeds") is not None:
        raise ValueError(
            "Right-padded inputs with explicit position_ids or inputs_embeds cannot be re-padded: pad on the left "
            "(processor(..., padding_side='left')) for generation."
        )
    logger.warning_once("Right padding detected: moving it to the left for generation (the returned prompts are left-padded).")
    length = attention_mask.shape[1]
    trailing = (attention_mask.flip(-1).cumsum(-1) == 0).sum(-1, keepdim=True)
    order = (torch.arange(length, device=attention_mask.device) - trailing) % length
    kwargs = {**kwargs, "attention_mask": attention_mask.gather(1, order)}
    return input_ids.gather(1, order.to(input_ids.device)), kwargs


__all__ = ["PPLLaVAForConditionalGeneration", "PPLLaVAModel", "PPLLaVAPreTrainedModel"]
