"""Video DPO of PPLLaVA with trl's DPOTrainer.

The defaults are the released recipe (config/dpo/dpo_ppllava_vicuna7b.yaml of the original): sigmoid loss, beta 0.1,
an SFT term of weight 0 (--loss_type sigmoid sft --loss_weights 1.0 0.0; raise the second weight for RPO-style
training), learning rate 5e-6 with a linear schedule and 10% warmup, 2 epochs, 32 frames per video drawn at random
inside their segments (--frame_sampling random, the original's training sampler), and only the language model learning
(--freezing_preset dpo). Rows are at most 3072 tokens: the original's model_max_length of 2048 counted the video as
one placeholder token, and here the video's tokens count too (1024 for 32 frames of 24x24 patches pooled by (2,3,3)).

    # The recipe on a converted PPLLaVA and the original's preference JSONL (prompt / chosen / rejected / video):
    accelerate launch examples/train_dpo.py --model_name_or_path ppllava-vicuna-7b --dtype bfloat16 \\
        --dataset_path sft_dpo_17k.jsonl --media_folder llava_hound/videos --output_dir ppllava-vicuna-7b-dpo \\
        --per_device_train_batch_size 2 --gradient_accumulation_steps 4
    # The same with LoRA on the language model (the original's LoRA rank and alpha):
    ... --use_peft --lora_r 64 --lora_alpha 16

    # Under a minute on a CPU, a tiny random PPLLaVA and a tiny synthetic preference set ("What color is the video?",
    # the true colour chosen; the tiny-demo defaults are listed below):
    python examples/train_dpo.py --output_dir /tmp/ppllava-dpo-tiny

The original ran this stage with DeepSpeed ZeRO-2:
`accelerate launch --config_file <trl>/accelerate_configs/zero2.yaml examples/train_dpo.py ...`.
"""

from training_script import build_trainer, end_processes, print_by_step, train_and_save

from ppllava_hf.training.dpo import PPLLaVADPOConfig, PPLLaVADPOTrainer


RECIPE = dict(
    beta=0.1,
    loss_type=["sigmoid", "sft"],
    loss_weights=[1.0, 0.0],
    learning_rate=5e-6,
    lr_scheduler_type="linear",
    warmup_steps=0.1,
    num_train_epochs=2,
    max_length=3072,
    num_frames=32,
    frame_sampling="random",
    freezing_preset="dpo",
)


def main() -> None:
    trainer = train_and_save(build_trainer(PPLLaVADPOTrainer, PPLLaVADPOConfig, "preference", RECIPE, __doc__))
    print_by_step(trainer, "rewards/margins", "Reward margin (chosen - rejected)")
    end_processes(trainer)


if __name__ == "__main__":
    main()
