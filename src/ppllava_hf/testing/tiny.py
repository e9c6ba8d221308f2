"""Tiny PPLLaVA configurations, tokenizers and processors in both original layouts, for tests, examples and benchmarks.

Nothing is downloaded: the configs are small (for random weights), the tokenizers are trained on a built-in corpus in
a few milliseconds (and cached), and the processor ties them together with ids that agree with the config.
"""

import functools
import json
import string
from typing import Literal

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTokenizer,
    LlamaTokenizer,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Tokenizer,
    SiglipConfig,
    SiglipModel,
    TokenizersBackend,
)

from ..models.ppllava.configuration_ppllava import PPLLaVAConfig
from ..models.ppllava.processing_ppllava import PPLLaVAProcessor


Layout = Literal["vicuna", "qwen"]


def tiny_config(
    layout: Layout = "vicuna",
    vocab_size: int = 320,
    image_token_id: int = 300,
    video_token_id: int = 301,
    prompt_vocab_size: int = 128,
    **overrides,
) -> PPLLaVAConfig:
    """A PPLLaVA config small enough for a CPU test: 84-pixel frames (6x6 patches of 14), hidden sizes of 32-64.

    `vicuna`: CLIP vision + CLIP text prompt encoder (248 positions) + Llama, with a 2-layer BT-Adapter.
    `qwen`: SigLIP vision + SigLIP text prompt encoder (196 positions) + Qwen2, no BT-Adapter, all tokens kept.
    Keyword overrides go to `PPLLaVAConfig`.
    """
    tile = 84
    shared_vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=tile, patch_size=14)
    shared_text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    shared_prompt = dict(vocab_size=prompt_vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile], [tile, 3 * tile]]
    if layout == "vicuna":
        settings = dict(
            vision_config=dict(model_type="clip_vision_model", projection_dim=40, **shared_vision),
            text_config=dict(model_type="llama", **shared_text),
            prompt_encoder_config=dict(
                model_type="clip_text_model", max_position_embeddings=248, projection_dim=40,
                bos_token_id=prompt_vocab_size - 2, eos_token_id=2, pad_token_id=prompt_vocab_size - 1, **shared_prompt,
            ),
            use_btadapter=True,
            btadapter_depth=2,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    elif layout == "qwen":
        settings = dict(
            vision_config=dict(model_type="siglip_vision_model", vision_use_head=False, **shared_vision),
            text_config=dict(model_type="qwen2", **shared_text),
            prompt_encoder_config=dict(
                model_type="siglip_text_model", max_position_embeddings=196, projection_size=32,
                bos_token_id=None, pad_token_id=prompt_vocab_size - 1, eos_token_id=prompt_vocab_size - 1, **shared_prompt,
            ),
            freeze_prompt_encoder=False,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
    else:
        raise ValueError(f"layout must be 'vicuna' or 'qwen', got {layout!r}.")
    settings.update(image_grid_pinpoints=pinpoints, image_token_id=image_token_id, video_token_id=video_token_id)
    settings.update(overrides)
    return PPLLaVAConfig(**settings)


def tiny_backbones(layout: Layout = "vicuna", **llava_overrides) -> tuple[PreTrainedModel, PreTrainedModel]:
    """Tiny random (LLaVA model, CLIP/SigLIP model) to build a PPLLaVA of `tiny_config(layout)`'s shapes from.

    `vicuna`: `LlavaNextForConditionalGeneration` (CLIP + Llama) and a `CLIPModel` with the stock 77 text positions.
    `qwen`: `LlavaOnevisionForConditionalGeneration` (SigLIP + Qwen2) and a `SiglipModel` with 64 text positions and the
    vision pooling head. Keyword overrides go to the LLaVA config.
    """
    config = tiny_config(layout)
    vision = config.vision_config.to_dict()
    prompt = config.prompt_encoder_config.to_dict()
    llava_settings = dict(
        vision_config=vision,
        text_config=config.text_config.to_dict(),
        image_token_index=config.image_token_id,
        image_grid_pinpoints=config.image_grid_pinpoints,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    )
    if layout == "qwen":
        llava_settings["video_token_index"] = config.video_token_id
    llava_settings.update(llava_overrides)
    if layout == "vicuna":
        llava = LlavaNextForConditionalGeneration(LlavaNextConfig(**llava_settings))
        prompt["max_position_embeddings"] = 77
        clip = CLIPModel(CLIPConfig(text_config=prompt, vision_config=vision, projection_dim=prompt["projection_dim"]))
    else:
        llava = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(**llava_settings))
        prompt["max_position_embeddings"] = 64
        clip = SiglipModel(SiglipConfig(text_config=prompt, vision_config={**vision, "vision_use_head": True}))
    return llava.eval(), clip.eval()
# ----------------------------------------------------------------------------------------------------------------------
# Tiny tokenizers and processor (trained on a built-in corpus: deterministic, no download)

TINY_CORPUS = """A person walks into the kitchen, opens the fridge and takes out a bottle of milk.
The man in the red shirt is playing the guitar while a woman sings next to him.
What happens in the video? Describe the video in detail. What color is the car?
Look! Two dogs run across the park and jump over a small wooden fence near the lake.
The camera slowly pans from the mountains to the river, where a boat is sailing.
A child draws a picture of a house with a yellow sun, green grass and blue sky.
Why does the woman laugh at the end? How many people are sitting at the table?
First the chef cuts the onions, then he fries them in a pan with oil and salt.
The players kick the ball to each other, and the goalkeeper catches it at last.
Where is the cat sleeping? It is sleeping on the sofa under a soft white blanket.
Is the light on or off? Which object does the boy pick up after he stands up?
She writes a letter, folds it twice, puts it into an envelope and seals it.
A bird lands on the branch, looks around, sings a short song and flies away.
Answer the question concisely: what is the main event shown in these frames?
Options: (A) cooking (B) dancing (C) reading (D) swimming. The answer is (B).
Numbers 0 1 2 3 4 5 6 7 8 9 appear on the screen, then the video ends quickly.
It's raining; people open their umbrellas, and cars drive slowly through water.
The teacher explains the lesson, and the students take notes in their books.
He says "hello" to a well-known actor - then leaves.
"""
# Letters and digits inside and at the end of words, so that every tiny vocabulary covers them; the LLM tokenizers also
# learn the rest of printable ASCII (the prompt vocabularies have no room for it: unknown characters become their unk).
TINY_CORPUS += "\n".join([string.ascii_letters, " ".join(string.ascii_letters), " ".join(string.digits)])
_LLM_CORPUS_EXTRA = " ".join(string.punctuation)

_LLM_SPECIALS = {"vicuna": ("<unk>", "<s>", "</s>"), "qwen": ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}


def tiny_tokenizer(
    layout: Layout = "vicuna", image_token_id: int = 300, video_token_id: int = 301, corpus: str = TINY_CORPUS
) -> PreTrainedTokenizerBase:
    """A small BPE tokenizer for the LLM of `layout` trained on `corpus`, with `<image>` and `<video>` at the given ids.

    `vicuna`: a `LlamaTokenizer` (Metaspace BPE) with `<unk>`=0 (also padding), `<s>`=1 (added in front), `</s>`=2.
    `qwen`: a `Qwen2Tokenizer` (byte-level BPE) with `<|endoftext|>`=0 (padding), `<|im_start|>`=1, `<|im_end|>`=2 (EOS).
    The vocabulary is trained to fill every id below the two placeholder ids, which must be consecutive.
    """
    first = min(image_token_id, video_token_id)
    if {image_token_id, video_token_id} != {first, first + 1}:
        raise ValueError(
            f"image_token_id and video_token_id must be consecutive, got {image_token_id} and {video_token_id}."
        )
    vocab, merges = _train_llm_bpe(layout, first, corpus)
    vocab = {**vocab, "<image>": image_token_id, "<video>": video_token_id}
    placeholders = {"image_token": "<image>", "video_token": "<video>"}
    unk, bos, eos = _LLM_SPECIALS[layout]
    if layout == "vicuna":
        return LlamaTokenizer(
            vocab=vocab, merges=merges, unk_token=unk, bos_token=bos, eos_token=eos, pad_token=unk, add_bos_token=True,
            extra_special_tokens=placeholders,
        )
    return Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token=eos, pad_token=unk,
        extra_special_tokens={**placeholders, "im_start_token": bos},
    )


def character_tokenizer(layout: Layout = "vicuna") -> PreTrainedTokenizerBase:
    """`tiny_tokenizer` without merges, `<image>` and `<video>` right after its characters: one token per character of
    printable ASCII (`vicuna`) or per byte (`qwen`). Each token of Vicuna's or Qwen2's real vocabulary covers at least
    one character (byte), so for ASCII text this tokenizer never counts fewer tokens than they do: length checks made
    with it hold for the real tokenizers too."""
    alphabet = len(_train_llm_bpe(layout, None)[0])
    return tiny_tokenizer(layout, alphabet, alphabet + 1)


def tiny_prompt_tokenizer(
    layout: Layout = "vicuna", vocab_size: int = 128, corpus: str = TINY_CORPUS
) -> PreTrainedTokenizerBase:
    """A small tokenizer for the prompt encoder of `layout` trained on `corpus`, `vocab_size` ids in all.

    `vicuna`: a `CLIPTokenizer` (lower-cased byte-level BPE with `</w>` word ends) whose `<|startoftext|>` and
    `<|endoftext|>` are the two highest ids, as in CLIP (the CLIP text model pools at the highest id); it pads with
    `<|endoftext|>`. `qwen`: a SigLIP-like tokenizer (lower-cased Metaspace BPE, `<unk>`=0) that appends `</s>`, the
    highest id, and pads with it.
    """
    if layout == "vicuna":
        vocab, merges = _train_prompt_bpe(layout, vocab_size - 2, corpus)
        vocab = {**vocab, "<|startoftext|>": vocab_size - 2, "<|endoftext|>": vocab_size - 1}
        return CLIPTokenizer(vocab=vocab, merges=merges)
    vocab, merges = _train_prompt_bpe(layout, vocab_size - 1, corpus)
    vocab = {**vocab, "</s>": vocab_size - 1}
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = _text_pipeline(layout, "prompt")
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab_size - 1)])
    return TokenizersBackend(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>", pad_token="</s>")


def tiny_processor(config: PPLLaVAConfig | Layout = "vicuna", num_frames: int = 8) -> PPLLaVAProcessor:
    """A `PPLLaVAProcessor` for a tiny model: `config` is a `PPLLaVAConfig` (e.g. from `tiny_config`, with any pooling
    overrides) or a layout name (then `tiny_config(layout)`). Its tokenizers are `tiny_tokenizer` and
    `tiny_prompt_tokenizer`, sized and numbered to match the config; videos are sampled to `num_frames` frames."""
    if isinstance(config, str):
        config = tiny_config(config)
    layout = "qwen" if config.vision_config.model_type == "siglip_vision_model" else "vicuna"
    tokenizer = tiny_tokenizer(layout, config.image_token_id, config.video_token_id)
    prompt_tokenizer = tiny_prompt_tokenizer(layout, config.prompt_encoder_config.vocab_size)
    return PPLLaVAProcessor.from_config(config, tokenizer, prompt_tokenizer, num_frames=num_frames)


def _text_pipeline(layout: Layout, role: str):
    """Normalizer and pre-tokenizer to train the tiny vocabularies with: those of the real tokenizer classes (Metaspace
    split per word for the Llama one, as SentencePiece trains), and a lower-cased Metaspace for the SigLIP-like one."""
    if role == "llm" and layout == "vicuna":
        return None, pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    if role == "prompt" and layout == "qwen":
        return normalizers.Lowercase(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend = (Qwen2Tokenizer if role == "llm" else CLIPTokenizer)().backend_tokenizer
    return backend.normalizer, backend.pre_tokenizer


@functools.cache
def _train_llm_bpe(
    layout: Layout, vocab_size: int | None, corpus: str = TINY_CORPUS
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The tiny LLM vocabulary of `layout` trained on `corpus`, `vocab_size` ids in all (`None`: its special tokens and
    characters only)."""
    if layout not in _LLM_SPECIALS:
        raise ValueError(f"layout must be 'vicuna' or 'qwen', got {layout!r}.")
    tokenizer = Tokenizer(BPE(unk_token=_LLM_SPECIALS[layout][0] if layout == "vicuna" else None))
    tokenizer.normalizer, tokenizer.pre_tokenizer = _text_pipeline(layout, "llm")
    alphabet = pre_tokenizers.ByteLevel.alphabet() if layout == "qwen" else []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size or 0, special_tokens=list(_LLM_SPECIALS[layout]), initial_alphabet=alphabet,
        show_progress=False,
    )
    return _train(tokenizer, trainer, vocab_size, [corpus, _LLM_CORPUS_EXTRA])


@functools.cache
def _train_prompt_bpe(layout: Layout, vocab_size: int, corpus: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    if layout not in _LLM_SPECIALS:
        raise ValueError(f"layout must be 'vicuna' or 'qwen', got {layout!r}.")
    if layout == "vicuna":
        tokenizer = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, end_of_word_suffix="</w>", show_progress=False)
    else:
        tokenizer = Tokenizer(BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>"], show_progress=False)
    tokenizer.normalizer, tokenizer.pre_tokenizer = _text_pipeline(layout, "prompt")
    return _train(tokenizer, trainer, vocab_size, [corpus])


def _train(
    tokenizer, trainer, vocab_size: int | None, texts: list[str]
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train on `texts`; the vocabulary must fill exactly `vocab_size` ids (when given) so that the special ids land
    where the tiny config expects them."""
    tokenizer.train_from_iterator(texts, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab, merges = model["vocab"], [tuple(merge) for merge in model["merges"]]
    if vocab_size is not None and len(vocab) != vocab_size:
        raise ValueError(
            f"The corpus yields {len(vocab)} tokens, not the {vocab_size} requested; pick a smaller "
            "vocabulary (or larger placeholder ids)."
        )
    # The trainer numbers some single characters in hash order: renumber (specials, sorted characters, merges in order).
    specials = [token.content for token in trainer.special_tokens]
    merged = ["".join(merge) for merge in merges]
    characters = sorted(set(vocab) - set(merged) - set(specials))
    ordered = specials + characters + merged
    return {token: index for index, token in enumerate(ordered)}, merges
