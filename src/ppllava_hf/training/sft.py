"""Video (and image) SFT for PPLLaVA with trl's `SFTTrainer`: the conversation format, a collator that trains on the
assistant turns only, and a thin trainer subclass.

Dataset format, one conversation per row (a JSONL file loads with `datasets.load_dataset("json", ...)`):

    {"messages": [{"role": "user", "content": "What is the man doing?"},
                  {"role": "assistant", "content": "He is slicing onions."}],
     "video": "clips/0001.mp4", "id": "0001"}

- `messages`: `{"role": "system" | "user" | "assistant", "content": ...}` turns, the content a string or a list of
  blocks (`{"type": "text", "text": ...}`, `{"type": "video"}`, `{"type": "image"}`; a media block may carry its own
  `"path"`, or its frames / image under `"video"` / `"image"`). At least one assistant turn.
- `video` (one) or `videos` (a list), `image` / `images`: file paths (relative paths start at the trainer's
  `media_folder`) or decoded frames (`(T, H, W, 3)` uint8 per video, `(H, W, 3)` per image). They fill the media
  blocks that carry no path, in order; a conversation without media blocks gets them at the start of its first user
  turn (the original layout: `USER: <video>\\nQuestion ASSISTANT: ...`).
- optional `multi_image` (`true`: the row's images are one multi-image group, the original's "multi-image" media type:
  encoded together as the frames of one clip, each `<image>` on its own line; see the README's "Multi-image"), and
  optional `pooling_prompt` and `id`.

Labels: only the assistant turns (answer text and the separator that ends it, `</s>` / `<|im_end|>`) are learned; the
system text, user turns, role markers and visual tokens are `-100`, from the chat template's `{% generation %}`
markers. The original recipe masks the same parts.

Pooling prompt: by default the text of the last user turn (the question), as PPLLaVA is prompted at inference and in
DPO. The original SFT fed the whole templated conversation, answers included, to its CLIP text encoder instead
(truncated to its positions); `pooling_prompt_source="conversation"` does the same. The question stays the default
because it is the only text there is at inference: pooling under the answer teaches the alignment to select the patches
the answer names, guidance it then never gets. A `pooling_prompt` column chooses another text per row.

Usage (`examples/train_sft.py` is the full script):

    args = PPLLaVASFTConfig("out", media_folder=videos, num_frames=32, freezing_preset="sft", learning_rate=2e-5,
                            lr_scheduler_type="cosine")
    trainer = PPLLaVASFTTrainer(model, args=args, train_dataset=conversations, processing_class=processor)
    trainer.train()
"""

import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from trl import SFTConfig, SFTTrainer

from ..models.ppllava.processing_ppllava import PPLLaVAProcessor
from ..models.ppllava.video_decoding_ppllava import FrameSampling
from .common import PPLLaVAConfigMixin, PPLLaVATrainerMixin
from .rows import (
    BadRowError,
    VideoCheck,
    chat_messages,
    check_batch_lengths,
    check_length,
    load_row_video,
    resolve_image,
    resolve_video,
    token_count,
    visual_tokens_added,
)


_MEDIA = {"video": ("video", "videos", resolve_video), "image": ("image", "images", resolve_image)}


def conversation_with_media(row: dict[str, Any], media_folder: str | None = None) -> list[dict]:
    """The row's conversation as chat messages whose every video / image block holds its file path or frames (the
    form `processor.apply_chat_template(tokenize=True)` reads). Raises `BadRowError` for a malformed row."""
    messages = chat_messages(row.get("messages"))
    if not any(message["role"] == "assistant" for message in messages):
        raise BadRowError("its conversation has no assistant turn to learn from", kind="no assistant turn")
    for modality, (single, several, resolve) in _MEDIA.items():
        given = row.get(several) or ([row[single]] if row.get(single) is not None else [])
        if isinstance(given, (str, os.PathLike)):  # `images: "a.png"`: one path, not a list of characters
            given = [given]
        blocks = [block for message in messages for block in message["content"] if block["type"] == modality]
        if not blocks and given:
            first_user = next((message for message in messages if message["role"] == "user"), None)
            if first_user is None:
                raise BadRowError(f"it has {modality}s but no user turn to put them in", kind="malformed")
            blocks = [{"type": modality} for _ in given]
            first_user["content"] = [*blocks, *first_user["content"]]
        empty = [block for block in blocks if _payload(block, modality) is None]
        if len(empty) != len(given):
            raise BadRowError(
                f"it has {len(empty)} {modality} block(s) without a path but {len(given)} {modality}(s) in its "
                f"{single}/{several} column", kind="media placeholders do not match",
            )
        for block, value in zip(empty, given):
            block[modality] = value
        for block in blocks:
            value = _payload(block, modality)
            for key in ("path", "url"):
                block.pop(key, None)
            block[modality] = resolve(value, media_folder)
    return messages


def _payload(block: dict, modality: str) -> Any:
    """What a media block holds: frames or an image under its modality's key, or a `path` / `url`."""
    return next((block[key] for key in (modality, "path", "url") if key in block), None)


def _media(conversation: list[dict], modality: str) -> list[Any]:
    return [block[modality] for message in conversation for block in message["content"] if block["type"] == modality]


def check_conversation_row(
    row: dict[str, Any],
    processor: PPLLaVAProcessor,
    media_folder: str | None = None,
    max_length: int | None = None,
    video_check: VideoCheck = "open",
) -> None:
    """Raise `BadRowError` (or `VideoDecodingError`) if the row cannot be trained on: malformed, no assistant turn,
    missing or unreadable media, or longer than `max_length` with its visual tokens."""
    conversation = conversation_with_media(row, media_folder)
    multi_image = is_multi_image(row)
    text = processor.apply_chat_template(conversation, tokenize=False, multi_image=multi_image)
    videos, images = _media(conversation, "video"), _media(conversation, "image")
    added = visual_tokens_added(processor, videos, images, video_check, multi_image)
    check_length(token_count(processor, text) + added, max_length)


def is_multi_image(row: dict[str, Any]) -> bool:
    """The row's `multi_image` flag (absent: `False`); anything but a bool raises `BadRowError`."""
    flag = row.get("multi_image")
    if flag is None:
        return False
    if not isinstance(flag, bool):
        raise BadRowError(f"its multi_image must be true or false, got {flag!r}", kind="malformed")
    return flag


PoolingPromptSource = Literal["last_user_turn", "conversation"]
POOLING_PROMPT_SOURCES = ("last_user_turn", "conversation")


@dataclass
class PPLLaVASFTConfig(PPLLaVAConfigMixin, SFTConfig):
    """trl's `SFTConfig` with PPLLaVA's options (`media_folder`, `num_frames`, `frame_sampling`, `on_bad_row`,
    `video_check`, `freezing_preset`; see `PPLLaVAConfigMixin`) and `pooling_prompt_source`: the arguments of
    `PPLLaVASFTTrainer`."""

    pooling_prompt_source: PoolingPromptSource = field(
        default="last_user_turn",
        metadata={
            "help": "The text that guides the pooling of a row without a pooling_prompt column: its last user turn "
            "(what PPLLaVA is prompted with at inference) or its whole templated conversation (the original SFT's "
            "choice).",
            "choices": list(POOLING_PROMPT_SOURCES),
        },
    )

    def __post_init__(self):
        if self.pooling_prompt_source not in POOLING_PROMPT_SOURCES:
            raise ValueError(
                f"pooling_prompt_source must be one of {POOLING_PROMPT_SOURCES}, got {self.pooling_prompt_source!r}."
            )
        super().__post_init__()
        # trl tokenizes text datasets itself before training (it skips that only for datasets with an image column);
        # PPLLaVA rows are tokenized by the collator, with their media, so preparation is always skipped. (Set after
        # trl's own `__post_init__`, which parses `--dataset_kwargs` from JSON.)
        self.dataset_kwargs = {**(self.dataset_kwargs or {}), "skip_prepare_dataset": True}


@dataclass
class PPLLaVASFTCollator:
    """Batches conversations for trl's `SFTTrainer`: `input_ids`, `attention_mask`, `labels` (everything but the
    assistant turns is `-100`) and the model's visual inputs (`pixel_values_videos`, `clip_input_ids`,
    `clip_attention_mask`, `pixel_values` and `image_sizes` for anyres images, `pixel_values_multi_image` and
    `multi_image` for multi-image rows).

    Tokenizes with `processor.apply_chat_template(..., return_assistant_tokens_mask=True)`, exactly as at inference
    (the BOS included), right-padded. Videos are decoded one row at a time so that a file that fails names its row.
    Rows are never truncated; a row longer than `max_length` raises `BadRowError` (the trainer drops such rows first).
    `frame_sampling="random"` draws the frames afresh at every batch, and `pooling_prompt_source="conversation"` pools
    under the whole templated conversation, as the original's SFT does (see the module docstring).
    """

    processor: PPLLaVAProcessor
    media_folder: str | None = None
    max_length: int | None = None
    frame_sampling: FrameSampling = "middle"
    pooling_prompt_source: PoolingPromptSource = "last_user_turn"

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        conversations = [self._decoded(example) for example in examples]
        batch = self.processor.apply_chat_template(
            conversations,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            return_assistant_tokens_mask=True,
            multi_image=[is_multi_image(example) for example in examples],
            processor_kwargs={
                "padding": True,
                "padding_side": "right",
                "pooling_prompt": [
                    example.get("pooling_prompt") or self._default_pooling_prompt(conversation)
                    for example, conversation in zip(examples, conversations)
                ],
            },
        )
        assistant_masks = torch.as_tensor(batch.pop("assistant_masks"))
        batch["labels"] = batch["input_ids"].masked_fill((assistant_masks * batch["attention_mask"]) == 0, -100)
        check_batch_lengths(batch["attention_mask"].sum(-1).tolist(), examples, self.max_length)
        return dict(batch)

    def _default_pooling_prompt(self, conversation: list[dict]) -> str | None:
        """The whole templated conversation with `pooling_prompt_source="conversation"`, its placeholders written
        `<image>` as the original writes them for every medium; else `None`, the processor's last user turn."""
        if self.pooling_prompt_source == "last_user_turn":
            return None
        text = self.processor.apply_chat_template(conversation, tokenize=False)
        return text.replace(self.processor.video_token, self.processor.image_token)

    def _decoded(self, example: dict[str, Any]) -> list[dict]:
        """The row's conversation with its videos decoded to frames (the processor's sampling, `frame_sampling`)."""
        conversation = conversation_with_media(example, self.media_folder)
        for message in conversation:
            for block in message["content"]:
                if block["type"] == "video":
                    block["video"] = load_row_video(self.processor, block["video"], example, self.frame_sampling)
        return conversation


class PPLLaVASFTTrainer(PPLLaVATrainerMixin, SFTTrainer):
    """trl's `SFTTrainer` for PPLLaVA conversations with videos and images (format in the module docstring).

    The loss, PEFT, DeepSpeed/FSDP, logging are trl's. The additions, set in `args` (a `PPLLaVASFTConfig`):
    `media_folder` (where relative media paths start), `num_frames`, `frame_sampling`, `pooling_prompt_source`,
    `on_bad_row` / `video_check` (see `ppllava_hf.training.rows`; skipped rows are listed in `trainer.skipped_rows`),
    `freezing_preset` (`"sft"` is the released recipe); and the default collator `PPLLaVASFTCollator`, which trains on
    the assistant turns.
    """

    _tag_names = ["trl", "sft", "ppllava"]

    def __init__(
        self,
        model: Any,
        args: PPLLaVASFTConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: PPLLaVAProcessor | None = None,
        **kwargs,
    ):
        args = args if args is not None else PPLLaVASFTConfig("PPLLaVA-SFT")
        processing_class, train_dataset, eval_dataset = self._set_up_rows(
            model, args, PPLLaVASFTConfig, processing_class, check_conversation_row, train_dataset, eval_dataset
        )
        # Built here rather than by trl, which only knows image columns.
        if data_collator is None:
            data_collator = PPLLaVASFTCollator(
                processing_class, args.media_folder, args.max_length, args.frame_sampling, args.pooling_prompt_source
            )
        super().__init__(model, args, data_collator, train_dataset, eval_dataset, processing_class, **kwargs)


__all__ = [
    "POOLING_PROMPT_SOURCES",
    "PPLLaVASFTCollator",
    "PPLLaVASFTConfig",
    "PPLLaVASFTTrainer",
    "check_conversation_row",
    "conversation_with_media",
    "is_multi_image",
]
