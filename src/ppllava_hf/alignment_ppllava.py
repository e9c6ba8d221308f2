"""Vision-prompt alignment: how relevant every visual patch is to the user's prompt, scored CLIP-style.

The prompt goes through a CLIP (or SigLIP) text encoder whose context is stretched beyond its pretrained length; every
patch goes through the vision tower's post-layernorm and visual projection; the scaled cosine similarities, softmaxed
over all patches of one sample, are the relevance weights that drive prompt-guided pooling.
"""

import math

import torch
from torch import nn
from transformers import CLIPTextModel, SiglipTextModel

from .configuration_ppllava import PPLLaVAConfig
from .transformers_internals_ppllava import SiglipMLP, replace_text_embeddings


# SigLIP's text tower is not in AutoModel's mapping, so the two supported prompt encoders are named here.
PROMPT_ENCODER_CLASSES = {"clip_text_model": CLIPTextModel, "siglip_text_model": SiglipTextModel}
# CLIP's and SigLIP's own initial temperature (log scale) and SigLIP's bias: what a fresh alignment starts from.
INITIAL_LOGIT_SCALE = {"clip_text_model": math.log(1 / 0.07), "siglip_text_model": math.log(10.0)}
INITIAL_SIGLIP_LOGIT_BIAS = -10.0


def stretch_position_embeddings(table: torch.Tensor, keep: int = 20, factor: int = 4) -> torch.Tensor:
    """Stretch a text position table the PPLLaVA way: keep the first `keep` rows, interpolate the rest `factor`x.

    Rows between consecutive kept positions are linear interpolations; the last `factor` rows extrapolate along the last
    difference. A 77-row CLIP table becomes 20 + 4 * 57 = 248 rows; a 64-row SigLIP table becomes 196.
    """
    length, dim = table.shape
    if not 0 < keep < length - 1:
        raise ValueError(f"keep={keep} must leave at least two positions of the {length}-row table to interpolate.")
    source = table.float()
    fractions = torch.arange(factor, dtype=torch.float32, device=table.device) / factor
    left, right = source[keep:-1, None], source[keep + 1 :, None]
    interpolated = left + fractions[:, None] * (right - left)
    extrapolated = source[-1] + fractions[:, None] * (source[-1] - source[-2])
    stretched = torch.cat([source[:keep], interpolated.reshape(-1, dim), extrapolated], dim=0)
    return stretched.to(table.dtype)


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

    def load_stretched_positions(self, table: torch.Tensor) -> None:
        """Start both tables from `table` (already stretched), as the original does when it extends a stock encoder."""
        with torch.no_grad():
            self.position_embedding_base.copy_(table)
            self.position_embedding_residual.copy_(table)

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
        # Stock CLIP/SigLIP text encoder, with PPLLaVA's extended position tables in place of its embeddings.
        self.text_model = PROMPT_ENCODER_CLASSES[prompt_config.model_type](prompt_config)
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
