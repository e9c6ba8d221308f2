"""Video SFT of PPLLaVA with trl's SFTTrainer, learning the assistant turns only.

The defaults are the released recipe (config/vicuna/ppllava_vicuna7b_videoonly.yaml of the original): learning rate
2e-5 with a cosine schedule and 3% warmup, 2 epochs, 32 frames per video drawn at random inside their segments
(--frame_sampling random, the original's training sampler), and everything but the vision tower learning, its
BT-Adapter included (--freezing_preset sft; the CLIP prompt encoder stays frozen, as the original runs it without
gradient). Rows are at most 4096 tokens, Vicuna-7B's context: the recipe's model_max_length of 1024 was never applied
by the original, and a 32-frame video alone is 1024 tokens (24x24 patches pooled by (2,3,3) windows: 16 x 8 x 8).
One departure: the pooling is guided by each row's last question, as at inference; --pooling_prompt_source
conversation guides it by the whole templated conversation, as the original SFT did (see ppllava_hf.training.sft).

    # The recipe on a PPLLaVA built from its backbones (examples/build_from_backbones.py) and a JSONL of conversations
    # ({"messages": [...], "video": "clips/0001.mp4"}, see ppllava_hf.training.sft):
    accelerate launch examples/train_sft.py --model_name_or_path ppllava-vicuna-7b-untrained --dtype bfloat16 \\
        --dataset_path video_sft.jsonl --media_folder videos --output_dir ppllava-vicuna-7b-sft \\
        --per_device_train_batch_size 8 --gradient_accumulation_steps 2
    # LoRA on the language model instead (the vision side then stays frozen unless --lora_modules_to_save names it):
    ... --use_peft --lora_r 64 --lora_alpha 16

    # Under a minute on a CPU, a tiny random PPLLaVA and a tiny synthetic set of video conversations ("What color is
    # the video?"; the tiny-demo defaults are listed below):
    python examples/train_sft.py --output_dir /tmp/ppllava-sft-tiny

The original ran this stage with DeepSpeed ZeRO-3:
`accelerate launch --config_file <trl>/accelerate_configs/zero3.yaml examples/train_sft.py ...`.
"""

from training_script import build_trainer, end_processes, print_by_step, train_and_save

from ppllava_hf.training.sft import PPLLaVASFTConfig, PPLLaVASFTTrainer


RECIPE = dict(
    learning_rate=2e-5,
    lr_scheduler_type="cosine",
    warmup_steps=0.03,
    num_train_epochs=2,
    max_length=4096,
    num_frames=32,
    frame_sampling="random",
    freezing_preset="sft",
)


def main() -> None:
    trainer = train_and_save(build_trainer(PPLLaVASFTTrainer, PPLLaVASFTConfig, "sft", RECIPE, __doc__))
    print_by_step(trainer, "loss", "Training loss")
    end_processes(trainer)


if __name__ == "__main__":
    main()
