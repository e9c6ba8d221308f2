"""Configuration of PPLLaVA: a LLaVA-style video LLM whose visual tokens are pooled under the guidance of the user's prompt."""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, PreTrainedConfig


VISION_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model")
PROMPT_ENCODER_MODEL_TYPES = ("clip_text_model", "siglip_text_model")
PROMPT_ENCODER_FOR_VISION = {"clip_vision_model": "clip_text_model", "siglip_vision_model": "siglip_text_model"}

# What each sub-config is built from when it is `None` (a dict without `model_type` takes the model type from here): the
# published layout, CLIP ViT-L/14-336, a Llama LLM and CLIP's text encoder with the context stretched to 248 positions.
SUB_CONFIG_DEFAULTS = {
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "projection_dim": 768,
    },
    "text_config": {"model_type": "llama"},
    "prompt_encoder_config": {
        "model_type": "clip_text_model",
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 248,
        "projection_dim": 768,
    },
}


@strict
class PPLLaVAConfig(PreTrainedConfig):
    r"""
    Configuration of [`PPLLaVAForConditionalGeneration`] and [`PPLLaVAModel`].

    PPLLaVA encodes frames with a vision tower (CLIP or SigLIP, optionally with a BT-Adapter temporal branch), scores
    every patch against the user's prompt with a CLIP/SigLIP text encoder whose context is stretched beyond 77 (64)
    positions, and pools the patches in 3-D windows weighted by that relevance before they reach the language model.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            The vision tower: `clip_vision_model` (CLIP ViT-L/14-336 by default) or `siglip_vision_model`.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            The language model: any causal LM that `AutoModelForCausalLM` builds (Llama by default, Qwen2, ...).
        prompt_encoder_config (`dict` or `PreTrainedConfig`, *optional*):
            The prompt text encoder used for vision-prompt alignment, of the vision tower's family (`clip_text_model` or
            `siglip_text_model`). Its `max_position_embeddings` is the extended context (248 for CLIP, 196 for SigLIP).
        prompt_keep_positions (`int`, *optional*, defaults to 20):
            Positions below this index use the frozen base position table, the others the trainable residual table.
        extended_prompt_positions (`bool`, *optional*, defaults to `True`):
            Give the prompt encoder PPLLaVA's two position tables (frozen base, trainable residual) of the stretched
            length. `False` keeps the text encoder's stock embeddings (one table of, e.g., CLIP's 77 positions), as the
            original does with `extend_clip: false`.
        freeze_prompt_encoder (`bool`, *optional*, defaults to `True`):
            Run the prompt text encoder without gradient (the original does so on its CLIP path).
        video_pooling_kernel, video_pooling_stride (`list[int]`, *optional*, defaults to `[2, 3, 3]`):
            Prompt-guided pooling window and stride over (frames, rows, columns) for videos.
        video_pooling_output_size (`list[int]`, *optional*):
            Pool videos to this (frames, rows, columns) grid instead; kernel and stride are then derived from it.
        image_pooling_kernel, image_pooling_stride (`list[int]`, *optional*, defaults to `[1, 3, 3]`):
            Window and stride for images, whose anyres tiles play the role of frames.
        image_pooling_output_size (`list[int]`, *optional*):
            Output (1, rows, columns) per image tile instead of kernel/stride.
        pooling_temperature (`float`, *optional*, defaults to 0.01):
            Temperature of the softmax that turns relevance weights into window weights.
        max_visual_tokens (`int`, *optional*):
            Default budget of visual tokens per video; longer videos get fewer, longer temporal windows that still cover
            every frame (see `plan_video_pooling`). `None` means no budget (the original behaviour).
        use_btadapter (`bool`, *optional*, defaults to `False`):
            Add the BT-Adapter temporal branch on the last `btadapter_depth` layers of a CLIP vision tower.
        btadapter_depth (`int`, *optional*, defaults to 4):
            Number of vision layers the BT-Adapter runs beside.
        btadapter_max_frames (`int`, *optional*, defaults to 64):
            Size of the BT-Adapter time-embedding table; longer clips run the branch on their own per balanced chunk
            of at most this many frames (see `btadapter_chunk_sizes`).
        btadapter_drop_path_rate (`float`, *optional*, defaults to 0.1):
            Stochastic-depth rate of the BT-Adapter in training (the original's schedule, inactive in eval).
        vision_chunk_frames (`int`, *optional*):
            Bound the working memory of long videos: the vision tower and the prompt alignment run over at most this
            many frames (or image tiles) at a time, the projector over at most this many frames or one pooling window.
            Only the selected vision features of all frames are kept. `None` processes each clip at once.
        vision_feature_layer (`int`, *optional*, defaults to -2):
            Index of the vision hidden state (input of layer k, or the final output for -1) fed to the projector.
        vision_feature_select_strategy (`str`, *optional*, defaults to `"default"`):
            `"default"` drops the CLS token, `"full"` keeps every token (SigLIP has no CLS).
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation between the two projector layers.
        multimodal_projector_bias (`bool`, *optional*, defaults to `True`):
            Whether the projector layers have biases.
        image_grid_pinpoints (`list[list[int]]`, *optional*):
            Candidate (height, width) resolutions for LLaVA-NeXT anyres tiling.
        image_token_id (`int`, *optional*, defaults to 32000), video_token_id (`int`, *optional*, defaults to 32001):
            Placeholder ids the processor expands to one id per visual token.
        ignore_index (`int`, *optional*, defaults to -100):
            Label value ignored by the loss.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the initialiser of the PPLLaVA-specific weights.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Whether the LM head shares the input embeddings.

    Example:

    ```python
    >>> from ppllava_hf import PPLLaVAConfig, PPLLaVAForConditionalGeneration

    >>> config = PPLLaVAConfig(use_btadapter=True)
    >>> model = PPLLaVAForConditionalGeneration(config)
    ```"""

    model_type = "ppllava"
    attribute_map = {"image_token_index": "image_token_id", "video_token_index": "video_token_id"}
    # transformers' public composite-config declaration: the attributes holding sub-configs, each resolved by AutoConfig
    # from its `model_type`. `__post_init__` builds them (from a dict, or from `SUB_CONFIG_DEFAULTS` when `None`).
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig, "prompt_encoder_config": AutoConfig}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    prompt_encoder_config: dict | PreTrainedConfig | None = None
    prompt_keep_positions: int = 20
    extended_prompt_positions: bool = True
    freeze_prompt_encoder: bool = True
    video_pooling_kernel: list[int] | None = None
    video_pooling_stride: list[int] | None = None
    video_pooling_output_size: list[int] | None = None
    image_pooling_kernel: list[int] | None = None
    image_pooling_stride: list[int] | None = None
    image_pooling_output_size: list[int] | None = None
    pooling_temperature: float = 0.01
    max_visual_tokens: int | None = None
    use_btadapter: bool = False
    btadapter_depth: int = 4
    btadapter_max_frames: int = 64
    btadapter_drop_path_rate: float = 0.1
    vision_chunk_frames: int | None = None
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    image_grid_pinpoints: list | None = None
    image_token_id: int = 32000
    video_token_id: int = 32001
    ignore_index: int = -100
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        for key in self.sub_configs:
            setattr(self, key, _sub_config(key, getattr(self, key)))
        super().__post_init__(**kwargs)
        self.video_pooling_kernel = _triple(self.video_pooling_kernel, default=(2, 3, 3))
        self.video_pooling_stride = _triple(self.video_pooling_stride, default=self.video_pooling_kernel)
        self.image_pooling_kernel = _triple(self.image_pooling_kernel, default=(1, 3, 3))
        self.image_pooling_stride = _triple(self.image_pooling_stride, default=self.image_pooling_kernel)
        self.video_pooling_output_size = _triple(self.video_pooling_output_size)
        self.image_pooling_output_size = _triple(self.image_pooling_output_size)
        if self.image_grid_pinpoints is None:
            tile = self.vision_config.image_size
            self.image_grid_pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile], [tile, 3 * tile]]
        else:
            self.image_grid_pinpoints = [[int(h), int(w)] for h, w in self.image_grid_pinpoints]
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        self._check_sub_model_types()
        self._check_pooling()
        self._check_btadapter()
        self._check_alignment_dims()
        self._check_vision_encoding()

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, columns) of patches the vision tower produces per frame."""
        side = self.vision_config.image_size // self.vision_config.patch_size
        return side, side

    def _check_sub_model_types(self):
        vision_type = self.vision_config.model_type
        if vision_type not in VISION_MODEL_TYPES:
            raise ValueError(
                f"vision_config.model_type={vision_type!r} is not supported; use one of {VISION_MODEL_TYPES} "
                "(PPLLaVA aligns patches with a CLIP or SigLIP text encoder)."
            )
        prompt_type = self.prompt_encoder_config.model_type
        if prompt_type not in PROMPT_ENCODER_MODEL_TYPES:
            raise ValueError(
                f"prompt_encoder_config.model_type={prompt_type!r} is not supported; use one of {PROMPT_ENCODER_MODEL_TYPES}."
            )
        if PROMPT_ENCODER_FOR_VISION[vision_type] != prompt_type:
            raise ValueError(
                f"The prompt encoder ({prompt_type}) must come from the vision tower's family ({vision_type}): use "
                f"prompt_encoder_config.model_type={PROMPT_ENCODER_FOR_VISION[vision_type]!r}."
            )
        if type(self.text_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise ValueError(
                f"text_config.model_type={self.text_config.model_type!r} has no causal LM in transformers; use a decoder "
                "such as 'llama' or 'qwen2'."
            )

    def _check_pooling(self):
        rows, cols = self.patch_grid
        for name in ("video", "image"):
            kernel = getattr(self, f"{name}_pooling_kernel")
            stride = getattr(self, f"{name}_pooling_stride")
            output_size = getattr(self, f"{name}_pooling_output_size")
            if min(kernel + stride) < 1:
                raise ValueError(f"{name}_pooling_kernel={kernel} and {name}_pooling_stride={stride} must be positive.")
            if output_size is not None:
                if not (1 <= output_size[1] <= rows and 1 <= output_size[2] <= cols and output_size[0] >= 1):
                    raise ValueError(
                        f"{name}_pooling_output_size={output_size} must be positive and at most the {rows}x{cols} patch grid."
                    )
                continue
            for axis, size in ((1, rows), (2, cols)):
                k, s = kernel[axis], stride[axis]
                if s > k or k > size or (size - k) % s:
                    raise ValueError(
                        f"{name}_pooling_kernel={kernel} / {name}_pooling_stride={stride} do not tile the {rows}x{cols} "
                        f"patch grid (image_size {self.vision_config.image_size} / patch_size "
                        f"{self.vision_config.patch_size}): along that axis (size - kernel) must be a multiple of the "
                        "stride, and stride <= kernel <= size. Pick e.g. kernel = stride = a divisor of the grid side, or "
                        f"set {name}_pooling_output_size."
                    )
        if self.image_pooling_kernel[0] != 1 or self.image_pooling_stride[0] != 1:
            raise ValueError(
                f"image_pooling_kernel/stride must be 1 along the first axis (each anyres tile is pooled on its own), "
                f"got {self.image_pooling_kernel} / {self.image_pooling_stride}."
            )
        if self.image_pooling_output_size is not None and self.image_pooling_output_size[0] != 1:
            raise ValueError(f"image_pooling_output_size must start with 1, got {self.image_pooling_output_size}.")
        if self.pooling_temperature <= 0:
            raise ValueError(f"pooling_temperature must be positive, got {self.pooling_temperature}.")
        if self.max_visual_tokens is not None and self.max_visual_tokens < 1:
            raise ValueError(f"max_visual_tokens must be positive or None, got {self.max_visual_tokens}.")

    def _check_btadapter(self):
        if not self.use_btadapter:
            return
        if self.vision_config.model_type != "clip_vision_model":
            raise ValueError("The BT-Adapter exists for CLIP vision towers only; set use_btadapter=False for SigLIP.")
        num_layers = self.vision_config.num_hidden_layers
        if not 1 <= self.btadapter_depth <= num_layers:
            raise ValueError(
                f"btadapter_depth={self.btadapter_depth} must be between 1 and the vision tower's {num_layers} layers."
            )
        if self.btadapter_max_frames < 1:
            raise ValueError(f"btadapter_max_frames must be positive, got {self.btadapter_max_frames}.")

    def _check_alignment_dims(self):
        prompt = self.prompt_encoder_config
        if prompt.model_type == "clip_text_model":
            prompt_dim, vision_dim = prompt.projection_dim, getattr(self.vision_config, "projection_dim", None)
            what = "prompt_encoder_config.projection_dim and vision_config.projection_dim"
        else:
            prompt_dim, vision_dim = prompt.projection_size, self.vision_config.hidden_size
            what = "prompt_encoder_config.projection_size and vision_config.hidden_size"
        if prompt_dim != vision_dim:
            raise ValueError(
                f"The prompt encoder and the vision tower cannot be aligned: {what} differ ({prompt_dim} vs {vision_dim}). "
                "Use the text and vision configs of the same CLIP/SigLIP checkpoint."
            )
        if self.extended_prompt_positions and not 0 < self.prompt_keep_positions < prompt.max_position_embeddings:
            raise ValueError(
                f"prompt_keep_positions={self.prompt_keep_positions} must be between 1 and the prompt encoder's "
                f"{prompt.max_position_embeddings} positions."
            )

    def _check_vision_encoding(self):
        num_states = self.vision_config.num_hidden_layers + 1
        if not -num_states <= self.vision_feature_layer < num_states:
            raise ValueError(
                f"vision_feature_layer={self.vision_feature_layer} is outside the vision tower's {num_states} hidden states."
            )
        if self.vision_chunk_frames is not None and self.vision_chunk_frames < 1:
            raise ValueError(f"vision_chunk_frames must be positive or None, got {self.vision_chunk_frames}.")


def _sub_config(key: str, value: dict | PreTrainedConfig | None) -> PreTrainedConfig:
    """The sub-config `key` as a config object: `value` itself, built from its dict (its `model_type`, else the
    default's), or the default layout when `None`."""
    if isinstance(value, PreTrainedConfig):
        return value
    fields = dict(SUB_CONFIG_DEFAULTS[key] if value is None else value)
    model_type = fields.pop("model_type", SUB_CONFIG_DEFAULTS[key]["model_type"])
    return AutoConfig.for_model(model_type, **fields)


def _triple(value, default=None) -> list[int] | None:
    """Normalise a (frames, rows, columns) size to a list of three ints."""
    if value is None:
        return None if default is None else [int(v) for v in default]
    if len(value) != 3:
        raise ValueError(f"Pooling sizes are (frames, rows, columns) triples, got {value}.")
    return [int(v) for v in value]


__all__ = ["PPLLaVAConfig"]
