"""BT-Adapter: a temporal branch beside the last layers of a CLIP vision tower.

The branch reads the CLIP layer outputs of a clip of frames, adds time embeddings, and alternates temporal attention
(each patch across frames) with spatial attention (each frame across patches). The hidden state the projector reads is
then the CLIP CLS of each frame followed by the average of the CLIP and branch patch tokens.

Token layout inside the branch: one shared CLS, then patches in (patch, frame) order, i.e. `(batch, 1 + P * T, dim)`.
"""

import math

import numpy as np
import torch
from torch import nn
from transformers import GradientCheckpointingLayer

from .transformers_internals_ppllava import CLIPMLP, CLIPAttention


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
