"""What PPLLaVA's DPO and SFT training share: the training scripts (arguments, loading a model, processor and rows to
train on, or tiny random/synthetic ones), LoRA on the language model only, and saving a trained model as a folder
that loads with the Auto classes."""

import argparse
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from accelerate.utils import is_peft_model
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    HfArgumentParser,
    PreTrainedModel,
    ProcessorMixin,
    Trainer,
    TrainingArguments,
)
from trl import ModelConfig, get_peft_config
from trl.trainer.utils import get_config_model_id

from ..models.ppllava.modeling_ppllava import PPLLaVAForConditionalGeneration
from ..models.ppllava.processing_ppllava import PPLLaVAProcessor
from ..testing.tiny import tiny_config, tiny_processor
from ..testing.tiny_training_data import write_tiny_jsonl
from .freezing import FREEZING_PRESETS, apply_freezing_preset, trainable_parameter_table
from .rows import BAD_ROW_POLICIES, VIDEO_CHECKS, BadRowPolicy, RowChecker, SkippedRow, VideoCheck


if TYPE_CHECKING:
    from datasets import Dataset
    from peft import LoraConfig


LANGUAGE_MODEL_LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_FOLDER = "adapter"
TINY_DATA_FOLDER = "tiny_data"
# Without --model_name_or_path the scripts train a tiny random model on a tiny synthetic set; these defaults make its
# learning show within a few CPU steps (the released recipes' learning rates are far too small for that).
TINY_DEMO_DEFAULTS = dict(
    learning_rate=1e-3,
    num_frames=4,
    per_device_train_batch_size=2,
    logging_steps=1,
    bf16=False,
    gradient_checkpointing=False,
    save_strategy="no",
)


class PPLLaVATrainerMixin:
    """What both PPLLaVA trainers add to trl's: the row checks (`self.row_checker`, `self.skipped_rows`) and the raw
    columns their collators read (`row_columns`)."""

    row_columns: tuple[str, ...] = ()

    def _set_up_rows(
        self,
        model: "str | PreTrainedModel",
        processing_class: ProcessorMixin | None,
        check_row: Callable[..., None],
        media_folder: str | None,
        on_bad_row: BadRowPolicy,
        video_check: VideoCheck,
    ) -> ProcessorMixin:
        """Create the row checker; returns the processor (the model's own when none is given). Called before trl's
        `__init__`, which prepares the datasets."""
        if processing_class is None:
            processing_class = default_processor(model)
        self.row_checker = RowChecker(check_row, processing_class, media_folder, on_bad_row, video_check)
        return processing_class

    @property
    def skipped_rows(self) -> list[SkippedRow]:
        """The rows left out of training (and evaluation), with the reason for each."""
        return self.row_checker.skipped

    def _set_signature_columns_if_needed(self):
        # Overridden because trl keeps only its tokenized columns (or image columns) when it removes unused columns;
        # the PPLLaVA collators read the raw rows and their media.
        if self._signature_columns is None:
            self._signature_columns = list(self.row_columns)


@dataclass
class PPLLaVAScriptArguments:
    """Options of PPLLaVA's training scripts that trl's configs do not have (the model options are trl's
    `ModelConfig`: `--model_name_or_path`, `--dtype`, `--use_peft`, `--lora_r`, ...)."""

    dataset_path: str | None = field(
        default=None,
        metadata={
            "help": "JSONL file of training rows (formats: ppllava_hf.training.dpo / ppllava_hf.training.sft). Default: "
            "a tiny synthetic colour-video set written to <output_dir>/tiny_data."
        },
    )
    media_folder: str | None = field(
        default=None, metadata={"help": "Folder that relative video and image paths in the rows start from."}
    )
    num_frames: int = field(default=32, metadata={"help": "Frames sampled per video (the released recipes: 32)."})
    freezing_preset: str = field(
        default="dpo",
        metadata={
            "help": "Which parts learn without LoRA (under --use_peft only the adapters do).",
            "choices": list(FREEZING_PRESETS),
        },
    )
    on_bad_row: str = field(
        default="skip",
        metadata={
            "help": "Rows with unreadable media, too long, or nothing to learn: skip them (with a count) or raise.",
            "choices": list(BAD_ROW_POLICIES),
        },
    )
    video_check: str = field(
        default="open",
        metadata={
            "help": "Check videos before training by reading their headers (open) or by decoding them (decode).",
            "choices": list(VIDEO_CHECKS),
        },
    )
    tiny_rows: int = field(default=16, metadata={"help": "Rows of the tiny synthetic set (without --dataset_path)."})


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default and keeps the script's docstring as written."""


def parse_script_args(
    config_class: type[TrainingArguments], recipe: dict[str, Any], description: str
) -> tuple[PPLLaVAScriptArguments, TrainingArguments, ModelConfig]:
    """Parse `(PPLLaVAScriptArguments, config_class, ModelConfig)` from the command line. `recipe` replaces the
    defaults of any flag; without `--model_name_or_path` (the tiny random model) `TINY_DEMO_DEFAULTS` replace them
    further. Flags given on the command line always win."""
    parser = HfArgumentParser(
        (PPLLaVAScriptArguments, config_class, ModelConfig), description=description, formatter_class=_HelpFormatter
    )
    parser.set_defaults(**recipe)
    if parser.parse_known_args()[0].model_name_or_path is None:
        parser.set_defaults(**TINY_DEMO_DEFAULTS)
    return parser.parse_args_into_dataclasses()


def run_training_script(
    trainer_class: type[Trainer],
    config_class: type[TrainingArguments],
    kind: Literal["preference", "sft"],
    recipe: dict[str, Any],
    description: str,
) -> Trainer:
    """The body of `examples/train_dpo.py` and `examples/train_sft.py`: parse the command line (`parse_script_args`),
    load the model and processor (`load_model_and_processor`), apply `--freezing_preset`, load the rows
    (`load_training_rows`), build `trainer_class` (`PPLLaVADPOTrainer` or `PPLLaVASFTTrainer`, with LoRA under
    `--use_peft`), print its trainable parameters per part, train, and save (`save_trained_model`). Returns the trainer,
    whose `state.log_history` holds the logged metrics."""
    script_args, training_args, model_args = parse_script_args(config_class, recipe, description)
    if model_args.model_name_or_path is None:
        # The tiny model's operations are too small to gain from threads; idle ones only spin on a busy machine.
        torch.set_num_threads(1)
    model, processor = load_model_and_processor(model_args, script_args.num_frames, seed=training_args.seed)
    apply_freezing_preset(model, script_args.freezing_preset)
    dataset, media_folder = load_training_rows(script_args, training_args.output_dir, kind)
    trainer = trainer_class(
        model,
        args=training_args,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=language_model_peft_config(model_args),
        media_folder=media_folder,
        on_bad_row=script_args.on_bad_row,
        video_check=script_args.video_check,
    )
    print(f"Trainable parameters:\n{trainable_parameter_table(trainer.model)}")
    if trainer.skipped_rows:
        print(f"Skipped {len(trainer.skipped_rows)} rows; the first: {trainer.skipped_rows[0]}")
    trainer.train()
    save_trained_model(trainer)
    print(f"Saved the model, processor and trainer_state.json to {training_args.output_dir}")
    return trainer


def load_model_and_processor(
    model_args: ModelConfig, num_frames: int, seed: int = 0
) -> tuple[PPLLaVAForConditionalGeneration, PPLLaVAProcessor]:
    """The PPLLaVA model and processor at `model_args.model_name_or_path` (with its `dtype`, `attn_implementation`,
    `model_revision`), or, without a path, a tiny random model (`tiny_config()`, seeded) with its tiny processor. The
    processor samples `num_frames` frames per video."""
    if model_args.model_name_or_path is None:
        torch.manual_seed(seed)
        config = tiny_config()
        return PPLLaVAForConditionalGeneration(config), tiny_processor(config, num_frames=num_frames)
    model = AutoModelForImageTextToText.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation,
    )
    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    processor.video_processor.num_frames, processor.video_processor.fps = num_frames, None
    return model, processor


def default_processor(model: "str | PreTrainedModel") -> ProcessorMixin:
    """The processor saved with `model` (a folder or Hub id, or a model loaded from one): what trl loads when a trainer
    gets no `processing_class`. The PPLLaVA trainers need it before trl's own `__init__` runs, to build their collator
    and check the rows."""
    return AutoProcessor.from_pretrained(model if isinstance(model, str) else get_config_model_id(model.config))


def load_training_rows(
    script_args: PPLLaVAScriptArguments, output_dir: str, kind: Literal["preference", "sft"]
) -> tuple["Dataset", str | None]:
    """The rows to train on and the folder their media paths start from: `--dataset_path` (JSONL) with
    `--media_folder`, or a tiny synthetic set of `--tiny_rows` rows written to `<output_dir>/tiny_data`."""
    from datasets import load_dataset

    path, media_folder = script_args.dataset_path, script_args.media_folder
    if path is None:
        media_folder = os.path.join(output_dir, TINY_DATA_FOLDER)
        path = write_tiny_jsonl(media_folder, kind, script_args.tiny_rows)
    return load_dataset("json", data_files=path, split="train"), media_folder


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
      `output_dir`. Merging needs the whole weights in one process: under DeepSpeed ZeRO-3 merge the saved adapter
      offline instead.

    Returns the saved model (the merged one under LoRA: merging folds the adapters into the trainer's model, so train
    no further with this trainer).
    """
    output_dir = trainer.args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    trainer.save_state()
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not is_peft_model(model):
        trainer.save_model(output_dir)
        return model
    trainer.save_model(os.path.join(output_dir, ADAPTER_FOLDER))
    merged = model.merge_and_unload()
    if trainer.args.should_save:
        merged.save_pretrained(output_dir)
        trainer.processing_class.save_pretrained(output_dir)
    return merged


__all__ = [
    "ADAPTER_FOLDER",
    "LANGUAGE_MODEL_LINEAR_LAYERS",
    "PPLLaVAScriptArguments",
    "PPLLaVATrainerMixin",
    "TINY_DEMO_DEFAULTS",
    "default_processor",
    "language_model_lora_config",
    "language_model_lora_targets",
    "language_model_peft_config",
    "load_model_and_processor",
    "load_training_rows",
    "parse_script_args",
    "run_training_script",
    "save_trained_model",
]
