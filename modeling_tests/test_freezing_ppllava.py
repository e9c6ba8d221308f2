"""Freezing presets of the original recipes and the trainable-parameter table, on tiny models of both layouts."""

import pytest
import torch

from ppllava_hf import PPLLaVAForConditionalGeneration
from ppllava_hf.testing.tiny import tiny_config
from ppllava_hf.training.freezing import (
    PARAMETER_GROUPS,
    apply_freezing_preset,
    parameter_groups,
    trainable_parameter_table,
)


LAYOUTS = ["vicuna", "qwen"]


@pytest.fixture(params=LAYOUTS)
def model(request) -> PPLLaVAForConditionalGeneration:
    torch.manual_seed(0)
    return PPLLaVAForConditionalGeneration(tiny_config(request.param))


def trainable_by_group(model) -> dict[str, bool | None]:
    """Per part: True if all its parameters train, False if none does (a mixed part fails the tests that read it)."""
    states = {}
    for name, params in parameter_groups(model).items():
        flags = {param.requires_grad for param in params}
        states[name] = None if len(flags) > 1 else flags.pop() if flags else "empty"
    return states


def test_dpo_preset_trains_the_language_model_and_lm_head_only(model):
    apply_freezing_preset(model, "dpo")
    states = trainable_by_group(model)
    assert states["language model"] is True and states["lm_head"] is True
    for name in ("vision tower", "prompt encoder", "prompt alignment", "projector", "image_newline"):
        assert states[name] is False, name
    assert states["BT-Adapter"] in (False, "empty")


def test_sft_preset_freezes_the_vision_tower_but_not_its_btadapter(model):
    apply_freezing_preset(model, "sft")
    states = trainable_by_group(model)
    assert states["vision tower"] is False
    for name in ("prompt alignment", "projector", "language model", "lm_head", "image_newline"):
        assert states[name] is True, name
    if model.config.use_btadapter:
        assert states["BT-Adapter"] is True


def test_sft_preset_trains_the_prompt_encoder_only_where_it_runs_with_gradient(model):
    apply_freezing_preset(model, "sft")
    prompt_encoder_trains = trainable_by_group(model)["prompt encoder"]
    # CLIP (vicuna) runs its text encoder without gradient; SigLIP (qwen) with gradient, as in the original.
    assert prompt_encoder_trains is (not model.config.freeze_prompt_encoder)
    assert prompt_encoder_trains is (model.config.prompt_encoder_config.model_type == "siglip_text_model")


def test_a_preset_replaces_the_previous_one(model):
    apply_freezing_preset(model, "sft")
    apply_freezing_preset(model, "dpo")
    after_both = {name: p.requires_grad for name, p in model.named_parameters()}
    for param in model.parameters():
        param.requires_grad_(True)
    apply_freezing_preset(model, "dpo")
    assert after_both == {name: p.requires_grad for name, p in model.named_parameters()}


def test_unknown_preset_lists_the_known_ones(model):
    with pytest.raises(ValueError, match="Unknown freezing preset 'lora'.*'dpo'.*'sft'"):
        apply_freezing_preset(model, "lora")


def test_parts_hold_every_parameter_exactly_once(model):
    groups = parameter_groups(model)
    assert groups.pop("other") == []
    grouped = [id(param) for params in groups.values() for param in params]
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))
    assert tuple(groups) == PARAMETER_GROUPS


def test_table_counts_add_up(model):
    table = apply_freezing_preset(model, "sft")
    assert table.total == sum(param.numel() for param in model.parameters())
    assert table.trainable == sum(param.numel() for param in model.parameters() if param.requires_grad)
    assert 0 < table.trainable < table.total
    assert table == trainable_parameter_table(model)
    text = str(table)
    for name in PARAMETER_GROUPS:
        assert name in text
    assert f"{table.trainable:,}" in text.splitlines()[-1] and f"{table.total:,}" in text.splitlines()[-1]
