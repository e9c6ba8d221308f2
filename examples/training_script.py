"""What examples/train_dpo.py and examples/train_sft.py share: the command line (trl's `TrlParser` over the dataset
arguments, the trainer's config and trl's `ModelConfig`), the tiny-demo defaults, loading the model, processor and
rows (or a tiny random model and a tiny synthetic set), and the run itself."""

import argparse
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer
from trl import ModelConfig, TrlParser

from ppllava_hf import PPLLaVAForConditionalGeneration, PPLLaVAProcessor
from ppllava_hf.testing.tiny import tiny_config, tiny_processor
from ppllava_hf.testing.tiny_training_data import write_tiny_jsonl
from ppllava_hf.training.common import PPLLaVAConfigMixin, language_model_peft_config, save_trained_model
from ppllava_hf.training.freezing import trainable_parameter_table


TINY_DATA_FOLDER = "tiny_data"
# Without --model_name_or_path the scripts train a tiny random model on a tiny synthetic set; these defaults make its
# learning show within a few CPU steps (the released recipes' learning rates are far too small for that).
TINY_DEMO_DEFAULTS = dict(
    learning_rate=1e-3,
    num_frames=4,
    per_device_train_batch_size=2,
    logging_steps=1,
    bf16=False,
    activation_checkpointing=False,
    save_strategy="no",
)


@dataclass
class DatasetArguments:
    """Where the training rows come from (the model options are trl's `ModelConfig`: `--model_name_or_path`,
    `--dtype`, `--use_peft`, `--lora_r`, ...; the training options the trainer's config)."""

    dataset_path: str | None = field(
        default=None,
        metadata={
            "help": "JSONL file of training rows (formats: ppllava_hf.training.dpo / ppllava_hf.training.sft). Default: "
            "a tiny synthetic colour-video set written to <output_dir>/tiny_data (which becomes --media_folder)."
        },
    )
    tiny_rows: int = field(default=16, metadata={"help": "Rows of the tiny synthetic set (without --dataset_path)."})


_TINY_FLAGS = " ".join(f"--{key} {value}" for key, value in TINY_DEMO_DEFAULTS.items())
# The end of both scripts' --help, after their own docstring.
EPILOG = f"""Without --model_name_or_path the script trains a tiny random PPLLaVA on a tiny synthetic set, and these
defaults change so that learning shows in a few CPU steps (one thread):
{textwrap.fill(_TINY_FLAGS, 116, initial_indent="  ", subsequent_indent="  ")}

It prints the trainable parameters per part at the start and saves the model, its processor and trainer_state.json
(with the log history) to --output_dir; with LoRA the adapter alone goes to <output_dir>/adapter and the saved model
has it merged. Several GPUs or DeepSpeed: launch with the configs trl ships in trl/accelerate_configs/ (multi_gpu,
zero1-3, fsdp1-2), e.g. `accelerate launch --config_file <trl>/accelerate_configs/zero2.yaml <script> ...`. Options
may also come from a YAML file: --config recipe.yaml (the command line wins over it)."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default and keeps the script's docstring as written."""


def parse_script_args(
    config_class: type[PPLLaVAConfigMixin], recipe: dict[str, Any], description: str, argv: Sequence[str] | None = None
) -> tuple[DatasetArguments, PPLLaVAConfigMixin, ModelConfig]:
    """Parse `(DatasetArguments, config_class, ModelConfig)` from the command line (and a `--config` YAML file, as
    trl's scripts do). `recipe` replaces the defaults of any flag; without a model (the tiny random one)
    `TINY_DEMO_DEFAULTS` replace them further. The YAML file, then the command line, always win."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = TrlParser(
        (DatasetArguments, config_class, ModelConfig),
        description=description,
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    parser.set_defaults(**recipe)
    if not _names_a_model(parser, argv):
        parser.set_defaults(**TINY_DEMO_DEFAULTS)
    return parser.parse_args_and_config(argv)


def _names_a_model(parser: TrlParser, argv: list[str]) -> bool:
    """Whether the command line, or the YAML file its `--config` names, gives `model_name_or_path`."""
    if parser.parse_known_args(argv)[0].model_name_or_path is not None:
        return True
    if "--config" not in argv:
        return False
    import yaml

    with open(argv[argv.index("--config") + 1]) as file:
        return yaml.safe_load(file).get("model_name_or_path") is not None


def run_training_script(
    trainer_class: type[Trainer],
    config_class: type[PPLLaVAConfigMixin],
    kind: Literal["preference", "sft"],
    recipe: dict[str, Any],
    description: str,
) -> Trainer:
    """The body of `train_dpo.py` and `train_sft.py`: parse the command line (`parse_script_args`), load the model and
    processor (`load_model_and_processor`) and the rows (`load_training_rows`), build `trainer_class`
    (`PPLLaVADPOTrainer` or `PPLLaVASFTTrainer`, with LoRA under `--use_peft`; it applies `--num_frames` and
    `--freezing_preset`), print its trainable parameters per part, train, and save (`save_trained_model`). Returns the
    trainer, whose `state.log_history` holds the logged metrics."""
    dataset_args, training_args, model_args = parse_script_args(config_class, recipe, description)
    if model_args.model_name_or_path is None:
        # The tiny model's operations are too small to gain from threads; idle ones only spin on a busy machine.
        torch.set_num_threads(1)
    model, processor = load_model_and_processor(model_args, seed=training_args.seed)
    dataset = load_training_rows(dataset_args, training_args, kind)
    trainer = trainer_class(
        model,
        args=training_args,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=language_model_peft_config(model_args),
    )
    print(f"Trainable parameters:\n{trainable_parameter_table(trainer.model)}")
    if trainer.skipped_rows:
        print(f"Skipped {len(trainer.skipped_rows)} rows; the first: {trainer.skipped_rows[0]}")
    trainer.train()
    save_trained_model(trainer)
    print(f"Saved the model, processor and trainer_state.json to {training_args.output_dir}")
    return trainer


def load_model_and_processor(
    model_args: ModelConfig, seed: int = 0
) -> tuple[PPLLaVAForConditionalGeneration, PPLLaVAProcessor]:
    """The PPLLaVA model and processor at `model_args.model_name_or_path` (with its `dtype`, `attn_implementation`,
    `model_revision`), or, without a path, a tiny random model (`tiny_config()`, seeded) with its tiny processor."""
    if model_args.model_name_or_path is None:
        torch.manual_seed(seed)
        config = tiny_config()
        return PPLLaVAForConditionalGeneration(config), tiny_processor(config)
    model = AutoModelForImageTextToText.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation,
    )
    return model, AutoProcessor.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)


def load_training_rows(
    dataset_args: DatasetArguments, training_args: PPLLaVAConfigMixin, kind: Literal["preference", "sft"]
) -> Dataset:
    """The rows of `--dataset_path` (JSONL), or a tiny synthetic set of `--tiny_rows` rows written to
    `<output_dir>/tiny_data`, which then becomes the config's `media_folder`."""
    path = dataset_args.dataset_path
    if path is None:
        training_args.media_folder = str(Path(training_args.output_dir) / TINY_DATA_FOLDER)
        path = write_tiny_jsonl(training_args.media_folder, kind, dataset_args.tiny_rows)
    return load_dataset("json", data_files=path, split="train")


def print_by_step(trainer: Trainer, key: str, label: str) -> None:
    """Print one logged metric step by step: `<label> by step: 1: 0.000, 2: 0.013, ...`."""
    values = [(log["step"], log[key]) for log in trainer.state.log_history if key in log]
    print(f"{label} by step: " + ", ".join(f"{step}: {value:.3f}" for step, value in values))
