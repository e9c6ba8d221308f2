"""Tiny embedded tokenizers: real trained BPE vocabularies whose ids agree with `tiny_config`, built without downloads."""

import pytest
from transformers import AutoTokenizer, CLIPTokenizer, LlamaTokenizer, Qwen2Tokenizer

from ppllava_hf.testing import tiny
from ppllava_hf.testing.tiny import tiny_config, tiny_processor, tiny_prompt_tokenizer, tiny_tokenizer


@pytest.mark.parametrize("layout, cls", [("vicuna", LlamaTokenizer), ("qwen", Qwen2Tokenizer)])
def test_llm_tokenizer_ids_agree_with_the_tiny_config(layout, cls):
    config = tiny_config(layout)
    tokenizer = tiny_tokenizer(layout)
    assert isinstance(tokenizer, cls)
    assert tokenizer.convert_tokens_to_ids(["<image>", "<video>"]) == [config.image_token_id, config.video_token_id]
    assert (tokenizer.image_token, tokenizer.video_token) == ("<image>", "<video>")
    assert len(tokenizer) == config.video_token_id + 1 <= config.text_config.vocab_size
    assert tokenizer.pad_token_id == config.text_config.pad_token_id == 0
    assert tokenizer.eos_token_id == config.text_config.eos_token_id == 2


def test_vicuna_tokenizer_adds_bos_and_keeps_special_tokens_whole():
    tokenizer = tiny_tokenizer("vicuna")
    ids = tokenizer("USER: <video><video>\nWhat happens? ASSISTANT: It rains.</s>")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1
    assert ids.count(301) == 2 and ids[-1] == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == "USER: \nWhat happens? ASSISTANT: It rains."


def test_qwen_tokenizer_has_chatml_specials_and_no_bos():
    tokenizer = tiny_tokenizer("qwen")
    ids = tokenizer("<|im_start|>user\nHi! {x} 42<|im_end|>")["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2 and tokenizer.bos_token is None
    assert tokenizer.decode(ids) == "<|im_start|>user\nHi! {x} 42<|im_end|>"


def test_clip_prompt_tokenizer_has_clip_layout():
    config = tiny_config("vicuna")
    tokenizer = tiny_prompt_tokenizer("vicuna", config.prompt_encoder_config.vocab_size)
    assert isinstance(tokenizer, CLIPTokenizer) and len(tokenizer) == 128
    assert tokenizer.bos_token_id == config.prompt_encoder_config.bos_token_id == 126  # <|startoftext|>
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == config.prompt_encoder_config.pad_token_id == 127
    encoded = tokenizer("What Happens?", padding="max_length", max_length=12)
    assert encoded["input_ids"][0] == 126 and encoded["input_ids"][-1] == 127
    assert tokenizer.decode(encoded["input_ids"], skip_special_tokens=True) == "what happens ?"


def test_siglip_like_prompt_tokenizer_ends_and_pads_with_its_highest_id():
    config = tiny_config("qwen")
    tokenizer = tiny_prompt_tokenizer("qwen", config.prompt_encoder_config.vocab_size)
    assert len(tokenizer) == 128
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == config.prompt_encoder_config.eos_token_id == 127
    ids = tokenizer("What happens?", padding="max_length", max_length=12)["input_ids"]
    assert ids[-1] == 127 and 127 not in ids[: ids.index(127)] and ids[0] != 127


@pytest.mark.parametrize("layout", ["vicuna", "qwen"])
def test_training_is_deterministic(layout):
    first = tiny_tokenizer(layout).get_vocab(), tiny_prompt_tokenizer(layout).get_vocab()
    tiny._train_llm_bpe.cache_clear()
    tiny._train_prompt_bpe.cache_clear()
    assert (tiny_tokenizer(layout).get_vocab(), tiny_prompt_tokenizer(layout).get_vocab()) == first


def test_custom_placeholder_ids_and_prompt_vocabulary():
    config = tiny_config("qwen", vocab_size=400, image_token_id=351, video_token_id=350, prompt_vocab_size=100)
    processor = tiny_processor(config)
    assert (processor.image_token_id, processor.video_token_id) == (351, 350)
    assert len(processor.prompt_tokenizer) == 100
    with pytest.raises(ValueError, match="consecutive"):
        tiny_tokenizer("vicuna", image_token_id=300, video_token_id=305)
    with pytest.raises(ValueError, match="pick a smaller vocabulary"):
        tiny_prompt_tokenizer("vicuna", vocab_size=5000)


@pytest.mark.parametrize("layout", ["vicuna", "qwen"])
def test_tokenizers_survive_save_and_load(layout, tmp_path):
    for name, tokenizer in (("llm", tiny_tokenizer(layout)), ("prompt", tiny_prompt_tokenizer(layout))):
        tokenizer.save_pretrained(tmp_path / name)
        loaded = AutoTokenizer.from_pretrained(tmp_path / name)
        text = "USER: <video>\nWhat happens in the video? ASSISTANT:"
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
