"""Video DPO for PPLLaVA with trl's `DPOTrainer`: the preference-data format, a collator, and a thin trainer subclass.

Dataset format, one row per preference pair (a JSONL file loads with `datasets.load_dataset("json", ...)`):

    {"prompt": "What is the man doing?", "chosen": "He is slicing onions.", "rejected": "He is dancing.",
     "video": "clips/0001.mp4", "id": "0001"}

- `prompt`: the user's question (a string; any `<video>` in it is removed and the video is put before the question,
  as the original recipe does), or a conversation (a list of `{"role", "content"}` messages) whose content may hold a
  `{"type": "video"}` block where the video goes (else the video opens the first user turn).
- `chosen`, `rejected`: the preferred and the dispreferred answer, as strings or as one-message assistant lists.
- `video`: a file path (relative paths start at the trainer's `media_folder`), or `(T, H, W, 3)` uint8 frames.
- optional `pooling_prompt` (the text that guides the pooling; default: the text of the last user turn, i.e. the
  question, as the original recipe feeds its CLIP encoder), and `id` (used to name the row in messages).

The chat template of the processor renders the prompt and both answers (Vicuna v1 or ChatML, the answers closed by
their separator); chosen and rejected are scored as completions of the same prompt.

Usage (`examples/train_dpo.py` is the full script):

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16)
    processor = AutoProcessor.from_pretrained(path)
    args = PPLLaVADPOConfig("out", media_folder=videos, num_frames=32, freezing_preset="dpo", beta=0.1,
                            loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.0], learning_rate=5e-6)
    trainer = PPLLaVADPOTrainer(model, args=args, train_dataset=load_dataset("json", data_files=jsonl, split="train"),
                                processing_class=processor)
    trainer.train()
"""

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from transformers import PreTrainedModel
from trl import DPOConfig, DPOTrainer, apply_chat_template

from ..models.ppllava.processing_ppllava import PPLLaVAProcessor, last_user_text
from ..models.ppllava.video_decoding_ppllava import FrameSampling
from .common import PPLLaVAConfigMixin, PPLLaVATrainerMixin
from .rows import (
    BadRowError,
    VideoCheck,
    adds_special_tokens,
    chat_messages,
    check_batch_lengths,
    check_length,
    content_blocks,
    load_row_video,
    resolve_video,
    token_count,
    visual_tokens_added,
)


MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values_videos", "clip_input_ids", "clip_attention_mask")


@dataclass(frozen=True)
class PreferenceTexts:
    """A preference row rendered with the chat template: the prompt, both completions and the pooling prompt."""

    prompt: str
    chosen: str
    rejected: str
    pooling_prompt: str


def render_preference(row: dict[str, Any], processor: PPLLaVAProcessor) -> PreferenceTexts:
    """The chat-template texts of a preference row (see the module docstring for the row format)."""
    if row.get("video") is None:
        raise BadRowError("it has no video", kind="no video")
    prompt = _prompt_messages(row.get("prompt"))
    answers = {name: _answer(row.get(name), name) for name in ("chosen", "rejected")}
    texts = apply_chat_template({"prompt": prompt, **answers}, processor)
    pooling_prompt = row.get("pooling_prompt") or last_user_text(prompt) or processor.clean_prompt_text(texts["prompt"])
    if not pooling_prompt.strip():
        raise BadRowError(
            "its prompt has no text to guide the pooling; add a question or a pooling_prompt", kind="no prompt"
        )
    return PreferenceTexts(texts["prompt"], texts["chosen"], texts["rejected"], pooling_prompt)


def _prompt_messages(prompt: Any) -> list[dict]:
    """The prompt as chat messages with exactly one video block."""
    if isinstance(prompt, str):
        question = prompt.replace("<video>", "").replace("<image>", "").strip()
        return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    if not isinstance(prompt, list):
        raise BadRowError(f"its prompt must be a string or a list of messages, got {prompt!r}", kind="malformed")
    messages = chat_messages(prompt, "prompt messages")
    media = [block["type"] for message in messages for block in message["content"] if block["type"] != "text"]
    if media and media != ["video"]:
        raise BadRowError(
            f"its prompt has {media.count('video')} video and {media.count('image')} image blocks; a preference row "
            "has exactly one video", kind="media placeholders do not match",
        )
    if not media:
        first_user = next((message for message in messages if message["role"] == "user"), None)
        if first_user is None:
            raise BadRowError("its prompt has no user turn", kind="malformed")
        first_user["content"] = [{"type": "video"}, *first_user["content"]]
    return messages


def _answer(answer: Any, name: str) -> list[dict]:
    if isinstance(answer, str):
        return [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    if isinstance(answer, list) and len(answer) == 1 and answer[0].get("role") == "assistant":
        return [{"role": "assistant", "content": content_blocks(answer[0].get("content"))}]
    raise BadRowError(f"its {name} answer must be a string or one assistant message, got {answer!r}", kind="malformed")


def check_preference_row(
    row: dict[str, Any],
    processor: PPLLaVAProcessor,
    media_folder: str | None = None,
    max_length: int | None = None,
    video_check: VideoCheck = "open",
) -> None:
    """Raise `BadRowError` (or `VideoDecodingError`) if the row cannot be trained on: no or unreadable video, the same
    chosen and rejected answer, or longer than `max_length` with its visual tokens."""
    texts = render_preference(row, processor)
    if texts.chosen == texts.rejected:
        raise BadRowError("its chosen and rejected answers are the same", kind="chosen equals rejected")
    added = visual_tokens_added(processor, [resolve_video(row["video"], media_folder)], [], video_check)
    longer = max(token_count(processor, texts.prompt + completion) for completion in (texts.chosen, texts.rejected))
    check_length(longer + added, max_length)


@dataclass
class PPLLaVADPOConfig(PPLLaVAConfigMixin, DPOConfig):
    """trl's `DPOConfig` with PPLLaVA's options (`media_folder`, `num_frames`, `frame_sampling`, `on_bad_row`,
    `video_check`, `freezing_preset`; see `PPLLaVAConfigMixin`): the arguments of `PPLLaVADPOTrainer`."""


@dataclass
class PPLLaVAPreferenceCollator:
    """Batches preference rows for trl's `DPOTrainer`: the chosen sequences, then the rejected ones.

    Returns `input_ids`, `attention_mask`, `completion_mask` (what `DPOTrainer` scores), and the model's visual inputs
    `pixel_values_videos`, `clip_input_ids`, `clip_attention_mask` (`DPOTrainer` forwards every key it does not know to
    the policy and the reference model), plus `ref_chosen_logps` / `ref_rejected_logps` when the rows carry them
    (precomputed reference log-probs).

    Each video is decoded once and given to both rows of its pair, with the same pooling prompt: the two rows carry
    identical pixels and prompt ids, so the model encodes the video once for the pair. Sequences are right-padded and
    tokenized whole (prompt + answer), the completion starting where the tokenized prompt alone stops matching.
    Rows are never truncated; a row longer than `max_length` raises `BadRowError` (the trainer drops such rows first).
    `frame_sampling="random"` draws each video's frames afresh at every batch, as the original's DPO data does.
    """

    processor: PPLLaVAProcessor
    media_folder: str | None = None
    max_length: int | None = None
    frame_sampling: FrameSampling = "middle"

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        texts = [render_preference(example, self.processor) for example in examples]
        frames = [
            load_row_video(
                self.processor, resolve_video(example["video"], self.media_folder), example, self.frame_sampling
            )
            for example in examples
        ]
        sequences = [text.prompt + text.chosen for text in texts] + [text.prompt + text.rejected for text in texts]
        batch = self.processor(
            text=sequences,
            videos=frames + frames,
            pooling_prompt=[text.pooling_prompt for text in texts] * 2,
            padding=True,
            padding_side="right",
            add_special_tokens=adds_special_tokens(self.processor, sequences[0]),
            return_tensors="pt",
        )
        visual_extra = [self.processor.num_video_tokens(len(clip)) - 1 for clip in frames] * 2
        prompts = [text.prompt for text in texts] * 2
        completion_mask = torch.zeros_like(batch["attention_mask"])
        for row, (prompt, sequence, extra) in enumerate(zip(prompts, sequences, visual_extra)):
            completion_mask[row, self._prompt_length(prompt, sequence) + extra :] = 1
        completion_mask *= batch["attention_mask"]
        check_batch_lengths(batch["attention_mask"].sum(-1).view(2, -1).amax(0).tolist(), examples, self.max_length)

        output = {key: batch[key] for key in MODEL_INPUTS}
        output["completion_mask"] = completion_mask
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                output[key] = torch.tensor([example[key] for example in examples])
        return output

    def _prompt_length(self, prompt: str, sequence: str) -> int:
        """Tokens of the sequence that belong to the prompt (placeholders unexpanded): the tokenized prompt and the
        tokenized whole sequence agree up to there (a token straddling the boundary counts as completion)."""
        tokenize = partial(self.processor.tokenizer, add_special_tokens=adds_special_tokens(self.processor, sequence))
        return common_prefix_length(tokenize(prompt)["input_ids"], tokenize(sequence)["input_ids"])


def common_prefix_length(ids: Sequence[int], other_ids: Sequence[int]) -> int:
    """How many leading tokens the two sequences share."""
    return next((index for index, (a, b) in enumerate(zip(ids, other_ids)) if a != b), min(len(ids), len(other_ids)))


class PPLLaVADPOTrainer(PPLLaVATrainerMixin, DPOTrainer):
    """trl's `DPOTrainer` for PPLLaVA's video preference rows (format in the module docstring).

    Everything else is trl's: the losses (`loss_type=["sigmoid", "sft"]` with `loss_weights` for the original's SFT
    term), the fused LM head that calls `model.base_model(**batch)`, PEFT, DeepSpeed/FSDP, logging. The additions,
    set in `args` (a `PPLLaVADPOConfig`):

    - `media_folder`: where relative video paths start; `num_frames`: frames sampled per video, `frame_sampling`: the
      frame of each segment the collator decodes (`"random"`: the original's training sampler).
    - `on_bad_row` (`"skip"` or `"raise"`) and `video_check` (`"open"` or `"decode"`): what happens to rows with a
      missing or unreadable video, identical answers, or more than `args.max_length` tokens (see
      `ppllava_hf.training.rows`); skipped rows are listed in `trainer.skipped_rows`.
    - `freezing_preset` (`"dpo"` is the released recipe): which parts learn, applied before LoRA.
    - The reference model: with `ref_model=None`, no PEFT and no `precompute_ref_log_probs`, a frozen copy of `model`
      made before training (see `frozen_copy`). With PEFT the reference is the model with its adapters disabled
      (trl's); with `precompute_ref_log_probs=True` the initial model scores every row before training and the
      reference log-probs are read from the dataset, so no reference model is kept (trl's). Under DeepSpeed ZeRO-3
      pass a `ref_model` loaded with `from_pretrained`, or precompute.
    - The default collator is `PPLLaVAPreferenceCollator`.

    Pass the model loaded (`AutoModelForImageTextToText.from_pretrained`, after `import ppllava_hf`): trl loads a
    path through `config.auto_map`, which only folders saved with remote code have.
    """

    _tag_names = ["trl", "dpo", "ppllava"]

    def __init__(
        self,
        model: "str | PreTrainedModel",
        ref_model: PreTrainedModel | None = None,
        args: PPLLaVADPOConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: PPLLaVAProcessor | None = None,
        **kwargs,
    ):
        args = args if args is not None else PPLLaVADPOConfig("PPLLaVA-DPO")
        processing_class, train_dataset, eval_dataset = self._set_up_rows(
            model, args, PPLLaVADPOConfig, processing_class, check_preference_row, train_dataset, eval_dataset
        )
        # trl would rebuild the reference with `from_pretrained(model.config.name_or_path)`, which needs the folder
        # saved with an `auto_map` (PPLLaVA folders have one only when written with remote code) and an in-memory
        # model has no path; a copy of the policy as it is now is the reference by definition. (A `PeftModel` is no
        # `PreTrainedModel`: trl copies its adapter as the reference.)
        wants_copy = isinstance(model, PreTrainedModel) and kwargs.get("peft_config") is None
        if ref_model is None and wants_copy and not args.precompute_ref_log_probs:
            ref_model = frozen_copy(model)
        # Built here rather than by trl, which only knows image columns.
        if data_collator is None:
            data_collator = PPLLaVAPreferenceCollator(
                processing_class, args.media_folder, args.max_length, args.frame_sampling
            )
        super().__init__(
            model, ref_model, args, data_collator, train_dataset, eval_dataset, processing_class, **kwargs
        )

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # The one trl internal PPLLaVA training overrides: trl has no public switch to skip it. `DPOTrainer.__init__`
        # (and `evaluate`) call it for every dataset without an image column, and it tokenizes the rows as text (and
        # appends EOS to string answers); a `<video>` prompt cannot be tokenized without its video. The rows were
        # checked before trl's `__init__`, and the collator tokenizes them with their videos. Pinned by
        # `test_trl_prepares_preference_datasets_through_the_one_overridden_hook`.
        return dataset


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A copy of `model` in eval mode with every parameter frozen: the reference policy of preference training.

    A model whose parameters DeepSpeed ZeRO-3 has already partitioned cannot be copied; load the reference with
    `from_pretrained` instead, or precompute the reference log-probs.
    """
    if any(hasattr(param, "ds_id") for param in model.parameters()):
        raise ValueError(
            "The model's parameters are partitioned by DeepSpeed ZeRO-3 and cannot be copied into a reference model: "
            "pass ref_model=AutoModelForImageTextToText.from_pretrained(...), set precompute_ref_log_probs=True "
            "(--precompute_ref_log_probs True in examples/train_dpo.py), or train LoRA adapters (--use_peft), whose "
            "reference is the model with its adapters disabled."
        )
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


__all__ = [
    "PPLLaVADPOConfig",
    "PPLLaVADPOTrainer",
    "PPLLaVAPreferenceCollator",
    "PreferenceTexts",
    "check_preference_row",
    "frozen_copy",
    "render_preference",
]
