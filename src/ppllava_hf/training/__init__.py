"""Training PPLLaVA with trl: video DPO and SFT trainers with their configs, row checks, freezing presets and LoRA."""

from .common import PPLLaVAConfigMixin, language_model_lora_config, merge_adapter, save_trained_model
from .dpo import PPLLaVADPOConfig, PPLLaVADPOTrainer
from .freezing import apply_freezing_preset, trainable_parameter_table
from .sft import PPLLaVASFTConfig, PPLLaVASFTTrainer


__all__ = [
    "PPLLaVAConfigMixin",
    "PPLLaVADPOConfig",
    "PPLLaVADPOTrainer",
    "PPLLaVASFTConfig",
    "PPLLaVASFTTrainer",
    "apply_freezing_preset",
    "language_model_lora_config",
    "merge_adapter",
    "save_trained_model",
    "trainable_parameter_table",
]
