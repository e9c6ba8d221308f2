"""Processor of PPLLaVA: text, videos and images to the inputs of `PPLLaVAForConditionalGeneration`.

Besides the usual LLaVA work (expand each `<video>` / `<image>` placeholder to exactly as many tokens as the model will
scatter into it, tokenize, process pixels), it tokenizes one *pooling prompt* per sample with the prompt encoder's
tokenizer (CLIP or SigLIP): the text that guides which patches the model keeps when it pools the visual tokens.
"""

import glob
import itertools
import json
import os
import re
from collections.abc import Mapping

import numpy as np
import torch
from transformers import (
    BatchFeature,
    LlavaNextImageProcessorPil,
    PreTrainedTokenizerBase,
    ProcessingKwargs,
    ProcessorMixin,
    TextKwargs,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, make_flat_list_of_images
from transformers.processing_utils import ImagesKwargs, MultiModalData, Unpack
from transformers.utils import logging

from .configuration_ppllava import PPLLaVAConfig
from .token_counts_ppllava import num_image_tokens, num_multi_image_tokens, plan_video_pooling
from .transformers_internals_ppllava import VideoProcessorMixin
from .video_decoding_ppllava import sample_frame_indices
from .video_processing_ppllava import PPLLaVAVideoProcessor, PPLLaVAVideosKwargs, canonical_videos, one_per_item


logger = logging.get_logger(__name__)


# =====================================================================================================================
# Chat templates reproducing PPLLaVA's conversation formats (`ppllava/conversation/conv.py`).
#
# - `VICUNA_V1_CHAT_TEMPLATE` (`plain_v1`, Llama/Vicuna backbone): `USER: <video>\nQuestion? ASSISTANT: Answer</s>USER: ...`
# - `CHATML_CHAT_TEMPLATE` (`plain_qwen`, Qwen2 backbone):
#   `<|im_start|>user\n<video>\nQuestion?<|im_end|>\n<|im_start|>assistant\nAnswer<|im_end|>\n...`
#
# As in the original, a user turn lists its visual placeholders (one `<video>` / `<image>` per content block, in order),
# each followed by a newline, then its text (text blocks joined by newlines): `conv.py`'s `user_query(is_mm=True)` turns
# every placeholder of a query into `<image>\n` (the original writes `<image>` for videos too), which is how its
# multi-image data reads, `USER: <image>\n<image>\nQuestion`. A system message is its text followed by the user
# separator (`" "`, or `"<|im_end|>\n"` without an `<|im_start|>system` header, exactly as `conv.py` renders it). Every
# assistant turn ends with its separator (`</s>` / `<|im_end|>`): `conv.py` leaves it off a final assistant message only
# because at inference the prompt ends with the assistant role; its training data does append the EOS. The assistant
# text and separator are marked with `{% generation %}` for `return_assistant_tokens_mask=True`.


def _conversation_template(
    system_end: str, user_start: str, user_end: str, assistant_start: str, assistant_end: str, assistant_after: str
) -> str:
    """A Jinja chat template in PPLLaVA's layout with the given role markers (Jinja string-literal syntax)."""
    return (
        "{%- for message in messages -%}"
        "{%- set ns = namespace(media='', texts=[]) -%}"
        "{%- if message['content'] is string -%}{%- set ns.texts = [message['content']] -%}"
        "{%- else -%}{%- for block in message['content'] -%}"
        "{%- if block['type'] == 'video' -%}{%- set ns.media = ns.media + '<video>\\n' -%}"
        "{%- elif block['type'] == 'image' -%}{%- set ns.media = ns.media + '<image>\\n' -%}"
        "{%- elif block['type'] == 'text' -%}{%- set ns.texts = ns.texts + [block['text']] -%}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{%- set text = ns.texts | join('\\n') -%}"
        "{%- if message['role'] == 'system' -%}{{ text + '" + system_end + "' }}"
        "{%- elif message['role'] == 'user' -%}"
        "{{ '" + user_start + "' + ns.media + text + '" + user_end + "' }}"
        "{%- elif message['role'] == 'assistant' -%}{{ '" + assistant_start + "' }}"
        "{% generation %}{{ text + '" + assistant_end + "' }}{% endgeneration %}{{ '" + assistant_after + "' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '" + assistant_start + "' }}{%- endif -%}"
    )


VICUNA_V1_CHAT_TEMPLATE = _conversation_template(" ", "USER: ", " ", "ASSISTANT: ", "</s>", "")
CHATML_CHAT_TEMPLATE = _conversation_template(
    "<|im_end|>\\n", "<|im_start|>user\\n", "<|im_end|>\\n", "<|im_start|>assistant\\n", "<|im_end|>", "\\n"
)


def default_chat_template(text_model_type: str) -> str:
    """PPLLaVA's template for a language model type: ChatML for Qwen models, Vicuna v1 otherwise."""
    return CHATML_CHAT_TEMPLATE if text_model_type.startswith("qwen") else VICUNA_V1_CHAT_TEMPLATE


def _field(item, name: str):
    """A field of a chat message or content block, given as a dict or as an object with attributes (both of which
    `apply_chat_template` takes)."""
    return item.get(name) if isinstance(item, Mapping) else getattr(item, name, None)


def last_user_text(conversation: list) -> str:
    """Text of the last user turn of a conversation (text blocks joined by newlines), as the template renders it."""
    for message in reversed(conversation):
        if _field(message, "role") == "user":
            content = _field(message, "content") or []
            if isinstance(content, str):
                return content
            return "\n".join(_field(block, "text") for block in content if _field(block, "type") == "text")
    return ""


# =====================================================================================================================
# Processor


SIGLIP_MEAN_STD = (0.5, 0.5, 0.5)
# from_pretrained options that say where the files are, passed on to the config lookup.
_HUB_OPTIONS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
# Role markers of the chat templates, removed (with the special tokens) when the pooling prompt falls back to the text.
_TEMPLATE_MARKUP = re.compile(r"<\|im_start\|>(?:system|user|assistant)\n|\b(?:USER|ASSISTANT): ?")


class PPLLaVAImagesKwargs(ImagesKwargs, total=False):
    """
    multi_image (`bool` or `list[bool]`):
        PPLLaVA's multi-image mode, for every sample or one bool per text sample: the images of a multi-image sample
        are squashed to the vision tower's input (no anyres tiles) and encoded together, as the frames of one clip, and
        each `<image>` expands to `num_multi_image_tokens()` tokens (no `image_newline`). Their pixels go to
        `pixel_values_multi_image` (one `(images, 3, H, W)` tensor per multi-image sample), and `multi_image` (one bool
        per sample) tells the model which samples they are.
    """

    multi_image: bool | list[bool]


class PPLLaVATextKwargs(TextKwargs, total=False):
    """
    pooling_prompt (`str` or `list[str | None]`):
        The text that guides the pooling of each sample's videos and images: one per sample (`None` entries fall back to
        the defaults), or one string for every sample.
    chat_pooling_prompt (`list[str]`):
        Set by `apply_chat_template`: the last user turn of each conversation (used when `pooling_prompt` is not given).

    The processor takes both before tokenizing (they go to the prompt tokenizer, not to the LLM tokenizer); they are
    text options because every transformers release of the supported window accepts a processor's own options there.
    """

    pooling_prompt: str | list[str | None] | None
    chat_pooling_prompt: list[str] | None


class PPLLaVAProcessorKwargs(ProcessingKwargs, total=False):
    """
    The options of each modality: `pooling_prompt` in [`PPLLaVATextKwargs`], the video options `max_visual_tokens` and
    `add_timestamps` in [`PPLLaVAVideosKwargs`], `multi_image` in [`PPLLaVAImagesKwargs`].
    """

    text_kwargs: PPLLaVATextKwargs
    images_kwargs: PPLLaVAImagesKwargs
    videos_kwargs: PPLLaVAVideosKwargs

    # The defaults of each modality, in the one declaration every transformers release of the supported window reads
    # (a TypedDict does not inherit it, so it is declared here). Video metadata always: `add_timestamps` needs the frame
    # times (the outputs keep it only with `return_metadata=True`).
    _defaults = {
        "text_kwargs": {"padding": True, "return_tensors": "pt"},
        "images_kwargs": {"return_tensors": "pt"},
        "videos_kwargs": {"return_tensors": "pt", "return_metadata": True},
    }


class PPLLaVAProcessor(ProcessorMixin):
    r"""
    Builds PPLLaVA's inputs from text, videos and images.

    `processor(text=..., videos=..., images=...)` returns `input_ids`, `attention_mask`, `pixel_values_videos`,
    `clip_input_ids`, `clip_attention_mask` and, for images, `pixel_values`, `image_sizes` (for the images of
    `multi_image=True` samples, `pixel_values_multi_image` and `multi_image`): exactly the arguments of
    `PPLLaVAForConditionalGeneration.forward` / `generate` (with `return_metadata=True` also `video_metadata`, to pop
    before calling the model).

    Which text drives the pooling of a sample (its `clip_input_ids` row), in order of precedence:
    1. `pooling_prompt=` given to the call (a string per sample);
    2. with `apply_chat_template`, the text of the last user turn of the conversation (as the original's demo and
       evaluation feed the user's question), when that turn has text;
    3. the sample's text with its `<video>` / `<image>` placeholders, special tokens and `USER:` / `ASSISTANT:` /
       `<|im_start|>role` markers removed.
    The prompt is padded to `prompt_max_length` (248 for CLIP, 196 for SigLIP) and truncated beyond it with a warning.

    Args:
        image_processor: LLaVA-NeXT anyres image processor (tiles of the vision tower's input size).
        video_processor ([`PPLLaVAVideoProcessor`]): decodes, samples and normalises video frames.
        tokenizer: the LLM tokenizer; must know `<image>` and `<video>`.
        prompt_tokenizer: the tokenizer of the prompt encoder (CLIP or SigLIP text).
        chat_template (`str`, *optional*): Jinja template (the converter writes PPLLaVA's Vicuna or ChatML one).
        image_token, video_token (`str`): placeholder strings.
        patch_size (`int`): patch size of the vision tower; with the video processor's frame size it gives the patch grid.
        video_pooling_kernel, video_pooling_stride, video_pooling_output_size, image_pooling_kernel, image_pooling_stride,
        image_pooling_output_size, max_visual_tokens: the model's pooling settings (see [`PPLLaVAConfig`]); they fix how
            many tokens each placeholder expands to.
        prompt_max_length (`int`): length the pooling prompt is padded/truncated to (the prompt encoder's positions).
        mask_prompt_padding (`bool`): return the tokenizer's attention mask for the prompt (CLIP). `False` returns all
            ones, as SigLIP's prompt encoder was trained attending to its padding.

    Build one consistent with a model config with [`PPLLaVAProcessor.from_config`].
    """

    valid_processor_kwargs = PPLLaVAProcessorKwargs
    skip_tensor_conversion = [
        "video_metadata", "text_replacement_offsets", "pixel_values_videos", "pixel_values_multi_image"
    ]

    def __init__(
        self,
        image_processor=None,
        video_processor=None,
        tokenizer=None,
        prompt_tokenizer=None,
        chat_template=None,
        image_token="<image>",
        video_token="<video>",
        patch_size=14,
        video_pooling_kernel=(2, 3, 3),
        video_pooling_stride=(2, 3, 3),
        video_pooling_output_size=None,
        image_pooling_kernel=(1, 3, 3),
        image_pooling_stride=(1, 3, 3),
        image_pooling_output_size=None,
        max_visual_tokens=None,
        prompt_max_length=248,
        mask_prompt_padding=True,
        **kwargs,
    ):
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        self.video_token = getattr(tokenizer, "video_token", None) or video_token
        self.image_token_id = _placeholder_id(tokenizer, self.image_token)
        self.video_token_id = _placeholder_id(tokenizer, self.video_token)
        self.patch_size = patch_size
        self.video_pooling_kernel = _as_list(video_pooling_kernel)
        self.video_pooling_stride = _as_list(video_pooling_stride)
        self.video_pooling_output_size = _as_list(video_pooling_output_size)
        self.image_pooling_kernel = _as_list(image_pooling_kernel)
        self.image_pooling_stride = _as_list(image_pooling_stride)
        self.image_pooling_output_size = _as_list(image_pooling_output_size)
        self.max_visual_tokens = max_visual_tokens
        self.prompt_max_length = prompt_max_length
        self.mask_prompt_padding = mask_prompt_padding
        super().__init__(image_processor, video_processor, tokenizer, prompt_tokenizer, chat_template=chat_template, **kwargs)
        self._check_frame_sizes()

    @classmethod
    def from_config(
        cls,
        config: PPLLaVAConfig,
        tokenizer: PreTrainedTokenizerBase,
        prompt_tokenizer: PreTrainedTokenizerBase,
        chat_template: str | None = None,
        num_frames: int = 32,
        **kwargs,
    ) -> "PPLLaVAProcessor":
        """A processor whose frame size, pooling settings, prompt length and placeholder ids agree with `config`.

        CLIP towers get frames squashed to the input size with CLIP's mean/std, SigLIP towers letterboxed frames with
        mean/std 0.5 (as the original does for each); images use LLaVA-NeXT anyres tiling with `config.image_grid_pinpoints`.
        The chat template defaults to ChatML for Qwen language models and Vicuna v1 otherwise. Extra `kwargs` go to the
        processor (e.g. `max_visual_tokens`).
        """
        vision = config.vision_config
        is_siglip = vision.model_type == "siglip_vision_model"
        mean, std = (SIGLIP_MEAN_STD, SIGLIP_MEAN_STD) if is_siglip else (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        tile = vision.image_size
        video_processor = PPLLaVAVideoProcessor(
            size={"height": tile, "width": tile},
            resize_mode="letterbox" if is_siglip else "squash",
            image_mean=mean,
            image_std=std,
            num_frames=num_frames,
        )
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": tile},
            crop_size={"height": tile, "width": tile},
            image_grid_pinpoints=config.image_grid_pinpoints,
            image_mean=mean,
            image_std=std,
        )
        settings = {
            "patch_size": vision.patch_size,
            "video_pooling_kernel": config.video_pooling_kernel,
            "video_pooling_stride": config.video_pooling_stride,
            "video_pooling_output_size": config.video_pooling_output_size,
            "image_pooling_kernel": config.image_pooling_kernel,
            "image_pooling_stride": config.image_pooling_stride,
            "image_pooling_output_size": config.image_pooling_output_size,
            "max_visual_tokens": config.max_visual_tokens,
            "prompt_max_length": config.prompt_encoder_config.max_position_embeddings,
            "mask_prompt_padding": not is_siglip,
            **kwargs,
        }
        processor = cls(
            image_processor,
            video_processor,
            tokenizer,
            prompt_tokenizer,
            chat_template=chat_template or default_chat_template(config.text_config.model_type),
            **settings,
        )
        processor.check_config(config)
        return processor

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "PPLLaVAProcessor":
        """transformers' loading, then the checks that the parts of the folder belong together: the prompt tokenizer
        must not be the LLM tokenizer (transformers falls back to the root folder's tokenizer when the folder lacks
        its `prompt_tokenizer/`), and where the folder holds the model's config, `check_config` must pass. A local
        folder whose JSON files do not parse, or that has no LLM tokenizer, is refused first, naming the file."""
        _check_processor_folder(os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder") or ""))
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if processor.prompt_tokenizer.get_vocab() == processor.tokenizer.get_vocab():
            raise ValueError(
                f"The prompt tokenizer loaded from {pretrained_model_name_or_path!r} is the LLM tokenizer: the folder has "
                "no prompt_tokenizer/ subfolder. Save the processor with its prompt tokenizer (the CLIP/SigLIP "
                "tokenizer of the prompt encoder), or pass prompt_tokenizer=... to from_pretrained."
            )
        hub_options = {key: kwargs[key] for key in _HUB_OPTIONS if key in kwargs}
        try:
            config_dict, _ = PPLLaVAConfig.get_config_dict(pretrained_model_name_or_path, **hub_options)
        except OSError:
            config_dict = {}
        if config_dict.get("model_type") == PPLLaVAConfig.model_type:  # else a processor saved on its own
            processor.check_config(PPLLaVAConfig.from_dict(config_dict))
        return processor

    def check_config(self, config: PPLLaVAConfig) -> None:
        """Raise a `ValueError` naming every setting where this processor and `config` would disagree on token ids or
        counts."""
        problems = []
        if (self.image_token_id, self.video_token_id) != (config.image_token_id, config.video_token_id):
            problems.append(
                f"placeholder ids: tokenizer {self.image_token}={self.image_token_id}, {self.video_token}="
                f"{self.video_token_id}; config image_token_id={config.image_token_id}, video_token_id={config.video_token_id}"
            )
        if len(self.tokenizer) > config.text_config.vocab_size:
            problems.append(f"the tokenizer has {len(self.tokenizer)} tokens, the LLM {config.text_config.vocab_size}")
        problems += prompt_tokenizer_problems(self.prompt_tokenizer, config.prompt_encoder_config)
        if self.patch_grid != tuple(config.patch_grid):
            problems.append(f"patch grid {self.patch_grid} vs the vision tower's {tuple(config.patch_grid)}")
        if self.prompt_max_length > config.prompt_encoder_config.max_position_embeddings:
            problems.append(
                f"prompt_max_length={self.prompt_max_length} exceeds the prompt encoder's "
                f"{config.prompt_encoder_config.max_position_embeddings} positions"
            )
        for name in ("video_pooling_kernel", "video_pooling_stride", "video_pooling_output_size", "image_pooling_kernel",
                     "image_pooling_stride", "image_pooling_output_size"):
            if getattr(self, name) != getattr(config, name):
                problems.append(f"{name}: processor {getattr(self, name)}, config {getattr(config, name)}")
        if self.image_processor.image_grid_pinpoints != config.image_grid_pinpoints:
            problems.append("image_grid_pinpoints differ")
        if problems:
            raise ValueError("The processor does not match the model config: " + "; ".join(problems) + ". Build it with "
                             "PPLLaVAProcessor.from_config(config, tokenizer, prompt_tokenizer).")

    # ------------------------------------------------------------------------------------------------------------------
    # Token counts: the same shared functions as the model's placeholder check

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, columns) of patches per frame: the frame size over the patch size."""
        height, width = self.video_processor.frame_size
        return height // self.patch_size, width // self.patch_size

    def num_video_tokens(self, num_frames: int, max_visual_tokens: int | None = None) -> int:
        """Visual tokens the model produces for a `num_frames`-frame video (what its `<video>` expands to)."""
        budget = max_visual_tokens if max_visual_tokens is not None else self.max_visual_tokens
        return plan_video_pooling(
            num_frames, self.patch_grid, self.video_pooling_kernel, self.video_pooling_stride,
            self.video_pooling_output_size, budget,
        ).num_tokens

    def num_image_tokens(self, image_size: tuple[int, int]) -> int:
        """Visual tokens the model produces for an image of `image_size` (height, width)."""
        return num_image_tokens(
            image_size, self.image_processor.image_grid_pinpoints, self.image_processor.crop_size.height,
            self.patch_grid, self.image_pooling_kernel, self.image_pooling_stride, self.image_pooling_output_size,
        )

    def num_multi_image_tokens(self) -> int:
        """Visual tokens the model produces for each image of a multi-image sample (what each of its `<image>` expands to)."""
        return num_multi_image_tokens(
            self.patch_grid, self.image_pooling_kernel, self.image_pooling_stride, self.image_pooling_output_size
        )

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs) -> MultiModalData:
        """transformers' token-count hook, which serving engines (vLLM's Transformers backend) call before processing:
        how many tokens each image `(height, width)` and each video `(frames, height, width)` expands to under this
        call's options (`max_visual_tokens`, `multi_image`, and `num_frames` with `do_sample_frames=True`).

        The video counts are of `<video>` tokens only (not the sentence `add_timestamps` writes after them). Each image
        is one item of `pixel_values` (its anyres tiles stay together), so `num_image_patches` is 1 per image.
        """
        options = self._merge_kwargs(PPLLaVAProcessorKwargs, **kwargs)
        counts = {}
        if image_sizes is not None:
            multi_image = options["images_kwargs"].get("multi_image")
            if not isinstance(multi_image, (bool, type(None))):
                raise ValueError(
                    f"multi_image={multi_image!r}: token counts per image size take one bool for all the images, not one "
                    "per sample."
                )
            counts["num_image_tokens"] = [
                self.num_multi_image_tokens() if multi_image else self.num_image_tokens(tuple(int(v) for v in size))
                for size in image_sizes
            ]
            counts["num_image_patches"] = [1] * len(image_sizes)
        if video_sizes is not None:
            videos_kwargs = options["videos_kwargs"]
            counts["num_video_tokens"] = [
                self.num_video_tokens(self._sampled_frame_count(int(size[0]), videos_kwargs),
                                      videos_kwargs.get("max_visual_tokens"))
                for size in video_sizes
            ]
        return MultiModalData(**counts)

    def _sampled_frame_count(self, total_num_frames: int, videos_kwargs: dict) -> int:
        """Frames the video processor keeps of a `total_num_frames`-frame array: all of them, or with
        `do_sample_frames=True` those PPLLaVA's sampler picks (by `num_frames`; `fps` needs the video's own rate)."""
        if videos_kwargs.get("do_sample_frames") is not True:
            return total_num_frames
        num_frames = videos_kwargs.get("num_frames")
        fps = videos_kwargs.get("fps") if num_frames is None else None
        if num_frames is None and fps is None:
            num_frames, fps = self.video_processor.num_frames, self.video_processor.fps
        if fps is not None:
            raise ValueError(
                "Counting the tokens of a video sampled by fps needs the video's frame rate, which a (frames, height, "
                "width) size does not carry: pass num_frames=... instead, or count the frames the sampler keeps first."
            )
        max_frames = videos_kwargs.get("max_num_frames") or self.video_processor.max_num_frames
        return len(sample_frame_indices(total_num_frames, num_frames, max_frames=max_frames))

    # ------------------------------------------------------------------------------------------------------------------

    def __call__(self, images=None, text=None, videos=None, **kwargs: Unpack[PPLLaVAProcessorKwargs]) -> BatchFeature:
        """Model inputs for a batch of texts with their videos and images (placeholders in the text, in order).

        transformers' `ProcessorMixin.__call__` processes the media, expands the placeholders through
        `replace_image_token` / `replace_video_token` and tokenizes; the pooling prompts are added to its outputs.
        """
        texts = self._check_texts(text)
        prompts = self._pooling_prompts(
            texts, _pop_text_option(kwargs, "pooling_prompt"), _pop_text_option(kwargs, "chat_pooling_prompt")
        )
        if videos is not None:
            videos = canonical_videos(videos)
        if _holds_no_image(images):  # `images=[]` (a text-only sample) is no images, in any mode
            images = None
        if "add_timestamps" in kwargs:
            kwargs["add_timestamps"] = boolean_option(kwargs["add_timestamps"], "add_timestamps")
        flags = one_per_item(kwargs.pop("multi_image", False), len(texts), "multi_image", item="text sample")
        flags = [boolean_option(flag, "multi_image") for flag in flags]
        if any(flags):
            kwargs["multi_image"] = flags
            if images is not None:
                images = self._images_per_sample(texts, images)
        outputs = super().__call__(images=images, text=texts, videos=videos, **kwargs)
        outputs.update(self._encode_pooling_prompts(prompts, _tensor_type(outputs["input_ids"])))
        return outputs

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs) -> None:
        """transformers' checks, after PPLLaVA's own placeholder counts (which say where each input goes)."""
        images = make_flat_list_of_images(images) if images is not None else []
        self._check_placeholders(text, len(images), self.image_token, "image")
        self._check_placeholders(text, len(videos or []), self.video_token, "video")
        super().validate_inputs(images=images or None, text=text, videos=videos, audio=audio, **kwargs)

    def _images_per_sample(self, texts: list[str], images) -> list[list]:
        """The images as one list per text sample, by the sample's `<image>` count (unchanged when the counts disagree,
        which `validate_inputs` then reports)."""
        flat = make_flat_list_of_images(self.image_processor.fetch_images(images))
        counts = [sample.count(self.image_token) for sample in texts]
        if sum(counts) != len(flat):
            return images
        return [flat[start:stop] for start, stop in itertools.pairwise(np.cumsum([0, *counts]).tolist())]

    def _process_images(self, images, multi_image: list[bool] | None = None, **kwargs) -> tuple[dict, list[str]]:
        """Pixels and placeholder expansions of the images: anyres tiles through the image processor, and the images of
        multi-image samples squashed through the video processor, as the original reads a multi-image sample.

        `ProcessorMixin.__call__` calls this hook with the images (one list per sample here) and the image options;
        transformers' own processors override it for their own image layouts (GOT-OCR2's multi-page images, say).
        `test_transformers_contracts` pins the contract.
        """
        if not multi_image or not any(multi_image):
            return super()._process_images(images, **kwargs)
        if len(images) != len(multi_image):
            raise ValueError(f"multi_image has {len(multi_image)} entries for {len(images)} samples; give one per sample.")
        anyres = [image for sample, grouped in zip(images, multi_image) if not grouped for image in sample]
        processed = dict(self.image_processor(anyres, **kwargs)) if anyres else {}
        groups = [self._multi_image_pixels(sample) for sample, grouped in zip(images, multi_image) if grouped and sample]
        if kwargs.get("return_tensors") == "np":
            groups = [group.numpy() for group in groups]
        processed.update(pixel_values_multi_image=groups, multi_image=list(multi_image))
        grouped_expansion = self.image_token * self.num_multi_image_tokens()
        anyres_indices = iter(range(len(anyres)))
        replacements = [
            grouped_expansion if grouped else self.replace_image_token(processed, next(anyres_indices), **kwargs)
            for sample, grouped in zip(images, multi_image)
            for _ in sample
        ]
        return processed, replacements

    def _multi_image_pixels(self, images: list) -> torch.Tensor:
        """`(images, 3, H, W)`: each image resized to the frame size as the video processor resizes a frame."""
        return self.video_processor(videos=[[image] for image in images], return_tensors="pt")["pixel_values_videos"][:, 0]

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """An image's placeholder expanded to its number of visual tokens (anyres tiles, pooled and laid out)."""
        return self.image_token * self.num_image_tokens(tuple(int(v) for v in image_inputs["image_sizes"][image_idx]))

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        """A video's placeholder expanded to its number of pooled tokens (and, with `add_timestamps`, its frame times)."""
        frames = len(video_inputs["pixel_values_videos"][video_idx])
        expansion = self.video_token * self.num_video_tokens(frames, kwargs.get("max_visual_tokens"))
        if kwargs.get("add_timestamps"):
            expansion += _timestamps_sentence(video_inputs["video_metadata"][video_idx])
        return expansion

    def _check_texts(self, text) -> list[str]:
        if text is None:
            raise ValueError("PPLLaVAProcessor needs `text`: the prompt with a <video> / <image> placeholder per input.")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(sample, str) for sample in texts):
            raise ValueError("`text` must be a string or a non-empty list of strings.")
        for index, sample in enumerate(texts):
            if not sample.strip():
                raise ValueError(f"Text sample {index} is empty; give each sample a prompt.")
        return texts

    @staticmethod
    def _check_placeholders(texts: list[str], num_inputs: int, token: str, modality: str) -> None:
        counts = [sample.count(token) for sample in texts]
        if sum(counts) == num_inputs:
            return
        raise ValueError(
            f"Got {num_inputs} {modality}(s) but the text has {sum(counts)} {token} placeholder(s) (per sample: {counts}). "
            f"Put one {token} in the text where each {modality} goes, in the order the {modality}s are given "
            f"(apply_chat_template writes them from {{'type': '{modality}'}} content)."
        )

    def clean_prompt_text(self, text: str) -> str:
        """`text` without placeholders, special tokens and chat-template role markers: the fallback pooling prompt."""
        text = _TEMPLATE_MARKUP.sub(" ", text)
        specials = {token.content for token in self.tokenizer.added_tokens_decoder.values() if token.special}
        for token in sorted(specials | {self.image_token, self.video_token}, key=len, reverse=True):
            text = text.replace(token, " ")
        return " ".join(text.split())

    def _pooling_prompts(self, texts: list[str], explicit, from_chat) -> list[str]:
        explicit = one_per_item(explicit, len(texts), "pooling_prompt", item="text sample")
        from_chat = one_per_item(from_chat, len(texts), "chat_pooling_prompt", item="text sample")
        prompts = []
        for index, (text, given, chat) in enumerate(zip(texts, explicit, from_chat)):
            prompt = given if given is not None else chat if chat else self.clean_prompt_text(text)
            if not prompt.strip():
                raise ValueError(
                    f"Sample {index} has an empty pooling prompt (its text is only placeholders and markup): add a question "
                    "to the text, or pass pooling_prompt=... (e.g. 'Describe the video.')."
                )
            prompts.append(prompt)
        return prompts

    def _encode_pooling_prompts(self, prompts: list[str], return_tensors) -> dict:
        lengths = [len(ids) for ids in self.prompt_tokenizer(prompts)["input_ids"]]
        cut = [index for index, length in enumerate(lengths) if length > self.prompt_max_length]
        if cut:
            logger.warning(
                f"Pooling prompt(s) of sample(s) {cut} have {[lengths[i] for i in cut]} tokens; they are truncated to the "
                f"prompt encoder's {self.prompt_max_length} positions."
            )
        encoded = self.prompt_tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.prompt_max_length,
            return_attention_mask=True, return_tensors=return_tensors,
        )
        mask = encoded["attention_mask"]
        if not self.mask_prompt_padding:
            mask = torch.ones_like(mask) if isinstance(mask, torch.Tensor) else [[1] * len(row) for row in mask]
        return {"clip_input_ids": encoded["input_ids"], "clip_attention_mask": mask}

    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs):
        """transformers' `apply_chat_template`, with the text of each conversation's last user turn as its default
        pooling prompt (what the original's demo and evaluation feed the prompt encoder). `multi_image=True` (or one
        bool per conversation) processes the images of those conversations in multi-image mode."""
        conversations = conversation if conversation and isinstance(conversation[0], (list, tuple)) else [conversation]
        processor_kwargs = {"chat_pooling_prompt": [last_user_text(c) for c in conversations]}
        if "multi_image" in kwargs:  # a processor option; transformers would warn that it is no template variable
            processor_kwargs["multi_image"] = kwargs.pop("multi_image")
        processor_kwargs.update(kwargs.pop("processor_kwargs", None) or {})
        return super().apply_chat_template(conversation, chat_template, processor_kwargs=processor_kwargs, **kwargs)

    def check_argument_for_proper_class(self, argument_name, argument):
        # transformers resolves the expected class of each sub-processor by name through its Auto mappings, and without
        # torchvision (which PPLLaVA does not need) the video-processor mapping is a placeholder that cannot; the video
        # processor is checked directly instead.
        if argument_name == "video_processor":
            if not isinstance(argument, VideoProcessorMixin):
                raise TypeError(f"video_processor must be a VideoProcessorMixin, got {type(argument).__name__}.")
            return VideoProcessorMixin
        return super().check_argument_for_proper_class(argument_name, argument)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values_videos", "clip_input_ids", "clip_attention_mask",
                "pixel_values", "image_sizes", "pixel_values_multi_image", "multi_image"]

    def _check_frame_sizes(self) -> None:
        height, width = self.video_processor.frame_size
        crop = self.image_processor.crop_size
        if height != width or (crop.height, crop.width) != (height, width):
            raise ValueError(
                f"Video frames ({height}x{width}) and image tiles ({crop.height}x{crop.width}) must both be the vision "
                "tower's square input size."
            )


def prompt_tokenizer_problems(prompt_tokenizer: PreTrainedTokenizerBase, prompt_config) -> list[str]:
    """Why `prompt_tokenizer` cannot be the tokenizer of the prompt encoder `prompt_config` (CLIP or SigLIP text): ids
    beyond its embeddings, or for CLIP an end-of-text token other than the one its pooler reads the prompt at."""
    if len(prompt_tokenizer) > prompt_config.vocab_size:
        return [f"the prompt tokenizer has {len(prompt_tokenizer)} tokens, the prompt encoder {prompt_config.vocab_size}"]
    if prompt_config.model_type != "clip_text_model":
        return []
    # CLIP pools the prompt at its end-of-text token: the config's eos id, or with legacy configs (eos id 2, as in
    # OpenAI's) the highest id of the row, which CLIP's tokenizer gives its end-of-text token.
    expected = len(prompt_tokenizer) - 1 if prompt_config.eos_token_id == 2 else prompt_config.eos_token_id
    if prompt_tokenizer.eos_token_id == expected:
        return []
    return [
        f"the prompt tokenizer ends a prompt with id {prompt_tokenizer.eos_token_id}, but the CLIP prompt encoder pools "
        f"the prompt at id {expected} (is it the prompt encoder's tokenizer?)"
    ]


def boolean_option(value, name: str) -> bool:
    """An on/off option as a bool: `True` / `False` (numpy's too), or the strings "true" / "false" that YAML and command
    lines give (any case); anything else is refused, never read by truthiness ("false" would switch it on)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{name} must be True or False (or the string 'true' / 'false'), got {value!r}.")


def _holds_no_image(images) -> bool:
    """Whether `images` is an empty list, or a list of empty lists (a batch of text-only samples)."""
    return isinstance(images, (list, tuple)) and all(_holds_no_image(item) for item in images)


# Files of a saved processor that are JSON, and the files any one of which holds an LLM tokenizer.
_PROCESSOR_JSON_FILES = ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                         "prompt_tokenizer/tokenizer.json", "prompt_tokenizer/tokenizer_config.json")
_TOKENIZER_FILES = ("tokenizer.json", "*.model", "vocab.*", "*.tiktoken")


def _check_processor_folder(folder: str) -> None:
    """Refuse a local processor folder with a JSON file that does not parse (a bare `JSONDecodeError` otherwise), or
    without the LLM tokenizer (transformers' "Couldn't instantiate the backend tokenizer"), naming the file."""
    if not os.path.isdir(folder):
        return  # a Hub id: transformers downloads and reports
    folder = os.path.normpath(folder)
    for name in _PROCESSOR_JSON_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as handle:
                    json.load(handle)
            except (ValueError, UnicodeDecodeError) as error:
                message = f"{path} is not valid JSON ({error}); restore it, or save the processor again."
                raise ValueError(message) from None
    if not any(glob.glob(os.path.join(glob.escape(folder), pattern)) for pattern in _TOKENIZER_FILES):
        raise ValueError(
            f"{folder} has no LLM tokenizer (no {', '.join(_TOKENIZER_FILES)} file); copy the LLM's tokenizer files "
            "there, or save the processor again."
        )


def _pop_text_option(kwargs: dict, name: str):
    """Remove the text option `name` from a processor call's `kwargs`, given flat or in `text_kwargs`, and return it."""
    nested = dict(kwargs.get("text_kwargs") or {})
    value = nested.pop(name, None)
    if "text_kwargs" in kwargs:
        kwargs["text_kwargs"] = nested
    return kwargs.pop(name, value)


def _tensor_type(values) -> str | None:
    """The `return_tensors` value that gives `values`' type."""
    if isinstance(values, torch.Tensor):
        return "pt"
    return "np" if isinstance(values, np.ndarray) else None


def _placeholder_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(
            f"The tokenizer has no {token!r} token. Add it with tokenizer.add_special_tokens("
            f"{{'extra_special_tokens': [{token!r}]}}) and resize the model's embeddings."
        )
    return token_id


def _as_list(value) -> list[int] | None:
    return None if value is None else [int(v) for v in value]


def _timestamps_sentence(metadata) -> str:
    """The original's optional frame-time message, e.g. " The video contains 4 frames sampled at 0.5, 1.5 seconds."."""
    try:
        times = metadata.timestamps
    except ValueError:
        raise ValueError(
            "add_timestamps needs the frame rate of every video: pass files, or `video_metadata=[{'fps': ...}]` for "
            "frame arrays."
        ) from None
    return f" The video contains {len(times)} frames sampled at {', '.join(f'{t:.1f}' for t in times)} seconds."


__all__ = ["PPLLaVAProcessor"]
