"""PPLLaVAConfig: exact round trips and a clear error for every configuration that cannot work."""


import pytest
from transformers import AutoConfig

import ppllava_hf  # noqa: F401  (registers the Auto classes)
from ppllava_hf import PPLLaVAConfig
from ppllava_hf.testing.tiny import tiny_config


def without_origin(config_dict: dict) -> dict:
    """A config's fields minus where it was loaded from."""
    return {key: value for key, value in config_dict.items() if key != "_name_or_path"}


@pytest.mark.parametrize("config", [PPLLaVAConfig(), tiny_config("vicuna"), tiny_config("qwen", max_visual_tokens=64)])
def test_round_trip_through_save_and_auto_config(config, tmp_path):
    config.save_pretrained(tmp_path)
    for loaded in (PPLLaVAConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert isinstance(loaded, PPLLaVAConfig)
        assert without_origin(loaded.to_dict()) == without_origin(config.to_dict())


def test_defaults_are_the_published_vicuna_layout():
    config = PPLLaVAConfig()
    assert config.vision_config.model_type == "clip_vision_model"
    assert config.patch_grid == (24, 24)
    assert config.video_pooling_kernel == config.video_pooling_stride == [2, 3, 3]
    assert config.image_pooling_kernel == config.image_pooling_stride == [1, 3, 3]
    assert config.pooling_temperature == 0.01
    assert config.prompt_encoder_config.max_position_embeddings == 248
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.get_text_config() is config.text_config


def test_sub_configs_are_declared_for_transformers_and_built_from_dicts_by_their_model_type():
    config = PPLLaVAConfig(text_config={"model_type": "qwen2", "hidden_size": 16, "num_attention_heads": 2,
                                        "num_key_value_heads": 2, "intermediate_size": 32, "num_hidden_layers": 1})
    assert set(PPLLaVAConfig.sub_configs) == {"vision_config", "text_config", "prompt_encoder_config"}
    assert type(config.text_config) is type(AutoConfig.for_model("qwen2")) and config.text_config.hidden_size == 16
    assert type(config.vision_config) is type(AutoConfig.for_model("clip_vision_model"))


def test_a_sub_config_dict_without_model_type_takes_the_default_type_but_not_the_default_sizes():
    config = PPLLaVAConfig(prompt_encoder_config={"max_position_embeddings": 100, "projection_dim": 768})
    assert config.prompt_encoder_config.model_type == "clip_text_model"
    assert config.prompt_encoder_config.hidden_size == AutoConfig.for_model("clip_text_model").hidden_size


def test_the_attention_implementation_reaches_every_sub_config():
    config = tiny_config("vicuna", attn_implementation="eager")
    assert {getattr(config, key)._attn_implementation for key in PPLLaVAConfig.sub_configs} == {"eager"}


def test_placeholder_ids_answer_to_both_names():
    config = tiny_config(image_token_id=300, video_token_id=301)
    assert (config.image_token_index, config.video_token_index) == (300, 301)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"video_pooling_kernel": [2, 5, 5]}, "do not tile the 6x6 patch grid"),
        ({"video_pooling_kernel": [2, 3, 3], "video_pooling_stride": [2, 4, 4]}, "do not tile"),
        ({"image_pooling_kernel": [2, 3, 3]}, "must be 1 along the first axis"),
        ({"video_pooling_output_size": [4, 7, 7]}, "at most the 6x6 patch grid"),
        ({"pooling_temperature": 0.0}, "pooling_temperature must be positive"),
        ({"max_visual_tokens": 0}, "max_visual_tokens must be positive"),
        ({"btadapter_depth": 5}, "btadapter_depth=5 must be between 1 and the vision tower's 4 layers"),
        ({"vision_feature_layer": 5}, "outside the vision tower's 5 hidden states"),
        ({"prompt_keep_positions": 248}, "prompt_keep_positions=248"),
    ],
)
def test_invalid_settings_are_refused_with_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config("vicuna", **overrides)


def test_btadapter_needs_a_clip_tower():
    with pytest.raises(ValueError, match="BT-Adapter exists for CLIP vision towers only"):
        tiny_config("qwen", use_btadapter=True)


def test_prompt_encoder_and_vision_tower_must_share_a_projection_space():
    vicuna = tiny_config("vicuna")
    prompt = vicuna.prompt_encoder_config.to_dict() | {"projection_dim": 24}
    with pytest.raises(ValueError, match="cannot be aligned: prompt_encoder_config.projection_dim and vision_config.projection_dim differ"):
        tiny_config("vicuna", prompt_encoder_config=prompt)
    qwen = tiny_config("qwen")
    prompt = qwen.prompt_encoder_config.to_dict() | {"projection_size": 24}
    with pytest.raises(ValueError, match="cannot be aligned: prompt_encoder_config.projection_size and vision_config.hidden_size"):
        tiny_config("qwen", prompt_encoder_config=prompt)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("vision_config", {"model_type": "vit", "image_size": 84, "patch_size": 14}, "vision_config.model_type='vit' is not supported"),
        ("prompt_encoder_config", {"model_type": "bert"}, "prompt_encoder_config.model_type='bert' is not supported"),
        ("text_config", {"model_type": "clip_text_model"}, "has no causal LM in transformers"),
    ],
)
def test_unknown_sub_model_types_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_config("vicuna", **{field: value})


def test_prompt_encoder_must_match_the_vision_family():
    siglip_prompt = tiny_config("qwen").prompt_encoder_config.to_dict()
    with pytest.raises(ValueError, match="must come from the vision tower's family"):
        tiny_config("vicuna", prompt_encoder_config=siglip_prompt)


def test_the_prompt_encoder_config_of_a_saved_folder_is_its_prompt_encoder_config(tmp_path):
    """transformers' CLIP/SigLIP text configs look up a folder's `text_config` (here the LLM's); PPLLaVA's prompt
    encoder config is `PPLLaVAConfig.from_pretrained(folder).prompt_encoder_config`, as the README says."""
    config = tiny_config("vicuna")
    config.save_pretrained(tmp_path)
    loaded = PPLLaVAConfig.from_pretrained(tmp_path).prompt_encoder_config
    assert loaded.model_type == "clip_text_model"
    assert loaded.to_dict() == config.prompt_encoder_config.to_dict()
