"""What PPLLaVA's DPO and SFT training share: the options both trainer configs add to trl's, what both trainers do
before trl's `__init__` runs (frames, freezing preset, row checks), LoRA on the language model only, and saving a
trained model as a folder that loads with the Auto classes."""

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import transformers
from accelerate.utils import is_peft_model
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
    ProcessorMixin,
    Trainer,
    TrainingArguments,
)
from trl import ModelConfig, get_peft_config

from ..models.ppllava.video_decoding_ppllava import FRAME_SAMPLINGS, FrameSampling
from .freezing import FREEZING_PRESETS, apply_freezing_preset, check_freezing_preset
from .rows import BadRowPolicy, RowChecker, SkippedRow, VideoCheck, check_options


if TYPE_CHECKING:
    import torch
    from peft import LoraConfig


# The oldest transformers the trainers run on (setup.cfg's train extra asks for it): 5.23 renamed TrainingArguments'
# `gradient_checkpointing` to `activation_checkpointing`, the name the configs set (the old one warns from 5.23 on).
TRAINING_TRANSFORMERS = "5.23"


def training_arguments_supported() -> bool:
    """Whether the installed transformers' `TrainingArguments` has what PPLLaVA's training configs set."""
    return "activation_checkpointing" in {option.name for option in dataclasses.fields(TrainingArguments)}


LANGUAGE_MODEL_LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_FOLDER = "adapter"


@dataclass
class PPLLaVAConfigMixin:
    """The options PPLLaVA's trainers add to trl's configs, mixed into `PPLLaVADPOConfig` and `PPLLaVASFTConfig` (before
    the trl config among the bases). Every field is a command-line flag through trl's `TrlParser`."""

    media_folder: str | None = field(
        default=None, metadata={"help": "Folder that relative video and image paths in the rows start from."}
    )
    num_frames: int | None = field(
        default=None,
        metadata={
            "help": "Frames the processor samples per video (the released recipes: 32); the trainer sets it on its "
            "processor. Unset: the processor's own sampling."
        },
    )
    on_bad_row: BadRowPolicy = field(
        default="skip",
        metadata={
            "help": "Rows with unreadable media, too long, or nothing to learn: skip them (with a count) or raise."
        },
    )
    video_check: VideoCheck = field(
        default="open",
        metadata={
            "help": "Check videos before training by reading their headers (open) or by decoding them (decode)."
        },
    )
    frame_sampling: FrameSampling = field(
        default="middle",
        metadata={
            "help": "Which frame of each of the num_frames segments the collators decode: its middle (PPLLaVA's "
            "inference rule) or a random one, drawn afresh each epoch (the original's training sampler, which the "
            "released recipes used). The saved processor keeps sampling the middle.",
            "choices": list(FRAME_SAMPLINGS),
        },
    )
    freezing_preset: str | None = field(
        default=None,
        metadata={
            "help": "Which parts learn, set by the trainer before it adds LoRA (under --use_peft only the adapters "
            "learn). Unset: the model's requires_grad as given.",
            "choices": list(FREEZING_PRESETS),
        },
    )
    # trl's default (True) makes `Trainer` drop every column but trl's tokenized ones before batching.
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Stays False: the PPLLaVA collators read the raw rows (prompts, media paths, ids)."},
    )

    def __post_init__(self):
        check_options(self.on_bad_row, self.video_check)
        if self.frame_sampling not in FRAME_SAMPLINGS:
            raise ValueError(f"frame_sampling must be one of {FRAME_SAMPLINGS}, got {self.frame_sampling!r}.")
        if self.freezing_preset is not None:
            check_freezing_preset(self.freezing_preset)
        if self.remove_unused_columns:
            raise ValueError(
                "remove_unused_columns=True would drop the raw columns (prompts, media paths) the PPLLaVA collators "
                "read; leave it False."
            )
        if not training_arguments_supported():
            raise ImportError(
                f"PPLLaVA's training configs need transformers>={TRAINING_TRANSFORMERS} (its TrainingArguments has "
                f"`activation_checkpointing`); you have {transformers.__version__}: pip install 'ppllava_hf[train]'."
            )
        # trl's configs set the deprecated `gradient_checkpointing` (to True), so transformers (>= 5.23) warns unless
        # `activation_checkpointing`, the name it prefers, is set: carry the value over to that name.
        if self.activation_checkpointing is None:
            self.activation_checkpointing = self.gradient_checkpointing
        super().__post_init__()


class PPLLaVATrainerMixin:
    """What both PPLLaVA trainers do before trl's `__init__`, which prepares the datasets: set the config's
    `num_frames` on the processor, apply its `freezing_preset`, and check every row (`self.row_checker`,
    `self.skipped_rows`). Datasets given to `evaluate` are checked the same way."""

    def _set_up_rows(
        self,
        model: "str | PreTrainedModel",
        args: PPLLaVAConfigMixin,
        config_class: type[PPLLaVAConfigMixin],
        processing_class: ProcessorMixin | None,
        check_row: Callable[..., None],
        train_dataset: Any,
        eval_dataset: Any,
    ) -> tuple[ProcessorMixin, Any, Any]:
        """Returns the processor (the model's own when none is given) and the checked train and eval datasets."""
        if not isinstance(args, config_class):
            raise TypeError(
                f"{type(self).__name__} takes a {config_class.__name__} as args (trl's config with PPLLaVA's options: "
                f"media_folder, num_frames, frame_sampling, on_bad_row, video_check, freezing_preset), got "
                f"{type(args).__name__}."
            )
        if processing_class is None:
            processing_class = default_processor(model)
        if args.num_frames is not None:
            processing_class.video_processor.num_frames, processing_class.video_processor.fps = args.num_frames, None
        if args.freezing_preset is not None:
            if isinstance(model, str) or is_peft_model(model):
                raise ValueError(
                    f"freezing_preset={args.freezing_preset!r} applies to the PPLLaVA model itself, before LoRA: pass "
                    "the model loaded with AutoModelForImageTextToText.from_pretrained (and LoRA as peft_config), or "
                    "leave freezing_preset unset."
                )
            apply_freezing_preset(model, args.freezing_preset)
        self.row_checker = RowChecker(check_row, processing_class, args.media_folder, args.on_bad_row, args.video_check)
        train_dataset = self._checked(train_dataset, "train", args)
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: self._checked(dataset, name, args) for name, dataset in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = self._checked(eval_dataset, "eval", args)
        return processing_class, train_dataset, eval_dataset

    def _checked(self, dataset: Any, name: str, args: PPLLaVAConfigMixin) -> Any:
        return self.row_checker(dataset, name, args.max_length, args.dataset_num_proc)

    @property
    def skipped_rows(self) -> list[SkippedRow]:
        """The rows left out of training (and evaluation), with the reason for each."""
        return self.row_checker.skipped

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"):
        """trl's `evaluate`, the rows of a dataset given here checked first (a dict is evaluated split by split, its
        metrics prefixed `<metric_key_prefix>_<split>` as `Trainer` does)."""
        if isinstance(eval_dataset, dict):
            metrics = {}
            for name, dataset in eval_dataset.items():
                metrics.update(self.evaluate(dataset, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            eval_dataset = self._checked(eval_dataset, metric_key_prefix, self.args)
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)


def default_processor(model: "str | PreTrainedModel") -> ProcessorMixin:
    """The processor saved with `model` (a folder or Hub id, or a model loaded from one): what trl loads when a trainer
    gets no `processing_class`. The PPLLaVA trainers need it before trl's own `__init__` runs, to build their collator
    and check the rows."""
    path = model if isinstance(model, str) else model.config.name_or_path
    if not path:
        raise ValueError(
            f"The {type(model).__name__} was not loaded from a folder or the Hub, so there is no processor saved with "
            "it: pass processing_class=AutoProcessor.from_pretrained(...)."
        )
    return AutoProcessor.from_pretrained(path)


def language_model_lora_targets(layers: tuple[str, ...] = LANGUAGE_MODEL_LINEAR_LAYERS) -> str:
    """peft `target_modules` (a regular expression on module names) selecting the given linear layers of the language
    model only: not `lm_head` (trl's fused LM head reads its weight directly, so an adapter there would never train),
    not the vision tower, BT-Adapter, prompt encoder or projector. The default layers are those of Llama and Qwen2."""
    return rf"model\.language_model\..*\.({'|'.join(layers)})"


def language_model_lora_config(
    r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.05, **kwargs
) -> "LoraConfig":
    """A peft `LoraConfig` adapting the linear layers of PPLLaVA's language model (see `language_model_lora_targets`);
    other `LoraConfig` arguments pass through."""
    from peft import LoraConfig

    kwargs.setdefault("target_modules", language_model_lora_targets())
    kwargs.setdefault("task_type", "CAUSAL_LM")
    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, **kwargs)


def language_model_peft_config(model_args: ModelConfig) -> "LoraConfig | None":
    """trl's `get_peft_config(model_args)` (None without `--use_peft`), its LoRA targets defaulting to the language
    model's linear layers (`language_model_lora_targets`) when `--lora_target_modules` is not given."""
    if model_args.use_peft and not model_args.lora_target_modules:
        model_args = dataclasses.replace(model_args, lora_target_modules=language_model_lora_targets())
    return get_peft_config(model_args)


def save_trained_model(trainer: Trainer) -> PreTrainedModel:
    """Save what a finished PPLLaVA training run produced into `trainer.args.output_dir`.

    - `trainer_state.json` (with the log history), via `trainer.save_state()`;
    - the model and its processor: a folder that `AutoModelForImageTextToText` and `AutoProcessor` load (after
      `import ppllava_hf`), written by `trainer.save_model()` (which gathers DeepSpeed / FSDP shards);
    - with LoRA, the adapter alone (and the processor) in `<output_dir>/adapter` (reload it onto the base model with
      `PeftModel.from_pretrained(base, path)`), and the model with the adapters merged into its weights at
      `output_dir`. On a 4-bit / 8-bit base (QLoRA) the merged model is `merge_adapter(<output_dir>/adapter)`: the
      base reloaded unquantized in the dtype it was loaded in, the adapter merged into it. Merging needs the whole
      weights in one process: under DeepSpeed ZeRO-3 run `merge_adapter` offline instead.

    Only the main process writes. Returns the saved model (the merged one under LoRA: merging folds the adapters into
    the trainer's model, so train no further with this trainer; on a quantized base the trainer's model is left as it
    is, and processes other than the main one return it).
    """
    output_dir = trainer.args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    trainer.save_state()
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not is_peft_model(model):
        trainer.save_model(output_dir)
        return model
    adapter_folder = os.path.join(output_dir, ADAPTER_FOLDER)
    trainer.save_model(adapter_folder)
    if not is_quantized(model):
        merged = model.merge_and_unload()
    elif trainer.args.should_save:
        merged = merge_adapter(adapter_folder, dtype=model.get_base_model().config.dtype)
    else:
        return model
    if trainer.args.should_save:
        merged.save_pretrained(output_dir)
        trainer.processing_class.save_pretrained(output_dir)
    return merged


def is_quantized(model: Any) -> bool:
    """Whether `model` (or the base model under a peft wrapper) was loaded with bitsandbytes 4-bit or 8-bit weights."""
    base = model.get_base_model() if is_peft_model(model) else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def merge_adapter(adapter_folder: str, dtype: "str | torch.dtype" = "auto") -> PreTrainedModel:
    """The base model an adapter folder names (`base_model_name_or_path`), loaded unquantized in `dtype`, with the
    adapter merged into its weights.

    This is how a QLoRA adapter becomes a full model: merged into 4-bit weights, the sum would be rounded back to 4
    bits; merged into the base's own weights, it is exactly what the adapted quantized model approximates. It is also
    the offline merge for adapters trained under DeepSpeed ZeRO-3. Loads on the CPU: it needs the base's size in RAM.
    """
    from peft import PeftConfig, PeftModel

    base_path = PeftConfig.from_pretrained(adapter_folder).base_model_name_or_path
    if not base_path:
        raise ValueError(
            f"The adapter in {adapter_folder} names no base model (base_model_name_or_path): load the base with "
            "AutoModelForImageTextToText.from_pretrained, then PeftModel.from_pretrained(base, adapter_folder)."
        )
    base = AutoModelForImageTextToText.from_pretrained(base_path, dtype=dtype)
    return PeftModel.from_pretrained(base, adapter_folder).merge_and_unload()


__all__ = [
    "ADAPTER_FOLDER",
    "LANGUAGE_MODEL_LINEAR_LAYERS",
    "PPLLaVAConfigMixin",
    "PPLLaVATrainerMixin",
    "default_processor",
    "is_quantized",
    "language_model_lora_config",
    "language_model_lora_targets",
    "language_model_peft_config",
    "merge_adapter",
    "save_trained_model",
]
