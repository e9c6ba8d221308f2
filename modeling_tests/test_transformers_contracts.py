"""The contract of every transformers internal PPLLaVA builds on (`ppllava_hf.models.ppllava.transformers_internals_ppllava`).

Each test states what PPLLaVA relies on; a failure names the transformers change to adapt to, in one place.
"""

import inspect

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers.processing_utils import MultiModalData
from transformers import (
    BitsAndBytesConfig,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaNextProcessor,
    SiglipTextConfig,
    SiglipTextModel,
    SiglipVisionConfig,
)

from ppllava_hf import PPLLaVAProcessor, PPLLaVAVideoProcessor
from ppllava_hf.models.ppllava.processing_ppllava import PPLLaVAProcessorKwargs
from ppllava_hf.models.ppllava.transformers_internals_ppllava import (
    CLIPMLP,
    AutoVideoProcessor,
    CLIPAttention,
    SiglipMLP,
    VideoProcessorMixin,
    replace_text_embeddings,
    slice_logits_to_keep,
    vision_position_embeddings,
)
from ppllava_hf.testing.tiny import tiny_processor


TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 50,
        "bos_token_id": 48, "eos_token_id": 49, "pad_token_id": 1}
VISION = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28,
          "patch_size": 14}


class RecordingEmbeddings(nn.Module):
    """Stand-in text embeddings that record how the text model calls them."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, hidden_size)
        self.calls = []

    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None):
        self.calls.append({"input_ids": input_ids, "position_ids": position_ids})
        return self.token_embedding(input_ids)


@pytest.mark.parametrize("model_class, config_class", [(CLIPTextModel, CLIPTextConfig), (SiglipTextModel, SiglipTextConfig)])
def test_text_models_embed_their_input_through_their_embeddings_submodule(model_class, config_class):
    model = model_class(config_class(**TEXT)).eval()
    embeddings = RecordingEmbeddings(TEXT["vocab_size"], TEXT["hidden_size"])
    replace_text_embeddings(model, embeddings)
    input_ids = torch.tensor([[3, 4, 5, 49]])

    with torch.no_grad():
        first = model(input_ids=input_ids).pooler_output
        embeddings.token_embedding.weight.add_(torch.randn_like(embeddings.token_embedding.weight))
        second = model(input_ids=input_ids).pooler_output

    assert len(embeddings.calls) == 2, (
        f"{model_class.__name__}.forward no longer calls `self.embeddings(input_ids=..., position_ids=...)` once: "
        "PPLLaVA's extended position tables (replace_text_embeddings) are not used"
    )
    assert torch.equal(embeddings.calls[0]["input_ids"], input_ids)
    assert not torch.allclose(first, second), "the text model's output no longer depends on its embeddings submodule"
    assert model.get_input_embeddings() is embeddings.token_embedding


def test_replacing_the_embeddings_of_a_model_without_them_names_the_change():
    with pytest.raises(TypeError, match="changed the layout of its text models"):
        replace_text_embeddings(nn.Linear(2, 2), RecordingEmbeddings(5, 2))


def test_clip_vision_position_table_is_what_the_embeddings_add():
    """The BT-Adapter adds CLIP's vision position table to its branch tokens, as the original does."""
    tower = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    pixels = torch.randn(2, 3, 28, 28)
    table = vision_position_embeddings(tower)

    with torch.no_grad():
        with_table = tower.embeddings(pixels)
        table_copy = table.clone()
        table.zero_()
        without_table = tower.embeddings(pixels)
        table.copy_(table_copy)

    assert table.shape == (1 + 4, VISION["hidden_size"])
    torch.testing.assert_close(with_table - without_table, table_copy.expand_as(with_table))


def test_clip_attention_and_mlp_blocks_keep_their_call_signature():
    """The BT-Adapter's layers are CLIP's attention and MLP: hidden states in, hidden states (and weights) out."""
    config = CLIPVisionConfig(**VISION)
    config._attn_implementation = "sdpa"
    hidden = torch.randn(3, 5, VISION["hidden_size"])
    attended, weights = CLIPAttention(config)(hidden)
    assert attended.shape == hidden.shape
    assert CLIPMLP(config)(hidden).shape == hidden.shape
    assert {name for name, _ in CLIPAttention(config).named_parameters()} >= {"q_proj.weight", "k_proj.weight",
                                                                                 "v_proj.weight", "out_proj.weight"}


def test_siglip_mlp_keeps_its_call_signature():
    config = SiglipVisionConfig(**VISION)
    hidden = torch.randn(3, 5, VISION["hidden_size"])
    assert SiglipMLP(config)(hidden).shape == hidden.shape
    assert {name for name, _ in SiglipMLP(config).named_parameters()} == {"fc1.weight", "fc1.bias", "fc2.weight",
                                                                            "fc2.bias"}


def test_slice_logits_to_keep_keeps_the_last_positions_or_the_given_ones():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    torch.testing.assert_close(slice_logits_to_keep(hidden, 0), hidden)
    torch.testing.assert_close(slice_logits_to_keep(hidden, 2), hidden[:, -2:])
    torch.testing.assert_close(slice_logits_to_keep(hidden, torch.tensor([0, 3])), hidden[:, [0, 3]])


def test_video_processor_mixin_sets_settings_as_attributes_and_calls_preprocess():
    """PPLLaVA's video processor relies on the mixin's `__init__` storing every setting and `__call__` -> `preprocess`."""
    processor = PPLLaVAVideoProcessor(num_frames=3, size={"height": 28, "width": 28})
    assert isinstance(processor, VideoProcessorMixin)
    assert processor.num_frames == 3 and processor.frame_size == (28, 28)
    video = np.random.default_rng(0).integers(0, 255, (5, 20, 24, 3), dtype=np.uint8)
    assert processor(video, do_sample_frames=True)["pixel_values_videos"].shape == (1, 3, 3, 28, 28)


def test_auto_video_processor_takes_registrations():
    assert callable(AutoVideoProcessor.register) and callable(AutoVideoProcessor.from_pretrained)


def test_processors_expand_image_placeholders_through_the_process_images_hook():
    """`PPLLaVAProcessor._process_images` overrides `ProcessorMixin`'s hook (as transformers' own processors do) for the
    multi-image mode: `__call__` must hand it the images and every images option, the processor's own included, then
    expand the i-th `<image>` with the i-th returned replacement and return the processed outputs."""
    calls = []

    class RecordingProcessor(PPLLaVAProcessor):
        def _process_images(self, images, **kwargs):
            calls.append((images, kwargs))
            return {"pixel_values_multi_image": [torch.zeros(1, 3, 84, 84)]}, [self.image_token * 3]

    base = tiny_processor("vicuna")
    processor = RecordingProcessor(base.image_processor, base.video_processor, base.tokenizer, base.prompt_tokenizer)
    image = Image.new("RGB", (84, 84))
    outputs = processor(text="<image> What is it?", images=[image], multi_image=True)
    [(images, kwargs)] = calls
    assert images == [[image]] and kwargs["multi_image"] == [True]
    assert int((outputs["input_ids"] == processor.image_token_id).sum()) == 3
    assert "pixel_values_multi_image" in outputs


def test_the_token_count_hook_returns_multimodal_data_and_merges_flat_options_into_their_modality():
    """`PPLLaVAProcessor._get_num_multimodal_tokens(image_sizes=, video_sizes=, **options)` is the hook transformers'
    processors implement for serving engines: they read `num_image_tokens`, `num_image_patches`, `num_video_tokens`
    from a `MultiModalData`, and the options reach it flat, which `ProcessorMixin._merge_kwargs` sorts by modality."""
    assert "image_sizes" in inspect.signature(LlavaNextProcessor._get_num_multimodal_tokens).parameters
    data = MultiModalData(num_image_tokens=[3], num_image_patches=[1], num_video_tokens=[5])
    assert "num_video_tokens" in data and data["num_image_tokens"] == [3] and "num_audio_tokens" not in data
    merged = tiny_processor("vicuna")._merge_kwargs(PPLLaVAProcessorKwargs, max_visual_tokens=8, multi_image=True)
    assert merged["videos_kwargs"]["max_visual_tokens"] == 8 and merged["images_kwargs"]["multi_image"] is True


class KeepingFirstLayer(LlamaForCausalLM):
    """Declares its first decoder layer the way PPLLaVA declares its visual side, and the second by a short name."""

    _keep_in_fp32_modules = ["model.layers.0", "layers.1"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantizers_skip_keep_in_fp32_modules_by_path_prefix_and_upcast_them_for_float16_only(tmp_path, dtype):
    """PPLLaVA keeps its visual side out of bitsandbytes with `_keep_in_fp32_modules` (read by every transformers
    quantizer through `HfQuantizer.get_modules_to_not_convert`), as module paths from the model's root. The
    non-strict list changes no dtype at bfloat16 (or float32); only a float16 load keeps those modules in float32.
    If this fails, transformers changed how quantizers pick the modules they leave alone: see the class attributes
    of `PPLLaVAModel` / `PPLLaVAForConditionalGeneration`."""
    bnb = pytest.importorskip("bitsandbytes", reason="the `quant` extra (bitsandbytes) is not installed")
    config = LlamaConfig(**{**TEXT, "num_hidden_layers": 3, "num_key_value_heads": 2, "head_dim": 8})
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = KeepingFirstLayer.from_pretrained(tmp_path, dtype=dtype, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    quantized = {name.split(".")[2] for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    assert quantized == {"1", "2"}  # "layers.1" matches neither a path from the root nor a module's name suffix
    kept = {param.dtype for param in model.model.layers[0].parameters()}
    assert kept == {torch.float32 if dtype == torch.float16 else dtype}
    assert model.model.layers[2].input_layernorm.weight.dtype == dtype


def test_loading_info_lists_mismatched_keys_with_checkpoint_then_model_shape(tmp_path):
    """`PPLLaVAPreTrainedModel.from_pretrained` loads with `ignore_mismatched_sizes=True, output_loading_info=True` and
    names each reshaped weight from `mismatched_keys`, read as `(key, checkpoint shape, model shape)`. If this fails,
    transformers changed that entry of the loading info: adapt the error in `from_pretrained`."""
    LlamaForCausalLM(LlamaConfig(**TEXT)).save_pretrained(tmp_path)
    wider = LlamaConfig(**{**TEXT, "vocab_size": TEXT["vocab_size"] + 2})
    _, info = LlamaForCausalLM.from_pretrained(tmp_path, config=wider, ignore_mismatched_sizes=True,
                                               output_loading_info=True)
    vocab, hidden = TEXT["vocab_size"], TEXT["hidden_size"]
    assert sorted((key, tuple(saved), tuple(model)) for key, saved, model in info["mismatched_keys"]) == [
        ("lm_head.weight", (vocab, hidden), (vocab + 2, hidden)),
        ("model.embed_tokens.weight", (vocab, hidden), (vocab + 2, hidden)),
    ]
