"""bitsandbytes 4-bit / 8-bit loading (its CPU back-end) and QLoRA: only the language model's linear layers are
quantized, the visual side is the unquantized model's, a QLoRA step of either example trains only the adapters, and
the adapter reloads and merges into the unquantized base."""

import pytest
import torch
from peft import PeftModel
from recorded_training import example_trainer
from tolerances import float32_forward, rounding_tolerance
from training_tester import (  # noqa: F401  (single_threaded: a module fixture)
    NUM_FRAMES,
    needs_training_release,
    single_threaded,
    snapshot,
    tiny_model_and_processor,
)
from transformers import AutoModel, AutoModelForImageTextToText, BitsAndBytesConfig

from ppllava_hf.testing.tiny_training_data import color_frames
from ppllava_hf.training.common import ADAPTER_FOLDER, is_quantized, save_trained_model


bnb = pytest.importorskip("bitsandbytes", reason="the `quant` extra (bitsandbytes) is not installed")

QUANTIZED_LINEAR = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
QUANTIZATION = {4: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16),
                8: BitsAndBytesConfig(load_in_8bit=True)}
QLORA_FLAGS = ("--use_cpu", "True", "--load_in_4bit", "True", "--use_peft", "True", "--lora_r", "8", "--lora_dropout", "0",
               "--max_steps", "1", "--tiny_rows", "2", "--warmup_steps", "0", "--report_to", "none", "--disable_tqdm", "True")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model, processor = tiny_model_and_processor()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval(), processor


def video_inputs(processor):
    return processor(text="USER: <video>\nWhat color is the video? ASSISTANT:", videos=[color_frames("red", NUM_FRAMES)])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("auto_class, prefix", [(AutoModelForImageTextToText, "model."), (AutoModel, "")])
def test_a_quantized_load_converts_the_language_models_linear_layers_only(tiny_folder, bits, auto_class, prefix):
    folder, reference, _ = tiny_folder
    model = auto_class.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=QUANTIZATION[bits])
    quantized = {name for name, module in model.named_modules() if isinstance(module, QUANTIZED_LINEAR)}
    language_model_linear = {
        prefix + name.removeprefix("model.")
        for name, module in reference.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith("model.language_model.")
    }
    assert quantized == language_model_linear
    unquantized = {name: param for name, param in model.named_parameters() if name.rsplit(".", 1)[0] not in quantized}
    assert {param.dtype for param in unquantized.values()} == {torch.bfloat16}  # the visual side, lm_head, norms, embeddings
    assert any(name.startswith(f"{prefix}vision_tower.") for name in unquantized)


def test_an_unknown_4bit_quant_type_is_refused_by_name_before_loading(tiny_folder, monkeypatch):
    folder, _, _ = tiny_folder
    monkeypatch.setattr(bnb.functional, "quantize_4bit", lambda *args, **kwargs: pytest.fail("a weight was quantized"))
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf5")
    with pytest.raises(ValueError, match=r"quant_type='nf5'\) is not a 4-bit type bitsandbytes knows: use 'nf4' or "):
        AutoModelForImageTextToText.from_pretrained(folder, quantization_config=quantization)


def test_a_4bit_model_encodes_videos_exactly_as_the_unquantized_one_and_generates(tiny_folder):
    folder, reference, processor = tiny_folder
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, quantization_config=QUANTIZATION[4])
    inputs = video_inputs(processor)
    visual = {key: inputs[key] for key in ("clip_input_ids", "clip_attention_mask")}
    with torch.no_grad():
        expected = reference.get_video_features(inputs["pixel_values_videos"], **visual).pooler_output
        features = model.get_video_features(inputs["pixel_values_videos"], **visual).pooler_output
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(features, expected))
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 3


def model_inputs(trainer) -> dict:
    batch = trainer.data_collator([trainer.train_dataset[0]])
    return {key: value for key, value in batch.items() if key not in ("completion_mask", "labels")}


@needs_training_release
@pytest.mark.parametrize("kind", ["dpo", "sft"])
def test_a_qlora_step_of_the_example_trains_only_the_adapters(kind, tmp_path):
    trainer = example_trainer(kind, tmp_path, *QLORA_FLAGS)
    assert is_quantized(trainer.model)
    before = snapshot(trainer.model)
    trainer.train()
    changed = {name for name, param in trainer.model.named_parameters() if not torch.equal(before[name], param)}
    assert changed and all(".lora_" in name and ".language_model." in name for name in changed)
    assert any("lora_B" in name for name in changed)  # lora_B starts at zero: the adapter now does something


@needs_training_release
def test_a_qlora_adapter_reloads_onto_the_quantized_base_and_merges_into_the_unquantized_one(tmp_path):
    trainer = example_trainer("sft", tmp_path, *QLORA_FLAGS)
    trainer.train()
    inputs = model_inputs(trainer)
    with torch.no_grad():
        adapted = trainer.model.eval()(**inputs).logits
        with trainer.model.disable_adapter():
            contribution = adapted - trainer.model(**inputs).logits  # what the adapter adds to the logits
    save_trained_model(trainer)
    base_folder = trainer.model.peft_config["default"].base_model_name_or_path

    quantization = trainer.model.get_base_model().config.quantization_config  # the example's: trl's NF4 settings
    quantized_base = AutoModelForImageTextToText.from_pretrained(base_folder, quantization_config=quantization)
    reloaded = PeftModel.from_pretrained(quantized_base, tmp_path / ADAPTER_FOLDER).eval()
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    unmerged = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_folder), tmp_path / ADAPTER_FOLDER)
    assert not is_quantized(merged) and getattr(merged.config, "quantization_config", None) is None
    assert {param.dtype for param in merged.parameters()} == {torch.float32}  # the dtype the base was loaded in
    with torch.no_grad():
        # trl trains QLoRA adapters in bfloat16 and peft reloads them upcast to float32: the adapter's input, its two
        # products and its output each round to bfloat16 in training, so the two differ by a few bfloat16 roundings of
        # the adapter's contribution (and the same NF4 codes of the base on both sides).
        torch.testing.assert_close(
            reloaded(**inputs).logits, adapted, **rounding_tolerance(torch.bfloat16, 4, contribution)
        )
        for name, param in reloaded.named_parameters():
            if ".lora_" in name:
                param.data = param.data.to(torch.bfloat16)
        # In training's dtype, the reloaded adapter computes exactly what the trained one did, up to float32 rounding.
        torch.testing.assert_close(
            reloaded(**inputs).logits, adapted, **float32_forward(adapted)
        )
        # Merged into float32 weights (W + scale * B @ A) against applied on the side (W x + scale * B (A x)).
        torch.testing.assert_close(
            merged(**inputs).logits,
            unmerged.eval()(**inputs).logits,
            **float32_forward(adapted),
        )
