"""PPLLaVA models: vision tower (+ BT-Adapter), vision-prompt alignment, prompt-guided pooling, projector and a causal LM."""

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
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
from transformers.utils import TransformersKwargs, logging

from .alignment_ppllava import INITIAL_SIGLIP_LOGIT_BIAS, PPLLaVAVisionPromptAlignment
from .anyres_ppllava import num_anyres_tiles, num_image_tokens, pack_image_tokens
from .btadapter_ppllava import PPLLaVABTAdapter, btadapter_chunk_sizes
from .configuration_ppllava import PPLLaVAConfig
from .pooling_ppllava import PoolingPlan, PPLLaVAPromptGuidedPooling, plan_image_pooling, plan_video_pooling
from .transformers_internals_ppllava import slice_logits_to_keep, vision_position_embeddings


logger = logging.get_logger(__name__)


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
    """

    image_hidden_states: torch.Tensor | None = None
    video_hidden_states: torch.Tensor | None = None


@dataclass
class PPLLaVACausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    transformers' causal-LM output (loss, logits, cache, hidden states, attentions), and:

    image_hidden_states, video_hidden_states (`torch.Tensor`, *optional*): the visual tokens that were scattered in.
    """

    image_hidden_states: torch.Tensor | None = None
    video_hidden_states: torch.Tensor | None = None


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

    def _return(self, output: ModelOutput, return_dict: bool | None) -> ModelOutput | tuple:
        """`output`, or its tuple form when `return_dict` (or, when not given, `config.return_dict`) is False."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, PPLLaVAModel):
            init.normal_(module.image_newline, mean=0.0, std=1 / math.sqrt(self.config.text_config.hidden_size))
        elif isinstance(module, PPLLaVAVisionPromptAlignment):
            embeddings = module.text_model.embeddings
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

    def __init__(self, config: PPLLaVAConfig):
        super().__init__(config)
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
        chunk = self.config.vision_chunk_frames or frames.shape[0]
        collected = {index: [] for index in state_indices}
        tower_outputs = []
        dtype = self.vision_tower.dtype
        for start in range(0, frames.shape[0], chunk):
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

    def _encoding_groups(self, clip_lengths: list[int], with_btadapter: bool) -> list[tuple[int, int, int]]:
        """`(first_frame, num_segments, segment_frames)` of each group of consecutive frames encoded together.

        With the BT-Adapter, a segment is one of the chunks `btadapter_chunk_sizes` splits a clip into (its temporal
        branch runs per segment) and a group stacks consecutive segments of equal length, up to `vision_chunk_frames`
        frames, into one adapter batch. Without it, a group is a single segment of at most `vision_chunk_frames` frames.
        Only one group's hidden states exist at a time.
        """
        total = sum(clip_lengths)
        limit = self.config.vision_chunk_frames or total
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
            states, outputs = self._run_vision_tower(
                frames[start:stop], state_indices, output_hidden_states, output_attentions
            )
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
                selected = group.new_empty((frames.shape[0], *group.shape[1:]))
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
        chunk = self.config.vision_chunk_frames
        output_frames_per_block = (
            plan.output_size[0] if chunk is None else max(1, (chunk - plan.kernel[0]) // plan.stride[0] + 1)
        )
        blocks = []
        for _, input_frames, block_plan in plan.temporal_blocks(output_frames_per_block):
            blocks.append(
                self.multi_modal_projector(
                    patches[:, input_frames], relevance[:, input_frames], block_plan.kernel, block_plan.stride
                )
            )
        return relevance[0], torch.cat(blocks, dim=1)[0]

    @staticmethod
    def _video_list(pixel_values_videos: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
        if isinstance(pixel_values_videos, torch.Tensor):
            if pixel_values_videos.ndim != 5:
                raise ValueError(
                    f"pixel_values_videos must be (videos, frames, 3, height, width), got shape {tuple(pixel_values_videos.shape)}."
                )
            return list(pixel_values_videos)
        return list(pixel_values_videos)

    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor | list[torch.Tensor],
        clip_input_ids: torch.LongTensor | None = None,
        clip_attention_mask: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        max_visual_tokens: int | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> PPLLaVAVisualOutput | tuple:
        r"""
        Pooled visual tokens of each video: vision tower (+ BT-Adapter), relevance to its prompt, prompt-guided pooling.

        pixel_values_videos (`torch.Tensor` of shape `(videos, frames, 3, height, width)`, or a list of `(frames, 3, H, W)`):
            The videos.
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
        videos = self._video_list(pixel_values_videos)
        prompts = self._prompts_for_items(len(videos), "video", clip_input_ids, clip_attention_mask, prompt_embeds)
        output_hidden_states, output_attentions = self._vision_output_flags(output_hidden_states, output_attentions)
        encoded, tokens, relevance = [], [], []
        for video, prompt in zip(videos, prompts):
            plan = self.video_pooling_plan(video.shape[0], max_visual_tokens)
            vision = self.encode_frames(video, [video.shape[0]], output_hidden_states, output_attentions)
            clip_relevance, pooled = self._pool_clip(vision.last_hidden_state, prompt, plan)
            encoded.append(vision)
            tokens.append(pooled.flatten(0, 2))
            relevance.append(clip_relevance)
        output = PPLLaVAVisualOutput(**_join_vision_outputs(encoded), pooler_output=tokens, relevance=relevance)
        return self._return(output, return_dict)

    def get_image_features(
        self,
        pixel_values: torch.Tensor | list[torch.Tensor],
        image_sizes: torch.Tensor,
        clip_input_ids: torch.LongTensor | None = None,
        clip_attention_mask: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
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
        sizes = [tuple(int(v) for v in size) for size in image_sizes]
        tile_counts = [num_anyres_tiles(size, config.image_grid_pinpoints, tile_size) for size in sizes]
        tiles = [image[:count] for image, count in zip(pixel_values, tile_counts)]
        prompts = self._prompts_for_items(len(tiles), "image", clip_input_ids, clip_attention_mask, prompt_embeds)
        output_hidden_states, output_attentions = self._vision_output_flags(output_hidden_states, output_attentions)
        vision = self.encode_frames(torch.cat(tiles), [1] * sum(tile_counts), output_hidden_states, output_attentions)
        tokens, relevance = [], []
        for image_features, size, prompt in zip(vision.last_hidden_state.split(tile_counts), sizes, prompts):
            plan = self.image_pooling_plan(image_features.shape[0])
            image_relevance, pooled = self._pool_clip(image_features, prompt, plan)
            newline = self.image_newline.to(pooled.device)
            tokens.append(pack_image_tokens(pooled, size, config.image_grid_pinpoints, tile_size, newline))
            relevance.append(image_relevance)
        output = PPLLaVAVisualOutput(**vision, pooler_output=tokens, relevance=relevance)
        return self._return(output, return_dict)

    def _vision_output_flags(self, output_hidden_states: bool | None, output_attentions: bool | None) -> tuple[bool, bool]:
        """The requested vision outputs, defaulting to the config's settings as transformers models do."""
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
        videos = self._video_list(pixel_values_videos)
        prompts = self._prompts_for_items(len(videos), "video", clip_input_ids, clip_attention_mask, None)
        return [
            self._relevance(self.encode_frames(video, [video.shape[0]]).last_hidden_state, prompt)[0]
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
    ) -> dict[str, PPLLaVAVisualOutput]:
        """Visual tokens of every image and video of a batch, each pooled by the prompt of the sample it belongs to.

        The owner of each image/video is read from the placeholders in `input_ids` (or `inputs_embeds`); the prompt
        encoder runs once per sample, and identical items with identical prompts (a preference pair's chosen and
        rejected rows, say) are encoded once. The result is what `forward(mm_encoder_outputs=...)` takes.
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
        prompt_keys = clip_input_ids if clip_attention_mask is None else torch.cat([clip_input_ids, clip_attention_mask], -1)
        outputs = {}
        if pixel_values is not None:
            if image_sizes is None:
                raise ValueError("Images need `image_sizes` (their original height and width); the processor returns them.")
            counts = [self.num_image_tokens(tuple(int(v) for v in size)) for size in image_sizes]
            mask = self._placeholder_mask(self.config.image_token_id, input_ids, inputs_embeds)
            rows = self._owner_rows(mask, counts, "image")
            keys = torch.cat([prompt_keys[rows], image_sizes.to(prompt_keys.device, prompt_keys.dtype)], -1)
            outputs["image"] = _encode_once_each(
                list(pixel_values),
                keys,
                lambda unique: self.get_image_features(
                    [pixel_values[i] for i in unique],
                    image_sizes[unique],
                    prompt_embeds=prompt_embeds[rows[unique]],
                    return_dict=True,
                ),
            )
        if pixel_values_videos is not None:
            videos = self._video_list(pixel_values_videos)
            counts = [self.video_pooling_plan(video.shape[0], max_visual_tokens).num_tokens for video in videos]
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
                ),
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
        return_dict: bool | None = None,
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
        kwargs:
            Passed to the language model, the KV cache included under the name the installed transformers gives it
            (`past_key_values` up to 5.23, `cache` from 5.24): PPLLaVA itself never reads the cache.

        The output's `last_hidden_state` is exactly as long as `input_ids`: the processor expanded every placeholder.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        has_pixels = pixel_values is not None or pixel_values_videos is not None
        if has_pixels and mm_encoder_outputs is not None:
            raise ValueError("Pass either pixel inputs or mm_encoder_outputs, not both.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if has_pixels:
            mm_encoder_outputs = self.encode_multimodal(
                input_ids, inputs_embeds, pixel_values, image_sizes, pixel_values_videos,
                clip_input_ids, clip_attention_mask, max_visual_tokens,
            )
        hidden = {}
        for modality, token_id in (("image", self.config.image_token_id), ("video", self.config.video_token_id)):
            encoded = (mm_encoder_outputs or {}).get(modality)
            if encoded is not None:
                mask = self._placeholder_mask(token_id, input_ids, inputs_embeds)
                if bool(mask.any()):
                    inputs_embeds, hidden[modality] = self._scatter(inputs_embeds, mask, encoded.pooler_output, modality)
            elif inputs_embeds.shape[1] > 1 and not torch.compiler.is_compiling():
                # Decoding steps carry no placeholders; a prompt's placeholders with nothing to fill them would make
                # the model answer from the placeholder embeddings.
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
            **outputs, image_hidden_states=hidden.get("image"), video_hidden_states=hidden.get("video")
        )
        return self._return(output, return_dict)

    def _check_no_placeholders(
        self, token_id: int, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, modality: str
    ) -> None:
        count = int(self._placeholder_mask(token_id, input_ids, inputs_embeds).sum())
        if count:
            pixels = "pixel_values_videos" if modality == "video" else "pixel_values (and image_sizes)"
            raise ValueError(
                f"The input has {count} {modality} placeholder tokens but no {modality} to fill them: pass {pixels} and "
                "clip_input_ids (the PPLLaVA processor returns them), or precomputed mm_encoder_outputs."
            )


def _encode_once_each(items: list[torch.Tensor], keys: torch.Tensor, encode) -> PPLLaVAVisualOutput:
    """Encode each distinct (pixels, key) item once and hand its tokens to every duplicate, in the original order."""
    representative = []
    for index, (item, key) in enumerate(zip(items, keys)):
        match = next(
            (
                earlier
                for earlier in dict.fromkeys(representative)
                if items[earlier].shape == item.shape and torch.equal(keys[earlier], key) and torch.equal(items[earlier], item)
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

    def get_video_relevance(self, pixel_values_videos, clip_input_ids, clip_attention_mask=None) -> list[torch.Tensor]:
        """See [`PPLLaVAModel.get_video_relevance`]."""
        return self.model.get_video_relevance(pixel_values_videos, clip_input_ids, clip_attention_mask)

    def encode_multimodal(self, **kwargs) -> dict[str, PPLLaVAVisualOutput]:
        """See [`PPLLaVAModel.encode_multimodal`]."""
        return self.model.encode_multimodal(**kwargs)

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
        return_dict: bool | None = None,
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
        return self._return(output, return_dict)

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, **kwargs):
        """[`GenerationMixin.generate`], with every image and video encoded once, before decoding starts, and pooled by
        the prompt of the sample it belongs to (the placeholders in the input ids say which). Beams and
        `num_return_sequences` reuse those tokens instead of re-encoding the pixels."""
        visual_keys = ("pixel_values", "image_sizes", "pixel_values_videos", "clip_input_ids", "clip_attention_mask")
        visual = {key: kwargs.pop(key, None) for key in visual_keys}
        max_visual_tokens = kwargs.pop("max_visual_tokens", None)
        if inputs is None and "input_ids" in kwargs:
            inputs = kwargs.pop("input_ids")
        inputs, kwargs = _move_right_padding_left(inputs, kwargs)
        if visual["pixel_values"] is not None or visual["pixel_values_videos"] is not None:
            if kwargs.get("mm_encoder_outputs") is not None:
                raise ValueError("Pass either pixel inputs or mm_encoder_outputs to generate, not both.")
            kwargs["mm_encoder_outputs"] = self.model.encode_multimodal(
                input_ids=inputs, inputs_embeds=kwargs.get("inputs_embeds"), max_visual_tokens=max_visual_tokens,
                **visual,
            )
        return super().generate(inputs, **kwargs)


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
