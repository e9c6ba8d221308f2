"""Runs of the training examples' trainers that record what the multi-process tests check, in the test's own process
(one process) or once per rank under torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 modeling_tests/recorded_training.py ROOT FLAGS...

trains DPO into ROOT/dpo, then SFT into ROOT/sft (`examples/training_script.build_trainer` with the example's
recipe, FLAGS and the tiny-demo defaults), each rank writing `rank<k>.json` beside the run: the logged metrics, the
frames the policy's vision tower encoded at each step, and the folders this process saved a model into.
"""

import json
import runpy
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import PreTrainedModel, Trainer, TrainerCallback


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

from training_script import build_trainer  # noqa: E402

from ppllava_hf.training.common import save_trained_model  # noqa: E402
from ppllava_hf.training.dpo import PPLLaVADPOConfig, PPLLaVADPOTrainer  # noqa: E402
from ppllava_hf.training.sft import PPLLaVASFTConfig, PPLLaVASFTTrainer  # noqa: E402


RUNS = {
    "dpo": ("train_dpo.py", PPLLaVADPOTrainer, PPLLaVADPOConfig, "preference"),
    "sft": ("train_sft.py", PPLLaVASFTTrainer, PPLLaVASFTConfig, "sft"),
}


class FramesPerStep(TrainerCallback):
    """Counts the frames a vision tower embeds during each optimizer step."""

    def __init__(self, vision_tower: torch.nn.Module):
        self.steps: list[int] = []
        self._frames = 0
        vision_tower.embeddings.register_forward_pre_hook(self._count)

    def _count(self, _module, args):
        self._frames += args[0].shape[0]

    def on_step_begin(self, *_args, **_kwargs):
        self._frames = 0

    def on_step_end(self, *_args, **_kwargs):
        self.steps.append(self._frames)


@contextmanager
def recorded_saves():
    """Every folder a `PreTrainedModel.save_pretrained` call writes to in this process, in order."""
    folders, save_pretrained = [], PreTrainedModel.save_pretrained

    def recording(model, save_directory, *args, **kwargs):
        folders.append(str(save_directory))
        return save_pretrained(model, save_directory, *args, **kwargs)

    PreTrainedModel.save_pretrained = recording
    try:
        yield folders
    finally:
        PreTrainedModel.save_pretrained = save_pretrained


def example_trainer(kind: str, output_dir: str | Path, *flags: str) -> Trainer:
    """The trainer the `kind` example ("dpo" or "sft") builds with `flags` and `--output_dir output_dir`."""
    script, trainer_class, config_class, rows = RUNS[kind]
    recipe = runpy.run_path(str(EXAMPLES / script))["RECIPE"]
    return build_trainer(trainer_class, config_class, rows, recipe, "", ["--output_dir", str(output_dir), *flags])


def recorded_run(kind: str, output_dir: str | Path, *flags: str) -> dict:
    """Train the `kind` example ("dpo" or "sft") into `output_dir` with `flags`, save it as the script does, and
    return (and write to `<output_dir>/rank<k>.json`) this process's record."""
    trainer = example_trainer(kind, output_dir, *flags)
    frames = FramesPerStep(trainer.model.model.vision_tower)
    trainer.add_callback(frames)
    with recorded_saves() as saves:
        trainer.train()
        save_trained_model(trainer)
    record = {
        "process": trainer.args.process_index,
        "processes": trainer.args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "log_history": trainer.state.log_history,
        "frames_per_step": frames.steps,
        "saved_models": saves,
    }
    Path(output_dir, f"rank{record['process']}.json").write_text(json.dumps(record))
    return record


if __name__ == "__main__":
    root, *arguments = sys.argv[1:]
    for name in RUNS:
        recorded_run(name, Path(root) / name, *arguments)
    PartialState().wait_for_everyone()
    PartialState().destroy_process_group()  # as the examples' end_processes does: a clean exit under torchrun
