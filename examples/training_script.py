"""What examples/train_dpo.py and examples/train_sft.py share: the command line (trl's `TrlParser` over the dataset
arguments, the trainer's config and trl's `ModelConfig`), the tiny-demo defaults, loading the model, processor and
rows (or a tiny random model and a tiny synthetic set), and the run itself."""

import argparse
import os
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset, load_dataset
from peft import prepare_model_for_kbit_training
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, Trainer, TrainingArguments
from trl import ModelConfig, TrlParser, get_quantization_config

from ppllava_hf import PPLLaVAForConditionalGeneration, PPLLaVAProcessor
from ppllava_hf.testing.tiny import tiny_config, tiny_processor
from ppllava_hf.testing.tiny_training_data import tiny_jsonl_path, write_tiny_jsonl
from ppllava_hf.training.common import PPLLaVAConfigMixin, language_model_peft_config, save_trained_model
from ppllava_hf.training.freezing import trainable_parameter_table


TINY_DATA_FOLDER = "tiny_data"
TINY_MODEL_FOLDER = "tiny_model"
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
has it merged. QLoRA: --load_in_4bit (or --load_in_8bit) --use_peft quantizes the language model alone; the merged
model is the adapter merged into the base reloaded unquantized, in --dtype. Several processes: `torchrun
--nproc_per_node N <script> ...` or `accelerate launch` with the configs trl ships in trl/accelerate_configs/
(multi_gpu, zero1-3, fsdp1-2), e.g. `accelerate launch --config_file <trl>/accelerate_configs/zero2.yaml <script>
...`; --per_device_train_batch_size is per process. On CPUs add --use_cpu True (and use
examples/accelerate_configs/two_cpu_processes.yaml with accelerate). Options may also come from a YAML file: --config
recipe.yaml (the command line wins over it)."""


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


def build_trainer(
    trainer_class: type[Trainer],
    config_class: type[PPLLaVAConfigMixin],
    kind: Literal["preference", "sft"],
    recipe: dict[str, Any],
    description: str,
    argv: Sequence[str] | None = None,
) -> Trainer:
    """The start of `train_dpo.py` and `train_sft.py`: parse the command line (`parse_script_args`; `argv` defaults to
    `sys.argv`), load the model and processor (`load_model_and_processor`) and the rows (`load_training_rows`), and
    build `trainer_class` (`PPLLaVADPOTrainer` or `PPLLaVASFTTrainer`, with LoRA under `--use_peft`; it applies
    `--num_frames` and `--freezing_preset`); print its trainable parameters per part. Under torchrun / accelerate
    launch every process runs this (and the main one prints)."""
    dataset_args, training_args, model_args = parse_script_args(config_class, recipe, description, argv)
    check_process_group(training_args)
    if model_args.model_name_or_path is None:
        # The tiny model's operations are too small to gain from threads; idle ones only spin on a busy machine.
        torch.set_num_threads(1)
    model, processor = load_model_and_processor(model_args, training_args)
    dataset = load_training_rows(dataset_args, training_args, kind)
    trainer = trainer_class(
        model,
        args=training_args,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=language_model_peft_config(model_args),
    )
    trainer.accelerator.print(f"Trainable parameters:\n{trainable_parameter_table(trainer.model)}")
    if trainer.skipped_rows:
        trainer.accelerator.print(f"Skipped {len(trainer.skipped_rows)} rows; the first: {trainer.skipped_rows[0]}")
    return trainer


def train_and_save(trainer: Trainer) -> Trainer:
    """The rest of `train_dpo.py` and `train_sft.py` after `build_trainer`: train, and save (`save_trained_model`).
    Returns the trainer, whose `state.log_history` holds the logged metrics."""
    trainer.train()
    save_trained_model(trainer)
    trainer.accelerator.print(f"Saved the model, processor and trainer_state.json to {trainer.args.output_dir}")
    return trainer


def end_processes(trainer: Trainer) -> None:
    """Wait for every process, then tear the process group down. A process that exits with the group still up leaves
    its gloo/NCCL threads to the interpreter's shutdown, which can abort it (SIGABRT, "terminate called without an
    active exception") after its work is done, and torchrun then fails the run."""
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


def check_process_group(training_args: TrainingArguments) -> None:
    """Refuse to run when torchrun / accelerate launch started more processes than joined one process group: on a
    machine without GPUs each would otherwise train alone on every row and write the same output folder."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != training_args.world_size:
        raise SystemExit(
            f"{launched} processes were launched, but they do not form one process group (this one sees "
            f"{training_args.world_size}): without GPUs add --use_cpu True, so that they join as CPU processes (gloo)."
        )


def load_model_and_processor(
    model_args: ModelConfig, training_args: TrainingArguments
) -> tuple[PreTrainedModel, PPLLaVAProcessor]:
    """The PPLLaVA model and processor at `model_args.model_name_or_path` (with its `dtype`, `attn_implementation`,
    `model_revision`), or, without a path, a tiny random model (`tiny_config()`, seeded by `training_args.seed`) with
    its tiny processor.

    `--load_in_4bit` / `--load_in_8bit` (trl's `get_quantization_config`) load the language model quantized by
    bitsandbytes (the model class keeps every other part in `--dtype`), on this process's device, prepared for
    training by peft's `prepare_model_for_kbit_training`; they need `--use_peft` (only LoRA adapters can learn on
    quantized weights). The tiny model is then saved to `<output_dir>/tiny_model` first, to be loaded quantized."""
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None and not model_args.use_peft:
        raise ValueError(
            "--load_in_4bit / --load_in_8bit quantize the language model, whose weights then cannot learn: add "
            "--use_peft to train LoRA adapters on it (QLoRA)."
        )
    path = model_args.model_name_or_path
    if path is None:
        torch.manual_seed(training_args.seed)
        config = tiny_config()
        model, processor = PPLLaVAForConditionalGeneration(config), tiny_processor(config)
        if quantization_config is None:
            return model, processor
        path = str(Path(training_args.output_dir) / TINY_MODEL_FOLDER)
        with training_args.main_process_first(desc="saving the tiny model"):
            if training_args.local_process_index == 0:
                model.save_pretrained(path)
                processor.save_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(
        path,
        revision=model_args.model_revision,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation,
        quantization_config=quantization_config,
        # bitsandbytes quantizes while loading, onto the device given here: each process's own.
        device_map=None if quantization_config is None else {"": str(training_args.device)},
    )
    if quantization_config is not None:
        # Freezes the base and upcasts its unquantized weights to float32 (peft's QLoRA recipe). Activation
        # checkpointing is left to the Trainer (`--activation_checkpointing`), which trl pairs with input gradients.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, AutoProcessor.from_pretrained(path, revision=model_args.model_revision)


def load_training_rows(
    dataset_args: DatasetArguments, training_args: PPLLaVAConfigMixin, kind: Literal["preference", "sft"]
) -> Dataset:
    """The rows of `--dataset_path` (JSONL), or a tiny synthetic set of `--tiny_rows` rows written to
    `<output_dir>/tiny_data` (by the main process), which then becomes the config's `media_folder`."""
    path = dataset_args.dataset_path
    with training_args.main_process_first(desc="loading the rows"):
        if path is None:
            training_args.media_folder = str(Path(training_args.output_dir) / TINY_DATA_FOLDER)
            path = tiny_jsonl_path(training_args.media_folder, kind)
            if training_args.local_process_index == 0:
                write_tiny_jsonl(training_args.media_folder, kind, dataset_args.tiny_rows)
        return load_dataset("json", data_files=path, split="train")


def print_by_step(trainer: Trainer, key: str, label: str) -> None:
    """Print one logged metric step by step: `<label> by step: 1: 0.000, 2: 0.013, ...`."""
    values = [(log["step"], log[key]) for log in trainer.state.log_history if key in log]
    trainer.accelerator.print(f"{label} by step: " + ", ".join(f"{step}: {value:.3f}" for step, value in values))
