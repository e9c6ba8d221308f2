"""Video SFT of PPLLaVA with trl's SFTTrainer, learning the assistant turns only.

The defaults are the released recipe (config/vicuna/ppllava_vicuna7b_videoonly.yaml of the original): learning rate
2e-5 with a cosine schedule and 3% warmup, 2 epochs, 32 frames per video, 1024 tokens at most, and everything but the
vision tower learning, its BT-Adapter included (--freezing_preset sft; the CLIP prompt encoder stays frozen, as the
original runs it without gradient).

    # The recipe on a PPLLaVA built from its backbones (examples/build_from_backbones.py) and a JSONL of conversations
    # ({"messages": [...], "video": "clips/0001.mp4"}, see ppllava_hf.training.sft):
    accelerate launch examples/train_sft.py --model_name_or_path ppllava-vicuna-7b-untrained --dtype bfloat16 \\
        --dataset_path video_sft.jsonl --media_folder videos --output_dir ppllava-vicuna-7b-sft \\
        --per_device_train_batch_size 8 --gradient_accumulation_steps 2
    # LoRA on the language model instead (the vision side then stays frozen unless --lora_modules_to_save names it):
    ... --use_peft --lora_r 64 --lora_alpha 16

    # Under a minute on a CPU: a tiny random PPLLaVA and a tiny synthetic set of video conversations ("What color is
    # the video?"). Without --model_name_or_path the defaults change so that the loss visibly falls in a few steps:
    # learning rate 1e-3, 4 frames, batch size 2, logging every step, no bf16, no gradient checkpointing, one thread.
    python examples/train_sft.py --output_dir /tmp/ppllava-sft-tiny

It prints the trainable parameters per part at the start and saves the model, its processor and trainer_state.json
(with the log history) to --output_dir; with LoRA the adapter alone goes to <output_dir>/adapter and the saved model
has it merged. Several GPUs or DeepSpeed: launch with the configs trl ships in trl/accelerate_configs/ (multi_gpu,
zero1-3, fsdp1-2), e.g. `accelerate launch --config_file <trl>/accelerate_configs/zero3.yaml examples/train_sft.py ...`
(the original ran this stage with DeepSpeed ZeRO-3).
"""

from trl import SFTConfig

from ppllava_hf.training.common import run_training_script
from ppllava_hf.training.sft import PPLLaVASFTTrainer


RECIPE = dict(
    learning_rate=2e-5,
    lr_scheduler_type="cosine",
    warmup_steps=0.03,
    num_train_epochs=2,
    max_length=1024,
    num_frames=32,
    freezing_preset="sft",
)
def main() -> None:
    trainer = run_training_script(PPLLaVASFTTrainer, SFTConfig, "sft", RECIPE, __doc__)
    values = [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log]
    print("Training loss by step: " + ", ".join(f"{step}: {value:.3f}" for step, value in values))


if __name__ == "__main__":
    main()
