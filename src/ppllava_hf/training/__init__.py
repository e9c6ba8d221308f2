"""Training PPLLaVA with trl: video DPO and SFT trainers, their row checks, freezing presets and LoRA helpers."""

from .common import language_model_lora_config, save_trained_model
from .dpo import PPLLaVADPOTrainer
from .freezing import apply_freezing_preset, trainable_parameter_table
from .sft import PPLLaVASFTTrainer


__all__ = [
    "PPLLaVADPOTrainer",
    "PPLLaVASFTTrainer",
    "apply_freezing_preset",
    "language_model_lora_config",
    "save_trained_model",
    "trainable_parameter_table",
]
